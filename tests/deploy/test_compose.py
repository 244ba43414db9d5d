"""docker-compose.yml and the Dockerfiles without a Docker engine: validated, linted, and the
server run natively with the compose service's command and environment and the image's
entrypoint and health check."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import yaml

from lstm_bench import procs
from lstm_bench.cluster import Proxy, RedisServer
from lstm_stream.v1 import lstm_stream_pb2_grpc as pb_grpc
from tests.service.client import Ev, answers, request
from tests.service.reference import Reference, events

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
COMPOSE = ROOT / "docker-compose.yml"


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def dockerfile_json(name: str, instruction: str) -> list[str]:
    """An exec-form instruction (ENTRYPOINT, HEALTHCHECK's CMD) of the final stage."""
    text = (ROOT / name).read_text().replace("\\\n", " ")
    lines = [line for line in text.splitlines() if line.startswith(instruction)]
    match = re.search(r"(\[.*\])", lines[-1])
    assert match, lines[-1]
    return yaml.safe_load(match.group(1))


def test_compose_files_follow_the_compose_specification() -> None:
    files = [str(ROOT / "docker-compose.yml"), str(ROOT / "docker-compose.gpu.yml")]
    done = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", *files],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfiles_pass_hadolint() -> None:
    files = [str(ROOT / "Dockerfile"), str(ROOT / "Dockerfile.cuda")]
    done = subprocess.run([str(BIN / "hadolint"), *files], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_stack_mounts_files_that_exist() -> None:
    services = compose()["services"]
    assert set(services) == {"lstm-stream", "prometheus", "grafana", "redis", "lstm", "proxy"}
    assert {s for s, v in services.items() if v.get("profiles") == ["scaled"]} == {
        "redis",
        "lstm",
        "proxy",
    }
    for service in ("prometheus", "grafana", "proxy"):
        for volume in services[service]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), (service, source)
    assert services["lstm-stream"]["build"]["dockerfile"] == "Dockerfile"
    gpu = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())["services"]
    devices = gpu["lstm-stream"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def start_compose_server(
    data_dir: Path, service_name: str = "lstm-stream", redis_url: str = ""
) -> tuple[subprocess.Popen[str], int, int]:
    """The image's entrypoint with a compose service's command and environment, natively:
    the container's data directory moved to ``data_dir``, its ports to free loopback ones,
    the compose Redis to ``redis_url``. Returns (process, gRPC port, metrics port)."""
    service = compose()["services"][service_name]
    entrypoint = dockerfile_json("Dockerfile", "ENTRYPOINT")
    assert entrypoint == ["lstm-serve"]
    args = [
        a.replace("/var/lib/lstm-stream/data", str(data_dir)).replace(
            "redis://redis:6379/0", redis_url
        )
        for a in service["command"]
    ]
    env = {**os.environ, **{k: str(v) for k, v in service["environment"].items()}}
    env.update(LSTM_HOST="127.0.0.1", LSTM_METRICS_HOST="127.0.0.1")
    env.update(LSTM_PORT="0", LSTM_METRICS_PORT="0", LSTM_LOG_LEVEL="WARNING")
    proc = subprocess.Popen(
        [str(BIN / entrypoint[0]), *args], env=env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    port, metrics_port = procs.parse_ports(proc.stdout.readline())
    assert metrics_port is not None
    return proc, port, metrics_port


def test_the_compose_server_runs_natively(tmp_path: Path) -> None:
    proc, port, _ = start_compose_server(tmp_path)
    try:
        health = dockerfile_json("Dockerfile", "HEALTHCHECK")
        assert health[0] == "python", health  # HEALTHCHECK ... CMD ["python", ...]
        probe = [sys.executable, *health[1:], "--port", str(port)]
        done = subprocess.run(probe, capture_output=True, text=True, timeout=30)
        assert (done.returncode, done.stdout.strip()) == (0, "SERVING"), done.stderr
        ref = Reference()
        x = events(np.random.default_rng(4), 2)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.LstmStreamStub(channel)
            got = answers(stub.Step(request([Ev("compose", x[0])])))
            np.testing.assert_allclose(got[0].output, ref.step("compose", x[0]), atol=1e-5)
        assert (tmp_path / "state.db").exists()  # the compose command's SQLite store
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    # After the server is gone the health check fails, as Docker needs it to.
    time.sleep(0.1)
    done = subprocess.run(probe, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "UNAVAILABLE" in done.stdout, shlex.join(probe)


def test_the_scaled_profile_runs_natively(tmp_path: Path) -> None:
    """Redis with the compose command, two replicas as the lstm service runs them, the
    proxy's config: an event through the proxy is stored in Redis's append-only file."""
    services = compose()["services"]
    redis_args = services["redis"]["command"]
    assert redis_args[0] == "redis-server" and "--appendonly" in redis_args
    redis = RedisServer(tmp_path / "redis")
    redis.start()  # RedisServer's own flags: the same AOF settings, checked here
    assert redis_args[redis_args.index("--appendfsync") + 1] == redis.fsync
    replicas = [start_compose_server(tmp_path / f"r{k}", "lstm", redis.url) for k in range(2)]
    proxy = Proxy(tmp_path / "proxy", [port for _, port, _ in replicas]).start()
    try:
        ref = Reference()
        x = events(np.random.default_rng(5), 1)
        with grpc.insecure_channel(proxy.address) as channel:
            stub = pb_grpc.LstmStreamStub(channel)
            got = answers(
                stub.Step(request([Ev("scaled", x[0])]), metadata=(("x-session-id", "scaled"),))
            )
            np.testing.assert_allclose(got[0].output, ref.step("scaled", x[0]), atol=1e-5)
        aof = b"".join(p.read_bytes() for p in (tmp_path / "redis").rglob("*.aof"))
        assert b"lstm:m:lstm/scaled" in aof
    finally:
        proxy.stop()
        for proc, _, _ in replicas:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        redis.stop()
