"""Parking: events that wait while their sessions are read from the store or moved.

Parked events keep their place in their requests; once their sessions are
placed (restored, created, moved), ``release`` queues them in their lanes'
pools in arrival order, and the ones whose sessions could not be placed get
their refusal.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np

from service.core.lane import Lane
from service.core.model import ServedModel
from service.core.newids import within_caps
from service.core.pool import Events, Pool, select
from service.core.results import Intakes
from service.core.types import INTERNAL_ERROR, OUTCOME, STORE_FAILED, Code, Failure
from service.metrics import Metrics
from service.state.cache import StoreUnavailable
from service.store.base import StoredRows

log = logging.getLogger(__name__)


class Parking:
    """One model's parked events, and the sessions being read from the store."""

    def __init__(self, model: ServedModel, intakes: Intakes, metrics: Metrics):
        self.model = model
        self.intakes = intakes
        self.metrics = metrics
        self.parked: Pool | None = None
        """Events waiting for their sessions to be read from the store or moved (slots -1)."""
        self._parked_ids: list[str] = []
        self._parked_versions: list[int] = []
        self._cold: set[str] = set()
        """Ids being read from the store."""

    @property
    def waiting(self) -> int:
        """Parked events."""
        return len(self.parked) if self.parked is not None else 0

    def park(
        self,
        rows: np.ndarray,
        ids: list[str],
        versions: list[int],
        columns: dict[str, np.ndarray],
        key: int,
        by_position: bool = True,
    ) -> list[str]:
        """Park the events at ``rows`` of intake ``key``; the ids among them to read from the
        store now. ``columns`` are the intake's (``by_position``) or already those events'."""
        if self.parked is None:
            self.parked = Pool(columns["values"].shape[1])

        def at(name: str) -> np.ndarray:
            return columns[name][rows] if by_position else columns[name]

        self.parked.extend(
            slots=np.full(rows.size, -1, np.int64),
            values=at("values"),
            seqs=at("seqs"),
            resets=at("resets"),
            t0=at("t0"),
            intake=np.full(rows.size, key, np.int64),
            row=rows,
            job=at("job"),
        )
        self._parked_ids += ids
        self._parked_versions += versions
        moving = self.model.moving
        new = [sid for sid in dict.fromkeys(ids) if sid not in self._cold and sid not in moving]
        self._cold.update(new)
        return new

    def repark(self, events: Events, ids: list[str]) -> list[str]:
        """Park pending events again (their sessions must be read anew); the ids to read."""
        if not ids:
            return []
        versions = [
            self.intakes.version_asked(key, job)
            for key, job in zip(events["intake"].tolist(), events["job"].tolist())
        ]
        columns = {name: events[name] for name in ("values", "seqs", "resets", "t0", "job")}
        # Each event keeps its own intake and row: park them one intake at a time.
        out: list[str] = []
        for key in dict.fromkeys(events["intake"].tolist()):
            mine = np.flatnonzero(events["intake"] == key)
            cols = {name: column[mine] for name, column in columns.items()}
            out += self.park(
                events["row"][mine],
                [ids[i] for i in mine.tolist()],
                [versions[i] for i in mine.tolist()],
                cols,
                key,
                by_position=False,
            )
        return out

    async def restore(self, session_ids: list[str]) -> None:
        """Read sessions not in memory from the store (claimed meanwhile), place each on its
        version (or move it by the policy), then queue their parked events.

        Off the run loop: warm sessions keep being answered meanwhile.
        """
        model = self.model
        try:
            async with model.claims.claim(session_ids):
                lane = model.newest or model.by_age[0]
                try:
                    found = await lane.cache.load(session_ids)
                except StoreUnavailable:
                    self.fail_parked(session_ids, (Code.UNAVAILABLE, STORE_FAILED))
                    return
                placed = await model.place(found, self.requested(session_ids))
                refused = self.create_loaded(session_ids, placed)
                self.release(session_ids, refused)
        except Exception:
            log.exception("restoring sessions failed")
            self.fail_parked(session_ids, (Code.INTERNAL, INTERNAL_ERROR))

    async def move(
        self, session_ids: list[str], source: Lane, target: Lane, mode: str, persist: bool
    ) -> list[str]:
        """Move sessions between versions; their events that waited meanwhile queue after."""
        try:
            return await self.model.move(session_ids, source, target, mode, persist)
        finally:
            self.release(session_ids, {})

    def reread(self, lane: Lane, session_ids: list[str]) -> list[str]:
        """Another replica moved these sessions to another version: drop them from ``lane``,
        park their pending events again; the ids to read from the store."""
        pool, table = lane.pool, lane.table
        slots = table.lookup(session_ids)
        events = pool.take(np.flatnonzero(np.isin(pool.slots, slots)))
        ids = table.ids_of(events["slots"])
        for slot in events["slots"].tolist():  # a slot may repeat: one each
            table.finish(np.array([slot]))
        for sid in session_ids:
            table.remove(sid)
        return self.repark(events, ids)

    def requested(self, session_ids: Sequence[str]) -> dict[str, int]:
        """The version each parked session's first event asks for (0: any)."""
        wanted = set(session_ids)
        out: dict[str, int] = {}
        for sid, version in zip(self._parked_ids, self._parked_versions):
            if sid in wanted and sid not in out:
                out[sid] = version
        return out

    def create_loaded(
        self, session_ids: Sequence[str], placed: list[tuple[Lane, StoredRows]]
    ) -> dict[str, Failure]:
        """Rows for sessions just read from the store (claimed meanwhile): the found ones from
        their stored rows, in the lanes ``placed`` says; the others new, on the version their
        first event asks for. Returns the refused ones' answers (caps, versions)."""
        model = self.model
        found = {sid: (lane, rows) for lane, rows in placed for sid in rows.session_ids}
        asked = self.requested(session_ids)
        refused: dict[str, Failure] = {}
        target: dict[str, Lane] = {}
        for sid in dict.fromkeys(session_ids):
            if sid in found:
                target[sid] = found[sid][0]
                continue
            try:
                target[sid] = model.lane(asked.get(sid, 0))
            except LookupError as exc:
                refused[sid] = (Code.NOT_FOUND, str(exc))
        table = model.by_age[0].table
        distinct = within_caps(table, [sid for sid in target if sid not in refused], refused)
        by_lane: dict[int, list[str]] = {}
        for sid in distinct:
            by_lane.setdefault(target[sid].version, []).append(sid)
        now = time.time()
        for version, ids in by_lane.items():
            model.lanes[version].table.create_many(ids, now)
        for lane, rows in placed:
            # Stored sessions refused over a cap have no row and stay in the store.
            lane.cache.restore(rows, lane.layout)
        self._cold.difference_update(session_ids)
        return refused

    def release(self, session_ids: Sequence[str], refused: dict[str, Failure]) -> None:
        """Place the parked events of ``session_ids`` in their sessions' lanes now; the events
        of sessions without a row get their answer from ``refused`` (else UNAVAILABLE)."""
        if self.parked is None or not self._parked_ids:
            return
        wanted = set(session_ids)
        mine = np.fromiter(
            (sid in wanted for sid in self._parked_ids), np.bool_, len(self._parked_ids)
        )
        if not mine.any():
            return
        events = self.parked.take(np.flatnonzero(mine))
        flags = mine.tolist()
        event_ids = [sid for sid, m in zip(self._parked_ids, flags) if m]
        asked = [v for v, m in zip(self._parked_versions, flags) if m]
        self._parked_ids = [sid for sid, m in zip(self._parked_ids, flags) if not m]
        self._parked_versions = [v for v, m in zip(self._parked_versions, flags) if not m]
        model = self.model
        where = [model.resident(sid) for sid in event_ids]
        failures: dict[Failure, list[int]] = {}
        by_lane: dict[int, list[int]] = {}
        for i, (sid, found, version) in enumerate(zip(event_ids, where, asked)):
            if found is None:
                failure = refused.get(sid, (Code.UNAVAILABLE, STORE_FAILED))
                failures.setdefault(failure, []).append(i)
            elif version and version != found[0].version:
                failure = (
                    Code.FAILED_PRECONDITION,
                    f"the session runs on version {found[0].version} of {model.name!r}, "
                    f"not {version} (MigrateSession moves it)",
                )
                failures.setdefault(failure, []).append(i)
            else:
                by_lane.setdefault(found[0].version, []).append(i)
        for failure, at in failures.items():
            self._fail(select(events, np.array(at, np.int64)), failure)
        for version, at in by_lane.items():
            lane = model.lanes[version]
            chosen = select(events, np.array(at, np.int64))
            chosen["slots"] = np.array([where[i][1] for i in at], np.int64)  # type: ignore[index]
            lane.pool.extend(**chosen)
            lane.table.hold(chosen["slots"])

    def fail_parked(self, session_ids: Sequence[str], failure: Failure) -> None:
        self._cold.difference_update(session_ids)
        self.release(session_ids, dict.fromkeys(session_ids, failure))

    def _fail(self, events: Events, failure: Failure) -> None:
        self.metrics.count_events(OUTCOME[failure[0]], int(events["slots"].size))
        self.intakes.fail(events, *failure)

    def drop_parked(self) -> None:
        """Forget parked events (their requests are being failed as a whole)."""
        if self.parked is not None:
            self.parked.take_all()
        self._parked_ids = []
        self._parked_versions = []
        self._cold.clear()
