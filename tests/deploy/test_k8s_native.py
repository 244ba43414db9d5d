"""The scaled overlay run natively: the server containers' command and environment, Redis's
arguments and HAProxy's ConfigMap as kustomize renders them; the kubelet's probes and its
way of stopping a pod (preStop, SIGTERM, SIGKILL after the grace period) done by hand.

What is substituted, and only that: listening addresses and ports become 127.0.0.1 and
free ports (the probes' ports follow); the Redis Service's name becomes the local
redis-server's URL; HAProxy's ``bind`` moves to a free loopback port and its
``server-template`` (DNS on the headless Service) becomes one ``server`` line per
replica, its ``resolvers`` section dropped (lstm_bench.cluster.Proxy does that).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lstm_bench import cluster, procs
from lstm_stream import AsyncClient
from lstm_stream.v1 import lstm_stream_pb2 as pb
from lstm_stream.v1 import lstm_stream_pb2_grpc as pb_grpc
from tests.deploy.test_compose import dockerfile_json
from tests.deploy.test_k8s import (
    K8S,
    SERVER,
    container,
    generated,
    one,
    render,
    settings,
)
from tests.scale.test_scale_out import RESTORED, E, assert_state, counter, header
from tests.service.client import Ev, answers, request
from tests.service.reference import events

BIN = Path(sys.executable).parent


class Pod:
    """One server container of the rendered StatefulSet, run as a local process."""

    def __init__(
        self,
        objects: list[dict[str, Any]],
        store: tuple[str, str],
        wrapper: list[str] | None = None,
    ):
        """``store``: the rendered state store URL and the local one it becomes;
        ``wrapper``: a command the server runs under (a read-only root)."""
        self.spec = one(objects, "StatefulSet", SERVER)["spec"]["template"]["spec"]
        self.container = container(objects, "StatefulSet", SERVER)
        command = self.container.get("command") or dockerfile_json("Dockerfile", "ENTRYPOINT")
        assert command == ["lstm-serve"]  # the image's entrypoint; the pod keeps it
        env = settings(objects)
        assert env["LSTM_STATE_STORE"] == store[0]
        env["LSTM_STATE_STORE"] = store[1]
        env.update(LSTM_HOST="127.0.0.1", LSTM_METRICS_HOST="127.0.0.1")
        env.update(LSTM_PORT="0", LSTM_METRICS_PORT="0", LSTM_LOG_LEVEL="WARNING")
        # It dies with the test process (a death signal set by an exec wrapper in the child:
        # a preexec_fn would fork this process, which runs gRPC clients).
        argv = [*(wrapper or []), str(BIN / command[0]), *command[1:]]
        argv[0] = shutil.which(argv[0]) or argv[0]
        self.proc = subprocess.Popen(
            procs.dying([*argv, *self.container.get("args", [])]),
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if wrapper else None,
            text=True,
        )
        assert self.proc.stdout is not None
        port, metrics_port = procs.parse_ports(self.proc.stdout.readline())
        assert metrics_port is not None
        self.target = procs.Target("server", self.proc, port, metrics_port)
        local = {"grpc": port, "metrics": metrics_port}
        self.ports: dict[int | str, int] = {}
        for p in self.container["ports"]:  # a probe names a container port or its number
            self.ports[p["name"]] = self.ports[p["containerPort"]] = local[p["name"]]

    def local(self, port: int | str) -> int:
        """The local port of a probe's port."""
        return self.ports[port]

    async def ready(self) -> bool:
        """The readiness probe as the kubelet runs it: grpc.health.v1 Check with the
        probe's service, within its timeout; only SERVING passes."""
        probe = self.container["readinessProbe"]
        return await grpc_probe(
            self.local(probe["grpc"]["port"]),
            probe["grpc"].get("service", ""),
            probe.get("timeoutSeconds", 1),
        )

    def live(self) -> bool:
        """The liveness probe: a TCP connection to the named port."""
        probe = self.container["livenessProbe"]
        try:
            with socket.create_connection(
                ("127.0.0.1", self.local(probe["tcpSocket"]["port"])),
                timeout=probe.get("timeoutSeconds", 1),
            ):
                return True
        except OSError:
            return False

    async def terminate(self, on_sigterm: asyncio.Event) -> tuple[int, bool, list[tuple]]:
        """What the kubelet does to a pod being deleted: the preStop hook, then SIGTERM,
        then SIGKILL when terminationGracePeriodSeconds (counted from the start) ends.
        Returns (exit code, whether it was killed, probe samples after SIGTERM)."""
        grace = self.spec["terminationGracePeriodSeconds"]
        start = time.monotonic()
        pre_stop = self.container["lifecycle"]["preStop"]["exec"]["command"]
        await asyncio.to_thread(subprocess.run, pre_stop, check=True, timeout=grace)
        assert self.proc.poll() is None
        samples = [("before SIGTERM", await self.ready(), self.live())]
        self.proc.send_signal(signal.SIGTERM)
        on_sigterm.set()
        while self.proc.poll() is None and time.monotonic() < start + grace:
            ready, live = await self.ready(), self.live()
            if self.proc.poll() is None:  # sampled while it was still running
                samples.append(("draining", ready, live))
            await asyncio.sleep(0.1)
        killed = self.proc.poll() is None
        if killed:
            self.proc.kill()
        return self.proc.wait(), killed, samples

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


async def grpc_probe(port: int, service: str, timeout: float) -> bool:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.aio.AioRpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture
def scaled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[list[Pod], cluster.Proxy]]:
    """Redis, two server pods and the proxy, as the scaled overlay renders them."""
    objects = render(K8S / "overlays" / "scaled")
    redis_args = container(objects, "StatefulSet", "lstm-stream-redis")["args"]
    redis = cluster.RedisServer(tmp_path / "redis")
    # RedisServer's own flags are the rendered ones: AOF on, fsync each second, no RDB
    assert redis_args[redis_args.index("--appendonly") + 1] == "yes"
    assert redis_args[redis_args.index("--appendfsync") + 1] == redis.fsync
    assert redis_args[redis_args.index("--save") + 1] == ""
    config = generated(objects, "ConfigMap", "lstm-stream-haproxy")["data"]["haproxy.cfg"]
    (tmp_path / "configmap").mkdir()
    (tmp_path / "configmap" / "haproxy.cfg").write_text(config)
    monkeypatch.setattr(cluster, "HAPROXY_CFG", tmp_path / "configmap" / "haproxy.cfg")
    pods: list[Pod] = []
    proxy = None
    try:
        redis.start()
        store = ("redis://lstm-stream-redis:6379/0", redis.url)
        pods = [Pod(objects, store) for _ in range(2)]
        proxy = cluster.Proxy(tmp_path / "proxy", [p.target.port for p in pods]).start()
        ran = proxy.config.read_text()
        kept = [line for line in config.splitlines() if line not in ran.splitlines()]
        assert [line.split()[0] for line in kept if line.strip()] == [
            "bind",
            "server-template",
            "resolvers",
            "#",
            "parse-resolv-conf",
            "hold",
        ], kept  # what was substituted: nothing else of the ConfigMap's file changed
        yield pods, proxy
    finally:
        if proxy is not None:
            proxy.stop()
        for pod in pods:
            pod.stop()
        redis.stop()


async def test_a_replica_stopped_as_kubernetes_stops_it_loses_no_answered_event(
    scaled: tuple[list[Pod], cluster.Proxy],
) -> None:
    pods, proxy = scaled
    victim, survivor = pods
    for pod in pods:  # the kubelet would put both in the headless Service's endpoints
        assert await pod.ready() and pod.live()
        port = pod.local(pod.container["readinessProbe"]["grpc"]["port"])
        assert not await grpc_probe(port, "lstm_stream.v1.NoSuchService", 1.0)
    n_sessions = 16
    progress = [0]
    stopping = asyncio.Event()
    sigterm = asyncio.Event()

    async def device(k: int) -> tuple[str, list[np.ndarray], list[tuple[int, int, bool]]]:
        """A device streaming 4 events a call through the proxy until the test ends."""
        sid = f"dev-{k}"
        rng = np.random.default_rng(k)
        sent: list[np.ndarray] = []
        answers: list[tuple[int, int, bool]] = []  # (step, seq, duplicate)
        async with AsyncClient(proxy.address, window=2) as client:
            while not stopping.is_set():
                x = rng.standard_normal((4, E)).astype(np.float32)
                batches = (([sid], x[i : i + 1]) for i in range(len(x)))
                async for r in client.stream(batches, session_id=sid):
                    answers.append((int(r.steps[0]), int(r.seqs[0]), bool(r.duplicates[0])))
                    progress[0] += 1
                sent.extend(x)
                await asyncio.sleep(0.05)
        return sid, sent, answers

    async def kubernetes() -> tuple[int, bool, list[tuple], int]:
        while progress[0] < n_sessions * 8:
            await asyncio.sleep(0.02)
        held = counter(victim.target, "lstm_live_sessions")
        outcome = await victim.terminate(sigterm)
        await asyncio.sleep(1.0)  # the survivor serves the moved sessions for a while
        stopping.set()
        return (*outcome, int(held))

    async def at_sigterm() -> int:
        await sigterm.wait()
        return progress[0]

    run = asyncio.gather(kubernetes(), at_sigterm(), *map(device, range(n_sessions)))
    try:
        results = await asyncio.wait_for(run, 60)  # ~15 s; a stuck call fails here, not at 120
    except asyncio.TimeoutError:
        pytest.fail(f"stuck after {progress[0]} answers; the victim exited {victim.proc.poll()}")
    (code, killed, samples, held), answered_at_sigterm, *devices = results
    assert held > 0, "the victim held no session: nothing was tested"
    assert (code, killed) == (0, False), "the drain did not end within the grace period"
    assert samples[0] == ("before SIGTERM", True, True)
    # Draining: the kubelet's readiness fails (out of the endpoints) while liveness
    # passes (no restart of a pod that is finishing its work).
    assert ("draining", False, True) in samples, samples
    assert all(not ready for _, ready, _ in samples[1:]), samples
    answered = sum(len(answers) for _, _, answers in devices)
    assert answered > answered_at_sigterm, "no event was answered after SIGTERM"
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        stub = pb_grpc.LstmStreamStub(channel)
        for sid, sent, answers in devices:
            # Every event answered once, in order. One applied before its answer was
            # lost comes back a duplicate (with the session's step then, PROTOCOL.md);
            # every other answer is the event's own step: nothing applied twice.
            assert [seq for _, seq, _ in answers] == list(range(1, len(sent) + 1)), sid
            wrong = [a for a in answers if (a[0] < a[1] if a[2] else a[0] != a[1])]
            assert not wrong, f"{sid}: (step, seq, duplicate) {wrong}"
            got = await stub.GetSession(pb.SessionRef(session_id=sid), metadata=header(sid))
            assert_state(got, np.array(sent))  # none lost, none applied twice
            assert got.last_seq == len(sent)
    # The victim's sessions went on at the survivor, read back from Redis.
    assert counter(survivor.target, RESTORED) >= held


READ_ONLY_ROOT = [
    "unshare",
    "--mount",
    "--propagation",
    "private",
    "sh",
    "-c",
    # In a mount namespace of its own: /tmp (the pod's emptyDirs, and here the data
    # volume, under pytest's tmp_path) stays writable, the rest of / is read-only.
    'mount --bind /tmp /tmp && mount -o remount,bind,ro / && exec "$@"',
    "sh",
]


def test_the_single_pod_runs_with_a_read_only_root_filesystem() -> None:
    """What the server writes has a volume: with / read-only but for /tmp (the pod's
    emptyDir and, here, its data volume), it starts, stores and drains as usual."""
    tmp_path = Path(tempfile.mkdtemp(dir="/tmp"))  # under the writable /tmp for sure
    probe = subprocess.run(
        # the options of the mount at / as the server will see it, and /tmp writable
        [*READ_ONLY_ROOT, "sh", "-c", f"touch {tmp_path}/ok && cat /proc/self/mountinfo"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode != 0 and "unshare" in probe.stderr:
        pytest.skip(f"no private mount namespace here: {probe.stderr.strip()}")
    assert probe.returncode == 0, probe.stderr
    root_options = [line.split()[5] for line in probe.stdout.splitlines() if line.split()[4] == "/"]
    assert root_options and root_options[-1].split(",")[0] == "ro", probe.stdout
    objects = render(K8S / "overlays" / "single")
    server = container(objects, "StatefulSet", SERVER)
    assert server["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in server["volumeMounts"]}
    assert mounts == {"/tmp", "/var/lib/lstm-stream/data"}  # the only writable paths
    data = tmp_path / "data"
    data.mkdir()
    store = ("sqlite:///var/lib/lstm-stream/data/state.db", f"sqlite://{data}/state.db")
    pod = Pod(objects, store, READ_ONLY_ROOT)
    try:
        x = events(np.random.default_rng(8), 3)
        with grpc.insecure_channel(pod.target.address) as channel:
            stub = pb_grpc.LstmStreamStub(channel)
            for row in x:
                got = answers(stub.Step(request([Ev("ro", row)])))
                assert got[0].code == 0, got[0].error
            assert_state(stub.GetSession(pb.SessionRef(session_id="ro")), x)
        assert (data / "state.db").exists()
        pod.proc.send_signal(signal.SIGTERM)
        assert pod.proc.wait(timeout=30) == 0
        assert pod.proc.stderr is not None
        log = pod.proc.stderr.read()
        assert "Read-only file system" not in log and "Errno 30" not in log, log
    finally:
        pod.stop()
        shutil.rmtree(tmp_path, ignore_errors=True)
