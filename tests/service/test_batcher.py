"""The engine without a network: one event per session per run, order, runs that fail."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from service.core.engine import Engine
from service.core.sessions import Sessions
from service.core.types import Code, EngineClosed, EventBlock, Job
from service.metrics import Metrics
from service.models import LoadSettings, Registry
from service.repository import ModelConfig, SingleModel
from service.runtime import Runtime, load_model_bytes
from service.state.cache import StoreAccess
from service.state.table import Limits, SessionSnapshot
from service.store import NullStore
from service.store.base import StateStore, StoredRows
from service.store.sqlite import SqliteStore
from tests.service.models import failing_model, lying_model
from tests.service.reference import Reference, events


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    return Runtime(*load_model_bytes(None), "cpu")


class Batcher:
    """The engine serving one model, "m", from a given runtime (no network)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.metrics = engine.metrics
        self.lane = engine.models["m"].lanes[1]
        self.sessions = Sessions(engine, engine.models["m"])

    def start(self) -> None:
        self.engine.start()

    def submit(self, block: EventBlock) -> Job:
        return self.engine.submit("m", block)

    async def get(self, session_id: str) -> SessionSnapshot | None:
        found = await self.sessions.get(session_id)
        return None if found is None else found.snapshot

    async def drain(self) -> None:
        await self.engine.drain()

    async def stop(self) -> None:
        await self.engine.stop()


async def make(
    runtime: Runtime, max_batch: int = 64, inline_batch: int = 0, store: StateStore | None = None
) -> Batcher:
    metrics = Metrics(CollectorRegistry())
    access = StoreAccess(store if store is not None else NullStore(), metrics)
    engine = Engine(metrics, access, max_batch, 128, inline_batch)
    registry = Registry(
        engine,
        access,
        Limits(1000),
        metrics,
        SingleModel("m", None),
        LoadSettings("cpu", 1, max_batch, 1024),
        "m",
    )
    await registry.install("m", 1, runtime, b"", ModelConfig("m"))
    return Batcher(engine)


def block(ids: list[str], values: np.ndarray, seqs: list[int] | None = None) -> EventBlock:
    n = len(ids)
    return EventBlock(ids, values, np.array(seqs or [0] * n, np.uint64), np.zeros(n, np.bool_), {})


@pytest.mark.parametrize("inline_batch", [0, 64])
async def test_one_event_per_session_per_run_in_order(runtime: Runtime, inline_batch: int) -> None:
    batcher = await make(runtime, inline_batch=inline_batch)
    batcher.start()
    ref = Reference()
    xs = events(np.random.default_rng(0), 6)
    ids = ["a", "a", "b", "a", "b", "c"]
    job = batcher.submit(block(ids, xs))
    await job.future  # type: ignore[misc]
    assert job.steps.tolist() == [1, 2, 1, 3, 2, 1]
    for i, sid in enumerate(ids):
        np.testing.assert_allclose(job.outputs[i], ref.step(sid, xs[i]), atol=1e-5)
    # "a" has three events: three runs, the first with a, b, c.
    batch_sizes = batcher.metrics.batch_size.collect()[0].samples
    assert [s.value for s in batch_sizes if s.name.endswith("_count")] == [3]
    assert [s.value for s in batch_sizes if s.name.endswith("_sum")] == [6]
    await batcher.stop()


def runs(batcher: Batcher) -> list[float]:
    """The engine's runs so far: their count and how many events they ran in all."""
    samples = batcher.metrics.batch_size.collect()[0].samples
    return [s.value for s in samples if s.name.endswith(("_count", "_sum"))]


async def parked(batcher: Batcher) -> None:
    """Let the run loop start and wait for work."""
    batcher.start()
    for _ in range(3):
        await asyncio.sleep(0)


async def test_an_idle_engine_answers_a_small_request_as_it_is_submitted(runtime: Runtime) -> None:
    batcher = await make(runtime, inline_batch=16)
    await parked(batcher)
    ref = Reference()
    xs = events(np.random.default_rng(7), 3)
    job = batcher.submit(block(["a", "b", "a"], xs))
    # On the caller's turn: "a" and "b" ran; a's second event waits for the run loop.
    assert job.remaining == 1 and not job.future.done()  # type: ignore[union-attr]
    await job.future  # type: ignore[misc]
    assert job.steps.tolist() == [1, 1, 2]
    for i, sid in enumerate(["a", "b", "a"]):
        np.testing.assert_allclose(job.outputs[i], ref.step(sid, xs[i]), atol=1e-5)
    lone = batcher.submit(block(["c"], xs[:1]))
    assert lone.future.done()  # type: ignore[union-attr]
    np.testing.assert_allclose(lone.outputs[0], ref.step("c", xs[0]), atol=1e-5)
    await batcher.stop()


async def idle(batcher: Batcher) -> None:
    """Wait until the engine counts as idle again: longer since its last run than that run
    took (requests closer behind one another are batched)."""
    engine = batcher.engine
    while time.perf_counter() - engine._finished_at <= engine._run_seconds:
        await asyncio.sleep(engine._run_seconds)
    await asyncio.sleep(0)


def intakes_opened(batcher: Batcher) -> int:
    """How many intakes (result arrays of requests admitted together) the engine opened."""
    return batcher.engine.intakes._next


async def test_a_lone_event_on_a_live_session_is_applied_from_its_own_request(
    runtime: Runtime,
) -> None:
    """On an idle engine a request of live sessions is applied at once from its own
    columns: no intake is opened, and answers, state and metrics are the usual ones."""
    batcher = await make(runtime, inline_batch=16)
    await parked(batcher)
    ref = Reference()
    xs = events(np.random.default_rng(21), 8)
    first = batcher.submit(block(["a", "b"], xs[:2], [1, 0]))  # new sessions: admitted
    assert first.future.done() and intakes_opened(batcher) == 1  # type: ignore[union-attr]
    for i in range(2):
        ref.step("ab"[i], xs[i])
    opened, before = intakes_opened(batcher), runs(batcher)
    await idle(batcher)
    lone = batcher.submit(block(["a"], xs[2:3], [2]))
    await idle(batcher)
    both = batcher.submit(block(["b", "a"], xs[3:5]))
    assert lone.future.done() and both.future.done()  # type: ignore[union-attr]
    assert intakes_opened(batcher) == opened  # neither went through admission's intake
    assert runs(batcher) == [before[0] + 2, before[1] + 3]  # two runs, counted as usual
    assert lone.steps.tolist() == [2] and both.steps.tolist() == [2, 3]
    assert lone.codes.tolist() == [0] and both.codes.tolist() == [0, 0]
    assert lone.versions.tolist() == [1] and both.versions.tolist() == [1, 1]
    assert not lone.duplicates.any() and not both.errors
    np.testing.assert_allclose(lone.outputs[0], ref.step("a", xs[2]), atol=1e-5)
    np.testing.assert_allclose(both.outputs[0], ref.step("b", xs[3]), atol=1e-5)
    np.testing.assert_allclose(both.outputs[1], ref.step("a", xs[4]), atol=1e-5)
    a = await batcher.get("a")
    assert a is not None and (a.step, a.last_seq) == (3, 2)
    np.testing.assert_allclose(a.output, both.outputs[1])
    # A reset starts from zeros, at once as well.
    reset = EventBlock(["a"], xs[5:6], np.array([7], np.uint64), np.ones(1, np.bool_), {})
    await idle(batcher)
    again = batcher.submit(reset)
    assert again.future.done() and intakes_opened(batcher) == opened  # type: ignore[union-attr]
    np.testing.assert_allclose(again.outputs[0], ref.step("a", xs[5], reset=True), atol=1e-5)
    a = await batcher.get("a")
    assert a is not None and (a.step, a.last_seq) == (4, 7)
    await batcher.stop()


async def test_a_request_applied_at_once_answers_duplicates_and_keeps_state(
    runtime: Runtime,
) -> None:
    batcher = await make(runtime, inline_batch=16)
    await parked(batcher)
    xs = events(np.random.default_rng(22), 3)
    await batcher.submit(block(["a"], xs[:1], [5])).future  # type: ignore[misc]
    kept = await batcher.get("a")
    opened = intakes_opened(batcher)
    await idle(batcher)
    dup = batcher.submit(block(["a"], xs[1:2], [5]))  # seq 5 was applied: answered as is
    assert dup.future.done() and intakes_opened(batcher) == opened  # type: ignore[union-attr]
    assert dup.duplicates.tolist() == [True] and dup.codes.tolist() == [0]
    assert dup.steps.tolist() == [1]
    np.testing.assert_array_equal(dup.outputs[0], kept.output)  # type: ignore[union-attr]
    after = await batcher.get("a")
    assert after is not None and (after.step, after.last_seq) == (1, 5)
    np.testing.assert_array_equal(after.states[0], kept.states[0])  # type: ignore[union-attr]
    await batcher.stop()


@pytest.mark.parametrize(
    "ids, version",
    [(["a", "a"], 0), (["a", "new"], 0), (["a"], 2)],
    ids=["a session twice", "a new session", "another version"],
)
async def test_what_cannot_be_applied_at_once_is_admitted_as_usual(
    runtime: Runtime, ids: list[str], version: int
) -> None:
    batcher = await make(runtime, inline_batch=16)
    await parked(batcher)
    xs = events(np.random.default_rng(23), 3)
    await batcher.submit(block(["a"], xs[:1])).future  # type: ignore[misc]
    opened = intakes_opened(batcher)
    await idle(batcher)
    job = batcher.engine.submit("m", block(ids, xs[1 : 1 + len(ids)]), version=version)
    await job.future  # type: ignore[misc]
    if version:  # the session is on version 1: refused whole at admission
        assert job.codes.tolist() == [Code.FAILED_PRECONDITION]
        assert job.steps.tolist() == [1]
    else:
        assert intakes_opened(batcher) == opened + 1
        assert job.codes.tolist() == [0] * len(ids)
        assert job.steps.tolist() == ([2, 3] if ids == ["a", "a"] else [2, 1])
    await batcher.stop()


async def test_a_run_applied_at_once_that_fails_answers_internal_and_keeps_state() -> None:
    runtime = Runtime(failing_model(), "failing.onnx", "cpu")
    runtime.warm_up(8)
    batcher = await make(runtime, inline_batch=16)
    await parked(batcher)
    good = np.array([[1.0, 2.0]], np.float32)
    await batcher.submit(block(["a"], good, [1])).future  # type: ignore[misc]
    before = await batcher.get("a")
    opened = intakes_opened(batcher)
    await idle(batcher)
    bad = batcher.submit(block(["a"], np.array([[50.0, 0.0]], np.float32), [2]))
    assert bad.future.done() and intakes_opened(batcher) == opened  # type: ignore[union-attr]
    assert bad.codes.tolist() == [Code.INTERNAL] and bad.versions.tolist() == [0]
    assert bad.errors == {0: "the model failed on this event's batch"}
    assert not bad.outputs.any() and bad.steps.tolist() == [1]
    after = await batcher.get("a")
    assert before is not None and after is not None
    assert (after.step, after.last_seq) == (1, 1)
    np.testing.assert_array_equal(after.states[0], before.states[0])
    await batcher.stop()


async def test_requests_close_behind_one_another_are_still_batched(runtime: Runtime) -> None:
    batcher = await make(runtime, inline_batch=16)
    await parked(batcher)
    xs = events(np.random.default_rng(8), 20)
    big = batcher.submit(block([f"s{i}" for i in range(17)], xs[:17]))  # over --inline-batch
    small = [batcher.submit(block([f"t{i}"], xs[17 + i : 18 + i])) for i in range(3)]
    assert not any(j.future.done() for j in (big, *small))  # type: ignore[union-attr]
    await asyncio.gather(big.future, *(j.future for j in small))  # type: ignore[arg-type]
    assert runs(batcher) == [1, 20]  # one run for all four requests
    await batcher.stop()


async def test_after_a_large_run_a_small_request_still_waits_for_the_run_loop(
    runtime: Runtime,
) -> None:
    """A large run means a busy server: the next small request is batched, not run alone."""
    batcher = await make(runtime, inline_batch=16)
    await parked(batcher)
    xs = events(np.random.default_rng(11), 21)
    big = batcher.submit(block([f"s{i}" for i in range(20)], xs[:20]))
    await big.future  # type: ignore[misc]
    for _ in range(3):
        await asyncio.sleep(0)  # the run loop parks again
    small = batcher.submit(block(["a"], xs[20:]))
    assert not small.future.done()  # type: ignore[union-attr]
    await small.future  # type: ignore[misc]
    assert small.steps.tolist() == [1]
    await batcher.stop()


async def test_without_inline_runs_nothing_runs_on_the_callers_turn(runtime: Runtime) -> None:
    batcher = await make(runtime, inline_batch=0)
    await parked(batcher)
    job = batcher.submit(block(["a"], events(np.random.default_rng(9), 1)))
    assert not job.future.done()  # type: ignore[union-attr]
    await job.future  # type: ignore[misc]
    assert job.steps.tolist() == [1]
    await batcher.stop()


async def test_with_a_store_an_idle_engine_still_commits_before_answering(
    runtime: Runtime, tmp_path: Path
) -> None:
    store = SqliteStore(str(tmp_path / "state.db"))
    store.open(False, "m")
    batcher = await make(runtime, inline_batch=16, store=store)
    await parked(batcher)
    job = batcher.submit(block(["a"], events(np.random.default_rng(10), 1), [5]))
    assert not job.future.done()  # type: ignore[union-attr]  # the commit is awaited
    await job.future  # type: ignore[misc]
    assert job.steps.tolist() == [1]
    (stored,) = store.load("m", ["a"])  # what the store holds once the answer is out
    assert stored.step.tolist() == [1] and stored.last_seq.tolist() == [5]
    await batcher.stop()
    await batcher.engine.store.stop()


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until ``check()`` is true (store reads end in the store's thread)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def test_a_run_that_holds_an_intake_between_another_s_events_answers_both(
    runtime: Runtime, tmp_path: Path
) -> None:
    """Events parked while their sessions are read join the pool behind later requests'
    events, so one run can hold B's events, then A's, then B's again. Each request gets
    its own answers: the run once credited A's to B, and neither request (nor the streams
    behind them) was ever answered."""
    reads = threading.Event()

    class SlowStore(SqliteStore):
        def load(self, model: str, session_ids: Sequence[str]) -> list[StoredRows]:
            reads.wait(10)  # one reader thread, reads in order: they end when the test says
            return super().load(model, session_ids)

    store = SlowStore(str(tmp_path / "state.db"))
    store.open(False, "m")
    batcher = await make(runtime, store=store)
    batcher.start()
    parking = batcher.engine.admissions["m"].parking
    pool = batcher.lane.pool
    ref = Reference()
    xs = events(np.random.default_rng(11), 4)
    reads.set()
    await batcher.submit(block(["w"], xs[:1])).future  # type: ignore[misc]
    ref.step("w", xs[0])
    reads.clear()
    async with batcher.lane.cache.lock:  # as a session call does: no run until it is done
        first = batcher.submit(block(["a"], xs[1:2]))  # "a" is read from the store
        await until(lambda: parking.waiting == 1)
        second = batcher.submit(block(["w", "b"], xs[2:]))  # "w" is pending, "b" is read
        await until(lambda: parking.waiting == 2 and pool.size == 1)
        reads.set()
        await until(lambda: pool.size == 3)  # w (second), a (first), b (second)
    await asyncio.wait_for(asyncio.gather(first.future, second.future), 10)  # type: ignore[arg-type]
    assert first.steps.tolist() == [1] and second.steps.tolist() == [2, 1]
    np.testing.assert_allclose(first.outputs[0], ref.step("a", xs[1]), atol=1e-5)
    np.testing.assert_allclose(second.outputs[0], ref.step("w", xs[2]), atol=1e-5)
    np.testing.assert_allclose(second.outputs[1], ref.step("b", xs[3]), atol=1e-5)
    assert runs(batcher) == [2, 4]  # "w" alone, then the three events in one run
    await batcher.stop()
    await batcher.engine.store.stop()


async def test_max_batch_splits_runs_and_later_jobs_keep_their_order(runtime: Runtime) -> None:
    batcher = await make(runtime, max_batch=4)
    batcher.start()
    ref = Reference()
    xs = events(np.random.default_rng(1), 20)
    first = batcher.submit(block([f"s{i}" for i in range(10)], xs[:10]))
    second = batcher.submit(block([f"s{i}" for i in range(10)], xs[10:]))
    await asyncio.gather(first.future, second.future)  # type: ignore[arg-type]
    for i in range(10):
        np.testing.assert_allclose(first.outputs[i], ref.step(f"s{i}", xs[i]), atol=1e-5)
        np.testing.assert_allclose(second.outputs[i], ref.step(f"s{i}", xs[10 + i]), atol=1e-5)
    assert second.steps.tolist() == [2] * 10
    await batcher.stop()


async def test_a_failed_run_answers_internal_and_keeps_state() -> None:
    runtime = Runtime(failing_model(), "failing.onnx", "cpu")
    runtime.warm_up(8)
    batcher = await make(runtime)
    batcher.start()
    good = np.array([[1.0, 2.0]], np.float32)
    ok = batcher.submit(block(["a"], good, [1]))
    await ok.future  # type: ignore[misc]
    assert ok.codes.tolist() == [0] and ok.outputs.tolist() == [[1.0, 2.0]]
    before = await batcher.get("a")
    # One poisoned event fails its whole run: both events get INTERNAL, neither state moves.
    bad = batcher.submit(block(["a", "b"], np.array([[50.0, 0.0], [1.0, 1.0]], np.float32), [2, 0]))
    await bad.future  # type: ignore[misc]
    assert bad.codes.tolist() == [Code.INTERNAL, Code.INTERNAL]
    assert bad.errors[0] == "the model failed on this event's batch"
    assert not bad.outputs.any()
    after = await batcher.get("a")
    assert before is not None and after is not None
    assert (after.step, after.last_seq) == (1, 1)
    b = await batcher.get("b")
    assert b is not None and b.step == 0
    # The batcher keeps going; seq 2 was never applied, so it is not a duplicate now.
    again = batcher.submit(block(["a"], good, [2]))
    await again.future  # type: ignore[misc]
    assert again.codes.tolist() == [0] and again.steps.tolist() == [2]
    await batcher.stop()


async def test_drain_refuses_new_events(runtime: Runtime) -> None:
    batcher = await make(runtime)
    batcher.start()
    job = batcher.submit(block(["a"], events(np.random.default_rng(3), 1)))
    await batcher.drain()
    assert job.future.done()  # type: ignore[union-attr]
    with pytest.raises(EngineClosed):
        batcher.submit(block(["a"], events(np.random.default_rng(3), 1)))
    await batcher.stop()


async def test_outputs_of_undeclared_shapes_fail_the_batch_and_keep_state() -> None:
    runtime = Runtime(lying_model(), "lying.onnx", "cpu")
    batcher = await make(runtime)
    batcher.start()
    ok = batcher.submit(block(["a"], np.full((1, 2), 2.0, np.float32)))  # width 2: true
    await ok.future
    assert ok.codes.tolist() == [0]
    before = await batcher.get("a")
    x = np.full((2, 2), 3.0, np.float32)  # width 3: a lie
    jobs = [batcher.submit(block(["a", "b"], x)), batcher.submit(block(["a"], x[:1]))]
    await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs)), 5)
    assert jobs[0].codes.tolist() == [Code.INTERNAL] * 2
    assert jobs[1].codes.tolist() == [Code.INTERNAL]
    assert jobs[1].errors[0] == "the model failed on this event's batch"
    after = await batcher.get("a")
    assert before is not None and after is not None and after.step == before.step == 1
    np.testing.assert_array_equal(after.states[0], before.states[0])
    assert batcher.lane.cache.table.pending[: batcher.lane.cache.table.capacity].sum() == 0
    await batcher.stop()


async def test_answered_requests_leave_no_garbage_cycles(runtime: Runtime) -> None:
    """Freed by reference counting alone: the collector has nothing of ours to find,
    so its cost does not grow with requests in flight (docs/PERFORMANCE.md)."""
    batcher = await make(runtime)
    batcher.start()
    xs = events(np.random.default_rng(5), 4)
    await batcher.submit(block(["a", "b", "a", "c"], xs)).future  # type: ignore[misc]
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for k in range(20):
            jobs = [batcher.submit(block([f"s{k}", "a"], xs[:2])) for _ in range(3)]
            await asyncio.gather(*(j.future for j in jobs))  # type: ignore[arg-type]
            del jobs
        gc.collect()
        ours = [o for o in gc.garbage if type(o).__module__.startswith("service")]
        futures = [o for o in gc.garbage if isinstance(o, asyncio.Future)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        await batcher.stop()
    assert not ours and not futures


async def test_a_caller_gone_mid_run_leaves_the_rest_of_the_run_answered(
    runtime: Runtime,
) -> None:
    """A request whose caller left (its future cancelled, e.g. the stream ended) while its
    event was in a run: the other requests of that run are answered as usual."""
    batcher = await make(runtime)
    batcher.start()
    ref = Reference()
    xs = events(np.random.default_rng(6), 3)
    gone = batcher.submit(block(["a"], xs[:1]))
    kept = batcher.submit(block(["b", "b"], xs[1:]))  # b's second event: the next run
    gone.future.cancel()
    await asyncio.wait_for(kept.future, 5)  # type: ignore[arg-type]
    assert kept.codes.tolist() == [0, 0] and kept.steps.tolist() == [1, 2]
    for i in (1, 2):
        np.testing.assert_allclose(kept.outputs[i - 1], ref.step("b", xs[i]), atol=1e-5)
    a = await batcher.get("a")
    assert a is not None and a.step == 1  # applied: the caller just never heard
    await batcher.stop()
