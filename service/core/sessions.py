"""The session verbs of one model: get, put, reset, delete, migrate, across its versions.

A session in memory is changed under its lane's lock; one only in the store
under a claim on its id (so no store read or other verb on it runs meanwhile).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from service.core.engine import Engine
from service.core.lane import Lane
from service.core.model import MOVES, ServedModel
from service.core.types import CannotMove, InvalidRequest
from service.state.table import SessionSnapshot
from service.store.base import StoredRows, StoreLayout


@dataclass(frozen=True)
class Found:
    """A session as read: its snapshot, the version it is pinned to, that version's states."""

    snapshot: SessionSnapshot
    version: int
    state_names: tuple[str, ...]


def _found(lane: Lane, snap: SessionSnapshot) -> Found:
    return Found(snap, lane.version, lane.spec.state_names)


def _from_rows(rows: StoredRows, layout: StoreLayout) -> Found:
    states, output = layout.split(rows.blob[:1])
    snap = SessionSnapshot(
        session_id=rows.session_ids[0],
        step=int(rows.step[0]),
        last_seq=int(rows.last_seq[0]),
        states=tuple(s[0].copy() for s in states),
        output=output[0].copy(),
        created=float(rows.created[0]),
        updated=float(rows.updated[0]),
    )
    return Found(snap, rows.version, layout.state_names)


class Sessions:
    """One model's session verbs."""

    def __init__(self, engine: Engine, model: ServedModel):
        self.engine = engine
        self.model = model
        self.store = model.store

    async def _stored(self, session_id: str) -> StoredRows | None:
        if not self.store.persistent:
            return None
        found = await self.store.read(self.store.store.load, self.model.name, [session_id])
        return found[0] if found else None

    def _layout(self, version: int) -> StoreLayout:
        layout = self.model.layout_of(version)
        if layout is None:
            raise CannotMove(f"{self.model.name!r} version {version} has no recorded layout")
        return layout

    async def get(self, session_id: str) -> Found | None:
        """In memory, else as stored (always as stored with a shared store: another replica
        may have moved it on)."""
        resident = self.model.resident(session_id)
        if resident is not None and not self.store.shared:
            lane, slot = resident
            return _found(lane, lane.table.snapshot(slot))
        rows = await self._stored(session_id)
        return None if rows is None else _from_rows(rows, self._layout(rows.version))

    async def has(self, session_id: str) -> bool:
        return self.model.resident(session_id) is not None or (
            await self._stored(session_id) is not None
        )

    async def put(
        self,
        session_id: str,
        step: int,
        last_seq: int,
        states: Mapping[str, Sequence[float] | np.ndarray],
        version: int = 0,
    ) -> Found:
        """Create or overwrite a session (``version``: where a new one starts; an existing one
        stays on its own, so naming another is refused)."""
        model = self.model
        while True:
            resident = model.resident(session_id)
            if resident is not None:
                lane = resident[0]
                self._same_version(lane.version, version)
                rows = _state_rows(lane, states)
                async with lane.cache.lock:
                    slot = lane.table.index.get(session_id)
                    if slot is None:
                        continue  # evicted meanwhile: look again
                    snap = await lane.cache.put(slot, session_id, step, last_seq, rows, None)
                    return _found(lane, snap)
            if not self.store.persistent:
                lane = model.lane(version)
                rows = _state_rows(lane, states)
                async with lane.cache.lock:
                    if model.resident(session_id) is not None:
                        continue
                    snap = await lane.cache.put(None, session_id, step, last_seq, rows, None)
                    return _found(lane, snap)
            async with model.claims.claim([session_id]):
                if model.resident(session_id) is not None:
                    continue
                stored = await self._stored(session_id)
                created = None
                if stored is not None:
                    self._same_version(stored.version, version)
                    created = float(stored.created[0])
                    pinned = model.lanes.get(stored.version)
                    lane = pinned if pinned is not None else model.lane(0)
                else:
                    lane = model.lane(version)
                rows = _state_rows(lane, states)
                async with lane.cache.lock:
                    snap = await lane.cache.put(None, session_id, step, last_seq, rows, created)
                return _found(lane, snap)

    def _same_version(self, pinned: int, asked: int) -> None:
        if asked and asked != pinned:
            raise CannotMove(
                f"the session runs on version {pinned} of {self.model.name!r}, not {asked}; "
                "MigrateSession moves it"
            )

    async def reset(self, session_id: str) -> Found | None:
        """Zero a session's state, keeping its counters."""
        model = self.model
        while True:
            resident = model.resident(session_id)
            if resident is not None:
                lane = resident[0]
                async with lane.cache.lock:
                    slot = lane.table.index.get(session_id)
                    if slot is None:
                        continue
                    return _found(lane, await lane.cache.reset(slot))
            if not self.store.persistent:
                return None
            async with model.claims.claim([session_id]):
                if model.resident(session_id) is not None:
                    continue
                rows = await self._stored(session_id)
                if rows is None:
                    return None
                rows.blob = np.zeros_like(rows.blob)
                rows.updated = np.array([time.time()])
                await self.store.write(self.store.store.save, model.name, rows)
                return _from_rows(rows, self._layout(rows.version))

    async def delete(self, session_id: str) -> Found | None:
        """Drop a session, from the store too; its last state."""
        model = self.model
        while True:
            resident = model.resident(session_id)
            if resident is not None:
                lane = resident[0]
                async with lane.cache.lock:
                    if session_id not in lane.table.index:
                        continue
                    snap = await lane.cache.delete(session_id)
                    assert snap is not None
                    return _found(lane, snap)
            if not self.store.persistent:
                return None
            async with model.claims.claim([session_id]):
                if model.resident(session_id) is not None:
                    continue
                rows = await self._stored(session_id)
                if rows is None:
                    return None
                await self.store.write(self.store.store.delete, model.name, [session_id])
                return _from_rows(rows, self._layout(rows.version))

    async def migrate(self, session_id: str, to_version: int, mode: str) -> Found | None:
        """Move one session to another version now, stored at once; None when there is none."""
        model = self.model
        mode = mode or model.policy.move_of(None)
        if mode not in MOVES:
            raise InvalidRequest(f"mode {mode!r}; expected one of {', '.join(MOVES)}")
        target = model.lane(to_version)
        while True:
            resident = model.resident(session_id)
            if resident is not None:
                lane = resident[0]
                if lane is target:
                    return _found(lane, lane.table.snapshot(resident[1]))
                self._can_move(lane.layout, target, mode)
                moved = await self.engine.move(model, [session_id], lane, target, mode, True)
                if not moved:
                    continue
                found = model.resident(session_id)
                if found is None:
                    continue
                return _found(found[0], found[0].table.snapshot(found[1]))
            if not self.store.persistent:
                return None
            async with model.claims.claim([session_id]):
                if model.resident(session_id) is not None:
                    continue
                rows = await self._stored(session_id)
                if rows is None:
                    return None
                if rows.version == target.version:
                    return _from_rows(rows, target.layout)
                source = self._layout(rows.version)
                self._can_move(source, target, mode)
                placed = await model.transform(rows, source, target, mode)
                placed.updated = np.array([time.time()])
                await self.store.write(self.store.store.save, model.name, placed)
                model.metrics.migrations.labels(model.name, mode).inc()
                return _from_rows(placed, target.layout)

    @staticmethod
    def _can_move(source: StoreLayout, target: Lane, mode: str) -> None:
        if mode == "carry" and not source.same_states(target.layout):
            raise CannotMove(
                f"carry needs the same states on both versions: {source.describe()} vs "
                f"{target.layout.describe()}"
            )
        if mode == "replay" and not source.replay_events:
            raise CannotMove(
                "replay needs the session's kept events: the model's config must keep them "
                "(retire_policy replay with replay_events)"
            )


def _state_rows(
    lane: Lane, states: Mapping[str, Sequence[float] | np.ndarray]
) -> list[np.ndarray | None]:
    """Given states as the version's rows (None: zeros); InvalidRequest for a bad one."""
    spec = lane.spec
    unknown = [name for name in states if name not in spec.state_names]
    if unknown:
        layout = ", ".join(f"{n}[{k}]" for n, k in zip(spec.state_names, spec.state_sizes))
        raise InvalidRequest(f"the model has no state {unknown[0]!r}; its states are {layout}")
    rows: list[np.ndarray | None] = [None] * len(spec.state_names)
    for i, (name, size) in enumerate(zip(spec.state_names, spec.state_sizes)):
        values = states.get(name)
        if values is None or not len(values):
            continue
        array = np.asarray(values, np.float32).reshape(-1)
        if array.size != size:
            raise InvalidRequest(f"{name} has {array.size} values; the model's {name} has {size}")
        if not np.isfinite(array).all():
            raise InvalidRequest(f"{name} contains NaN or Inf")
        rows[i] = array
    return rows
