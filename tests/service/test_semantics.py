"""Duplicates, reset, TTL eviction, the session cap, session RPCs and model info."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import onnxruntime
import pytest

from lstm_stream.v1 import lstm_stream_pb2 as pb
from lstm_stream.v1 import lstm_stream_pb2_grpc as pb_grpc
from model_export.default import default_parameters
from model_export.params import fingerprint
from tests.conftest import ServerFactory
from tests.service.client import Ev, answers, request
from tests.service.reference import Reference, events

RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]


async def get(stub: pb_grpc.LstmStreamStub, sid: str) -> pb.Session:
    return await stub.GetSession(pb.SessionRef(session_id=sid))


@pytest.mark.parametrize("columnar", [False, True])
async def test_duplicates_are_not_applied_again(
    stub: pb_grpc.LstmStreamStub, columnar: bool
) -> None:
    ref = Reference()
    xs = events(np.random.default_rng(1), 4)
    first = answers(
        await stub.Step(request([Ev("s", xs[0], seq=1), Ev("s", xs[1], seq=2)], columnar))
    )
    ref.step("s", xs[0])
    out2 = ref.step("s", xs[1])
    before = await get(stub, "s")
    # seq 2 again (a retry) and seq 1 (older): neither is applied.
    got = answers(
        await stub.Step(request([Ev("s", xs[2], seq=2), Ev("s", xs[3], seq=1)], columnar))
    )
    for answer in got:
        assert answer.duplicate and answer.code == 0
        assert answer.step == 2
        np.testing.assert_array_equal(answer.output, first[1].output)  # the last applied output
    np.testing.assert_allclose(first[1].output, out2, atol=1e-5)
    after = await get(stub, "s")
    assert (after.step, after.last_seq, list(after.hidden)) == (2, 2, list(before.hidden))
    # A higher seq applies; seq 0 always applies.
    got = answers(
        await stub.Step(request([Ev("s", xs[2], seq=5), Ev("s", xs[3], seq=0)], columnar))
    )
    assert [a.duplicate for a in got] == [False, False]
    assert [a.step for a in got] == [3, 4]
    ref.step("s", xs[2])
    np.testing.assert_allclose(got[1].output, ref.step("s", xs[3]), atol=1e-5)
    assert (await get(stub, "s")).last_seq == 5


async def test_reset_starts_from_zero_state(stub: pb_grpc.LstmStreamStub) -> None:
    ref = Reference()
    xs = events(np.random.default_rng(2), 3)
    await stub.Step(request([Ev("r", xs[0]), Ev("r", xs[1])]))
    got = answers(await stub.Step(request([Ev("r", xs[2], reset=True)], columnar=True)))
    np.testing.assert_allclose(got[0].output, ref.step("fresh", xs[2]), atol=1e-5)
    assert got[0].step == 3  # step counts every applied event; reset does not rewind it


async def test_session_rpcs(stub: pb_grpc.LstmStreamStub) -> None:
    ref = Reference()
    xs = events(np.random.default_rng(3), 3)
    for name in ("GetSession", "ResetSession", "DeleteSession"):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await getattr(stub, name)(pb.SessionRef(session_id="nobody"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "nobody" in info.value.details()

    await stub.Step(request([Ev("m", xs[0], seq=7)]))
    ref.step("m", xs[0])
    s = await get(stub, "m")
    assert (s.step, s.last_seq) == (1, 7)
    np.testing.assert_allclose(s.hidden, ref.hidden["m"], atol=1e-5)
    np.testing.assert_allclose(s.cell, ref.cell["m"], atol=1e-5)
    np.testing.assert_allclose(s.output, ref.hidden["m"], atol=1e-5)
    assert s.created.ToNanoseconds() > 0 and s.updated.ToNanoseconds() >= s.created.ToNanoseconds()

    # Put: migrate the state to a new id and continue there; the outputs continue the sequence.
    moved = await stub.PutSession(
        pb.Session(session_id="m2", step=s.step, last_seq=s.last_seq, hidden=s.hidden, cell=s.cell)
    )
    assert (moved.step, moved.last_seq) == (1, 7)
    got = answers(await stub.Step(request([Ev("m2", xs[1], seq=8)])))
    np.testing.assert_allclose(got[0].output, ref.step("m", xs[1]), atol=1e-5)
    assert got[0].step == 2

    # Put overwrites an existing session; empty state means zeros.
    await stub.PutSession(pb.Session(session_id="m2", step=0, last_seq=0))
    z = await get(stub, "m2")
    assert z.step == 0 and not any(z.hidden) and not any(z.cell)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.PutSession(pb.Session(session_id="m2", hidden=[1.0, 2.0]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hidden has 2 values" in info.value.details()

    # Reset keeps counters, zeroes state.
    r = await stub.ResetSession(pb.SessionRef(session_id="m"))
    assert (r.step, r.last_seq) == (1, 7) and not any(r.hidden) and not any(r.cell)
    got = answers(await stub.Step(request([Ev("m", xs[2], seq=9)])))
    np.testing.assert_allclose(got[0].output, ref.step("zero", xs[2]), atol=1e-5)

    # Delete returns the last state; the id is then unknown and starts afresh.
    d = await stub.DeleteSession(pb.SessionRef(session_id="m"))
    assert d.step == 2
    np.testing.assert_allclose(d.hidden, ref.hidden["zero"], atol=1e-5)
    with pytest.raises(grpc.aio.AioRpcError):
        await get(stub, "m")
    got = answers(await stub.Step(request([Ev("m", xs[2], seq=1)])))
    assert got[0].step == 1 and not got[0].duplicate


async def test_model_info(stub: pb_grpc.LstmStreamStub) -> None:
    info = await stub.GetModelInfo(pb.ModelInfoRequest())
    assert (info.event_size, info.hidden_size, info.output_size) == (32, 64, 64)
    assert info.fingerprint == fingerprint(default_parameters())
    assert info.execution_provider in ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert info.source == "embedded-default"
    assert list(info.state_names) == ["hidden", "cell"]
    assert info.onnxruntime_version == onnxruntime.__version__


async def test_ttl_evicts_idle_sessions_only(start_server: ServerFactory) -> None:
    server = await start_server(session_ttl=0.6)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.LstmStreamStub(channel)
        xs = events(np.random.default_rng(4), 2)
        await stub.Step(request([Ev("idle", xs[0]), Ev("busy", xs[0])]))
        for _ in range(8):  # keep "busy" active for 1.6 s
            await asyncio.sleep(0.2)
            await stub.Step(request([Ev("busy", xs[1])]))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await get(stub, "idle")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert (await get(stub, "busy")).step == 9
        # An evicted id starts a fresh session on its next event.
        got = answers(await stub.Step(request([Ev("idle", xs[0])])))
        assert got[0].step == 1


async def test_session_cap(start_server: ServerFactory) -> None:
    server = await start_server(max_sessions=3, initial_capacity=1)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.LstmStreamStub(channel)
        x = events(np.random.default_rng(5), 1)[0]
        plan = [Ev("a", x), Ev("b", x), Ev("c", x), Ev("d", x), Ev("a", x)]
        for columnar in (False, True):
            got = answers(await stub.Step(request(plan, columnar)))
            assert [a.code for a in got] == [0, 0, 0, RESOURCE_EXHAUSTED, 0]
            assert "maximum of 3 sessions" in got[3].error
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await get(stub, "d")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.PutSession(pb.Session(session_id="e"))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Deleting one frees room for another.
        await stub.DeleteSession(pb.SessionRef(session_id="b"))
        got = answers(await stub.Step(request([Ev("d", x)])))
        assert got[0].code == 0 and got[0].step == 1
