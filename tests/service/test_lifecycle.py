"""Health, warm-up, disconnects, and SIGTERM drain against the real server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry

from lstm_bench import procs
from lstm_stream.v1 import lstm_stream_pb2 as pb
from lstm_stream.v1 import lstm_stream_pb2_grpc as pb_grpc
from service.api.native import SERVICE_NAME
from service.server import Server
from tests.conftest import DEVICE, ServerFactory, make_settings
from tests.service.client import Ev, answers, request
from tests.service.reference import Reference, events

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health_of(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service))).status


async def test_serving_only_after_the_model_is_loaded_and_warm() -> None:
    server = Server(make_settings(), registry=CollectorRegistry())
    await server.bind()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            assert await health_of(channel) == NOT_SERVING
            assert await health_of(channel, SERVICE_NAME) == NOT_SERVING
            stub = pb_grpc.LstmStreamStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Step(request([Ev("s", np.zeros(32))]))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "still loading" in info.value.details()
            await server.load()
            assert await health_of(channel) == SERVING
            assert await health_of(channel, SERVICE_NAME) == SERVING
            got = answers(await stub.Step(request([Ev("s", np.zeros(32))])))
            assert got[0].step == 1
    finally:
        await server.stop(grace=1.0)


async def test_reflection_lists_the_services(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def ask():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for response in stub.ServerReflectionInfo(ask()):
        names = {s.name for s in response.list_services_response.service}
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


async def test_client_disconnect_mid_stream_leaves_server_healthy(
    server: Server, channel: grpc.aio.Channel
) -> None:
    stub = pb_grpc.LstmStreamStub(channel)
    baseline = len(asyncio.all_tasks())
    ref = Reference()
    rng = np.random.default_rng(0)
    sent: list[np.ndarray] = []

    async def requests():
        for _ in range(200):
            x = events(rng, 1)[0]
            sent.append(x)
            yield request([Ev("dropped", x)], columnar=True)
            await asyncio.sleep(0.001)

    call = stub.StreamSteps(requests())
    for _ in range(5):
        await call.read()
    call.cancel()  # the client goes away with requests in flight
    await asyncio.sleep(0.5)

    assert server.metrics.registry.get_sample_value("lstm_active_streams") == 0
    assert len(asyncio.all_tasks()) <= baseline
    assert await health_of(channel) == SERVING
    # Whatever was applied was applied whole and in order: state == reference after `step` events.
    state = await stub.GetSession(pb.SessionRef(session_id="dropped"))
    assert 5 <= state.step <= len(sent)
    for x in sent[: state.step]:
        ref.step("dropped", x)
    np.testing.assert_allclose(state.hidden, ref.hidden["dropped"], atol=1e-5)
    np.testing.assert_allclose(state.cell, ref.cell["dropped"], atol=1e-5)
    # And the server keeps serving.
    got = answers(await stub.Step(request([Ev("dropped", sent[0])])))
    assert got[0].step == state.step + 1


def start_subprocess(*args: str) -> tuple[subprocess.Popen[str], int]:
    """``python -m service`` on free ports, as the bench starts it; (process, gRPC port)."""
    target = procs.start("server", None, ["--device", DEVICE, *args])
    assert target.proc is not None
    return target.proc, target.port


async def test_sigterm_finishes_in_flight_requests_and_exits_0() -> None:
    proc, port = start_subprocess("--grace", "5")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.LstmStreamStub(channel)
            ref = Reference()
            rng = np.random.default_rng(0)
            plans = [[Ev(f"s{k}", x) for k, x in enumerate(events(rng, 64))] for _ in range(30)]
            first_read = asyncio.Event()
            sent = 0

            async def requests():
                nonlocal sent
                for plan in plans:
                    yield request(plan, columnar=True)
                    sent += 1
                await first_read.wait()
                await asyncio.sleep(10)  # keep the stream open past SIGTERM

            call = stub.StreamSteps(requests())
            responses = [await call.read()]
            first_read.set()
            proc.send_signal(signal.SIGTERM)
            code, details = grpc.StatusCode.OK, ""
            try:
                while (response := await call.read()) is not grpc.aio.EOF:
                    responses.append(response)
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details()
            # The server ends the stream with UNAVAILABLE. A client whose request side is
            # still open can read grpc's own "Internal error from Core" instead (a known
            # client-side race, seen in ~1 of 10 runs); our INTERNAL has other details.
            assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.OK) or (
                code is grpc.StatusCode.INTERNAL and details == "Internal error from Core"
            ), details
            # Every request the server read was answered, in order, with correct outputs.
            assert len(responses) >= 1
            for plan, response in zip(plans, responses):
                for ev, answer in zip(plan, answers(response)):
                    np.testing.assert_allclose(
                        answer.output, ref.step(ev.session_id, ev.values), atol=1e-5
                    )
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_sigterm_while_unary_calls_are_in_flight() -> None:
    proc, port = start_subprocess("--grace", "5")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.LstmStreamStub(channel)
            x = events(np.random.default_rng(0), 256)
            calls = [stub.Step(request([Ev(f"u{k}", x[k])], columnar=True)) for k in range(256)]
            await asyncio.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            results = await asyncio.gather(*calls, return_exceptions=True)
            for r in results:  # each call either completed or was refused as UNAVAILABLE
                if isinstance(r, grpc.aio.AioRpcError):
                    assert r.code() == grpc.StatusCode.UNAVAILABLE
                else:
                    assert answers(r)[0].code == 0
            assert any(not isinstance(r, Exception) for r in results)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the failure on a machine without CUDA")
def test_device_cuda_without_cuda_fails_at_start() -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "service", "--port", "0", "--metrics-port", "0", "--device", "cuda"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LSTM_LOG_FORMAT": "text"},
    )
    assert result.returncode == 1
    assert "--device cuda: this onnxruntime build has no CUDA execution provider" in result.stderr
    assert "install onnxruntime-gpu" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 30


async def test_drain_refuses_new_streams(start_server: ServerFactory) -> None:
    server = await start_server()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.LstmStreamStub(channel)
        stop = asyncio.ensure_future(server.stop(grace=1.0))
        await asyncio.sleep(0)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Step(request([Ev("late", np.zeros(32))]))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in info.value.details()
        assert await health_of(channel) == NOT_SERVING
        events = server.metrics.registry.get_sample_value(
            "lstm_events_total", {"outcome": "unavailable"}
        )
        assert events == 1
        await stop


@pytest.mark.skipif(DEVICE == "cuda", reason="make run uses the CPU venv")
async def test_make_run_serves() -> None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen(
        ["make", "--no-print-directory", "run", "PORT=0", "METRICS_PORT=0"],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        line = ""
        deadline = time.monotonic() + 120
        while "gRPC on" not in line and time.monotonic() < deadline:
            line = await asyncio.to_thread(proc.stdout.readline)
            assert line, "make run exited before serving"
        port = int(line.split("gRPC on ")[1].split(",")[0].rsplit(":", 1)[1])
        assert "metrics on http://127.0.0.1:" in line
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert await health_of(channel) == SERVING
            info = await pb_grpc.LstmStreamStub(channel).GetModelInfo(pb.ModelInfoRequest())
            assert info.source == "embedded-default"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)


def test_a_port_in_use_is_one_clear_line_and_exit_1() -> None:
    """Another process has the port: no traceback, the address, the flag to change."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        base = [sys.executable, "-m", "service", "--device", DEVICE, "--log-format", "text"]
        for flags, words in (
            (["--port", str(port), "--metrics-port", "0"], ["gRPC", "--port"]),
            (["--port", "0", "--metrics-port", str(port)], ["metrics", "--metrics-port"]),
        ):
            done = subprocess.run([*base, *flags], capture_output=True, text=True, timeout=60)
            assert done.returncode == 1, done.stderr
            assert "Traceback" not in done.stderr
            [line] = [ln for ln in done.stderr.splitlines() if ln.startswith("lstm-serve:")]
            assert f"127.0.0.1:{port}" in line and all(w in line for w in words), line
