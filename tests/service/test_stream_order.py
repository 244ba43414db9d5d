"""Answers on a stream come back in request order, whatever the client does.

Against the real server over gRPC on 127.0.0.1: a client pipelining far past
``--max-inflight``, requests refused whole between good ones, lone requests on
an idle engine next to bursts, OIP's ``sequence_end``, streams cancelled or
dropped mid-flight, and a drain with requests in flight. Every answer is
checked against the float64 reference, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lstm_bench import procs
from lstm_stream.oip.v2 import inference_pb2 as oip
from lstm_stream.oip.v2 import inference_pb2_grpc as oip_grpc
from lstm_stream.v1 import lstm_stream_pb2 as pb
from lstm_stream.v1 import lstm_stream_pb2_grpc as pb_grpc
from service.server import Server
from tests.conftest import DEVICE, ServerFactory
from tests.service.client import Ev, answers, request
from tests.service.reference import Reference, events

E, OUT = 32, 64
"""The embedded default model's event and output sizes."""
WINDOW = 2
"""``--max-inflight`` of the servers here: requests read ahead per stream."""
MAX_EVENTS = 16
"""``--max-events-per-request`` of the module's server."""
OK = 0
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
STREAM = "/lstm_stream.v1.LstmStream/StreamSteps"
EOF = grpc.aio.EOF  # type: ignore[attr-defined]  # not in grpc-stubs
SHUTTING_DOWN = "the server is shutting down; retry on another replica"
"""How a draining server ends a stream (UNAVAILABLE), once it has answered what it read."""
SLOW_READER = [("grpc.http2.bdp_probe", 0), ("grpc.max_receive_message_length", 64 << 20)]
"""Options of a client channel whose receive window stays at HTTP/2's 64 KiB: while such
a client reads nothing, the server's writes to it soon stop."""
PATIENCE_S = 30.0
"""The longest a test waits for one answer or state: far above what a loaded 2-core
machine needs, only there so that a lost answer fails rather than hangs."""


# -- the module's server: a subprocess whose stderr is kept ------------------------------


@dataclass
class Served:
    target: procs.Target
    stderr: Path

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")


NOT_IN_THE_LOG = (
    "Exception in callback",
    "Traceback",
    "ERROR",
    "exception was never retrieved",
    "was destroyed but it is pending",
)
"""What the server's stderr (at WARNING) must never show: a callback that raised (a job's
wake-up firing after its stream ended), a traceback, a lost task or future."""


def assert_clean(log: str) -> None:
    for words in NOT_IN_THE_LOG:
        assert words not in log, f"{words!r} in the server's stderr:\n{log[-4000:]}"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """lstm-serve reading at most WINDOW requests ahead per stream, stderr to a file."""
    stderr = tmp_path_factory.mktemp("stream-order") / "server.stderr"
    args = ["--device", DEVICE, "--max-inflight", str(WINDOW)]
    args += ["--max-events-per-request", str(MAX_EVENTS)]
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            procs.dying([*procs.server_command(), *args]),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    try:
        assert proc.stdout is not None
        port, metrics_port = procs.parse_ports(proc.stdout.readline())
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    target = procs.Target("server", proc, port, metrics_port)
    try:
        yield Served(target, stderr)
        assert proc.poll() is None, "the server died"
    finally:
        code = target.stop()
        assert proc.stdout is not None
        proc.stdout.close()
    assert code == 0
    assert_clean(stderr.read_text(errors="replace"))


# -- requests and what their answers must be ----------------------------------------------


@dataclass
class Sent:
    """One request as its bytes, and what its answer must be."""

    message: bytes
    plan: list[Ev]
    """The events a good request applies (none for one refused whole)."""
    refused: int = OK
    """The code of the in-stream answer to a request refused whole."""
    include_state: bool = False


def good(plan: list[Ev], columnar: bool = False, include_state: bool = False) -> Sent:
    include_state = include_state and not columnar
    message = request(plan, columnar=columnar, include_state=include_state)
    return Sent(message.SerializeToString(), plan, OK, include_state)


def malformed_batch(session_id: str) -> Sent:
    """A batch of one event whose values are 4 bytes short: refused whole."""
    batch = pb.EventBatch(session_ids=[session_id], values=bytes(E * 4 - 4))
    return Sent(pb.StepRequest(batch=batch).SerializeToString(), [], INVALID_ARGUMENT)


def both_forms(session_id: str) -> Sent:
    """Events and a batch in one request: refused whole."""
    message = pb.StepRequest(
        events=[pb.Event(session_id=session_id, values=[0.0] * E)],
        batch=pb.EventBatch(session_ids=[session_id], values=bytes(E * 4)),
    )
    return Sent(message.SerializeToString(), [], INVALID_ARGUMENT)


def too_many_events(session_id: str) -> Sent:
    """One event more than --max-events-per-request: refused whole."""
    plan = [Ev(session_id, np.zeros(E, np.float32))] * (MAX_EVENTS + 1)
    return Sent(request(plan, columnar=True).SerializeToString(), [], RESOURCE_EXHAUSTED)


def undecodable() -> Sent:
    """Bytes that are no StepRequest: refused whole."""
    return Sent(b"\xff\xff\xff", [], INVALID_ARGUMENT)


class Checker:
    """The reference for every session a test feeds, advanced one answer at a time."""

    def __init__(self) -> None:
        self.ref = Reference()
        self.steps: dict[str, int] = {}
        self.answered = 0
        """Answers checked so far: the index of the next one."""

    def check(self, sent: Sent, response: pb.StepResponse) -> None:
        k = self.answered
        self.answered += 1
        if sent.refused:
            assert (response.code, bool(response.error)) == (sent.refused, True), (k, response)
            assert not response.results and not response.HasField("batch"), k
            return
        assert response.code == OK, (k, response.code, response.error)
        got = answers(response, OUT)
        assert len(got) == len(sent.plan), (k, len(got), len(sent.plan))
        for i, (ev, answer) in enumerate(zip(sent.plan, got)):
            assert answer.code == OK, (k, answer.error)
            step = self.steps[ev.session_id] = self.steps.get(ev.session_id, 0) + 1
            assert answer.step == step, f"answer {k} is not the answer to request {k}"
            expected = self.ref.step(ev.session_id, np.asarray(ev.values), ev.reset)
            np.testing.assert_allclose(answer.output, expected, rtol=0, atol=1e-5)
            if sent.include_state:
                result = response.results[i]
                hidden = self.ref.hidden[ev.session_id]
                np.testing.assert_allclose(result.hidden, hidden, rtol=0, atol=1e-5)
                cell = self.ref.cell[ev.session_id]
                np.testing.assert_allclose(result.cell, cell, rtol=0, atol=1e-5)

    async def state_matches(self, stub: pb_grpc.LstmStreamStub, session_id: str) -> None:
        """The server's state of the session is the reference's after the answered events."""
        state = await stub.GetSession(pb.SessionRef(session_id=session_id), timeout=PATIENCE_S)
        assert state.step == self.steps[session_id]
        np.testing.assert_allclose(state.hidden, self.ref.hidden[session_id], atol=1e-5)
        np.testing.assert_allclose(state.cell, self.ref.cell[session_id], atol=1e-5)


# -- talking to the server ----------------------------------------------------------------


def raw_stream(channel: grpc.aio.Channel) -> Any:
    """``StreamSteps`` taking each request as its bytes (undecodable ones included)."""
    return channel.stream_stream(
        STREAM, request_serializer=None, response_deserializer=pb.StepResponse.FromString
    )(None)


async def write_all(call: Any, script: Sequence[Sent], done: bool = True) -> None:
    """Write every request without waiting for an answer (then half-close)."""
    for sent in script:
        await call.write(sent.message)
    if done:
        await call.done_writing()


async def read(call: Any) -> Any:
    return await asyncio.wait_for(call.read(), PATIENCE_S)


async def read_until_status(call: Any) -> tuple[list[Any], grpc.StatusCode, str]:
    """Every response until the call ends, and how it ended."""
    responses = []
    try:
        while (response := await read(call)) is not EOF:
            responses.append(response)
    except grpc.aio.AioRpcError as exc:
        return responses, exc.code(), exc.details() or ""
    return responses, grpc.StatusCode.OK, ""


def sample(target: procs.Target, name: str) -> float:
    return target.metrics().get(name, 0.0)


APPLIED = 'lstm_events_total{outcome="applied"}'


async def eventually(
    condition: Callable[[], bool], timeout: float = PATIENCE_S, every: float = 0.05
) -> bool:
    """Whether ``condition()`` holds within ``timeout``, asked ``every`` seconds: for counts
    the server keeps, which no call of ours waits on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(every)
    return condition()


async def healthy(address: str) -> bool:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        check = await stub.Check(health_pb2.HealthCheckRequest(), timeout=PATIENCE_S)
        return bool(check.status == health_pb2.HealthCheckResponse.SERVING)


# -- (a) pipelining past the window --------------------------------------------------------

PIPELINED = 200


async def test_pipelining_far_past_max_inflight_answers_every_request_in_order(
    served: Served,
) -> None:
    """200 requests written without waiting to a server that reads 2 ahead: while the
    client reads nothing, the server stops reading (flow control); then every answer
    comes, in order, equal to the reference, and nothing is lost."""
    rng = np.random.default_rng(1)
    sessions = [f"pipelined-{i}" for i in range(5)]
    script = []
    for k in range(PIPELINED):
        plan = [Ev(sessions[(k + j) % 5], x) for j, x in enumerate(events(rng, 1 + k % 4))]
        script.append(good(plan, columnar=k % 3 == 1, include_state=True))
    total = sum(len(s.plan) for s in script)
    target = served.target
    before = sample(target, APPLIED)
    checker = Checker()
    async with grpc.aio.insecure_channel(target.address, options=SLOW_READER) as channel:
        call = raw_stream(channel)
        writing = asyncio.ensure_future(write_all(call, script))
        # No answer is read for a second, 20 times what the 500 events take: the answers
        # fill the client's 64 KiB window (about 1 KiB an event with states), and the
        # server, WINDOW requests ahead, stops reading.
        await asyncio.sleep(1.0)
        held = sample(target, APPLIED) - before
        responses, code, details = await read_until_status(call)
        await asyncio.wait_for(writing, PATIENCE_S)
        assert code is grpc.StatusCode.OK, details
        assert len(responses) == PIPELINED
        for sent, response in zip(script, responses):
            checker.check(sent, response)
        stub = pb_grpc.LstmStreamStub(channel)
        for sid in sessions:
            await checker.state_matches(stub, sid)
    assert held < total / 2, f"{held} of {total} events applied while the client read nothing"
    assert sample(target, APPLIED) - before == total


# -- (b) requests refused whole ------------------------------------------------------------


async def test_requests_refused_whole_keep_their_places_in_order(served: Served) -> None:
    """Malformed batches, both forms at once, too many events and undecodable bytes between
    good requests, all pipelined: each gets its in-stream refusal at its own place, and the
    sessions they name are untouched."""
    rng = np.random.default_rng(2)
    sessions = [f"refused-{i}" for i in range(3)]
    script = []
    for k in range(210):
        sid, other = sessions[k % 3], sessions[(k + 1) % 3]
        x = events(rng, 2)
        kind = k % 7
        if kind == 0:
            script.append(good([Ev(sid, x[0]), Ev(other, x[1])]))
        elif kind == 1:
            script.append(malformed_batch(sid))
        elif kind == 2:
            script.append(good([Ev(sid, x[0])], columnar=True))
        elif kind == 3:
            script.append(both_forms(sid))
        elif kind == 4:
            script.append(good([Ev(other, x[0])], include_state=True))
        elif kind == 5:
            script.append(too_many_events(sid))
        else:
            script.append(undecodable())
    checker = Checker()
    async with grpc.aio.insecure_channel(served.target.address) as channel:
        call = raw_stream(channel)
        writing = asyncio.ensure_future(write_all(call, script))
        responses, code, details = await read_until_status(call)
        await asyncio.wait_for(writing, PATIENCE_S)
        assert code is grpc.StatusCode.OK, details
        assert len(responses) == len(script)
        for sent, response in zip(script, responses):
            checker.check(sent, response)
        stub = pb_grpc.LstmStreamStub(channel)
        for sid in sessions:
            await checker.state_matches(stub, sid)


# -- (e) lone requests on an idle engine, and bursts ----------------------------------------


async def test_lone_requests_and_bursts_on_one_stream_stay_in_order(served: Served) -> None:
    """One stream alternating one-in-flight exchanges (each finds the engine idle and is
    answered as it begins), bursts, and refusals just before or after a lone request: every
    answer in order."""
    rng = np.random.default_rng(5)
    sessions = ["mixed-a", "mixed-b"]
    checker = Checker()
    count = 0

    def one() -> Sent:
        nonlocal count
        count += 1
        x = events(rng, 1)[0]
        return good([Ev(sessions[count % 2], x)], columnar=count % 3 == 0)

    def refused() -> Sent:
        nonlocal count
        count += 1
        return (malformed_batch, both_forms)[count % 2](sessions[count % 2])

    async with grpc.aio.insecure_channel(served.target.address) as channel:
        call = raw_stream(channel)

        async def exchange(script: Sequence[Sent]) -> None:
            await write_all(call, script, done=False)
            for sent in script:
                checker.check(sent, await read(call))

        for _ in range(15):
            await exchange([one()])
        await exchange([one() for _ in range(40)])
        for _ in range(10):
            await exchange([refused()])
            await exchange([one()])
        for _ in range(10):
            await exchange([refused(), one()])  # an idle engine answers the second at once
        for _ in range(10):
            await exchange([one(), refused()])
        for _ in range(10):
            await exchange([one(), one(), one()])
        await exchange([refused() if k % 4 == 3 else one() for k in range(40)])
        for _ in range(10):
            await exchange([one()])
        await call.done_writing()
        assert await read(call) is EOF
        stub = pb_grpc.LstmStreamStub(channel)
        for sid in sessions:
            await checker.state_matches(stub, sid)
    assert checker.answered == 15 + 40 + 20 + 20 + 20 + 30 + 40 + 10


# -- OIP: sequence_end holds reading until it is answered ------------------------------------


def infer(
    sequence: str, rows: np.ndarray, id: str, start: bool = False, end: bool = False
) -> oip.ModelInferRequest:
    message = oip.ModelInferRequest(model_name="lstm", id=id)
    message.parameters["sequence_id"].string_param = sequence
    message.parameters["sequence_start"].bool_param = start
    message.parameters["sequence_end"].bool_param = end
    message.inputs.add(name="event", datatype="FP32", shape=list(rows.shape))
    message.raw_input_contents.append(rows.astype("<f4").tobytes())
    return message


async def test_oip_stream_begins_nothing_after_sequence_end_until_it_is_answered(
    served: Served,
) -> None:
    """Rounds of three pipelined requests on one sequence, the third with sequence_end,
    the next round's first without sequence_start: that one starts a new sequence from
    zero state (the end was answered, and the sequence deleted, before it was read), and
    every answer, a refused request's included, comes in order."""
    rng = np.random.default_rng(6)
    sequence = "oip-ordered"
    ref = Reference()
    script: list[tuple[oip.ModelInferRequest, np.ndarray | None]] = []
    for r in range(8):
        for j, n in enumerate((2, 1, 1)):
            rows = events(rng, n)
            message = infer(sequence, rows, f"{r}-{j}", start=r == j == 0, end=j == 2)
            outputs = [ref.step(sequence, row, reset=j == i == 0) for i, row in enumerate(rows)]
            script.append((message, np.array(outputs)))
        if r == 3:  # refused (one value short), answered with error_message at its place
            script.append((infer(sequence, np.zeros((1, E - 1), np.float32), "bad"), None))
    async with grpc.aio.insecure_channel(served.target.address) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        call = stub.ModelStreamInfer()

        async def write() -> None:
            for message, _ in script:
                await call.write(message)
            await call.done_writing()

        writing = asyncio.ensure_future(write())
        for message, expected in script:
            response = await read(call)
            if expected is None:
                assert response.error_message and not response.HasField("infer_response")
                continue
            assert not response.error_message, (message.id, response.error_message)
            got = response.infer_response
            assert got.id == message.id
            output = np.frombuffer(got.raw_output_contents[0], "<f4").reshape(expected.shape)
            np.testing.assert_allclose(output, expected, rtol=0, atol=1e-5)
        assert await read(call) is EOF
        await asyncio.wait_for(writing, PATIENCE_S)
        with pytest.raises(grpc.aio.AioRpcError) as info:  # the last round ended it
            await pb_grpc.LstmStreamStub(channel).GetSession(pb.SessionRef(session_id=sequence))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


# -- (d) streams cancelled or dropped mid-flight ---------------------------------------------

CANCELLED_STREAMS = 48
REQUESTS_EACH = 40


async def test_streams_cancelled_or_dropped_mid_flight_leave_nothing_behind(
    served: Served,
) -> None:
    """48 streams with requests in flight, each after 0-4 answers: half cancelled by
    their clients, half dropped with their channels. No stream is left open, the log shows
    no callback that raised and no traceback, each session holds exactly its first
    ``step`` events in order, and the server serves on."""
    target = served.target
    sent: dict[str, np.ndarray] = {}
    answered: dict[str, int] = {}
    cancelling = [grpc.aio.insecure_channel(target.address) for _ in range(2)]
    dropping = [grpc.aio.insecure_channel(target.address) for _ in range(2)]
    all_read = asyncio.Event()
    reading = CANCELLED_STREAMS // 2

    async def one(i: int) -> None:
        nonlocal reading
        sid = f"cancelled-{i}"
        xs = sent[sid] = events(np.random.default_rng(100 + i), REQUESTS_EACH)
        script = [good([Ev(sid, x)], columnar=i % 3 == 0) for x in xs]
        dropped = i % 2 == 1
        call = raw_stream((dropping if dropped else cancelling)[i // 2 % 2])
        # Never half-closed: a stream ends only by its client going.
        writing = asyncio.ensure_future(write_all(call, script, done=False))
        checker = Checker()
        try:
            for request_sent in script[: i % 5]:
                checker.check(request_sent, await read(call))
            answered[sid] = i % 5
            if dropped:  # it reads no more; its channel closes once all dropped ones are here
                reading -= 1
                if not reading:
                    all_read.set()
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
                    await asyncio.wait_for(call.code(), PATIENCE_S)
            else:
                call.cancel()
        finally:
            writing.cancel()
            with contextlib.suppress(BaseException):
                await writing

    async def drop() -> None:
        await asyncio.wait_for(all_read.wait(), PATIENCE_S)
        for channel in dropping:
            await channel.close(None)  # every call on it ends: the server sees its peer go

    try:
        await asyncio.gather(drop(), *(one(i) for i in range(CANCELLED_STREAMS)))
    finally:
        for channel in cancelling + dropping:
            await channel.close(None)

    assert await eventually(lambda: sample(target, "lstm_active_streams") == 0)
    async with grpc.aio.insecure_channel(target.address) as channel:
        stub = pb_grpc.LstmStreamStub(channel)
        for sid, xs in sent.items():
            try:
                state = await stub.GetSession(pb.SessionRef(session_id=sid), timeout=PATIENCE_S)
            except grpc.aio.AioRpcError as exc:  # gone before its first request was read
                assert exc.code() == grpc.StatusCode.NOT_FOUND and answered[sid] == 0, exc
                continue
            assert answered[sid] <= state.step <= REQUESTS_EACH, (sid, state.step)
            ref = Reference()
            for x in xs[: state.step]:
                ref.step(sid, x)
            np.testing.assert_allclose(state.hidden, ref.hidden[sid], atol=1e-5)
            np.testing.assert_allclose(state.cell, ref.cell[sid], atol=1e-5)
        # The server serves on: a new stream on the sessions, answered in order.
        checker = Checker()
        rng = np.random.default_rng(9)
        script = [good([Ev("after-cancels", x)]) for x in events(rng, 20)]
        call = raw_stream(channel)
        writing = asyncio.ensure_future(write_all(call, script))
        responses, code, details = await read_until_status(call)
        await writing
        assert code is grpc.StatusCode.OK, details
        assert len(responses) == len(script)
        for request_sent, response in zip(script, responses):
            checker.check(request_sent, response)
    assert await healthy(target.address)
    assert_clean(served.log())


# -- (c) a drain with requests in flight ------------------------------------------------------


def applied_in(server: Server) -> float:
    value = server.metrics.registry.get_sample_value("lstm_events_total", {"outcome": "applied"})
    return value or 0.0


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING]


DRAINED = 250


async def test_a_drain_answers_every_request_it_read_then_ends_unavailable(
    start_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A drain while one stream has requests in flight (its window full, the rest waiting
    in the transport) and another waits for its next request: the first gets every answer
    it was owed, in order, then UNAVAILABLE; the idle one UNAVAILABLE; nothing applied goes
    unanswered; nothing is logged."""
    caplog.set_level(logging.WARNING)
    server = await start_server(max_inflight=WINDOW, grace=5.0)
    address = f"127.0.0.1:{server.port}"
    rng = np.random.default_rng(3)
    before = applied_in(server)
    # Small requests, answers with states (~1 KiB): the 250 requests fit the server's
    # receive window, their answers are four times the client's.
    script = [good([Ev("drain-busy", x)], include_state=True) for x in events(rng, DRAINED)]
    checker = Checker()
    async with (
        grpc.aio.insecure_channel(address, options=SLOW_READER) as channel,
        grpc.aio.insecure_channel(address) as other,
    ):
        idle = raw_stream(other)
        lone = good([Ev("drain-idle", events(rng, 1)[0])])
        await idle.write(lone.message)
        checker.check(lone, await read(idle))

        busy = raw_stream(channel)
        writing = asyncio.ensure_future(write_all(busy, script))
        first = [await read(busy) for _ in range(10)]
        await asyncio.wait_for(writing, PATIENCE_S)  # all written, the request side closed
        stopping = asyncio.ensure_future(server.stop(grace=5.0))

        rest, code, details = await read_until_status(busy)
        responses = first + rest
        assert (code, details) == (grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        # A request read as the drain began may be refused in-stream: never before an answer.
        answered = 0
        for sent, response in zip(script, responses):
            if response.code == grpc.StatusCode.UNAVAILABLE.value[0]:
                break
            checker.check(sent, response)
            answered += 1
        assert all(r.code == grpc.StatusCode.UNAVAILABLE.value[0] for r in responses[answered:])
        assert 10 <= answered < DRAINED

        _, idle_code, idle_details = await read_until_status(idle)
        assert (idle_code, idle_details) == (grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        await asyncio.wait_for(stopping, PATIENCE_S)
    # Every event the server applied was answered: no request it read was dropped.
    assert applied_in(server) - before == 1 + answered
    assert errors_logged(caplog) == []


LONG = 1000
"""Events of each of four sessions in one request: a thousand runs, one event each."""


async def test_a_drain_waits_for_the_answer_a_stream_is_waiting_for(
    start_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A drain while a stream's oldest request is still with the engine (its writer waits
    for that job): the stream gets that answer, whole and correct, then UNAVAILABLE."""
    caplog.set_level(logging.WARNING)
    server = await start_server(max_inflight=WINDOW, grace=PATIENCE_S, inline_batch=0)
    address = f"127.0.0.1:{server.port}"
    rng = np.random.default_rng(7)
    checker = Checker()
    async with grpc.aio.insecure_channel(address) as channel:
        call = raw_stream(channel)
        lone = good([Ev("long-0", events(rng, 1)[0])])
        await call.write(lone.message)
        checker.check(lone, await read(call))
        before = applied_in(server)
        plan = [Ev(f"long-{k % 4}", x) for k, x in enumerate(events(rng, 4 * LONG))]
        long = good(plan, columnar=True)
        await call.write(long.message)
        # Its first runs are done: the rest take a thousand runs more.
        assert await eventually(lambda: applied_in(server) > before, every=0.001)
        stopping = asyncio.ensure_future(server.stop(grace=PATIENCE_S))
        responses, code, details = await read_until_status(call)
        assert len(responses) == 1, "the answer the stream waited for was not sent"
        checker.check(long, responses[0])
        assert (code, details) == (grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        await asyncio.wait_for(stopping, PATIENCE_S)
    assert applied_in(server) - before == 4 * LONG
    assert errors_logged(caplog) == []


# -- a drain while the reader writes an answer itself -----------------------------------------

BIG = 4096
"""Events of one request whose answer (1 MiB of outputs) cannot pass a 64 KiB window."""


@pytest.mark.parametrize("first", [True, False], ids=["first-answer", "later-answer"])
async def test_a_drain_while_a_lone_answer_is_being_written_still_sends_it(
    start_server: ServerFactory, caplog: pytest.LogCaptureFixture, first: bool
) -> None:
    """A request the idle engine answers as it begins is written by the stream's reader
    itself; here its answer cannot leave (the client does not read) when the server drains.
    The client then reads that answer, whole and correct, and UNAVAILABLE; nothing logged.
    (``first``: it is the stream's first answer, so its write also sends the headers.)"""
    caplog.set_level(logging.WARNING)
    # Runs of BIG events on the loop itself: the request is answered as it begins.
    server = await start_server(max_inflight=WINDOW, max_batch=BIG, inline_batch=BIG)
    address = f"127.0.0.1:{server.port}"
    rng = np.random.default_rng(4)
    checker = Checker()
    async with (
        grpc.aio.insecure_channel(address, options=SLOW_READER) as channel,
        grpc.aio.insecure_channel(address) as other,
    ):
        call = raw_stream(channel)
        if not first:
            lone = good([Ev("lone-0", events(rng, 1)[0])], columnar=True)
            await call.write(lone.message)
            checker.check(lone, await read(call))
            await asyncio.sleep(0.05)  # the engine is idle again (longer than its last run)
        before = applied_in(server)
        xs = events(rng, BIG)
        big = good([Ev(f"lone-{i}", x) for i, x in enumerate(xs)], columnar=True)
        await call.write(big.message)
        assert await eventually(lambda: applied_in(server) - before == BIG)
        stopping = asyncio.ensure_future(server.stop(grace=3.0))
        health = health_pb2_grpc.HealthStub(other)
        serving = health_pb2.HealthCheckResponse.SERVING
        while (await health.Check(health_pb2.HealthCheckRequest())).status == serving:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # the drain has begun, the answer still waits for the client

        responses, code, details = await read_until_status(call)
        assert len(responses) == 1, "the answer the server owed was not sent"
        checker.check(big, responses[0])
        assert (code, details) == (grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        await asyncio.wait_for(stopping, PATIENCE_S)
    assert errors_logged(caplog) == []
