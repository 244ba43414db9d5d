"""Served outputs equal the numpy reference across sessions, streams and both forms."""

from __future__ import annotations

import asyncio

import numpy as np

from lstm_stream.v1 import lstm_stream_pb2 as pb
from lstm_stream.v1 import lstm_stream_pb2_grpc as pb_grpc
from tests.service.client import Answer, Ev, answers, request
from tests.service.reference import Reference, events

STREAMS = 8
SESSIONS_PER_STREAM = 26  # 208 sessions in all, plus one shared by every stream
STEPS = 20
SHARED = "shared-by-all-streams"


async def test_many_sessions_over_concurrent_streams_equal_reference(
    stub: pb_grpc.LstmStreamStub,
) -> None:
    ref = Reference()
    shared_seen: list[tuple[Answer, np.ndarray]] = []

    async def one_stream(s: int) -> None:
        rng = np.random.default_rng(s)
        columnar = s % 2 == 1
        sessions = [f"stream{s}-session{k}" for k in range(SESSIONS_PER_STREAM)]
        plans: list[list[Ev]] = []
        for _ in range(STEPS):
            xs = events(rng, SESSIONS_PER_STREAM + 3)
            plan = [Ev(sid, xs[k]) for k, sid in enumerate(sessions)]
            # Two more events of the first session in the same request, and the shared session.
            plan += [Ev(sessions[0], xs[-3]), Ev(SHARED, xs[-2]), Ev(sessions[0], xs[-1])]
            rng.shuffle(plan[1:])  # keeps sessions[0]'s first event first among its own
            plans.append(plan)

        async def requests():  # pipelined: every request is sent without waiting
            for plan in plans:
                yield request(plan, columnar=columnar)

        k = 0
        async for response in stub.StreamSteps(requests()):
            plan = plans[k]
            got = answers(response)
            assert len(got) == len(plan)
            assert response.HasField("batch") == columnar
            for ev, answer in zip(plan, got):
                assert answer.code == 0, answer.error
                if ev.session_id == SHARED:
                    shared_seen.append((answer, np.asarray(ev.values)))
                    continue
                expected = ref.step(ev.session_id, np.asarray(ev.values))
                np.testing.assert_allclose(answer.output, expected, rtol=0, atol=1e-5)
                assert answer.step == len(ref_steps.setdefault(ev.session_id, [])) + 1
                ref_steps[ev.session_id].append(answer.step)
            k += 1
        assert k == STEPS

    ref_steps: dict[str, list[int]] = {}
    await asyncio.gather(*(one_stream(s) for s in range(STREAMS)))

    # The shared session was fed from every stream: its steps order its events.
    shared_seen.sort(key=lambda pair: pair[0].step)
    assert [a.step for a, _ in shared_seen] == list(range(1, STREAMS * STEPS + 1))
    for answer, values in shared_seen:
        np.testing.assert_allclose(answer.output, ref.step(SHARED, values), rtol=0, atol=1e-5)
    assert len(ref_steps) == STREAMS * SESSIONS_PER_STREAM

    state = await stub.GetSession(pb.SessionRef(session_id=SHARED))
    assert state.step == STREAMS * STEPS
    np.testing.assert_allclose(state.hidden, ref.hidden[SHARED], rtol=0, atol=1e-5)
    np.testing.assert_allclose(state.cell, ref.cell[SHARED], rtol=0, atol=1e-5)


async def test_unary_step_both_forms_and_include_state(stub: pb_grpc.LstmStreamStub) -> None:
    ref = Reference()
    rng = np.random.default_rng(7)
    for k in range(5):
        xs = events(rng, 3)
        plan = [Ev("a", xs[0]), Ev("b", xs[1]), Ev("a", xs[2])]
        response = await stub.Step(request(plan, columnar=k % 2 == 1, include_state=True))
        for ev, answer in zip(plan, answers(response)):
            np.testing.assert_allclose(answer.output, ref.step(ev.session_id, ev.values), atol=1e-5)
        if k % 2 == 0:  # include_state answers the state after each event
            last = response.results[2]
            np.testing.assert_allclose(last.hidden, ref.hidden["a"], atol=1e-5)
            np.testing.assert_allclose(last.cell, ref.cell["a"], atol=1e-5)
    a = await stub.GetSession(pb.SessionRef(session_id="a"))
    assert a.step == 10


async def test_empty_request_gets_empty_response(stub: pb_grpc.LstmStreamStub) -> None:
    response = await stub.Step(pb.StepRequest())
    assert len(response.results) == 0 and not response.HasField("batch")
    response = await stub.Step(pb.StepRequest(batch=pb.EventBatch()))
    assert len(response.batch.steps) == 0
