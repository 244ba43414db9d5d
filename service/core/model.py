"""A served model: its versions (lanes), where each session runs, and moves between versions.

A session is pinned to the version it started on. When a version retires, its
sessions follow the model's retire policy: ``drain`` (they stay; new sessions
start on the newest version), ``carry`` (state as is), ``reset`` (zero state) or
``replay`` (the kept events run again on the new version from zero state). A
move is a deterministic function of a session's stored row and the policy, so a
move made in memory is stored with the session's next event, and a restart
before then makes the same move again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from service.core.lane import Lane
from service.core.types import CannotMove, UnknownModel
from service.metrics import Metrics
from service.state.cache import Claims, StoreAccess
from service.state.table import SessionSnapshot
from service.store.base import StoredRows, StoreLayout

log = logging.getLogger(__name__)

RETIRE_POLICIES = ("drain", "carry", "reset", "replay")
MOVES = ("carry", "reset", "replay")

Runner = Callable[
    [Lane, np.ndarray, list[np.ndarray]], Awaitable[tuple[np.ndarray, list[np.ndarray]]]
]
"""Runs one batch on a lane's runtime, in the engine's run thread: ``(output, states)``."""


@dataclass(frozen=True)
class RetirePolicy:
    """What happens to a version's sessions when the version leaves (a model's config)."""

    policy: str = "drain"
    after_s: float = 0.0
    """drain: after this long, the sessions left move by reset (0: never)."""
    replay_events: int = 0
    """replay: events kept per session."""

    def move_of(self, retiring: str | None) -> str:
        """How a session of a version retiring with ``retiring`` moves when it must."""
        policy = retiring or self.policy
        return "reset" if policy == "drain" else policy


class ServedModel:
    """One model's lanes; sessions are found, placed and moved here."""

    def __init__(
        self, name: str, policy: RetirePolicy, store: StoreAccess, metrics: Metrics, run: Runner
    ):
        self.name = name
        self.policy = policy
        self.store = store
        self.metrics = metrics
        self.run = run
        self.claims = Claims()
        self.lanes: dict[int, Lane] = {}
        self.newest: Lane | None = None
        """Where new sessions start: the highest version that is not retiring."""
        self.by_age: list[Lane] = []
        """Every lane, newest version first."""
        self.moving: set[str] = set()
        """Sessions on their way to another version: their new events wait (parked)."""
        self.closed = False
        """Being unloaded: takes no new events."""

    # -- lanes -----------------------------------------------------------------------

    def add(self, lane: Lane) -> None:
        self.lanes[lane.version] = lane
        self._ordered()

    def retire(self, lane: Lane, policy: str | None) -> None:
        """Mark a lane retiring with ``policy`` (None: serving again)."""
        lane.retiring = policy
        self._ordered()

    def drop(self, lane: Lane) -> None:
        lane.unloaded = True
        del self.lanes[lane.version]
        self._ordered()

    def _ordered(self) -> None:
        self.by_age = sorted(self.lanes.values(), key=lambda lane: -lane.version)
        serving = [lane for lane in self.by_age if lane.retiring is None]
        self.newest = serving[0] if serving else None

    def lane(self, version: int) -> Lane:
        """The lane new sessions go to: ``version``'s, or the newest (version 0)."""
        if not version:
            if self.newest is None:
                raise UnknownModel(f"model {self.name!r} has no version ready")
            return self.newest
        lane = self.lanes.get(version)
        if lane is None or lane.retiring is not None:
            raise UnknownModel(f"model {self.name!r} has no version {version} ready")
        return lane

    def resident(self, session_id: str) -> tuple[Lane, int] | None:
        """The lane whose table holds the session, and its row."""
        for lane in self.by_age:
            slot = lane.table.index.get(session_id)
            if slot is not None:
                return lane, slot
        return None

    def layout_of(self, version: int) -> StoreLayout | None:
        lane = self.lanes.get(version)
        if lane is not None:
            return lane.layout
        return self.store.store.layouts(self.name).get(version)

    # -- sessions read from the store ----------------------------------------------------

    async def place(
        self, found: Sequence[StoredRows], requested: dict[str, int]
    ) -> list[tuple[Lane, StoredRows]]:
        """Where each stored session runs now, as rows of that lane's layout.

        A session pinned to a version that serves (or drains) goes back to it;
        one pinned to a version that left (or retires by moving) moves to the
        newest version by the model's policy.
        """
        out = []
        for rows in found:
            lane = self.lanes.get(rows.version)
            if lane is not None and lane.retiring in (None, "drain"):
                out.append((lane, rows))
                continue
            mode = self.policy.move_of(lane.retiring if lane is not None else None)
            target = self.lane(0)
            source = self.layout_of(rows.version)
            if source is None:
                raise CannotMove(f"{self.name!r} version {rows.version} has no recorded layout")
            moved = await self.transform(rows, source, target, mode)
            self.metrics.migrations.labels(self.name, mode).inc(len(rows))
            out.append((target, moved))
        del requested  # new sessions' versions are chosen by admission
        return out

    async def transform(
        self, rows: StoredRows, source: StoreLayout, target: Lane, mode: str
    ) -> StoredRows:
        """Stored rows of ``source`` as rows of ``target``, moved by ``mode``.

        Counters, times and the last output are kept: the client sees one
        continuous session. ``carry`` needs both layouts' states alike (else the
        sessions move by reset); ``replay`` runs each session's kept events on
        the target from zero state (batched across sessions).
        """
        n = len(rows)
        layout = target.layout
        states, output = source.split(rows.blob)
        if mode == "carry" and not source.same_states(layout):
            log.warning(
                "%s: version %d's state layout differs from version %d's; its sessions move "
                "by reset instead of carry",
                self.name,
                rows.version,
                target.version,
            )
            mode = "reset"
        new_states = [np.zeros((n, k), np.float32) for k in layout.state_sizes]
        new_output = np.zeros((n, layout.output_size), np.float32)
        if output.shape[1] == layout.output_size:
            new_output[:] = output
        kept = source.kept(rows.blob)
        if mode == "carry":
            new_states = [np.array(s, np.float32) for s in states]
        elif mode == "replay" and kept is not None:
            new_states, last = await self._replay(target, source, kept)
            ran = last is not None
            if ran:
                assert last is not None
                new_output = np.where(last[1][:, None], last[0], new_output)
        new_kept = None
        if (
            layout.replay_events
            and kept is not None
            and layout.replay_events == source.replay_events
        ):
            new_kept = kept.copy()
        if mode == "reset" and new_kept is not None:
            new_kept[:, -1] = 0  # a new sequence: nothing kept to replay
        blob = layout.join(new_states, new_output, new_kept)
        return StoredRows(
            rows.session_ids,
            rows.step,
            rows.last_seq,
            blob,
            rows.created,
            rows.updated,
            target.version,
        )

    async def _replay(
        self, target: Lane, source: StoreLayout, kept: np.ndarray
    ) -> tuple[list[np.ndarray], tuple[np.ndarray, np.ndarray] | None]:
        """Run each row's kept events (oldest first) on ``target`` from zero state.

        Returns the states after them, and the last output of each row with whether it has one.
        """
        n = kept.shape[0]
        size, k = source.event_size, source.replay_events
        events = kept[:, :-2].reshape(n, k, size)
        head = kept[:, -2].astype(np.int64)
        count = kept[:, -1].astype(np.int64)
        layout = target.layout
        states = [np.zeros((n, w), np.float32) for w in layout.state_sizes]
        last = np.zeros((n, layout.output_size), np.float32)
        for t in range(int(count.max()) if n else 0):
            active = np.flatnonzero(count > t)
            at = (head[active] - count[active] + t) % k
            values = np.ascontiguousarray(events[active, at])
            output, new = await self.run(target, values, [s[active] for s in states])
            for s, v in zip(states, new):
                s[active] = v
            last[active] = output
        return states, (last, count > 0)

    # -- moving sessions in memory --------------------------------------------------------

    async def move(
        self, session_ids: list[str], source: Lane, target: Lane, mode: str, persist: bool = False
    ) -> list[str]:
        """Move sessions of ``source`` to ``target`` now; the ones moved. Their new events
        wait (``moving``) until the caller releases them. With ``persist`` the moved rows
        are stored at once (else with each session's next event)."""
        mine = [sid for sid in dict.fromkeys(session_ids) if sid not in self.moving]
        self.moving.update(mine)
        try:
            await source.settled(mine)
            async with self.claims.claim(mine):
                first, second = sorted((source, target), key=lambda lane: lane.version)
                async with first.cache.lock, second.cache.lock:
                    return await self._move_now(mine, source, target, mode, persist)
        finally:
            self.moving.difference_update(mine)

    async def _move_now(
        self, session_ids: list[str], source: Lane, target: Lane, mode: str, persist: bool
    ) -> list[str]:
        slots = source.table.lookup(session_ids)
        ids = [sid for sid, slot in zip(session_ids, slots.tolist()) if slot >= 0]
        if not ids:
            return []
        slots = slots[slots >= 0]
        rows = source.table.stored_rows(slots, source.layout, source.version)
        moved = await self.transform(rows, source.layout, target, mode)
        if persist and self.store.persistent:
            moved.updated = np.full(len(moved), time.time())
            await self.store.write(self.store.store.save, self.name, moved)
        for sid in ids:
            source.table.remove(sid)
        target.table.create_many(ids, time.time())
        target.table.restore(target.table.lookup(ids), moved, target.layout)
        self.metrics.migrations.labels(self.name, mode).inc(len(ids))
        return ids

    def snapshot(self, session_id: str) -> tuple[SessionSnapshot, int] | None:
        found = self.resident(session_id)
        if found is None:
            return None
        lane, slot = found
        return lane.table.snapshot(slot), lane.version

    def live_sessions(self, tenant: str) -> int:
        return sum(lane.table.tenant_count(tenant) for lane in self.by_age)
