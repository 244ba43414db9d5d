"""Bad input: the documented code and message, nothing applied, no other session disturbed."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from lstm_stream.v1 import lstm_stream_pb2 as pb
from lstm_stream.v1 import lstm_stream_pb2_grpc as pb_grpc
from tests.conftest import ServerFactory
from tests.service.client import Ev, answers, request
from tests.service.reference import Reference, events

INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
GOOD = events(np.random.default_rng(0), 1)[0]


def with_value(value: float) -> np.ndarray:
    x = GOOD.copy()
    x[5] = value
    return x


BAD_EVENTS = {
    "wrong length": (Ev("victim", GOOD[:31]), "event has 31 values; the model takes 32"),
    "too long": (Ev("victim", np.append(GOOD, 1.0)), "event has 33 values; the model takes 32"),
    "nan": (Ev("victim", with_value(np.nan)), "values contain NaN or Inf"),
    "inf": (Ev("victim", with_value(np.inf)), "values contain NaN or Inf"),
    "-inf": (Ev("victim", with_value(-np.inf)), "values contain NaN or Inf"),
    "empty id": (Ev("", GOOD), "session_id is empty"),
    "over-long id": (Ev("x" * 129, GOOD), "session_id is 129 bytes long; the limit is 128"),
    "over-long utf-8 id": (Ev("é" * 65, GOOD), "session_id is 130 bytes long; the limit is 128"),
}
# The columnar form has no per-event length: a wrong byte count is a malformed batch.
COLUMNAR_BAD = ["nan", "inf", "-inf", "empty id", "over-long id", "over-long utf-8 id"]


def state_bytes(s: pb.Session) -> tuple[object, ...]:
    f32 = lambda v: np.asarray(v, np.float32).tobytes()  # noqa: E731
    return (s.step, s.last_seq, f32(s.hidden), f32(s.cell), f32(s.output))


async def states(stub: pb_grpc.LstmStreamStub) -> dict[str, tuple[object, ...]]:
    out = {}
    for sid in ("victim", "bystander"):
        out[sid] = state_bytes(await stub.GetSession(pb.SessionRef(session_id=sid)))
    return out


@pytest.fixture
async def seeded(stub: pb_grpc.LstmStreamStub) -> pb_grpc.LstmStreamStub:
    xs = events(np.random.default_rng(1), 3)
    await stub.Step(
        request([Ev("victim", xs[0], seq=3), Ev("bystander", xs[1]), Ev("victim", xs[2], seq=4)])
    )
    return stub


@pytest.mark.parametrize(
    ("case", "columnar"),
    [(case, False) for case in BAD_EVENTS] + [(case, True) for case in COLUMNAR_BAD],
)
async def test_bad_event_is_refused_and_changes_nothing(
    seeded: pb_grpc.LstmStreamStub, case: str, columnar: bool
) -> None:
    stub = seeded
    bad, message = BAD_EVENTS[case]
    before = await states(stub)
    ref = Reference()
    x = events(np.random.default_rng(2), 1)[0]
    got = answers(
        await stub.Step(request([Ev("newcomer", x), bad, Ev("victim", GOOD, seq=4)], columnar))
    )
    assert got[1].code == INVALID and got[1].error == message
    assert got[1].output.size == 0 or not got[1].output.any()
    # The other events of the request proceed: a new session and a duplicate of victim's seq 4.
    assert got[0].code == 0 and got[0].error == ""
    np.testing.assert_allclose(got[0].output, ref.step("newcomer", x), atol=1e-5)
    assert got[2].duplicate
    assert await states(stub) == before
    # No session was created for the refused event: victim, bystander and newcomer only.
    assert (await stub.GetModelInfo(pb.ModelInfoRequest())).live_sessions == 3


@pytest.mark.parametrize("columnar", [False, True])
async def test_a_request_of_only_bad_events_for_new_ids(
    stub: pb_grpc.LstmStreamStub, columnar: bool
) -> None:
    """Found by fuzzing: this once stopped the batcher, and every later call hung."""
    nan = np.full(32, np.nan, np.float32)
    got = answers(await stub.Step(request([Ev("new-1", nan), Ev("new-2", nan)], columnar)))
    assert [a.code for a in got] == [INVALID, INVALID]
    got = answers(await stub.Step(request([Ev("new-1", GOOD)], columnar)), 64)
    assert got[0].code == 0 and got[0].step == 1


def malformed_batches() -> dict[str, tuple[pb.StepRequest, str]]:
    good = request([Ev("victim", GOOD), Ev("bystander", GOOD)], columnar=True)
    cases = {}
    r = pb.StepRequest()
    r.CopyFrom(good)
    r.batch.values = r.batch.values[:-4]
    cases["short values"] = (r, "values holds 63 values where 2 x 32 = 64 are expected")
    r = pb.StepRequest()
    r.CopyFrom(good)
    r.batch.seqs.append(9)
    cases["seqs length"] = (r, "seqs has 3 entries; expected 0 or 2")
    r = pb.StepRequest()
    r.CopyFrom(good)
    r.batch.resets.append(True)
    cases["resets length"] = (r, "resets has 3 entries; expected 0 or 2")
    r = pb.StepRequest()
    r.CopyFrom(good)
    r.events.append(pb.Event(session_id="victim", values=GOOD.tolist()))
    cases["both forms"] = (r, "a StepRequest carries either events or batch, not both")
    return cases


@pytest.mark.parametrize("case", list(malformed_batches()))
async def test_malformed_request_is_rejected_whole(
    seeded: pb_grpc.LstmStreamStub, case: str
) -> None:
    stub = seeded
    bad, message = malformed_batches()[case]
    before = await states(stub)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Step(bad)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()
    assert "Traceback" not in info.value.details()
    assert await states(stub) == before

    # On a stream the same request is answered with a whole-request code; the stream goes on.
    async def requests():
        yield bad
        yield request([Ev("bystander", GOOD)], columnar=True)

    responses = [r async for r in stub.StreamSteps(requests())]
    assert responses[0].code == INVALID and message in responses[0].error
    assert not responses[0].HasField("batch") and len(responses[0].results) == 0
    assert answers(responses[1])[0].step == before["bystander"][0] + 1  # type: ignore[operator]
    after = await states(stub)
    assert after["victim"] == before["victim"]


async def test_too_many_events(start_server: ServerFactory) -> None:
    server = await start_server(max_events_per_request=4)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.LstmStreamStub(channel)
        for columnar in (False, True):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Step(request([Ev(f"s{i}", GOOD) for i in range(5)], columnar))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "5 events in one request; the limit is 4" in info.value.details()
        assert (await stub.GetModelInfo(pb.ModelInfoRequest())).live_sessions == 0


async def test_message_over_size_limit(start_server: ServerFactory) -> None:
    server = await start_server(max_message_bytes=4096)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.LstmStreamStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Step(request([Ev(f"s{i}", GOOD) for i in range(64)], columnar=True))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        got = answers(await stub.Step(request([Ev("small", GOOD)], columnar=True)))
        assert got[0].code == 0
