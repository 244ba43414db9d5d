"""The run loop: admit, then plan → run → commit → apply or requeue → answer, one run at a time.

Requests are queued as they arrive (no per-event work on the caller's side
beyond decoding). The loop admits everything queued in one vectorised pass,
then runs ONNX Runtime on the earliest pending event of each session, at most
``max_batch``, as soon as the previous run is done: a quiet server answers at
once and a busy one forms large batches. The table is only touched on the
event loop's thread; ONNX Runtime runs on copies of the gathered rows in a
worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import numpy as np

from service.core.admission import Admission
from service.core.plan import StepPlan
from service.core.pool import Pool
from service.core.results import Intakes
from service.core.types import (
    INTERNAL_ERROR,
    MODEL_FAILED,
    OUTCOME,
    STORE_FAILED,
    Code,
    EngineClosed,
    EventBlock,
    Failure,
    Job,
)
from service.metrics import Metrics
from service.runtime import Runtime
from service.state.cache import SessionCache, StoreUnavailable
from service.worker import Worker

log = logging.getLogger(__name__)


@dataclass
class Lane:
    """One loaded model: its runtime, its sessions, its pending and parked events."""

    runtime: Runtime
    cache: SessionCache
    pool: Pool
    admission: Admission

    @property
    def busy(self) -> bool:
        """Events wait here: pending, or parked while their sessions are read."""
        return bool(len(self.pool) or self.admission.waiting)


class Engine:
    """Owns the runs: one ONNX Runtime run at a time, one event per session per run."""

    def __init__(
        self,
        runtime: Runtime,
        cache: SessionCache,
        metrics: Metrics,
        max_batch: int,
        max_session_id_bytes: int,
        inline_batch: int = 0,
    ):
        self.metrics = metrics
        self.max_batch = max_batch
        self.inline_batch = inline_batch
        """Runs of at most this many events run on the event loop itself."""
        self.intakes = Intakes()
        spec = runtime.spec
        pool = Pool(spec.event_size)
        admission = Admission(
            cache,
            pool,
            self.intakes,
            metrics,
            spec.output_size,
            spec.state_sizes,
            max_session_id_bytes,
        )
        self.lane = Lane(runtime, cache, pool, admission)
        self._inbox: list[Job] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._loop = asyncio.get_running_loop()
        self._worker = Worker(self._loop, "onnxruntime")
        self._loads: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._running: np.ndarray | None = None  # rows of the run in progress
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        self._task = self._loop.create_task(self._run_loop(), name="engine")

    def close(self) -> None:
        """Refuse new events from now on."""
        self._closed = True

    async def drain(self) -> None:
        """Refuse new events and wait until every accepted one is answered."""
        self._closed = True
        await self._idle.wait()

    async def stop(self) -> None:
        self._closed = True
        for task in (self._task, *self._loads):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._worker.stop()

    # -- events ----------------------------------------------------------------------

    def submit(self, block: EventBlock, include_state: bool = False) -> Job:
        """Queue a request's events; ``job.future`` resolves when all of them are answered."""
        if self._closed:
            self.metrics.count_events("unavailable", len(block.session_ids))
            raise EngineClosed("the server is draining")
        job = Job(block, include_state, self._loop.create_future())
        self._inbox.append(job)
        if not self._wake.is_set():
            self._idle.clear()
            self._wake.set()
        return job

    def _admit(self) -> None:
        jobs, self._inbox = self._inbox, []
        try:
            cold = self.lane.admission.admit(jobs)
        except Exception:  # as below: answer everyone rather than stop
            log.exception("batcher intake failed")
            self._fail_everything()
            for job in jobs:
                job.fail_whole(INTERNAL_ERROR)
            return
        if cold:
            task = self._loop.create_task(self._restore(cold), name="restore")
            self._loads.add(task)
            task.add_done_callback(self._loads.discard)

    async def _restore(self, session_ids: list[str]) -> None:
        """Read sessions not in memory from the store, then let their events run.

        Off the run loop: warm sessions keep being answered meanwhile.
        """
        cache = self.lane.cache
        try:
            async with cache.claim(session_ids):
                try:
                    stored = await cache.load(session_ids)
                except StoreUnavailable:
                    stored = None
                self.lane.admission.unpark(session_ids, stored)
        except Exception:
            log.exception("restoring sessions failed")
            self._fail_everything()
        self._wake.set()

    # -- the run loop --------------------------------------------------------------

    async def _run_loop(self) -> None:
        lane = self.lane
        while True:
            if self._inbox:
                self._admit()
            if not len(lane.pool):
                if self._inbox:
                    continue
                if not lane.admission.waiting:
                    self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            async with lane.cache.lock:
                try:
                    await self._step(lane)
                except Exception:  # a bug here must not stop the server's only run loop
                    log.exception("batcher run failed")
                    self._fail_everything()

    async def _step(self, lane: Lane) -> None:
        """One run: plan it, run and commit it, answer its events."""
        plan = StepPlan.make(lane.pool, lane.cache.table, self.max_batch)
        self._running = plan.slots
        failure = await self._run(lane, plan) if plan.run_slots.size else None
        self._answer(lane, plan, failure)
        lane.cache.table.finish(plan.slots)
        self._running = None
        self._count(plan, failure)

    async def _run(self, lane: Lane, plan: StepPlan) -> Failure | None:
        """Run the model, store the new rows, then apply them; how the run failed, if it did.

        Only what is stored is applied. Rows another replica wrote first are
        reloaded, and their events go back to the front of the pool to run again.
        """
        cache, table = lane.cache, lane.cache.table
        if cache.failure is not None:
            return (Code.UNAVAILABLE, STORE_FAILED)  # fail fast; the probe sees recovery
        started = time.perf_counter()
        self.metrics.queue_seconds.observe_many(started - plan.queued_at)
        runtime = lane.runtime
        try:
            if plan.run_slots.size <= self.inline_batch:
                # A tiny run costs less than the hop to the worker thread and back.
                output, states, cpu = runtime.timed_run(plan.values, plan.states)
            else:
                output, states, cpu = await self._worker.call(
                    runtime.timed_run, plan.values, plan.states
                )
        except Exception:
            log.exception("ONNX Runtime failed on a batch of %d events", plan.run_slots.size)
            return (Code.INTERNAL, MODEL_FAILED)
        self.metrics.inference_cpu.inc(cpu)
        self.metrics.inference_seconds.observe(time.perf_counter() - started)
        self.metrics.batch_size.observe(plan.run_slots.size)
        step, last_seq = plan.counters(table)
        now = time.time()
        conflicts = None
        if cache.persistent:
            try:
                conflicts = await cache.commit(plan.run_slots, step, last_seq, states, output, now)
            except StoreUnavailable:
                return (Code.UNAVAILABLE, STORE_FAILED)
        plan.apply(table, output, states, step, last_seq, now)
        if conflicts is not None:
            cache.reload(plan.run_slots[conflicts.index], conflicts)
            plan.requeue(lane.pool, conflicts.index)
        return None

    def _answer(self, lane: Lane, plan: StepPlan, failure: Failure | None) -> None:
        table = lane.cache.table
        slots = plan.slots
        if not slots.size:  # every event of the run went back to the pool
            return
        self.intakes.answer(
            plan.events,
            table.steps(slots),
            table.outputs(slots),
            lambda: table.gather(slots),
            plan.duplicate,
            failure,
        )

    def _count(self, plan: StepPlan, failure: Failure | None) -> None:
        ran = int(plan.run_slots.size)
        self.metrics.count_events("applied", 0 if failure else ran)
        self.metrics.count_events("duplicate", int(plan.slots.size) - ran)
        if failure is not None:
            self.metrics.count_events(OUTCOME[failure[0]], ran)
        self.metrics.event_seconds.observe_many(time.perf_counter() - plan.events["t0"])

    def _fail_everything(self) -> None:
        """After a core bug: answer every unanswered event INTERNAL; no caller hangs.

        Pending counts of the pool's rows and of the run that failed are released.
        """
        lane = self.lane
        table = lane.cache.table
        for slot in lane.pool.take_all()["slots"].tolist():  # a slot may repeat: one each
            table.finish(np.array([slot]))
        if self._running is not None:
            table.finish(self._running)
            self._running = None
        lane.admission.drop_parked()
        self.intakes.fail_all(INTERNAL_ERROR)
