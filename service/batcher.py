"""The batcher: one request queue, one ONNX Runtime run at a time, one event per session per run."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from service.metrics import Metrics
from service.runtime import Runtime
from service.sessions import SessionCapError, SessionSnapshot, SessionTable, session_id_error

log = logging.getLogger(__name__)


class Code(enum.IntEnum):
    """The ``google.rpc.Code`` numbers an event can be answered with."""

    OK = 0
    INVALID_ARGUMENT = 3
    NOT_FOUND = 5
    RESOURCE_EXHAUSTED = 8
    INTERNAL = 13
    UNAVAILABLE = 14


_OUTCOME = {
    Code.INVALID_ARGUMENT: "invalid",
    Code.RESOURCE_EXHAUSTED: "over_capacity",
    Code.INTERNAL: "failed",
    Code.UNAVAILABLE: "unavailable",
}


class BatcherClosed(Exception):
    """The batcher is draining or stopped and takes no new events."""


@dataclass
class EventBlock:
    """The events of one request, decoded: n ids, ``[n, E]`` values, seqs, resets.

    ``bad`` holds per-event problems found while decoding (e.g. a wrong number of
    values); those rows of ``values`` are ignored.
    """

    session_ids: Sequence[str]
    values: np.ndarray
    seqs: np.ndarray
    resets: np.ndarray
    bad: dict[int, str]


class Job:
    """One request in flight: its events, their results, and one future for all of them."""

    __slots__ = (
        "codes",
        "duplicates",
        "errors",
        "future",
        "n",
        "outputs",
        "pending",
        "resets",
        "seqs",
        "slots",
        "states",
        "steps",
        "t0",
        "values",
    )

    def __init__(self, block: EventBlock, output_size: int, state_sizes: Sequence[int] | None):
        n = len(block.session_ids)
        self.n = n
        self.values = block.values
        self.seqs = block.seqs
        self.resets = block.resets
        self.slots = np.full(n, -1, np.int64)
        self.steps = np.zeros(n, np.uint64)
        self.outputs = np.zeros((n, output_size), np.float32)
        self.codes = np.zeros(n, np.int32)
        self.duplicates = np.zeros(n, np.bool_)
        self.errors: dict[int, str] = {}
        self.states = (
            None if state_sizes is None else [np.zeros((n, k), np.float32) for k in state_sizes]
        )
        self.pending = np.zeros(0, np.int64)
        self.t0 = time.perf_counter()
        self.future: asyncio.Future[Job] | None = None

    def fail(self, rows: np.ndarray | Sequence[int], code: Code, message: str) -> None:
        for i in np.asarray(rows, np.int64).tolist():
            self.codes[i] = code
            self.errors[i] = message


class Batcher:
    """Owns the session table; applies events in arrival order per session.

    Each run takes at most one pending event per session (a session's next event
    waits for the next run) and at most ``max_batch`` events, and starts as soon
    as the previous run is done, so a quiet server answers at once and a busy one
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
    ):
        self.runtime = runtime
        self.table = table
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_session_id_bytes = max_session_id_bytes
        self.event_size = runtime.spec.event_size
        self._jobs: deque[Job] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="onnxruntime")
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

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
        """Validate and queue a request's events; ``job.future`` resolves when all are answered.

        Rejected events get their code here and never touch a session; a new
        session is created only for an event that will be applied.
        """
        if self._closed:
            raise BatcherClosed("the server is draining")
        table = self.table
        job = Job(block, table.output_size, table.state_sizes if include_state else None)
        n = job.n
        codes = job.codes
        for i, message in block.bad.items():
            job.fail([i], Code.INVALID_ARGUMENT, message)
        if n:
            not_finite = np.flatnonzero(~np.isfinite(block.values).all(axis=1) & (codes == 0))
            if not_finite.size:
                job.fail(not_finite, Code.INVALID_ARGUMENT, "values contain NaN or Inf")
        slots = table.lookup(block.session_ids)
        unknown = np.flatnonzero((slots < 0) & (codes == 0))
        if unknown.size:
            self._create_sessions(job, block.session_ids, slots, unknown)
        job.slots = slots
        accepted = np.flatnonzero(codes == 0)
        self._count_rejections(codes)
        known = slots >= 0
        job.steps[known] = table.step[slots[known]]
        loop = asyncio.get_running_loop()
        job.future = loop.create_future()
        if accepted.size == 0:
            job.future.set_result(job)
            return job
        np.add.at(table.pending, slots[accepted], 1)
        job.pending = accepted
        self._jobs.append(job)
        self._idle.clear()
        self._wake.set()
        return job

    def _create_sessions(
        self, job: Job, ids: Sequence[str], slots: np.ndarray, rows: np.ndarray
    ) -> None:
        table = self.table
        now = time.time()
        for i in rows.tolist():
            sid = ids[i]
            slot = table.index.get(sid)  # created by an earlier row of this request
            if slot is None:
                problem = session_id_error(sid, self.max_session_id_bytes)
                if problem is not None:
                    job.fail([i], Code.INVALID_ARGUMENT, problem)
                    continue
                try:
                    slot = table.create(sid, now)
                except SessionCapError as exc:
                    job.fail([i], Code.RESOURCE_EXHAUSTED, str(exc))
                    continue
            slots[i] = slot

    def _count_rejections(self, codes: np.ndarray) -> None:
        if not codes.any():
            return
        values, counts = np.unique(codes[codes != 0], return_counts=True)
        for code, count in zip(values.tolist(), counts.tolist()):
            self.metrics.count_events(_OUTCOME[Code(code)], count)

    # -- the run loop --------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            if not self._jobs:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            async with self._lock:
                try:
                    await self._run_once()
                except Exception:  # a bug here must not stop the server's only batcher
                    log.exception("batcher run failed")
                    self._fail_all("internal error in the batcher")

    def _select(self) -> tuple[list[Job], np.ndarray, np.ndarray, np.ndarray]:
        """Pick the earliest pending event of each session, oldest first, up to max_batch.

        Returns the jobs looked at, and for each picked event its job number, its
        index inside the job and its position in that job's pending list.
        """
        jobs: list[Job] = []
        parts: list[np.ndarray] = []
        seen = 0
        for job in self._jobs:  # bounded look-ahead keeps a deep queue cheap
            jobs.append(job)
            parts.append(job.slots[job.pending])
            seen += job.pending.size
            if seen >= 4 * self.max_batch:
                break
        cat = parts[0] if len(parts) == 1 else np.concatenate(parts)
        _, first = np.unique(cat, return_index=True)
        picked = np.sort(first)[: self.max_batch]
        starts = np.cumsum([0] + [p.size for p in parts])
        job_of = np.searchsorted(starts, picked, side="right") - 1
        pos = picked - starts[job_of]
        return jobs, job_of, pos, cat[picked]

    async def _run_once(self) -> None:
        table = self.table
        jobs, job_of, pos, slots = self._select()
        bounds = np.searchsorted(job_of, np.arange(len(jobs) + 1))
        segments = []  # (job, event indices, positions in job.pending, batch slice)
        for j, job in enumerate(jobs):
            lo, hi = int(bounds[j]), int(bounds[j + 1])
            if lo < hi:
                p = pos[lo:hi]
                segments.append((job, job.pending[p], p, slice(lo, hi)))
        if len(segments) == 1:
            job, idx, _, _ = segments[0]
            values, seqs, resets = job.values[idx], job.seqs[idx], job.resets[idx]
            t0s = np.full(idx.size, job.t0)
        else:
            values = np.concatenate([s[0].values[s[1]] for s in segments])
            seqs = np.concatenate([s[0].seqs[s[1]] for s in segments])
            resets = np.concatenate([s[0].resets[s[1]] for s in segments])
            t0s = np.concatenate([np.full(s[1].size, s[0].t0) for s in segments])

        duplicate = (seqs > 0) & (seqs <= table.last_seq[slots])
        apply = ~duplicate
        run_slots = slots[apply]
        failed = False
        if run_slots.size:
            states = [t[run_slots] for t in table.states]
            run_resets = resets[apply]
            if run_resets.any():
                for s in states:
                    s[run_resets] = 0.0
            started = time.perf_counter()
            self.metrics.queue_seconds.observe_many(started - t0s[apply])
            try:
                output, new_states = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self.runtime.run, values[apply], states
                )
            except Exception:
                log.exception("ONNX Runtime failed on a batch of %d events", run_slots.size)
                failed = True
            else:
                self.metrics.inference_seconds.observe(time.perf_counter() - started)
                self.metrics.batch_size.observe(run_slots.size)
                for t, s in zip(table.states, new_states):
                    t[run_slots] = s
                table.output[run_slots] = output
                table.step[run_slots] += np.uint64(1)
                run_seqs = seqs[apply]
                table.last_seq[run_slots] = np.where(
                    run_seqs > 0, run_seqs, table.last_seq[run_slots]
                )
                table.updated[run_slots] = time.time()

        done = time.perf_counter()
        for job, idx, p, sl in segments:
            job_slots = slots[sl]
            job.duplicates[idx] = duplicate[sl]
            job.steps[idx] = table.step[job_slots]
            job.outputs[idx] = table.output[job_slots]
            if failed:
                rows = idx[apply[sl]]
                job.fail(rows, Code.INTERNAL, "the model failed on this event's batch")
                job.outputs[rows] = 0.0
            if job.states is not None:
                for out, t in zip(job.states, table.states):
                    out[idx] = t[job_slots]
            job.pending = np.delete(job.pending, p)
            if job.pending.size == 0 and job.future is not None and not job.future.done():
                job.future.set_result(job)
        table.finish(slots)

        applied = 0 if failed else int(apply.sum())
        self.metrics.count_events("applied", applied)
        self.metrics.count_events("duplicate", int(duplicate.sum()))
        self.metrics.count_events("failed", int(apply.sum()) - applied)
        self.metrics.event_seconds.observe_many(done - t0s)
        if any(job.pending.size == 0 for job in jobs):
            self._jobs = deque(job for job in self._jobs if job.pending.size)

    def _fail_all(self, message: str) -> None:
        for job in self._jobs:
            job.fail(job.pending, Code.INTERNAL, message)
            for slot in job.slots[job.pending].tolist():  # a slot may repeat: one finish each
                self.table.finish(np.array([slot]))
            job.pending = np.zeros(0, np.int64)
            if job.future is not None and not job.future.done():
                job.future.set_result(job)
        self._jobs.clear()

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
