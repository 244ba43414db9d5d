"""The batcher: one request queue, one ONNX Runtime run at a time, one event per session per run."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate, chain
from typing import Any, TypeVar

import numpy as np

from service.metrics import Metrics
from service.runtime import Runtime
from service.sessions import SessionCapError, SessionSnapshot, SessionTable, session_id_error
from service.store import Conflicts, StateStore, StoredRows, StoreError, StoreLayout

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
STORE_FAILED = "the state store is unavailable; the event was not applied, retry later"
PROBE_INTERVAL_S = 0.5
"""While the store is failing, it is probed this often; events fail fast meanwhile."""

T = TypeVar("T")


class StoreUnavailable(Exception):
    """The state store is failing; the operation changed nothing."""


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
    """One request in flight; ``future`` resolves (to None) when every event is answered.

    None rather than the job: a future holding the job that holds it is a
    reference cycle per request, left to the garbage collector (docs/PERFORMANCE.md).

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

    def __init__(self, block: EventBlock, include_state: bool, future: asyncio.Future[None]):
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

    def push_front(self, rows: dict[str, np.ndarray]) -> None:
        """Put rows taken earlier back before every other row (they stay the oldest)."""
        for name in self.FIELDS:
            setattr(self, name, np.concatenate((rows[name], getattr(self, name))))

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


class _Worker:
    """One thread running calls for the event loop, one at a time, in order.

    What ``run_in_executor`` on a one-thread pool does, without the
    ``concurrent.futures`` future chained to an asyncio one: 25 instead of 39 µs
    of CPU per call when loop and thread share a core (docs/PERFORMANCE.md).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str):
        self._loop = loop
        self._calls: queue.SimpleQueue[
            tuple[asyncio.Future[Any], Callable[..., Any], tuple[Any, ...]] | None
        ] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """``fn(*args)`` in the thread; the future is settled on the loop."""
        future: asyncio.Future[T] = self._loop.create_future()
        self._calls.put((future, fn, args))
        return future

    def _serve(self) -> None:
        settle = self._loop.call_soon_threadsafe
        while (item := self._calls.get()) is not None:
            future, fn, args = item
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to the awaiting coroutine, as an executor does
                settle(_settle, future, None, exc)
            else:
                settle(_settle, future, result, None)

    def stop(self) -> None:
        """Finish the calls already queued, then end the thread."""
        self._calls.put(None)
        self._thread.join()


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():  # its awaiter was cancelled meanwhile (the batcher stopping)
        return
    if exc is None:
        future.set_result(result)
    else:
        future.set_exception(exc)


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
        store: StateStore | None = None,
        layout: StoreLayout | None = None,
        on_store_health: Callable[[bool], None] | None = None,
        max_sessions_per_tenant: int = 0,
    ):
        self.runtime = runtime
        self.max_sessions_per_tenant = max_sessions_per_tenant
        """With tenants (``table.tenant_sep``), each holds at most this many (0 = no cap)."""
        self.store = store
        """Where sessions are written through to; None keeps them in memory only."""
        self.layout = layout
        self.on_store_health = on_store_health
        """Called with False when the store starts failing and True when it recovers."""
        self.store_failure: str | None = None
        """Why the store is failing, or None while it works."""
        assert store is None or layout is not None
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
        self._loop = asyncio.get_running_loop()
        self._worker = _Worker(self._loop, "onnxruntime")
        self._store_worker = _Worker(self._loop, "state-store")
        self._probe: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._running: np.ndarray | None = None  # rows of the run in progress
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        self._task = self._loop.create_task(self._run_loop(), name="batcher")

    async def drain(self) -> None:
        """Refuse new events and wait until every accepted one is answered."""
        self._closed = True
        await self._idle.wait()

    async def stop(self) -> None:
        self._closed = True
        for task in (self._task, self._probe):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._worker.stop()
        self._store_worker.stop()

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

    async def _admit(self) -> None:
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
                job.future.set_result(None)
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
        if not np.isfinite(values).all():  # faster than a sum at every size, and never warns
            rejected = True
            for i in np.flatnonzero(~np.isfinite(values).all(axis=1)).tolist():
                if not codes[i]:
                    j = int(job_of[i])
                    jobs[j].fail(i - starts[j], Code.INVALID_ARGUMENT, NOT_FINITE)
        slots = table.lookup(ids)
        if slots.min() < 0:
            unknown = np.flatnonzero(slots < 0)
            if self.store is None:
                rejected |= self._create_sessions(jobs, starts, job_of, ids, slots, unknown, codes)
            else:
                # Nothing else touches the table while the stored sessions are read.
                async with self._lock:
                    rejected |= await self._restore_sessions(
                        jobs, starts, job_of, ids, slots, unknown, codes
                    )
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
                job.future.set_result(None)
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
        if acc_slots.size == 1:
            table.pending[acc_slots] += 1
        else:
            np.add.at(table.pending, acc_slots, 1)  # a session may repeat within an intake

    def _create_sessions(
        self,
        jobs: list[Job],
        starts: list[int],
        job_of: np.ndarray,
        ids: Sequence[str],
        slots: np.ndarray,
        unknown: np.ndarray,
        codes: np.ndarray,
        stored: StoredRows | None = None,
        refused: dict[str, tuple[Code, str]] | None = None,
    ) -> bool:
        """Create the sessions of new ids in bulk; refuse bad ids and ids over the cap.

        ``stored`` sessions start from their stored rows instead of zeros; ids in
        ``refused`` are refused with the given answer. Every event of a refused id
        gets the same answer as its first one. Returns whether any event was refused.
        """
        table = self.table
        row_array, new, distinct = self._new_ids(ids, unknown, codes)
        refused = {} if refused is None else refused
        distinct = self._valid_ids(distinct, refused)
        if refused:
            distinct = [sid for sid in distinct if sid not in refused]
        if self.max_sessions_per_tenant and distinct:
            distinct = self._tenant_room(distinct, refused)
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
        if stored is not None and len(stored):
            # Stored sessions refused over the cap have no row (-1) and stay in the store.
            restored = table.restore(table.lookup(stored.session_ids), stored, self._layout)
            self.metrics.store_reads.labels("restored").inc(restored)
        if not refused:
            if new:  # each new id once (the common case): the created rows are the rows' slots
                slots[row_array] = created if len(distinct) == len(new) else table.lookup(new)
            return False
        index = table.index
        for i, sid in zip(row_array.tolist(), new):
            if sid in refused:
                j = int(job_of[i])
                jobs[j].fail(i - starts[j], *refused[sid])
            else:
                slots[i] = index[sid]
        return True

    def _tenant_room(self, distinct: list[str], refused: dict[str, tuple[Code, str]]) -> list[str]:
        """``distinct`` without the new ids over their tenant's cap (added to ``refused``)."""
        table = self.table
        cap = self.max_sessions_per_tenant
        full = (Code.RESOURCE_EXHAUSTED, f"this tenant holds its maximum of {cap} sessions")
        room: dict[str, int] = {}
        kept = []
        for sid in distinct:
            tenant = table.tenant_of(sid)
            left = room.get(tenant)
            if left is None:
                left = cap - table.tenant_live[tenant]
            if left > 0:
                kept.append(sid)
            else:
                refused[sid] = full
            room[tenant] = left - 1
        return kept

    def check_tenant_room(self, session_id: str) -> None:
        """SessionCapError if a new session for this id would pass its tenant's cap."""
        cap = self.max_sessions_per_tenant
        if cap and self.table.tenant_live[self.table.tenant_of(session_id)] >= cap:
            raise SessionCapError(f"this tenant holds its maximum of {cap} sessions")

    @staticmethod
    def _new_ids(
        ids: Sequence[str], unknown: np.ndarray, codes: np.ndarray
    ) -> tuple[np.ndarray, list[str], list[str]]:
        """Rows of unknown ids not yet refused, their ids, and those ids once each."""
        row_array = unknown[codes[unknown] == 0]
        new = [ids[i] for i in row_array.tolist()]
        return row_array, new, list(dict.fromkeys(new))  # first appearance order, at C speed

    def _valid_ids(self, distinct: list[str], refused: dict[str, tuple[Code, str]]) -> list[str]:
        """``distinct`` without the ids that are empty or too long (added to ``refused``)."""
        lengths = list(map(len, distinct))
        limit = self.max_session_id_bytes
        if lengths and min(lengths) > 0 and 4 * max(lengths) <= limit:
            return distinct  # UTF-8 has at most 4 bytes a character: every id fits
        for sid in distinct:
            problem = session_id_error(sid, limit)
            if problem is not None:
                refused[sid] = (Code.INVALID_ARGUMENT, problem)
        return [sid for sid in distinct if sid not in refused]

    async def _restore_sessions(
        self,
        jobs: list[Job],
        starts: list[int],
        job_of: np.ndarray,
        ids: Sequence[str],
        slots: np.ndarray,
        unknown: np.ndarray,
        codes: np.ndarray,
    ) -> bool:
        """Like ``_create_sessions``, but ids the store holds continue from their stored state.

        While the store cannot be read, no unknown id can be told new from stored:
        their events are refused UNAVAILABLE rather than started from zeros.
        """
        assert self.store is not None
        _, _, distinct = self._new_ids(ids, unknown, codes)
        refused: dict[str, tuple[Code, str]] = {}
        distinct = self._valid_ids(distinct, refused)
        stored = None
        try:
            stored = await self._store_call(self.store.load, distinct)
        except StoreUnavailable:
            refused.update(dict.fromkeys(distinct, (Code.UNAVAILABLE, STORE_FAILED)))
        else:
            self.metrics.store_reads.labels("missed").inc(len(distinct) - len(stored))
        return self._create_sessions(
            jobs, starts, job_of, ids, slots, unknown, codes, stored, refused
        )

    @property
    def _layout(self) -> StoreLayout:
        assert self.layout is not None
        return self.layout

    # -- the state store -------------------------------------------------------------

    async def _store_call(self, call: Callable[..., T], *args: Any) -> T:
        """Run a store call in the store's thread; StoreUnavailable if it fails (or is failing)."""
        if self.store_failure is not None:
            raise StoreUnavailable(self.store_failure)
        started = time.perf_counter()
        try:
            result = await self._store_worker.call(call, *args)
        except StoreError as exc:
            self._store_failed(str(exc))
            raise StoreUnavailable(str(exc)) from exc
        self.metrics.store_seconds.labels(call.__name__).observe(time.perf_counter() - started)
        return result

    def _store_failed(self, reason: str) -> None:
        self.metrics.store_errors.inc()
        if self.store_failure is not None:
            return
        log.error("%s; answering UNAVAILABLE and reporting NOT_SERVING until it recovers", reason)
        self.store_failure = reason
        self.metrics.store_up.set(0)
        if self.on_store_health is not None:
            self.on_store_health(False)
        self._probe = self._loop.create_task(self._probe_store(), name="store-probe")

    async def _probe_store(self) -> None:
        """Try a small write every PROBE_INTERVAL_S until the store takes it again."""
        assert self.store is not None
        while True:
            await asyncio.sleep(PROBE_INTERVAL_S)
            try:
                await self._store_worker.call(self.store.probe)
            except StoreError as exc:
                log.debug("state store still failing: %s", exc)
                continue
            log.info("state store recovered")
            self.store_failure = None
            self.metrics.store_up.set(1)
            if self.on_store_health is not None:
                self.on_store_health(True)
            return

    def _count_rejections(self, codes: np.ndarray) -> None:
        values, counts = np.unique(codes[codes != 0], return_counts=True)
        for code, count in zip(values.tolist(), counts.tolist()):
            self.metrics.count_events(_OUTCOME[Code(code)], count)

    # -- the run loop --------------------------------------------------------------

    async def _run_loop(self) -> None:
        while True:
            if self._inbox:
                jobs = self._inbox
                try:
                    await self._admit()
                except Exception:  # as below: answer everyone rather than stop
                    log.exception("batcher intake failed")
                    self._fail_pool("internal error in the batcher")
                    self._fail_jobs(jobs, "internal error in the batcher")
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
        failure: tuple[Code, str] | None = None
        if run_slots.size and self.store_failure is not None:
            failure = (Code.UNAVAILABLE, STORE_FAILED)  # fail fast; the probe sees recovery
        elif run_slots.size:
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
                    output, new_states, cpu = await self._worker.call(
                        self.runtime.timed_run, values, states
                    )
            except Exception:
                log.exception("ONNX Runtime failed on a batch of %d events", run_slots.size)
                failure = (Code.INTERNAL, MODEL_FAILED)
            else:
                self.metrics.inference_seconds.observe(time.perf_counter() - started)
                self.metrics.inference_cpu.inc(cpu)
                self.metrics.batch_size.observe(run_slots.size)
                step = table.step[run_slots] + np.uint64(1)
                last_seq = table.last_seq[run_slots]
                if sequenced:
                    last_seq = np.maximum(last_seq, seqs if all_apply else seqs[apply])
                now = time.time()
                conflicts = None
                if self.store is not None:
                    failure, conflicts = await self._write_through(
                        run_slots, step, last_seq, new_states, output, now
                    )
                if failure is None:  # only what is stored is applied
                    for t, s in zip(table.states, new_states):
                        t[run_slots] = s
                    if table.output_alias is None:
                        table.output[run_slots] = output
                    table.step[run_slots] = step
                    table.last_seq[run_slots] = last_seq
                    table.updated[run_slots] = now
                if conflicts is not None:
                    # Another replica wrote these sessions since this copy was made: take
                    # the stored rows and apply the same events to them in the next run.
                    stale = conflicts.index
                    self._reload(run_slots[stale], conflicts)
                    again = stale if all_apply else np.flatnonzero(apply)[stale]
                    batch, duplicate, slots = self._requeue(batch, duplicate, again)
                    run_slots = np.delete(run_slots, stale)

        self._answer(batch, duplicate, failure)
        table.finish(slots)
        self._running = None
        not_applied = int(run_slots.size) if failure else 0
        self.metrics.count_events("applied", int(run_slots.size) - not_applied)
        self.metrics.count_events("duplicate", int(slots.size - run_slots.size))
        if failure is not None:
            self.metrics.count_events(_OUTCOME[failure[0]], not_applied)
        self.metrics.event_seconds.observe_many(time.perf_counter() - batch["t0"])

    async def _write_through(
        self,
        slots: np.ndarray,
        step: np.ndarray,
        last_seq: np.ndarray,
        states: Sequence[np.ndarray],
        output: np.ndarray,
        now: float,
    ) -> tuple[tuple[Code, str] | None, Conflicts | None]:
        """Commit a run's new rows in one transaction: the failure to answer when that fails,
        and (shared store) the rows another replica had written first (indices into ``slots``).

        Rows deleted while their events were pending are not written back.
        """
        assert self.store is not None
        table = self.table
        keep = None
        if table.n_doomed:
            keep = ~table.doomed[slots]
            slots, step, last_seq = slots[keep], step[keep], last_seq[keep]
            states, output = [s[keep] for s in states], output[keep]
        rows = StoredRows(
            table.ids[slots].tolist(),
            step,
            last_seq,
            self._layout.join(states, output),
            table.created[slots],
            np.full(slots.size, now),
        )
        conflicts = None
        try:
            if self.store.shared:
                conflicts = await self._store_call(
                    self.store.swap, rows, table.step[slots], table.updated[slots]
                )
            else:
                await self._store_call(self.store.save, rows)
        except StoreUnavailable:
            return (Code.UNAVAILABLE, STORE_FAILED), None
        if conflicts is None or not conflicts.index.size:
            self.metrics.store_rows_written.inc(len(rows))
            return None, None
        self.metrics.store_rows_written.inc(len(rows) - conflicts.index.size)
        self.metrics.store_conflicts.inc(conflicts.index.size)
        if keep is not None:
            conflicts.index = np.flatnonzero(keep)[conflicts.index]
        return None, conflicts

    def _reload(self, slots: np.ndarray, conflicts: Conflicts) -> None:
        """Replace stale rows by the stored ones; a row no longer stored starts from zeros."""
        table = self.table
        current = conflicts.current
        gone = slots
        if len(current):
            table.restore(table.lookup(current.session_ids), current, self._layout)
            gone = np.setdiff1d(slots, table.lookup(current.session_ids))
        for slot in gone.tolist():  # deleted or expired by another replica
            table.reset(slot)
            table.step[slot] = 0
            table.last_seq[slot] = 0

    def _requeue(
        self, batch: dict[str, np.ndarray], duplicate: np.ndarray, again: np.ndarray
    ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """Put the events at positions ``again`` back first in the pool, still pending;
        the rest of the batch, its duplicate flags and its slots, to be answered now."""
        keep = np.ones(duplicate.size, np.bool_)
        keep[again] = False
        self._pool.push_front({name: column[again] for name, column in batch.items()})
        rest = {name: column[keep] for name, column in batch.items()}
        return rest, duplicate[keep], rest["slots"]

    def _answer(
        self,
        batch: dict[str, np.ndarray],
        duplicate: np.ndarray,
        failure: tuple[Code, str] | None,
    ) -> None:
        """Copy each event's result into its request; resolve requests that are complete."""
        table = self.table
        slots, intakes, rows, jobs = batch["slots"], batch["intake"], batch["row"], batch["job"]
        if not slots.size:  # every event of the run went back to the pool
            return
        steps = table.step[slots]
        outputs = table.output[slots]
        # Events are in pool order, so each intake's events are contiguous.
        if intakes[0] == intakes[-1]:
            spans: Sequence[tuple[int, int]] = [(0, slots.size)]
        else:
            cuts = (np.flatnonzero(intakes[1:] != intakes[:-1]) + 1).tolist()
            spans = list(zip([0, *cuts], [*cuts, slots.size]))
        for lo, hi in spans:
            key = int(intakes[lo])
            intake = self._intakes[key]
            r = rows[lo:hi]
            intake.steps[r] = steps[lo:hi]
            intake.outputs[r] = outputs[lo:hi]
            intake.duplicates[r] = duplicate[lo:hi]
            if intake.states is not None:
                for out, t in zip(intake.states, table.states):
                    out[r] = t[slots[lo:hi]]
            if failure is not None:
                bad = r[~duplicate[lo:hi]]
                intake.codes[bad] = failure[0]
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
                if failure is not None:
                    for i in r[(jobs[lo:hi] == j) & ~duplicate[lo:hi]].tolist():
                        job.errors[i - intake.starts[j]] = failure[1]
                job.remaining -= count
                if job.remaining == 0:
                    job.future.set_result(None)
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
                job.future.set_result(None)
        self._intakes.clear()

    @staticmethod
    def _fail_jobs(jobs: list[Job], message: str) -> None:
        """Answer every event of jobs that an intake failed on (and left unresolved) INTERNAL."""
        for job in jobs:
            if job.future.done():
                continue
            job.steps = np.zeros(job.n, np.uint64)
            job.outputs = np.zeros((job.n, 0), np.float32)
            job.codes = np.full(job.n, Code.INTERNAL, np.int32)
            job.duplicates = np.zeros(job.n, np.bool_)
            job.states = None
            job.errors = dict.fromkeys(range(job.n), message)
            job.future.set_result(None)

    # -- session operations (between runs) -------------------------------------------

    async def get(self, session_id: str) -> SessionSnapshot | None:
        """A session in memory, else (with a store) as stored; None when there is none.

        With a shared store, always as stored: another replica may have moved it on.
        """
        slot = self.table.index.get(session_id)
        if slot is not None and not (self.store is not None and self.store.shared):
            return self.table.snapshot(slot)
        rows = await self._load_one(session_id)
        return None if rows is None else self._snapshot_of(rows)

    async def put(
        self, session_id: str, step: int, last_seq: int, states: Sequence[np.ndarray | None]
    ) -> SessionSnapshot:
        """Create or overwrite a session, after any run in flight has been scattered.

        With a store, the row is stored first; a session only in the store stays there.
        """
        async with self._lock:
            table = self.table
            slot = table.index.get(session_id)
            now = time.time()
            if self.store is None:
                if slot is None:
                    self.check_tenant_room(session_id)
                    slot = table.create(session_id, now)
                table.write(slot, step, last_seq, states, now)
                return table.snapshot(slot)
            if slot is not None:
                created = float(table.created[slot])
            else:
                stored = await self._load_one(session_id)
                created = now if stored is None else float(stored.created[0])
            full = [
                np.zeros((1, n), np.float32) if v is None else np.reshape(v, (1, n))
                for v, n in zip(states, table.state_sizes)
            ]
            output = np.zeros((1, table.output_size), np.float32)
            rows = _one_row(session_id, step, last_seq, self._layout.join(full, output), created)
            rows.updated[0] = now
            await self._store_call(self.store.save, rows)
            if slot is not None:
                table.write(slot, step, last_seq, states, now)
            return self._snapshot_of(rows)

    async def reset(self, session_id: str) -> SessionSnapshot | None:
        """Zero a session's state, keeping its counters; None when there is none."""
        async with self._lock:
            table = self.table
            slot = table.index.get(session_id)
            now = time.time()
            if self.store is not None:
                if slot is not None:
                    rows = table.stored_rows(np.array([slot]), self._layout)
                else:
                    found = await self._load_one(session_id)
                    if found is None:
                        return None
                    rows = found
                rows.blob = np.zeros_like(rows.blob)
                rows.updated = np.array([now])
                await self._store_call(self.store.save, rows)
                if slot is None:
                    return self._snapshot_of(rows)
            elif slot is None:
                return None
            table.reset(slot)
            table.updated[slot] = now
            return table.snapshot(slot)

    async def delete(self, session_id: str) -> SessionSnapshot | None:
        """Drop a session (from the store too); its last state, or None when there is none."""
        async with self._lock:
            slot = self.table.index.get(session_id)
            if self.store is None:
                return None if slot is None else self.table.remove(session_id)
            if slot is not None:
                snap = self.table.snapshot(slot)
            else:
                rows = await self._load_one(session_id)
                if rows is None:
                    return None
                snap = self._snapshot_of(rows)
            await self._store_call(self.store.delete, [session_id])
            if slot is not None:
                self.table.remove(session_id)
            return snap

    async def evict_idle(self, ttl: float) -> int:
        """Drop sessions idle longer than ``ttl`` seconds from memory (none with pending events).

        Without a store that is the end of them; with one, they are restored when used again.
        """
        async with self._lock:
            n = self._evict_idle_before(time.time() - ttl)
        if n:
            self.metrics.evictions.labels("ttl").inc(n)
            log.info("evicted %d idle sessions from memory (ttl %.0fs)", n, ttl)
        return n

    async def expire_stored(self, ttl: float) -> int:
        """Delete sessions idle longer than ``ttl`` seconds from the store, and from memory."""
        assert self.store is not None
        async with self._lock:
            cutoff = time.time() - ttl
            try:
                n = await self._store_call(self.store.expire, cutoff)
            except StoreUnavailable:
                return 0  # tried again at the next period; the probe reports recovery
            # Write-through keeps ``updated`` equal in both places: the same sessions.
            self._evict_idle_before(cutoff)
        if n:
            self.metrics.evictions.labels("store_ttl").inc(n)
            log.info("expired %d sessions from the state store (store ttl %.0fs)", n, ttl)
        return n

    def _evict_idle_before(self, cutoff: float) -> int:
        ids = self.table.idle_ids(cutoff)
        for sid in ids:
            self.table.remove(sid)
        return len(ids)

    async def _load_one(self, session_id: str) -> StoredRows | None:
        if self.store is None:
            return None
        rows = await self._store_call(self.store.load, [session_id])
        return rows if len(rows) else None

    def _snapshot_of(self, rows: StoredRows) -> SessionSnapshot:
        """The first of ``rows`` as a snapshot."""
        states, output = self._layout.split(rows.blob[:1])
        return SessionSnapshot(
            session_id=rows.session_ids[0],
            step=int(rows.step[0]),
            last_seq=int(rows.last_seq[0]),
            states=tuple(s[0].copy() for s in states),
            output=output[0].copy(),
            created=float(rows.created[0]),
            updated=float(rows.updated[0]),
        )


def _one_row(session_id: str, step: int, last_seq: int, blob: np.ndarray, now: float) -> StoredRows:
    return StoredRows(
        [session_id],
        np.array([step], np.uint64),
        np.array([last_seq], np.uint64),
        blob,
        np.array([now]),
        np.array([now]),
    )


def _column(parts: list[np.ndarray | None], counts: list[int], dtype: type) -> np.ndarray:
    """Concatenate optional per-request columns; None stands for zeros."""
    if all(p is None for p in parts):
        return np.zeros(sum(counts), dtype)
    return np.concatenate(
        [np.zeros(c, dtype) if p is None else np.asarray(p, dtype) for p, c in zip(parts, counts)]
    )
