"""TLS, mutual TLS, tokens, tenants: certificates made by deploy/tls/make-test-certs.sh."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lstm_bench import procs
from lstm_stream.v1 import lstm_stream_pb2 as pb
from lstm_stream.v1 import lstm_stream_pb2_grpc as pb_grpc
from service.settings import Settings
from tests.conftest import DEVICE, ServerFactory
from tests.service.client import Ev, answers, request
from tests.service.reference import Reference, events

ROOT = Path(__file__).resolve().parents[2]
MAKE_CERTS = ROOT / "deploy" / "tls" / "make-test-certs.sh"
ALPHA = "alpha-token-7f3c9a1e5b2d4f60"
BRAVO = "bravo-token-0e8d6c4b2a197531"
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two independent CAs, each with a server certificate and a client 'tenant-a'."""
    dirs = {}
    for name in ("ca1", "ca2"):
        d = tmp_path_factory.mktemp(name)
        subprocess.run(["sh", str(MAKE_CERTS), str(d), "localhost", "tenant-a"], check=True)
        dirs[name] = d
    return dirs


@pytest.fixture
def tokens(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# token tenant\n{ALPHA} tenant-a\n\n{BRAVO}   tenant-b  # the other one\n")
    return path


def tls_channel(port: int, ca: Path, client: Path | None = None) -> grpc.aio.Channel:
    """A channel trusting ``ca``/ca.pem, presenting ``client`` (``DIR/NAME``) .pem/.key if given."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(ca / "ca.pem").read_bytes(),
        private_key=client.with_suffix(".key").read_bytes() if client else None,
        certificate_chain=client.with_suffix(".pem").read_bytes() if client else None,
    )
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def tls_settings(d: Path, mutual: bool = False) -> dict[str, Any]:
    s = {"tls_cert": str(d / "server.pem"), "tls_key": str(d / "server.key")}
    if mutual:
        s["tls_client_ca"] = str(d / "ca.pem")
    return s


async def step_ok(channel: grpc.aio.Channel, metadata: Sequence[tuple[str, str]] = ()) -> int:
    stub = pb_grpc.LstmStreamStub(channel)
    x = events(np.random.default_rng(0), 1)[0]
    got = answers(await stub.Step(request([Ev("probe", x)]), metadata=metadata, timeout=10))
    return got[0].code


async def refused(
    channel: grpc.aio.Channel, metadata: Sequence[tuple[str, str]] = ()
) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await step_ok(channel, metadata)
    return info.value.code()


async def test_tls_serves_only_clients_that_trust_it(
    start_server: ServerFactory, pki: dict[str, Path]
) -> None:
    server = await start_server(**tls_settings(pki["ca1"]))
    async with tls_channel(server.port, pki["ca1"]) as channel:
        assert await step_ok(channel) == 0
        stub = pb_grpc.LstmStreamStub(channel)
        call = stub.StreamSteps(iter([request([Ev("s", np.zeros(32))])]))
        assert [answers(r)[0].step async for r in call] == [1]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as plaintext:
        assert await refused(plaintext) == grpc.StatusCode.UNAVAILABLE
    async with tls_channel(server.port, pki["ca2"]) as untrusting:
        assert await refused(untrusting) == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_requires_a_certificate_from_the_client_ca(
    start_server: ServerFactory, pki: dict[str, Path]
) -> None:
    server = await start_server(**tls_settings(pki["ca1"], mutual=True))
    async with tls_channel(server.port, pki["ca1"], pki["ca1"] / "tenant-a") as channel:
        assert await step_ok(channel) == 0
    async with tls_channel(server.port, pki["ca1"]) as no_certificate:
        assert await refused(no_certificate) == grpc.StatusCode.UNAVAILABLE
    async with tls_channel(server.port, pki["ca1"], pki["ca2"] / "tenant-a") as other_ca:
        assert await refused(other_ca) == grpc.StatusCode.UNAVAILABLE


async def test_calls_without_a_valid_token_are_refused_and_change_nothing(
    start_server: ServerFactory, tokens: Path
) -> None:
    server = await start_server(auth_tokens=str(tokens))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.LstmStreamStub(channel)
        assert await step_ok(channel, bearer(ALPHA)) == 0
        for metadata in ((), bearer("not-a-token-at-all-000000"), (("authorization", ALPHA),)):
            assert await refused(channel, metadata) == grpc.StatusCode.UNAUTHENTICATED
            calls = [
                stub.GetSession(pb.SessionRef(session_id="probe"), metadata=metadata),
                stub.ResetSession(pb.SessionRef(session_id="probe"), metadata=metadata),
                stub.DeleteSession(pb.SessionRef(session_id="probe"), metadata=metadata),
                stub.PutSession(pb.Session(session_id="probe", step=99), metadata=metadata),
                stub.GetModelInfo(pb.ModelInfoRequest(), metadata=metadata),
            ]
            for call in calls:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            one = iter([request([Ev("probe", np.zeros(32))])])
            stream = stub.StreamSteps(one, metadata=metadata)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stream.read()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        probe = await stub.GetSession(pb.SessionRef(session_id="probe"), metadata=bearer(ALPHA))
        assert probe.step == 1  # nothing above moved it
        # Health and reflection need no token.
        health = health_pb2_grpc.HealthStub(channel)
        status = await health.Check(health_pb2.HealthCheckRequest())
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        async for answer in reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        ):
            assert answer.list_services_response.service
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read()
    assert b"tenant-a" not in text and ALPHA.encode() not in text
    assert server.settings.metrics_bind_host == "127.0.0.1"


async def tenants_share_an_id(port: int, ref_a: Reference, ref_b: Reference, k: int) -> None:
    """A and B each apply one event to their own "shared" session and check the output."""
    rng = np.random.default_rng(k)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.LstmStreamStub(channel)
        for token, ref in ((ALPHA, ref_a), (BRAVO, ref_b)):
            x = events(rng, 1)[0]
            message = request([Ev("shared", x)], columnar=k % 2 == 1)
            got = answers(await stub.Step(message, metadata=bearer(token)))
            np.testing.assert_allclose(got[0].output, ref.step("shared", x), atol=1e-5)


async def test_tenants_with_the_same_session_id_are_apart(
    start_server: ServerFactory, tokens: Path, tmp_path: Path
) -> None:
    settings = {"auth_tokens": str(tokens), "state_store": f"sqlite://{tmp_path / 's.db'}"}
    server = await start_server(**settings)
    ref_a, ref_b = Reference(), Reference()
    for k in range(3):
        await tenants_share_an_id(server.port, ref_a, ref_b, k)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.LstmStreamStub(channel)
        a, b = bearer(ALPHA), bearer(BRAVO)
        ref = pb.SessionRef(session_id="shared")
        got_a = await stub.GetSession(ref, metadata=a)
        assert got_a.session_id == "shared" and got_a.step == 3
        np.testing.assert_allclose(got_a.hidden, ref_a.hidden["shared"], atol=1e-5)
        # B resets, overwrites and deletes its own "shared"; A's stays as it was.
        await stub.ResetSession(ref, metadata=b)
        await stub.PutSession(pb.Session(session_id="shared", step=50, last_seq=9), metadata=b)
        assert (await stub.DeleteSession(ref, metadata=b)).step == 50
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetSession(ref, metadata=b)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert (await stub.GetSession(ref, metadata=a)) == got_a
        ref_b = Reference()  # B starts over
    await server.stop()
    server = await start_server(**settings)  # the store keeps the tenants apart too
    await tenants_share_an_id(server.port, ref_a, ref_b, 3)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.LstmStreamStub(channel)
        ref = pb.SessionRef(session_id="shared")
        assert (await stub.GetSession(ref, metadata=bearer(ALPHA))).step == 4
        assert (await stub.GetSession(ref, metadata=bearer(BRAVO))).step == 1


async def test_a_tenant_at_its_cap_does_not_stop_the_others(
    start_server: ServerFactory, tokens: Path
) -> None:
    server = await start_server(auth_tokens=str(tokens), max_sessions_per_tenant=3)
    x = np.zeros(32, np.float32)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.LstmStreamStub(channel)
        plan = [Ev(f"s{i}", x) for i in range(4)]
        got = answers(await stub.Step(request(plan, columnar=True), metadata=bearer(ALPHA)))
        assert [a.code for a in got] == [0, 0, 0, RESOURCE_EXHAUSTED]
        assert "this tenant holds its maximum of 3 sessions" in got[3].error
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.PutSession(pb.Session(session_id="s9"), metadata=bearer(ALPHA))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        got = answers(await stub.Step(request(plan[:3]), metadata=bearer(BRAVO)))
        assert [a.code for a in got] == [0, 0, 0]
        info_a = await stub.GetModelInfo(pb.ModelInfoRequest(), metadata=bearer(ALPHA))
        assert info_a.live_sessions == 3  # its own, not the server's 6
        await stub.DeleteSession(pb.SessionRef(session_id="s0"), metadata=bearer(ALPHA))
        got = answers(await stub.Step(request(plan[3:]), metadata=bearer(ALPHA)))
        assert got[0].code == 0


async def test_the_client_certificate_can_name_the_tenant(
    start_server: ServerFactory, pki: dict[str, Path], tokens: Path
) -> None:
    server = await start_server(
        **tls_settings(pki["ca1"], mutual=True), auth_tokens=str(tokens), tenant_from_cert=True
    )
    client = pki["ca1"] / "tenant-a"
    async with tls_channel(server.port, pki["ca1"], client) as channel:
        stub = pb_grpc.LstmStreamStub(channel)
        await stub.Step(request([Ev("mine", np.zeros(32))]))  # no token: the certificate's CN
        by_token = await stub.GetSession(pb.SessionRef(session_id="mine"), metadata=bearer(ALPHA))
        assert by_token.step == 1  # tenant-a by token sees tenant-a's session
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetSession(pb.SessionRef(session_id="mine"), metadata=bearer(BRAVO))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_auth_moves_metrics_to_loopback_unless_told() -> None:
    base = {"host": "0.0.0.0", "auth_tokens": "tokens"}
    assert Settings(**base).metrics_bind_host == "127.0.0.1"
    assert Settings(**base, metrics_host="0.0.0.0").metrics_bind_host == "0.0.0.0"
    assert Settings(host="0.0.0.0").metrics_bind_host == "0.0.0.0"


async def test_sighup_revokes_tokens_and_rotates_certificates_keeping_streams(
    pki: dict[str, Path], tmp_path: Path
) -> None:
    live = tmp_path / "live"
    live.mkdir()
    for name in ("server.pem", "server.key"):
        shutil.copy(pki["ca1"] / name, live / name)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{ALPHA} tenant-a\n{BRAVO} tenant-b\n")
    args = ["--device", DEVICE, "--auth-tokens", str(tokens)]
    args += ["--tls-cert", str(live / "server.pem"), "--tls-key", str(live / "server.key")]
    target = procs.start("server", None, args)
    assert target.proc is not None
    ref = Reference()
    x = events(np.random.default_rng(5), 2)
    try:
        async with tls_channel(target.port, pki["ca1"]) as old:
            stub = pb_grpc.LstmStreamStub(old)
            stream = stub.StreamSteps(metadata=bearer(ALPHA))
            await stream.write(request([Ev("kept", x[0])]))
            got = answers(await stream.read())
            np.testing.assert_allclose(got[0].output, ref.step("kept", x[0]), atol=1e-5)
            # Revoke ALPHA and rotate to the other CA's certificate, then SIGHUP.
            tokens.write_text(f"{BRAVO} tenant-b\n")
            for name in ("server.pem", "server.key"):
                shutil.copy(pki["ca2"] / name, live / name)
            target.proc.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.5)
            # The live stream goes on.
            await stream.write(request([Ev("kept", x[1])]))
            got = answers(await stream.read())
            np.testing.assert_allclose(got[0].output, ref.step("kept", x[1]), atol=1e-5)
            await stream.done_writing()
            # New calls: the revoked token is refused, the other one works.
            assert await refused(old, bearer(ALPHA)) == grpc.StatusCode.UNAUTHENTICATED
            assert await step_ok(old, bearer(BRAVO)) == 0
        async with tls_channel(target.port, pki["ca2"]) as rotated:
            assert await step_ok(rotated, bearer(BRAVO)) == 0
        async with tls_channel(target.port, pki["ca1"]) as stale:
            assert await refused(stale, bearer(BRAVO)) == grpc.StatusCode.UNAVAILABLE
    finally:
        assert target.stop() == 0


async def test_logs_hold_no_token_and_no_event_value(tmp_path: Path, tokens: Path) -> None:
    log_path = tmp_path / "server.log"
    value = 0.7436281  # distinctive; also checked in the forms a log could print it
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [
                *procs.server_command(),
                *("--device", DEVICE, "--auth-tokens", str(tokens)),
                *("--log-level", "DEBUG", "--log-format", "json"),
            ],
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
        )
        assert proc.stdout is not None
        port = procs.parse_ports(proc.stdout.readline())[0]
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.LstmStreamStub(channel)
                values = np.full(32, value, np.float32)
                a = bearer(ALPHA)
                for columnar in (False, True):
                    await stub.Step(request([Ev("private", values)], columnar), metadata=a)
                await stub.Step(request([Ev("private", values[:3])]), metadata=a)  # refused
                stream = stub.StreamSteps(
                    iter([request([Ev("private", values, seq=9)])]), metadata=bearer(BRAVO)
                )
                [r async for r in stream]
                await stub.GetSession(pb.SessionRef(session_id="private"), metadata=bearer(ALPHA))
                with pytest.raises(grpc.aio.AioRpcError):
                    wrong = bearer(ALPHA[:-1])
                    await stub.GetSession(pb.SessionRef(session_id="x"), metadata=wrong)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
    text = log_path.read_text()
    assert "serving on" in text  # the capture did catch the server's log
    for secret in (ALPHA, BRAVO, ALPHA[:-1], "0.7436", "0.74362"):
        assert secret not in text, secret


async def test_the_readme_tls_example_runs(start_server: ServerFactory, tmp_path: Path) -> None:
    """docs/SECURITY.md's ``python tls`` block, as written, against a TLS server with its token."""
    readme = (ROOT / "docs" / "SECURITY.md").read_text()
    [block] = re.findall(r"```python tls\n(.*?)```", readme, re.S)
    [tokens] = re.findall(r"```text\n(\w{32}  tenant-a\n.*?)```", readme, re.S)
    subprocess.run(["sh", str(MAKE_CERTS), str(tmp_path / "certs")], check=True)
    (tmp_path / "tokens.txt").write_text(tokens)
    server = await start_server(
        tls_cert=str(tmp_path / "certs" / "server.pem"),
        tls_key=str(tmp_path / "certs" / "server.key"),
        auth_tokens=str(tmp_path / "tokens.txt"),
    )
    code = block.replace("localhost:50051", f"localhost:{server.port}")
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "tls step 1"


async def test_session_id_limits_apply_to_the_id_as_sent(
    start_server: ServerFactory, tokens: Path
) -> None:
    server = await start_server(auth_tokens=str(tokens))
    x = np.zeros(32, np.float32)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.LstmStreamStub(channel)
        for columnar in (False, True):
            plan = [Ev("a" * 128, x), Ev("b" * 129, x), Ev("", x)]
            got = answers(await stub.Step(request(plan, columnar), metadata=bearer(ALPHA)))
            assert [a.code for a in got] == [0, 3, 3]
            assert got[1].error == "session_id is 129 bytes long; the limit is 128"
            assert got[2].error == "session_id is empty"
