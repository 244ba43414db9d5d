"""The batcher: one request queue, one ONNX Runtime run at a time, one event per session per run."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import accumulate, chain

import numpy as np

from service.metrics import Metrics
from service.runtime import Runtime
from service.sessions import SessionSnapshot, SessionTable, session_id_error

log = logging.getLogger(__name__)


class Code(enum.IntEnum):
    """The ``google.rpc.Code`` numbers an event can be answered with."""

    OK = 0
    INVALID_ARGUMENT = 3
    RESOURCE_EXHAUSTED = 8
    INTERNAL = 13
    UNAVAILABLE = 14


_OUTCOME = {
    Code.INVALID_ARGUMENT: "invalid",
    Code.RESOURCE_EXHAUSTED: "over_capacity",
    Code.INTERNAL: "failed",
    Code.UNAVAILABLE: "unavailable",
}
NOT_FINITE = "values contain NaN or Inf"
MODEL_FAILED = "the model failed on this event's batch"


class BatcherClosed(Exception):
    """The batcher is draining or stopped and takes no new events."""


@dataclass
class EventBlock:
    """The events of one request, decoded: n ids, ``[n, E]`` float32 values, seqs, resets.

    ``seqs``/``resets`` may be None (all 0 / all false). ``bad`` holds per-event
    problems found while decoding (e.g. a wrong number of values); those rows of
    ``values`` are ignored.
    """

    session_ids: Sequence[str]
    values: np.ndarray
    seqs: np.ndarray | None = None
    resets: np.ndarray | None = None
    bad: dict[int, str] | None = None


class Job:
    """One request in flight; ``future`` resolves (to the job) when every event is answered.

    The result arrays are views into arrays shared by every request admitted in
    the same intake, so a request costs no allocation of its own.
    """

    __slots__ = (
        "block",
        "codes",
        "duplicates",
        "errors",
        "future",
        "include_state",
        "n",
        "outputs",
        "remaining",
        "states",
        "steps",
        "t0",
    )

    def __init__(self, block: EventBlock, include_state: bool, future: asyncio.Future[Job]):
        self.block = block
        self.n = len(block.session_ids)
        self.include_state = include_state
        self.future = future
        self.t0 = time.perf_counter()
        self.errors: dict[int, str] = {}
        self.remaining = 0
        self.steps: np.ndarray
        self.outputs: np.ndarray
        self.codes: np.ndarray
        self.duplicates: np.ndarray
        self.states: list[np.ndarray] | None = None

    def fail(self, i: int, code: Code, message: str) -> None:
        self.codes[i] = code
        self.errors[i] = message


class _Intake:
    """Result arrays for the requests admitted together; jobs hold views of them."""

    __slots__ = ("codes", "duplicates", "jobs", "outputs", "starts", "states", "steps")

    def __init__(
        self, jobs: list[Job], starts: list[int], output_size: int, state_sizes: Sequence[int]
    ):
        self.jobs = jobs
        self.starts = starts
        """Row of each job's first event; ``starts[-1]`` is the number of events."""
        n = starts[-1]
        self.steps = np.zeros(n, np.uint64)
        self.outputs = np.zeros((n, output_size), np.float32)
        self.codes = np.zeros(n, np.int32)
        self.duplicates = np.zeros(n, np.bool_)
        with_state = any(job.include_state for job in jobs)
        self.states = [np.zeros((n, k), np.float32) for k in state_sizes] if with_state else None


class _Pool:
    """Accepted events not yet applied, oldest first, as parallel arrays."""

    def __init__(self, event_size: int):
        self.slots = np.zeros(0, np.int64)
        self.values = np.zeros((0, event_size), np.float32)
        self.seqs = np.zeros(0, np.uint64)
        self.resets = np.zeros(0, np.bool_)
        self.t0 = np.zeros(0, np.float64)
        self.intake = np.zeros(0, np.int64)  # key into Batcher._intakes
        self.row = np.zeros(0, np.int64)  # row in that intake's arrays
        self.job = np.zeros(0, np.int64)  # job number inside that intake

    FIELDS = ("slots", "values", "seqs", "resets", "t0", "intake", "row", "job")

    def __len__(self) -> int:
        return self.slots.size

    def extend(self, **new: np.ndarray) -> None:
        for name in self.FIELDS:
            old = getattr(self, name)
            setattr(self, name, np.concatenate((old, new[name])) if old.size else new[name])

    def take(self, picked: np.ndarray) -> dict[str, np.ndarray]:
        """Remove and return the rows at ``picked`` (sorted positions)."""
        out = {}
        if picked.size == len(self):
            for name in self.FIELDS:
                out[name] = getattr(self, name)
                setattr(self, name, out[name][:0])
            return out
        keep = np.ones(len(self), np.bool_)
        keep[picked] = False
        for name in self.FIELDS:
            column = getattr(self, name)
            out[name] = column[picked]
            setattr(self, name, column[keep])
        return out


class Batcher:
    """Owns the session table; applies events in arrival order per session.

    Requests are queued as they arrive (no per-event work on the caller's side
    beyond decoding). The run loop admits everything queued in one vectorised
    intake (validation, id lookup, session creation), then runs ONNX Runtime on
    the earliest pending event of each session, at most ``max_batch``, as soon
    as the previous run is done: a quiet server answers at once and a busy one
    forms large batches. The table is only touched on the event loop thread;
    ONNX Runtime runs on copies of the gathered rows in a worker thread.
    """

    def __init__(
        self,
        runtime: Runtime,
        table: SessionTable,
        metrics: Metrics,
        max_batch: int,
        max_session_id_bytes: int,
        inline_batch: int = 0,
    ):
        self.runtime = runtime
        self.inline_batch = inline_batch
        """Runs of at most this many events run on the event loop itself."""
        self.table = table
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_session_id_bytes = max_session_id_bytes
        self.event_size = runtime.spec.event_size
        self._inbox: list[Job] = []
        self._pool = _Pool(self.event_size)
        self._intakes: dict[int, _Intake] = {}
        self._next_intake = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="onnxruntime")
        self._task: asyncio.Task[None] | None = None
        self._running: np.ndarray | None = None  # rows of the run in progress
        self._closed = False
        self._loop = asyncio.get_running_loop()

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        self._task = self._loop.create_task(self._run_loop(), name="batcher")

    async def drain(self) -> None:
        """Refuse new events and wait until every accepted one is answered."""
        self._closed = True
        await self._idle.wait()

    async def stop(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    # -- events ----------------------------------------------------------------------

    def submit(self, block: EventBlock, include_state: bool = False) -> Job:
        """Queue a request's events; ``job.future`` resolves when all of them are answered."""
        if self._closed:
            self.metrics.count_events("unavailable", len(block.session_ids))
            raise BatcherClosed("the server is draining")
        job = Job(block, include_state, self._loop.create_future())
        self._inbox.append(job)
        if not self._wake.is_set():
            self._idle.clear()
            self._wake.set()
        return job

    def _admit(self) -> None:
        """Validate and place everything in the inbox: one vectorised pass for all requests.

        Rejected events get their code here and never touch a session; a new
        session is created only for an event that will be applied.
        """
        jobs, self._inbox = self._inbox, []
        table = self.table
        counts = [job.n for job in jobs]
        starts = list(accumulate(counts, initial=0))
        n = starts[-1]
        spec = self.runtime.spec
        intake = _Intake(jobs, starts, spec.output_size, spec.state_sizes)
        key = self._next_intake
        self._next_intake += 1
        for j, job in enumerate(jobs):
            lo, hi = starts[j], starts[j + 1]
            job.steps = intake.steps[lo:hi]
            job.outputs = intake.outputs[lo:hi]
            job.codes = intake.codes[lo:hi]
            job.duplicates = intake.duplicates[lo:hi]
            if job.include_state and intake.states is not None:
                job.states = [s[lo:hi] for s in intake.states]
        if n == 0:
            for job in jobs:
                job.future.set_result(job)
            return

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
        if not np.isfinite(values.sum(dtype=np.float64)):  # NaN/Inf propagate through a sum
            rejected = True
            for i in np.flatnonzero(~np.isfinite(values).all(axis=1)).tolist():
                if not codes[i]:
                    j = int(job_of[i])
                    jobs[j].fail(i - starts[j], Code.INVALID_ARGUMENT, NOT_FINITE)
        slots = table.lookup(ids)
        if slots.min() < 0:
            unknown = np.flatnonzero(slots < 0)
            rejected |= self._create_sessions(jobs, starts, job_of, ids, slots, unknown, codes)
        accepted: np.ndarray | None = None  # None: every event was accepted
        per_job = counts
        if rejected:
            self._count_rejections(codes)
            known = slots >= 0
            intake.steps[known] = table.step[slots[known]]
            accepted = np.flatnonzero(codes == 0)
            per_job = np.bincount(job_of[accepted], minlength=len(jobs)).tolist()
        for job, remaining in zip(jobs, per_job):
            job.remaining = remaining
            if not remaining:
                job.future.set_result(job)
        if accepted is not None and not accepted.size:
            return
        self._intakes[key] = intake

        def kept(column: np.ndarray) -> np.ndarray:
            return column if accepted is None else column[accepted]

        acc_slots = kept(slots)
        self._pool.extend(
            slots=acc_slots,
            values=kept(values),
            seqs=kept(seqs),
            resets=kept(resets),
            t0=kept(t0),
            intake=np.full(acc_slots.size, key, np.int64),
            row=np.arange(n) if accepted is None else accepted,
            job=kept(job_of),
        )
        np.add.at(table.pending, acc_slots, 1)

    def _create_sessions(
        self,
        jobs: list[Job],
        starts: list[int],
        job_of: np.ndarray,
        ids: Sequence[str],
        slots: np.ndarray,
        unknown: np.ndarray,
        codes: np.ndarray,
    ) -> bool:
        """Create the sessions of new ids in bulk; refuse bad ids and ids over the cap.

        Every event of a refused id gets the same answer as its first one. Returns
        whether any event was refused.
        """
        table = self.table
        row_array = unknown[codes[unknown] == 0]
        rows = row_array.tolist()
        new = [ids[i] for i in rows]
        distinct = list(dict.fromkeys(new))  # first appearance order, at C speed
        refused: dict[str, tuple[Code, str]] = {}
        lengths = list(map(len, distinct))
        limit = self.max_session_id_bytes
        if not lengths or min(lengths) == 0 or 4 * max(lengths) > limit:
            # Some id may be empty or too long (UTF-8 has at most 4 bytes a character).
            for sid in distinct:
                problem = session_id_error(sid, limit)
                if problem is not None:
                    refused[sid] = (Code.INVALID_ARGUMENT, problem)
            distinct = [sid for sid in distinct if sid not in refused]
        room = table.room()
        if len(distinct) > room:  # the earliest new sessions fit; the rest are refused
            full = (
                Code.RESOURCE_EXHAUSTED,
                f"the server holds its maximum of {table.max_sessions} sessions",
            )
            for sid in distinct[room:]:
                refused[sid] = full
            distinct = distinct[:room]
        created = table.create_many(distinct, time.time()) if distinct else None
        if not refused:
            # Each new id once (the common case): the created rows are the rows' slots.
            slots[row_array] = created if len(distinct) == len(new) else table.lookup(new)
            return False
        index = table.index
        for i, sid in zip(rows, new):
            if sid in refused:
                j = int(job_of[i])
                jobs[j].fail(i - starts[j], *refused[sid])
            else:
                slots[i] = index[sid]
        return True

    def _count_rejections(self, codes: np.ndarray) -> None:
        values, counts = np.unique(codes[codes != 0], return_counts=True)
        for code, count in zip(values.tolist(), counts.tolist()):
            self.metrics.count_events(_OUTCOME[Code(code)], count)

    # -- the run loop --------------------------------------------------------------

    async def _run_loop(self) -> None:
        while True:
            if self._inbox:
                self._admit()
            if not len(self._pool):
                if self._inbox:
                    continue
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            async with self._lock:
                try:
                    await self._run_once()
                except Exception:  # a bug here must not stop the server's only batcher
                    log.exception("batcher run failed")
                    self._fail_pool("internal error in the batcher")

    def _pick(self) -> np.ndarray:
        """Positions in the pool of the earliest event of each session, oldest first."""
        slots = self._pool.slots
        n = slots.size
        if n <= self.max_batch and (n == 1 or (n <= 64 and len(set(slots.tolist())) == n)):
            return np.arange(n)  # the common case: every pending session once
        _, first = np.unique(slots, return_index=True)
        if first.size == n and n <= self.max_batch:
            return np.arange(n)
        return np.sort(first)[: self.max_batch]

    async def _run_once(self) -> None:
        table = self.table
        batch = self._pool.take(self._pick())
        slots, seqs, resets = batch["slots"], batch["seqs"], batch["resets"]
        self._running = slots
        sequenced = bool(seqs.any())
        if sequenced:
            duplicate = (seqs > 0) & (seqs <= table.last_seq[slots])
            all_apply = not duplicate.any()
        else:
            duplicate = np.zeros(slots.size, np.bool_)
            all_apply = True
        apply = ~duplicate
        run_slots = slots if all_apply else slots[apply]
        failed = False
        if run_slots.size:
            states = [t[run_slots] for t in table.states]
            run_resets = resets if all_apply else resets[apply]
            if run_resets.any():
                for s in states:
                    s[run_resets] = 0.0
            values = batch["values"] if all_apply else batch["values"][apply]
            started = time.perf_counter()
            self.metrics.queue_seconds.observe_many(
                started - (batch["t0"] if all_apply else batch["t0"][apply])
            )
            try:
                if run_slots.size <= self.inline_batch:
                    # A tiny run costs less than the hop to the worker thread and back.
                    output, new_states, cpu = self.runtime.timed_run(values, states)
                else:
                    output, new_states, cpu = await self._loop.run_in_executor(
                        self._executor, self.runtime.timed_run, values, states
                    )
            except Exception:
                log.exception("ONNX Runtime failed on a batch of %d events", run_slots.size)
                failed = True
            else:
                self.metrics.inference_seconds.observe(time.perf_counter() - started)
                self.metrics.inference_cpu.inc(cpu)
                self.metrics.batch_size.observe(run_slots.size)
                for t, s in zip(table.states, new_states):
                    t[run_slots] = s
                if table.output_alias is None:
                    table.output[run_slots] = output
                table.step[run_slots] += np.uint64(1)
                if sequenced:
                    run_seqs = seqs if all_apply else seqs[apply]
                    table.last_seq[run_slots] = np.maximum(table.last_seq[run_slots], run_seqs)
                table.updated[run_slots] = time.time()

        self._answer(batch, duplicate, failed)
        table.finish(slots)
        self._running = None
        applied = 0 if failed else int(run_slots.size)
        self.metrics.count_events("applied", applied)
        self.metrics.count_events("duplicate", int(slots.size - run_slots.size))
        self.metrics.count_events("failed", int(run_slots.size) - applied)
        self.metrics.event_seconds.observe_many(time.perf_counter() - batch["t0"])

    def _answer(self, batch: dict[str, np.ndarray], duplicate: np.ndarray, failed: bool) -> None:
        """Copy each event's result into its request; resolve requests that are complete."""
        table = self.table
        slots, intakes, rows, jobs = batch["slots"], batch["intake"], batch["row"], batch["job"]
        steps = table.step[slots]
        outputs = table.output[slots]
        # Events are in pool order, so each intake's events are contiguous.
        cuts = np.flatnonzero(intakes[1:] != intakes[:-1]) + 1
        for lo, hi in zip([0, *cuts.tolist()], [*cuts.tolist(), slots.size]):
            key = int(intakes[lo])
            intake = self._intakes[key]
            r = rows[lo:hi]
            intake.steps[r] = steps[lo:hi]
            intake.outputs[r] = outputs[lo:hi]
            intake.duplicates[r] = duplicate[lo:hi]
            if intake.states is not None:
                for out, t in zip(intake.states, table.states):
                    out[r] = t[slots[lo:hi]]
            if failed:
                bad = r[~duplicate[lo:hi]]
                intake.codes[bad] = Code.INTERNAL
                intake.outputs[bad] = 0.0
            # Within an intake, events keep their order, so job numbers never decrease.
            if jobs[lo] == jobs[hi - 1]:
                per_job: Sequence[tuple[int, int]] = [(int(jobs[lo]), hi - lo)]
            else:
                done_jobs, done_counts = np.unique(jobs[lo:hi], return_counts=True)
                per_job = list(zip(done_jobs.tolist(), done_counts.tolist()))
            finished = 0
            for j, count in per_job:
                job = intake.jobs[j]
                if failed:
                    for i in r[(jobs[lo:hi] == j) & ~duplicate[lo:hi]].tolist():
                        job.errors[i - intake.starts[j]] = MODEL_FAILED
                job.remaining -= count
                if job.remaining == 0:
                    job.future.set_result(job)
                    finished += 1
            if finished and all(jb.remaining == 0 for jb in intake.jobs):
                del self._intakes[key]

    def _fail_pool(self, message: str) -> None:
        """After a batcher bug: answer every unanswered event INTERNAL; no caller hangs.

        Pending counts of the pool's rows and of the run that failed are released.
        An event counts as answered once it has a step or is a duplicate.
        """
        batch = self._pool.take(np.arange(len(self._pool)))
        for slot in batch["slots"].tolist():  # a slot may repeat: one finish each
            self.table.finish(np.array([slot]))
        if self._running is not None:
            self.table.finish(self._running)
            self._running = None
        for intake in self._intakes.values():
            unanswered = (intake.codes == 0) & (intake.steps == 0) & ~intake.duplicates
            for j, job in enumerate(intake.jobs):
                if job.future.done():
                    continue
                lo, hi = intake.starts[j], intake.starts[j + 1]
                for i in np.flatnonzero(unanswered[lo:hi]).tolist():
                    job.fail(i, Code.INTERNAL, message)
                job.remaining = 0
                job.future.set_result(job)
        self._intakes.clear()

    # -- session operations (between runs) -------------------------------------------

    def get(self, session_id: str) -> SessionSnapshot | None:
        slot = self.table.index.get(session_id)
        return None if slot is None else self.table.snapshot(slot)

    async def put(
        self, session_id: str, step: int, last_seq: int, states: Sequence[np.ndarray | None]
    ) -> SessionSnapshot:
        """Create or overwrite a session, after any run in flight has been scattered."""
        async with self._lock:
            table = self.table
            slot = table.index.get(session_id)
            now = time.time()
            if slot is None:
                slot = table.create(session_id, now)
            table.write(slot, step, last_seq, states, now)
            return table.snapshot(slot)

    async def reset(self, session_id: str) -> SessionSnapshot | None:
        async with self._lock:
            slot = self.table.index.get(session_id)
            if slot is None:
                return None
            self.table.reset(slot)
            self.table.updated[slot] = time.time()
            return self.table.snapshot(slot)

    async def delete(self, session_id: str) -> SessionSnapshot | None:
        async with self._lock:
            if session_id not in self.table:
                return None
            return self.table.remove(session_id)

    def evict_idle(self, ttl: float) -> int:
        """Drop sessions idle longer than ``ttl`` seconds (none with pending events)."""
        ids = self.table.idle_ids(time.time() - ttl)
        for sid in ids:
            self.table.remove(sid)
        if ids:
            self.metrics.evictions.labels("ttl").inc(len(ids))
            log.info("evicted %d idle sessions (ttl %.0fs)", len(ids), ttl)
        return len(ids)


def _column(parts: list[np.ndarray | None], counts: list[int], dtype: type) -> np.ndarray:
    """Concatenate optional per-request columns; None stands for zeros."""
    if all(p is None for p in parts):
        return np.zeros(sum(counts), dtype)
    return np.concatenate(
        [np.zeros(c, dtype) if p is None else np.asarray(p, dtype) for p, c in zip(parts, counts)]
    )
