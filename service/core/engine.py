"""The run loop: admit, then plan → run → commit → apply or requeue → answer, one run at a time.

Requests are queued as they arrive (no per-event work on the caller's side
beyond decoding). The loop admits everything queued in one vectorised pass per
model, then runs ONNX Runtime on the earliest pending event of each session of
one lane (model version), at most ``max_batch``, as soon as the previous run is
done: a quiet server answers at once and a busy one forms large batches. Lanes
take turns oldest event first; one run at a time on the device. The tables are
only touched on the event loop's thread; ONNX Runtime runs on copies of the
gathered rows in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from asyncio import Future
from collections.abc import Coroutine
from typing import Any

import numpy as np

from service.core.admission import Admission
from service.core.lane import Lane
from service.core.model import ServedModel
from service.core.plan import StepPlan
from service.core.results import Intakes, answer_request
from service.core.scan import scan
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
    UnknownModel,
)
from service.metrics import Metrics
from service.state.cache import StoreAccess, StoreUnavailable
from service.worker import Worker

log = logging.getLogger(__name__)


class _RunFailed(Exception):
    """A run did not happen; ``failure`` is how its events are answered."""

    def __init__(self, failure: Failure):
        self.failure = failure


class Engine:
    """Owns the runs: one ONNX Runtime run at a time, one event per session per run."""

    def __init__(
        self,
        metrics: Metrics,
        store: StoreAccess,
        max_batch: int,
        max_session_id_bytes: int,
        inline_batch: int = 0,
    ):
        self.metrics = metrics
        self.store = store
        self.max_batch = max_batch
        self.max_session_id_bytes = max_session_id_bytes
        self.inline_batch = inline_batch
        """Runs of at most this many events run on the event loop itself."""
        self.intakes = Intakes()
        self.models: dict[str, ServedModel] = {}
        self.admissions: dict[str, Admission] = {}
        self._lanes: list[Lane] = []
        self._one_lane = False
        self._direct = False
        """Small requests may run on their caller's turn (``_run_direct``): no lane has a store."""
        self.generation = 0
        """Counts changes of the lanes (a version loaded, retired or dropped)."""
        self._inbox: list[Job] = []
        self._wake = asyncio.Event()
        self._woken = False
        """Mirrors ``_wake.is_set()`` without a call per request."""
        self._parked = False
        """The run loop waits for work: nothing is pending or running."""
        self._finished_at = 0.0
        """When the last run ended (``perf_counter``)."""
        self._run_seconds = 0.0
        """How long the last run took, answering included."""
        self._last_size = 0
        """How many events the last run answered."""
        self._idle = asyncio.Event()
        self._idle.set()
        self._loop = asyncio.get_running_loop()
        self._worker = Worker(self._loop, "onnxruntime")
        self._tasks: set[asyncio.Task[Any]] = set()
        self._task: asyncio.Task[None] | None = None
        self._running: tuple[Lane, np.ndarray] | None = None  # rows of the run in progress
        self._closed = False

    # -- models ----------------------------------------------------------------------

    def add_model(self, model: ServedModel) -> None:
        self.models[model.name] = model
        self.admissions[model.name] = Admission(
            model, self.intakes, self.metrics, self.max_session_id_bytes
        )
        self.lanes_changed()

    def remove_model(self, name: str) -> None:
        self.models.pop(name, None)
        self.admissions.pop(name, None)
        self.lanes_changed()

    def lanes_changed(self) -> None:
        """A lane was added, retired or dropped: the run loop's list follows."""
        self._lanes = [lane for model in self.models.values() for lane in model.by_age]
        self._one_lane = len(self._lanes) == 1
        self._direct = not any(lane.persistent for lane in self._lanes)
        self.generation += 1

    async def run_batch(
        self, lane: Lane, values: np.ndarray, states: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One batch on a lane's runtime in the run thread, between the loop's runs (replays)."""
        output, new_states, _ = await self._worker.call(lane.runtime.timed_run, values, states)
        return output, new_states

    def spawn(self, coroutine: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """A background task of the engine (restores, moves), cancelled at ``stop``."""
        task = self._loop.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

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
        for task in (self._task, *self._tasks):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._worker.stop()

    # -- events ----------------------------------------------------------------------

    def submit(
        self,
        model: str | ServedModel,
        block: EventBlock,
        include_state: bool = False,
        version: int = 0,
    ) -> Job:
        """Queue a request's events; ``job.future`` resolves when all of them are answered.

        ``model``: its name, or the model itself as the data plane found it.
        """
        if self._closed:
            self.metrics.count_events("unavailable", len(block.session_ids))
            raise EngineClosed("the server is draining")
        served: ServedModel | None = (
            self.models.get(model) if model.__class__ is str else model  # type: ignore[arg-type,assignment]
        )
        if served is None or served.closed:
            raise UnknownModel(f"no model {model!r} is loaded")
        job = Job(block, include_state, Future(loop=self._loop), served.name, version)
        if (
            self._parked
            and self._direct  # no lane commits to a store (its commit is awaited)
            and not self._woken  # nothing else waits for the run loop
            and job.n <= self.inline_batch
            and self._last_size <= self.inline_batch  # a busy server's runs are large
            and job.t0 - self._finished_at > self._run_seconds
        ):
            if not self._apply_at_once(served, job):
                self._inbox.append(job)
                self._run_direct()
            return job
        self._inbox.append(job)
        if not self._woken:
            self._kick()
        return job

    def _kick(self) -> None:
        """Wake the run loop: there is work for it."""
        self._woken = True
        self._idle.clear()
        self._wake.set()

    def _apply_at_once(self, served: ServedModel, job: Job) -> bool:
        """Apply a small request on its caller's turn, from its own columns: the engine is
        idle (see ``_run_direct``). Whether it was; if not, nothing changed.

        It is when the model has one version, nothing is moving between versions, and
        every event is valid and for a distinct session already in memory, which asks
        no state back (a lone event on a live session, the common case): no intake,
        no pool, no plan of the pool. Anything else (a new session, a refusal, a
        session twice, a request naming a version) is admitted as usual.
        """
        lanes = served.by_age
        if len(lanes) != 1 or served.moving or job.include_state:
            return False
        lane = lanes[0]
        if lane.pool.size or lane.cache.lock.locked():
            return False
        table = lane.table
        try:
            found = scan([job], table.index, lane.spec.event_size)
            if found.unknown or found.bad or found.not_finite:
                return False
            if job.version and job.version != lane.version:
                return False
            slots = found.slots
            if slots.size > 1 and np.unique(slots).size < slots.size:
                return False
            plan = StepPlan.of_request(found, table)
            failure = self._apply_now(lane, plan)
            answer_request(
                job,
                table.steps(slots),
                table.outputs(slots),
                plan.duplicate,
                failure,
                lane.version,
            )
            self._finished(lane, plan, failure)
        except Exception:  # as in the run loop: answer rather than stop
            log.exception("batcher run failed")
            job.fail_whole(INTERNAL_ERROR)
        return True

    def _run_direct(self) -> None:
        """Admit and run a small request on its caller's turn: the engine is idle.

        A lone event then costs no wake-up of the run loop, no task switch and no
        thread hop. Idle means the run loop waits for work, has waited longer than
        its last run took, and that run was small: requests that come close behind
        one another, or after a large run (a busy server), wake the run loop as
        usual and are batched together.
        """
        self._admit()
        lane = self._next_lane()
        if (
            lane is not None
            and lane.pool.size <= self.inline_batch
            and not lane.cache.lock.locked()
        ):
            try:
                self._step_now(lane)
            except Exception:  # as in the run loop: answer everyone rather than stop
                log.exception("batcher run failed")
                self._fail_everything()
            lane.after_run()
        if self._inbox or self._next_lane() is not None:
            self._kick()

    def _admit(self) -> None:
        jobs, self._inbox = self._inbox, []
        groups: dict[str, list[Job]]
        if len(self.admissions) == 1:  # one model: every job is for it (submit checked)
            groups = {jobs[0].model: jobs}
        else:
            groups = {}
            for job in jobs:
                groups.setdefault(job.model, []).append(job)
        for name, group in groups.items():
            admission = self.admissions.get(name)
            if admission is None or not admission.model.lanes:
                for job in group:  # unloaded while the request waited
                    job.fail_whole(f"model {name!r} is not loaded")
                continue
            try:
                cold = admission.admit(group)
            except Exception:  # as below: answer everyone rather than stop
                log.exception("batcher intake failed")
                self._fail_everything()
                for job in group:
                    job.fail_whole(INTERNAL_ERROR)
                continue
            if cold:
                self.spawn(self._restore(admission, cold), "restore")

    async def _restore(self, admission: Admission, session_ids: list[str]) -> None:
        """Read sessions not in memory from the store, place them, then let their events run.

        Off the run loop: warm sessions keep being answered meanwhile.
        """
        try:
            await admission.parking.restore(session_ids)
        finally:
            self._wake.set()

    async def move(
        self,
        model: ServedModel,
        session_ids: list[str],
        source: Lane,
        target: Lane,
        mode: str,
        persist: bool = False,
    ) -> list[str]:
        """Move sessions between versions; their events that waited meanwhile run after."""
        try:
            return await self.admissions[model.name].parking.move(
                session_ids, source, target, mode, persist
            )
        finally:
            self._wake.set()

    # -- the run loop --------------------------------------------------------------

    async def _run_loop(self) -> None:
        while True:
            if self._inbox:
                self._admit()
            lane = self._next_lane()
            if lane is None:
                if self._inbox:
                    continue
                if not any(a.parking.waiting for a in self.admissions.values()):
                    self._idle.set()
                self._woken = False
                self._wake.clear()
                self._parked = True
                try:
                    await self._wake.wait()
                finally:
                    self._parked = False
                continue
            async with lane.cache.lock:
                try:
                    await self._step(lane)
                except Exception:  # a bug here must not stop the server's only run loop
                    log.exception("batcher run failed")
                    self._fail_everything()
            lane.after_run()

    def _next_lane(self) -> Lane | None:
        """The lane with events pending, oldest event first."""
        lanes = self._lanes
        if self._one_lane:
            return lanes[0] if lanes[0].pool.size else None
        ready = [lane for lane in lanes if lane.pool.size]
        if not ready:
            return None
        return min(ready, key=lambda lane: lane.oldest)

    async def _step(self, lane: Lane) -> None:
        """One run: plan it, run and commit it, answer its events."""
        plan = StepPlan.make(lane.pool, lane.table, self.max_batch)
        self._running = (lane, plan.slots)
        failure = await self._run(lane, plan) if plan.run_slots.size else None
        self._done(lane, plan, failure)

    def _step_now(self, lane: Lane) -> None:
        """``_step`` without awaiting: a small run on the loop, no store to commit to."""
        plan = StepPlan.make(lane.pool, lane.table, self.max_batch)
        self._running = (lane, plan.slots)
        self._done(lane, plan, self._apply_now(lane, plan))

    def _apply_now(self, lane: Lane, plan: StepPlan) -> Failure | None:
        """Run a small plan on the loop and apply it (no store to commit to); how it failed."""
        if not plan.run_slots.size:
            return None
        try:
            output, states = self._infer(lane, plan)
        except _RunFailed as exc:
            return exc.failure
        step, last_seq = plan.counters(lane.table)
        plan.apply(lane.table, output, states, step, last_seq, time.time())
        return None

    def _done(self, lane: Lane, plan: StepPlan, failure: Failure | None) -> None:
        """Answer a run's events and release their rows."""
        self._answer(lane, plan, failure)
        lane.table.finish(plan.slots)
        self._running = None
        self._finished(lane, plan, failure)

    def _finished(self, lane: Lane, plan: StepPlan, failure: Failure | None) -> None:
        """A run is answered: its metrics, and what the next request's path is judged by."""
        self._count(lane, plan, failure)
        self._finished_at = time.perf_counter()
        self._run_seconds = self._finished_at - plan.started
        self._last_size = plan.slots.size

    def _infer(self, lane: Lane, plan: StepPlan) -> tuple[np.ndarray, list[np.ndarray]]:
        """Run the model on the loop (a small run): its output and states (_RunFailed: why not)."""
        self._check_store(lane)
        started = time.perf_counter()
        runtime = lane.runtime
        cpu: float | None = None
        try:
            if runtime.on_cpu:  # a lone event through the arrays bound once (the loop's)
                run = runtime.run_one if plan.run_slots.size == 1 else runtime.run
                output, states = run(plan.values, plan.states)
            else:
                output, states, cpu = runtime.timed_run(plan.values, plan.states)
        except Exception:
            raise _RunFailed(self._model_failed(plan)) from None
        self._ran(lane, plan, started, cpu)
        return output, states

    async def _run(self, lane: Lane, plan: StepPlan) -> Failure | None:
        """Run the model, store the new rows, then apply them; how the run failed, if it did.

        Only what is stored is applied. Rows another replica wrote first are
        reloaded, and their events go back to the front of the pool to run again.
        """
        cache, table = lane.cache, lane.table
        try:
            if plan.run_slots.size <= self.inline_batch and not cache.persistent:
                # A small run costs less than the hop to the worker thread and back. With a
                # store every run stays in the thread, as before: its commit is what a run
                # waits for there (not measured otherwise).
                output, states = self._infer(lane, plan)
            else:
                self._check_store(lane)
                started = time.perf_counter()
                try:
                    output, states, cpu = await self._worker.call(
                        lane.runtime.timed_run, plan.values, plan.states
                    )
                except Exception:
                    return self._model_failed(plan)
                self._ran(lane, plan, started, cpu)
        except _RunFailed as exc:
            return exc.failure
        step, last_seq = plan.counters(table)
        now = time.time()
        conflicts = None
        if cache.persistent:
            kept = table.kept_after(plan.run_slots, plan.values, plan.run_resets)
            try:
                conflicts = await cache.commit(
                    plan.run_slots, step, last_seq, states, output, now, kept
                )
            except StoreUnavailable:
                return (Code.UNAVAILABLE, STORE_FAILED)
        plan.apply(table, output, states, step, last_seq, now)
        if conflicts is not None:
            moved = cache.reload(plan.run_slots[conflicts.index], conflicts)
            plan.requeue(lane.pool, conflicts.index)
            if moved:
                self._moved_elsewhere(lane, moved)
        return None

    @staticmethod
    def _check_store(lane: Lane) -> None:
        """A store that failed fails the run at once (its probe sees it recover)."""
        if lane.cache.failure is not None:
            raise _RunFailed((Code.UNAVAILABLE, STORE_FAILED))

    @staticmethod
    def _model_failed(plan: StepPlan) -> Failure:
        log.exception("ONNX Runtime failed on a batch of %d events", plan.run_slots.size)
        return (Code.INTERNAL, MODEL_FAILED)

    def _ran(self, lane: Lane, plan: StepPlan, started: float, cpu: float | None) -> None:
        """The model ran: its events' queue wait now; its time and CPU counted with the run.

        ``cpu`` None: the run was on the loop and on the CPU, its thread doing nothing else
        meanwhile, so its time is its CPU time (two clock syscalls fewer per lone event)."""
        self.metrics.queue_seconds.observe_since(started, plan.queued_at)
        plan.seconds = time.perf_counter() - started
        plan.cpu = plan.seconds if cpu is None else cpu

    def _moved_elsewhere(self, lane: Lane, session_ids: list[str]) -> None:
        """Another replica moved these sessions to another version: drop them here and read
        them again (their requeued events wait for it)."""
        admission = self.admissions[lane.model]
        cold = admission.parking.reread(lane, session_ids)
        if cold:
            self.spawn(self._restore(admission, cold), "restore")

    def _answer(self, lane: Lane, plan: StepPlan, failure: Failure | None) -> None:
        table = lane.table
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
            lane.version,
            table.state_sizes,
        )

    def _count(self, lane: Lane, plan: StepPlan, failure: Failure | None) -> None:
        ran = int(plan.run_slots.size)
        failed = None if failure is None else OUTCOME[failure[0]]
        self.metrics.count_run(
            lane.metrics, ran, int(plan.slots.size) - ran, failed, plan.seconds, plan.cpu
        )
        self.metrics.event_seconds.observe_since(time.perf_counter(), plan.events["t0"])

    def _fail_everything(self) -> None:
        """After a core bug: answer every unanswered event INTERNAL; no caller hangs.

        Pending counts of the pools' rows and of the run that failed are released.
        """
        for lane in self._lanes:
            for slot in lane.pool.take_all()["slots"].tolist():  # a slot may repeat
                lane.table.finish(np.array([slot]))
        if self._running is not None:
            lane, slots = self._running
            lane.table.finish(slots)
            self._running = None
        for admission in self.admissions.values():
            admission.parking.drop_parked()
        self.intakes.fail_all(INTERNAL_ERROR)

    @property
    def lanes(self) -> list[Lane]:
        return self._lanes
