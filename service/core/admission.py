"""Admission: validate requests' events in one vectorised pass and place them.

An event is refused here (with its code) or placed: in the pending pool when its
session is in the table or new, or *parked* while its session is read from the
store. Parked events join the pool, in arrival order, once their sessions are
in; warm sessions never wait for them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from itertools import chain

import numpy as np

from service.core.pool import Events, Pool, select
from service.core.results import Intake, Intakes
from service.core.types import NOT_FINITE, OUTCOME, STORE_FAILED, Code, Failure, Job
from service.metrics import Metrics
from service.state.cache import SessionCache
from service.state.keys import tenant_of
from service.state.table import SessionTable, session_id_error
from service.store.base import StoredRows


class Admission:
    """Turns queued jobs into pool rows for one lane's sessions."""

    def __init__(
        self,
        cache: SessionCache,
        pool: Pool,
        intakes: Intakes,
        metrics: Metrics,
        output_size: int,
        state_sizes: Sequence[int],
        max_session_id_bytes: int,
    ):
        self.cache = cache
        self.table = cache.table
        self.pool = pool
        self.intakes = intakes
        self.metrics = metrics
        self.output_size = output_size
        self.state_sizes = tuple(state_sizes)
        self.max_session_id_bytes = max_session_id_bytes
        self.parked = Pool(pool.values.shape[1])
        """Events waiting for their sessions to be read from the store (slots -1)."""
        self._parked_ids: list[str] = []
        self._cold: set[str] = set()
        """Ids being read from the store."""

    @property
    def waiting(self) -> int:
        """Parked events."""
        return len(self.parked)

    def admit(self, jobs: list[Job]) -> list[str]:
        """Refuse or place every event of ``jobs``; the ids to read from the store now.

        Rejected events get their code here and never touch a session; a new
        session is created only for an event that will be applied.
        """
        table = self.table
        intake = Intake(jobs, self.output_size, self.state_sizes)
        counts = [job.n for job in jobs]
        n = len(intake)
        if n == 0:
            for job in jobs:
                job.resolve()
            return []
        blocks = [job.block for job in jobs]
        ids: Sequence[str] = (
            blocks[0].session_ids
            if len(blocks) == 1
            else list(chain.from_iterable(b.session_ids for b in blocks))
        )
        values = (
            blocks[0].values if len(blocks) == 1 else np.concatenate([b.values for b in blocks])
        )
        seqs = _column([b.seqs for b in blocks], counts, np.uint64)
        resets = _column([b.resets for b in blocks], counts, np.bool_)
        if len(jobs) == 1:
            job_of = np.zeros(n, np.int64)
            t0 = np.full(n, jobs[0].t0)
        else:
            job_of = np.repeat(np.arange(len(jobs)), counts)
            t0 = np.repeat(np.array([job.t0 for job in jobs]), counts)

        # Each check costs one pass in the common case; rows are found only when needed.
        codes = intake.codes
        rejected = False
        for j, block in enumerate(blocks):
            if block.bad:
                rejected = True
                for i, message in block.bad.items():
                    jobs[j].fail(i, Code.INVALID_ARGUMENT, message)
        if not np.isfinite(values).all():  # faster than a sum at every size, and never warns
            rejected = True
            for i in np.flatnonzero(~np.isfinite(values).all(axis=1)).tolist():
                if not codes[i]:
                    intake.fail(i, int(job_of[i]), Code.INVALID_ARGUMENT, NOT_FINITE)
        slots = table.lookup(ids)
        cold: np.ndarray | None = None
        if slots.min() < 0:
            unknown = np.flatnonzero(slots < 0)
            if self.cache.persistent:
                rejected |= self._refuse_bad_ids(intake, job_of, ids, unknown)
                cold = unknown[codes[unknown] == 0]
                if not cold.size:
                    cold = None
            else:
                rejected |= self._create_sessions(intake, job_of, ids, slots, unknown)
        accepted: np.ndarray | None = None  # None: every event goes to the pool
        per_job = counts
        if rejected or cold is not None:
            if rejected:
                self._count_refused(codes)
                known = slots >= 0
                intake.steps[known] = table.steps(slots[known])
            ok = codes == 0
            per_job = np.bincount(job_of[ok], minlength=len(jobs)).tolist()
            if cold is not None:
                ok[cold] = False
            accepted = np.flatnonzero(ok)
        for job, remaining in zip(jobs, per_job):
            job.remaining = remaining
            if not remaining:
                job.resolve()
        if not any(per_job):
            return []
        key = self.intakes.add(intake)

        def kept(column: np.ndarray) -> np.ndarray:
            return column if accepted is None else column[accepted]

        acc_slots = kept(slots)
        if acc_slots.size:
            self.pool.extend(
                slots=acc_slots,
                values=kept(values),
                seqs=kept(seqs),
                resets=kept(resets),
                t0=kept(t0),
                intake=np.full(acc_slots.size, key, np.int64),
                row=np.arange(n) if accepted is None else accepted,
                job=kept(job_of),
            )
            table.hold(acc_slots)
        if cold is None:
            return []
        return self._park(
            cold, [ids[i] for i in cold.tolist()], values, seqs, resets, t0, key, job_of
        )

    # -- sessions read from the store ------------------------------------------------

    def _park(
        self,
        rows: np.ndarray,
        ids: list[str],
        values: np.ndarray,
        seqs: np.ndarray,
        resets: np.ndarray,
        t0: np.ndarray,
        key: int,
        job_of: np.ndarray,
    ) -> list[str]:
        self.parked.extend(
            slots=np.full(rows.size, -1, np.int64),
            values=values[rows],
            seqs=seqs[rows],
            resets=resets[rows],
            t0=t0[rows],
            intake=np.full(rows.size, key, np.int64),
            row=rows,
            job=job_of[rows],
        )
        self._parked_ids += ids
        new = [sid for sid in dict.fromkeys(ids) if sid not in self._cold]
        self._cold.update(new)
        return new

    def unpark(self, session_ids: Sequence[str], stored: StoredRows | None) -> None:
        """``session_ids`` were looked up in the store: place their parked events.

        ``stored`` holds the ones found (they continue from their stored rows);
        the others start new. None: the store could not be read, so no id can be
        told new from stored, and their events are refused UNAVAILABLE rather
        than started from zeros.
        """
        wanted = set(session_ids)
        self._cold -= wanted
        mine = np.fromiter(
            (sid in wanted for sid in self._parked_ids), np.bool_, len(self._parked_ids)
        )
        events = self.parked.take(np.flatnonzero(mine))
        event_ids = [sid for sid, m in zip(self._parked_ids, mine.tolist()) if m]
        self._parked_ids = [sid for sid, m in zip(self._parked_ids, mine.tolist()) if not m]
        if stored is None:
            self._fail(events, (Code.UNAVAILABLE, STORE_FAILED))
            return
        refused: dict[str, Failure] = {}
        # Claimed while they were read: nothing else can have created their rows.
        distinct = within_caps(self.table, list(dict.fromkeys(session_ids)), refused)
        if distinct:
            self.table.create_many(distinct, time.time())
        if len(stored):
            # Stored sessions refused over the cap have no row and stay in the store.
            self.cache.restore(stored)
        slots = self.table.lookup(event_ids)
        if refused:
            for failure in set(refused.values()):
                where = np.array([refused.get(sid) == failure for sid in event_ids], np.bool_)
                self._fail(select(events, where), failure)
            placed = slots >= 0
            events, slots = select(events, placed), slots[placed]
        if slots.size:
            events["slots"] = slots
            self.pool.extend(**events)
            self.table.hold(slots)

    def _fail(self, events: Events, failure: Failure) -> None:
        self.metrics.count_events(OUTCOME[failure[0]], int(events["slots"].size))
        self.intakes.fail(events, *failure)

    def drop_parked(self) -> None:
        """Forget parked events (their requests are being failed as a whole)."""
        self.parked.take_all()
        self._parked_ids = []

    # -- new sessions ----------------------------------------------------------------

    def _refuse_bad_ids(
        self, intake: Intake, job_of: np.ndarray, ids: Sequence[str], unknown: np.ndarray
    ) -> bool:
        """Refuse the events of unknown ids that are empty or too long; whether any was."""
        refused: dict[str, Failure] = {}
        _, _, distinct = new_ids(ids, unknown, intake.codes)
        valid_ids(distinct, self.max_session_id_bytes, refused)
        if not refused:
            return False
        for i in unknown.tolist():
            if ids[i] in refused and not intake.codes[i]:
                intake.fail(i, int(job_of[i]), *refused[ids[i]])
        return True

    def _create_sessions(
        self,
        intake: Intake,
        job_of: np.ndarray,
        ids: Sequence[str],
        slots: np.ndarray,
        unknown: np.ndarray,
    ) -> bool:
        """Create the sessions of new ids in bulk; refuse bad ids and ids over the caps.

        Every event of a refused id gets the same answer as its first one.
        Returns whether any event was refused.
        """
        table = self.table
        codes = intake.codes
        row_array, new, distinct = new_ids(ids, unknown, codes)
        refused: dict[str, Failure] = {}
        valid = valid_ids(distinct, self.max_session_id_bytes, refused)
        distinct = within_caps(table, valid, refused)
        created = table.create_many(distinct, time.time()) if distinct else None
        if not refused:
            if new:  # each new id once (the common case): the created rows are the rows' slots
                slots[row_array] = created if len(distinct) == len(new) else table.lookup(new)
            return False
        index = table.index
        for i, sid in zip(row_array.tolist(), new):
            if sid in refused:
                intake.fail(i, int(job_of[i]), *refused[sid])
            else:
                slots[i] = index[sid]
        return True

    def _count_refused(self, codes: np.ndarray) -> None:
        values, counts = np.unique(codes[codes != 0], return_counts=True)
        for code, count in zip(values.tolist(), counts.tolist()):
            self.metrics.count_events(OUTCOME[Code(code)], count)


def within_caps(table: SessionTable, distinct: list[str], refused: dict[str, Failure]) -> list[str]:
    """``distinct`` without the new ids over their tenant's cap or the server's."""
    if table.max_per_tenant and distinct:
        distinct = _tenant_room(table, distinct, refused)
    room = table.room()
    if len(distinct) > room:  # the earliest new sessions fit; the rest are refused
        full = (
            Code.RESOURCE_EXHAUSTED,
            f"the server holds its maximum of {table.max_sessions} sessions",
        )
        for sid in distinct[room:]:
            refused[sid] = full
        distinct = distinct[:room]
    return distinct


def _tenant_room(
    table: SessionTable, distinct: list[str], refused: dict[str, Failure]
) -> list[str]:
    """``distinct`` without the new ids over their tenant's cap (added to ``refused``)."""
    full = (
        Code.RESOURCE_EXHAUSTED,
        f"this tenant holds its maximum of {table.max_per_tenant} sessions",
    )
    room: dict[str, int] = {}
    kept = []
    for sid in distinct:
        tenant = tenant_of(sid)
        left = room.get(tenant)
        if left is None:
            left = table.tenant_room(tenant)
        if left > 0:
            kept.append(sid)
        else:
            refused[sid] = full
        room[tenant] = left - 1
    return kept


def new_ids(
    ids: Sequence[str], unknown: np.ndarray, codes: np.ndarray
) -> tuple[np.ndarray, list[str], list[str]]:
    """Rows of unknown ids not yet refused, their ids, and those ids once each."""
    row_array = unknown[codes[unknown] == 0]
    new = [ids[i] for i in row_array.tolist()]
    return row_array, new, list(dict.fromkeys(new))  # first appearance order, at C speed


def valid_ids(distinct: list[str], limit: int, refused: dict[str, Failure]) -> list[str]:
    """``distinct`` without the ids that are empty or too long (added to ``refused``)."""
    lengths = list(map(len, distinct))
    if lengths and min(lengths) > 0 and 4 * max(lengths) <= limit:
        return distinct  # UTF-8 has at most 4 bytes a character: every id fits
    for sid in distinct:
        problem = session_id_error(sid, limit)
        if problem is not None:
            refused[sid] = (Code.INVALID_ARGUMENT, problem)
    return [sid for sid in distinct if sid not in refused]


def _column(parts: list[np.ndarray | None], counts: list[int], dtype: type) -> np.ndarray:
    """Concatenate optional per-request columns; None stands for zeros."""
    if all(p is None for p in parts):
        return np.zeros(sum(counts), dtype)
    return np.concatenate(
        [np.zeros(c, dtype) if p is None else np.asarray(p, dtype) for p, c in zip(parts, counts)]
    )
