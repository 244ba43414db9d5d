"""The SQLite state store behind the real server: restarts, SIGKILL, failures, expiry."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from lstm_bench import procs
from lstm_stream.v1 import lstm_stream_pb2 as pb
from lstm_stream.v1 import lstm_stream_pb2_grpc as pb_grpc
from model_export import lstm
from model_export.default import default_parameters
from service.server import Server
from service.store.sqlite import SqliteStore
from tests.conftest import DEVICE, ServerFactory
from tests.service.client import Ev, answers, request
from tests.service.models import failing_model
from tests.service.reference import Reference, events
from tests.service.test_lifecycle import health_of

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
INTERNAL = grpc.StatusCode.INTERNAL.value[0]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def url(path: Path) -> str:
    return f"sqlite://{path}"


async def session(stub: pb_grpc.LstmStreamStub, sid: str) -> pb.Session:
    return await stub.GetSession(pb.SessionRef(session_id=sid))


def assert_state(got: pb.Session, ref: Reference, sid: str) -> None:
    np.testing.assert_allclose(got.hidden, ref.hidden[sid], atol=1e-5)
    np.testing.assert_allclose(got.cell, ref.cell[sid], atol=1e-5)


async def stub_of(server: Server) -> AsyncIterator[pb_grpc.LstmStreamStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.LstmStreamStub(channel)


async def test_sessions_survive_a_restart(start_server: ServerFactory, tmp_path: Path) -> None:
    db = url(tmp_path / "state.db")
    ref = Reference()
    x = events(np.random.default_rng(0), 40)
    server = await start_server(state_store=db)
    async for stub in stub_of(server):
        for k in range(4):  # 4 steps for each of 8 sessions, both forms
            plan = [Ev(f"s{i}", x[8 * k + i], seq=k + 1) for i in range(8)]
            got = answers(await stub.Step(request(plan, columnar=k % 2 == 1)))
            for ev, answer in zip(plan, got):
                np.testing.assert_allclose(
                    answer.output, ref.step(ev.session_id, ev.values), atol=1e-5
                )
    await server.stop()

    server = await start_server(state_store=db)
    assert len(server.engine.lanes[0].table) == 0  # type: ignore[union-attr]
    async for stub in stub_of(server):
        before = await session(stub, "s3")  # read from the store, not brought into memory
        assert (before.step, before.last_seq) == (4, 4)
        assert_state(before, ref, "s3")
        assert len(server.engine.lanes[0].table) == 0  # type: ignore[union-attr]
        plan = [Ev(f"s{i}", x[32 + i], seq=5) for i in range(8)]
        got = answers(await stub.Step(request(plan, columnar=True)))
        for ev, answer in zip(plan, got):  # each continues from its stored state
            assert answer.step == 5
            np.testing.assert_allclose(answer.output, ref.step(ev.session_id, ev.values), atol=1e-5)
        # A resent event is a duplicate after the restart too.
        again = answers(await stub.Step(request([Ev("s0", x[0], seq=5)])))
        assert again[0].duplicate and again[0].step == 5
    text = server.metrics.registry.get_sample_value
    assert text("lstm_store_reads_total", {"result": "restored"}) == 8
    assert text("lstm_store_rows_written_total") == 8


async def test_memory_eviction_keeps_the_stored_state(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    server = await start_server(state_store=url(tmp_path / "s.db"), session_ttl=0.2)
    ref = Reference()
    x = events(np.random.default_rng(1), 3)
    async for stub in stub_of(server):
        await stub.Step(request([Ev("a", x[0]), Ev("a", x[1])]))
        ref.step("a", x[0])
        ref.step("a", x[1])
        for _ in range(100):
            if "a" not in server.engine.lanes[0].table:  # type: ignore[union-attr]
                break
            await asyncio.sleep(0.05)
        assert "a" not in server.engine.lanes[0].table  # type: ignore[union-attr]
        got = answers(await stub.Step(request([Ev("a", x[2])])))
        assert got[0].step == 3
        np.testing.assert_allclose(got[0].output, ref.step("a", x[2]), atol=1e-5)


async def test_session_rpcs_write_through(start_server: ServerFactory, tmp_path: Path) -> None:
    db = url(tmp_path / "s.db")
    server = await start_server(state_store=db)
    x = events(np.random.default_rng(2), 2)
    hidden = np.linspace(-1, 1, 64).astype(np.float32)
    async for stub in stub_of(server):
        await stub.Step(request([Ev("kept", x[0]), Ev("gone", x[1]), Ev("zeroed", x[1])]))
        await stub.PutSession(pb.Session(session_id="put", step=9, last_seq=4, hidden=hidden))
        await stub.ResetSession(pb.SessionRef(session_id="zeroed"))
        deleted = await stub.DeleteSession(pb.SessionRef(session_id="gone"))
        assert deleted.step == 1
    await server.stop()
    server = await start_server(state_store=db)
    async for stub in stub_of(server):
        put = await session(stub, "put")
        assert (put.step, put.last_seq) == (9, 4)
        np.testing.assert_array_equal(put.hidden, hidden)
        assert not any(put.cell)
        zeroed = await session(stub, "zeroed")
        assert zeroed.step == 1 and not any(zeroed.hidden) and not any(zeroed.cell)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await session(stub, "gone")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        # Sessions only in the store: reset, put and delete act on the stored row.
        assert (await session(stub, "kept")).step == 1
        await stub.ResetSession(pb.SessionRef(session_id="kept"))
        assert not any((await session(stub, "kept")).hidden)
        last = await stub.DeleteSession(pb.SessionRef(session_id="kept"))
        assert last.step == 1
        with pytest.raises(grpc.aio.AioRpcError):
            await session(stub, "kept")
        assert len(server.engine.lanes[0].table) == 0  # type: ignore[union-attr]


async def test_store_ttl_deletes_idle_sessions(start_server: ServerFactory, tmp_path: Path) -> None:
    server = await start_server(state_store=url(tmp_path / "s.db"), store_ttl=0.3)
    async for stub in stub_of(server):
        await stub.Step(request([Ev("old", events(np.random.default_rng(3), 1)[0])]))
        await asyncio.sleep(0.8)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await session(stub, "old")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    sample = server.metrics.registry.get_sample_value
    assert sample("lstm_evictions_total", {"reason": "store_ttl"}) == 1


async def test_a_locked_store_answers_unavailable_and_changes_nothing(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    path = tmp_path / "s.db"
    server = await start_server(state_store=url(path), store_timeout=0.05)
    ref = Reference()
    x = events(np.random.default_rng(4), 6)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.LstmStreamStub(channel)
        await stub.Step(request([Ev("a", x[0], seq=1)]))
        ref.step("a", x[0])
        lock = sqlite3.connect(path, isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")  # another writer holds the file: SQLITE_BUSY
        got = answers(await stub.Step(request([Ev("a", x[1], seq=2), Ev("new", x[2])], True)))
        assert [a.code for a in got] == [UNAVAILABLE, UNAVAILABLE]
        assert "state store is unavailable" in got[0].error
        assert await health_of(channel) == NOT_SERVING
        # While failing: nothing advances, in memory or in the store; session RPCs refuse.
        got = answers(await stub.Step(request([Ev("a", x[1], seq=2)])))
        assert got[0].code == UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ResetSession(pb.SessionRef(session_id="a"))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        a = await session(stub, "a")
        assert (a.step, a.last_seq) == (1, 1)
        assert_state(a, ref, "a")
        sample = server.metrics.registry.get_sample_value
        assert sample("lstm_store_up") == 0
        assert sample("lstm_events_total", {"outcome": "unavailable"}) == 3
        lock.execute("ROLLBACK")
        for _ in range(100):
            if await health_of(channel) == SERVING:
                break
            await asyncio.sleep(0.05)
        assert await health_of(channel) == SERVING
        assert sample("lstm_store_up") == 1
        # The same event, retried, now applies to the state from before the failure.
        got = answers(await stub.Step(request([Ev("a", x[1], seq=2), Ev("new", x[2])])))
        assert [a.code for a in got] == [0, 0] and [a.step for a in got] == [2, 1]
        np.testing.assert_allclose(got[0].output, ref.step("a", x[1]), atol=1e-5)
        np.testing.assert_allclose(got[1].output, ref.step("new", x[2]), atol=1e-5)
    lock.close()


async def test_a_failing_model_run_stores_nothing(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    model = tmp_path / "failing.onnx"
    model.write_bytes(failing_model())
    db = url(tmp_path / "s.db")
    server = await start_server(model=str(model), state_store=db)
    async for stub in stub_of(server):
        ok = answers(await stub.Step(request([Ev("a", [1.0, 2.0], seq=1)])), output_size=2)
        assert ok[0].code == 0
        # A stored session and a new one, each in a run that fails. (A new session is
        # read from the store first, so it runs after the stored one: two runs.)
        bad = answers(
            await stub.Step(request([Ev("a", [50.0, 0.0], seq=2), Ev("b", [50.0, 0.0])])),
            output_size=2,
        )
        assert [b.code for b in bad] == [INTERNAL, INTERNAL]
    await server.stop()
    server = await start_server(model=str(model), state_store=db)
    async for stub in stub_of(server):
        a = await session(stub, "a")
        assert (a.step, a.last_seq) == (1, 1)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await session(stub, "b")  # created for the failed run, never stored
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_warm_sessions_are_answered_while_a_cold_one_is_read(
    start_server: ServerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session read back from a slow store holds up nobody else (a restart, a replica
    taking sessions over, a slow Redis): warm sessions keep being answered meanwhile."""
    db = url(tmp_path / "state.db")
    ref = Reference()
    x = events(np.random.default_rng(7), 8)
    server = await start_server(state_store=db)
    async for stub in stub_of(server):
        got = answers(await stub.Step(request([Ev("cold", x[0])])))
        np.testing.assert_allclose(got[0].output, ref.step("cold", x[0]), atol=1e-5)
    await server.stop()

    release = threading.Event()
    load = SqliteStore.load

    def slow_load(store: SqliteStore, model: str, session_ids: Sequence[str]) -> object:
        if "cold" in session_ids:  # the store answers this read only when the test says so
            release.wait(30)
        return load(store, model, session_ids)

    monkeypatch.setattr(SqliteStore, "load", slow_load)
    server = await start_server(state_store=db)
    try:
        async for stub in stub_of(server):
            await stub.Step(request([Ev("warm", x[1])]))
            ref.step("warm", x[1])
            cold = asyncio.ensure_future(stub.Step(request([Ev("cold", x[2])])))
            await asyncio.sleep(0.2)  # admitted, its read under way
            for k in range(3, 6):
                got = answers(await asyncio.wait_for(stub.Step(request([Ev("warm", x[k])])), 10))
                np.testing.assert_allclose(got[0].output, ref.step("warm", x[k]), atol=1e-5)
                assert got[0].step == k - 1
            assert not cold.done()
            release.set()
            got = answers(await asyncio.wait_for(cold, 10))
            assert got[0].step == 2  # continued from its stored row
            np.testing.assert_allclose(got[0].output, ref.step("cold", x[2]), atol=1e-5)
    finally:
        release.set()


def test_a_store_of_another_model_stops_the_start(tmp_path: Path) -> None:
    """Sessions stored by other weights under the same model version: no policy can serve
    them, so the start fails (an empty store of another model is simply taken over)."""
    db = url(tmp_path / "s.db")
    model = tmp_path / "failing.onnx"
    model.write_bytes(failing_model())
    target = procs.start("server", None, ["--device", DEVICE, "--state-store", db])
    with grpc.insecure_channel(target.address) as channel:
        stub = pb_grpc.LstmStreamStub(channel)
        assert answers(stub.Step(request([Ev("a", [0.0] * 32)])))[0].code == 0
    assert target.stop() == 0
    cmd = [sys.executable, "-m", "service", "--port", "0", "--metrics-port", "0"]
    cmd += ["--device", DEVICE, "--state-store", db, "--model", str(model)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "holds sessions of 'lstm' version 1" in done.stderr and "--store-reset" in done.stderr
    target = procs.start("server", None, ["--device", DEVICE, "--state-store", db])
    assert target.stop() == 0  # the original model still opens it
    args = ["--device", DEVICE, "--state-store", db, "--model", str(model), "--store-reset"]
    target = procs.start("server", None, args)
    assert target.stop() == 0


def test_a_corrupt_store_file_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    path.write_bytes(b"\x13" * 8192)
    cmd = [sys.executable, "-m", "service", "--port", "0", "--metrics-port", "0"]
    cmd += ["--device", DEVICE, "--state-store", url(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "file is not a database" in done.stderr


# -- SIGKILL -------------------------------------------------------------------------------

SESSIONS = 64
STREAMS = 4
STEPS = 200


def reference_states(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hidden and cell of every session after k events, ``[k, session, H]`` (k = 0..STEPS)."""
    p = default_parameters()
    h = np.zeros((x.shape[0], p.hidden_size))
    c = np.zeros_like(h)
    hs, cs = [h], [c]
    for k in range(x.shape[1]):
        h, c = lstm.step(x[:, k].astype(np.float64), h, c, p)
        hs.append(h)
        cs.append(c)
    return np.array(hs), np.array(cs)


async def drive(
    port: int, x: np.ndarray, start: list[int], received: list[int], stop_after: int = STEPS
) -> None:
    """STREAMS streams, each pipelining columnar requests of one event per session it owns.

    ``start[s]`` is the seq to begin with; ``received[s]`` counts answered events.
    Returns when every stream ends, or fails (the server was killed).
    """
    per = SESSIONS // STREAMS

    async def one(stub: pb_grpc.LstmStreamStub, owned: range) -> None:
        first = min(start[s] for s in owned)

        def requests():
            for k in range(first, stop_after + 1):
                ids = [s for s in owned if start[s] <= k]
                yield request([Ev(f"s{s}", x[s, k - 1], seq=k) for s in ids], columnar=True)

        call = stub.StreamSteps(requests())
        k = first
        async for response in call:
            ids = [s for s in owned if start[s] <= k]
            for s, answer in zip(ids, answers(response)):
                assert answer.code == 0 and not answer.duplicate, answer.error
                assert answer.step == k
                received[s] = k
            k += 1

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.LstmStreamStub(channel)
        await asyncio.gather(
            *(one(stub, range(i * per, (i + 1) * per)) for i in range(STREAMS)),
            return_exceptions=True,
        )


@pytest.mark.parametrize("moment", [0, 1, 2])
async def test_sigkill_loses_no_answered_event(tmp_path: Path, moment: int) -> None:
    rng = np.random.default_rng(moment)
    x = rng.standard_normal((SESSIONS, STEPS, 32)).astype(np.float32)
    hs, cs = reference_states(x)
    db = url(tmp_path / "s.db")
    args = ["--device", DEVICE, "--state-store", db]
    target = procs.start("server", None, args)
    received = [0] * SESSIONS
    assert target.proc is not None
    try:
        run = asyncio.ensure_future(drive(target.port, x, [1] * SESSIONS, received))
        # A random moment, by progress (machines differ in speed): 5-80% of the answers in.
        at = int(random.Random(moment).uniform(0.05, 0.8) * SESSIONS * STEPS)
        while sum(received) < at and not run.done():
            await asyncio.sleep(0.001)
        target.proc.kill()
        target.proc.wait()
        await run
    finally:
        target.stop()
    assert 0 < sum(received) < SESSIONS * STEPS, "the kill must land mid-run"

    target = procs.start("server", None, args)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{target.port}") as channel:
            stub = pb_grpc.LstmStreamStub(channel)
            steps = []
            for s in range(SESSIONS):
                got = await session(stub, f"s{s}")
                # Every answered event is stored. Events stored but not yet answered
                # when the process died (the window between commit and delivery) may
                # be there too; each is then applied exactly once, in order.
                assert received[s] <= got.step <= received[s] + 64, (s, received[s], got.step)
                assert got.last_seq == got.step
                np.testing.assert_allclose(got.hidden, hs[got.step, s], atol=1e-5)
                np.testing.assert_allclose(got.cell, cs[got.step, s], atol=1e-5)
                steps.append(got.step)
            # Re-sending the last 3 events (a client that was not sure) changes nothing.
            resend = [
                Ev(f"s{s}", x[s, k - 1], seq=k)
                for s in range(SESSIONS)
                for k in range(max(1, steps[s] - 2), steps[s] + 1)
            ]
            for answer, ev in zip(answers(await stub.Step(request(resend, True))), resend):
                assert answer.duplicate and answer.code == 0, ev.session_id
            for s in (0, SESSIONS - 1):
                again = await session(stub, f"s{s}")
                assert again.step == steps[s]
                np.testing.assert_allclose(again.hidden, hs[steps[s], s], atol=1e-5)
            # The client resumes after last_seq; the end equals an uninterrupted run.
            await drive(target.port, x, [st + 1 for st in steps], received)
            assert received == [STEPS] * SESSIONS
            for s in range(SESSIONS):
                got = await session(stub, f"s{s}")
                assert got.step == got.last_seq == STEPS
                np.testing.assert_allclose(got.hidden, hs[STEPS, s], atol=1e-5)
                np.testing.assert_allclose(got.cell, cs[STEPS, s], atol=1e-5)
    finally:
        assert target.stop() == 0
