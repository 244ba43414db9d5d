"""Replicas sharing sessions through Redis, behind HAProxy: all real programs on loopback.

redis-server and haproxy are Debian's (``make tools``); replicas are ``lstm-serve``
processes; the proxy runs deploy/haproxy/haproxy.cfg with only its addresses replaced.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from lstm_bench import procs
from lstm_bench.cluster import Proxy, RedisServer, free_port, start_replica
from lstm_stream import AsyncClient, Client, ShardedClient, rendezvous
from lstm_stream.v1 import lstm_stream_pb2 as pb
from lstm_stream.v1 import lstm_stream_pb2_grpc as pb_grpc
from model_export import lstm
from model_export.default import default_parameters
from tests.conftest import ServerFactory
from tests.service.client import Ev, answers, request
from tests.service.reference import Reference, events
from tests.service.test_lifecycle import health_of

pytestmark = pytest.mark.timeout(180)

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
E = 32


class Cluster:
    """What a test started; everything is stopped at the end, whatever happened."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.redis = RedisServer(tmp / "redis").start()
        self.replicas: list[procs.Target] = []
        self.proxy: Proxy | None = None

    def add_replica(self) -> procs.Target:
        replica = start_replica(self.redis.url)
        self.replicas.append(replica)
        return replica

    def start_proxy(self) -> Proxy:
        self.proxy = Proxy(self.tmp / "proxy", [r.port for r in self.replicas]).start()
        return self.proxy

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        for replica in self.replicas:
            replica.stop()
        self.redis.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop()


def counter(target: procs.Target, name: str) -> float:
    return target.metrics().get(name, 0.0)


RESTORED = 'lstm_store_reads_total{result="restored"}'
CONFLICTS = "lstm_store_conflicts_total"


async def wait_for_health(channel: grpc.aio.Channel, status: str) -> None:
    want = health_pb2.HealthCheckResponse.ServingStatus.Value(status)
    for _ in range(200):
        if await health_of(channel) == want:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"health never became {status}")


def header(sid: str) -> tuple[tuple[str, str]]:
    return (("x-session-id", sid),)


def reference_of(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = default_parameters()
    h = np.zeros(p.hidden_size)
    c = np.zeros(p.hidden_size)
    for row in x:
        h, c = lstm.step(row.astype(np.float64), h, c, p)
    return h, c


def assert_state(got: pb.Session, x: np.ndarray) -> None:
    h, c = reference_of(x)
    assert got.step == len(x)
    np.testing.assert_allclose(got.hidden, h, atol=1e-5)
    np.testing.assert_allclose(got.cell, c, atol=1e-5)


async def test_two_replicas_feeding_one_session_apply_each_event_once(cluster: Cluster) -> None:
    """Both replicas hold the session; every write of one makes the other's copy stale."""
    replicas = [cluster.add_replica(), cluster.add_replica()]
    rng = np.random.default_rng(7)
    acks: list[tuple[int, np.ndarray, np.ndarray]] = []

    async def feed(address: str, n: int) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.LstmStreamStub(channel)
            for _ in range(n):
                x = rng.standard_normal(E).astype(np.float32)
                [a] = answers(await stub.Step(request([Ev("shared", x)], columnar=True)))
                assert a.code == 0, a.error
                acks.append((int(a.step), x, a.output))

    await asyncio.gather(*(feed(r.address, 60) for r in replicas))
    acks.sort(key=lambda a: a[0])
    assert [a[0] for a in acks] == list(range(1, 121))  # no gap, no repeat
    ref = Reference()
    for _, x, output in acks:  # the acknowledged order is the order applied
        np.testing.assert_allclose(output, ref.step("shared", x), atol=1e-5)
    conflicts = sum(counter(r, CONFLICTS) for r in replicas)
    assert conflicts > 0, "the two copies never collided: the test did not test CAS"
    for r in replicas:  # either replica answers the stored state
        async with grpc.aio.insecure_channel(r.address) as channel:
            got = await pb_grpc.LstmStreamStub(channel).GetSession(
                pb.SessionRef(session_id="shared")
            )
        assert_state(got, np.array([a[1] for a in acks]))


async def test_a_reset_or_delete_on_one_replica_reaches_a_copy_on_another(
    cluster: Cluster,
) -> None:
    a, b = cluster.add_replica(), cluster.add_replica()
    x = events(np.random.default_rng(3), 6)
    async with (
        grpc.aio.insecure_channel(a.address) as ca,
        grpc.aio.insecure_channel(b.address) as cb,
    ):
        sa, sb = pb_grpc.LstmStreamStub(ca), pb_grpc.LstmStreamStub(cb)
        for row in x[:3]:
            await sa.Step(request([Ev("r", row)], columnar=True))
        await sb.ResetSession(pb.SessionRef(session_id="r"))  # a's copy is now stale
        [ans] = answers(await sa.Step(request([Ev("r", x[3])], columnar=True)))
        ref = Reference()
        assert ans.step == 4  # the reset kept the counters
        np.testing.assert_allclose(ans.output, ref.step("r", x[3]), atol=1e-5)  # from zeros
        await sb.DeleteSession(pb.SessionRef(session_id="r"))
        [ans] = answers(await sa.Step(request([Ev("r", x[4])], columnar=True)))
        assert ans.step == 1  # a new session: a did not write its old copy back
        np.testing.assert_allclose(ans.output, Reference().step("r", x[4]), atol=1e-5)
    assert counter(a, CONFLICTS) == 2


async def stream_session(
    stub: pb_grpc.LstmStreamStub, sid: str, x: np.ndarray, progress: list[int]
) -> int:
    """Send ``x`` one event per message with seq; after a broken stream, ask the session's
    ``last_seq`` through the proxy and go on from there. Returns the breaks seen."""
    acked = 0
    breaks = 0
    while acked < len(x):
        call = stub.StreamSteps(metadata=header(sid))
        try:
            for i in range(acked, len(x)):
                await call.write(request([Ev(sid, x[i], seq=i + 1)], columnar=True))
                [a] = answers(await call.read())
                assert a.code == 0, a.error
                acked = i + 1
                progress[0] += 1
                await asyncio.sleep(0.002)
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            # A stream broken between an answer and the next write fails the write with
            # InvalidStateError ("RPC already finished") rather than AioRpcError.
            breaks += 1
            got = await stub.GetSession(pb.SessionRef(session_id=sid), metadata=header(sid))
            assert got.last_seq >= acked, f"{sid}: acknowledged events lost"
            acked = got.last_seq
    return breaks


async def test_a_replica_killed_mid_stream_loses_nothing(cluster: Cluster) -> None:
    for _ in range(3):
        cluster.add_replica()
    proxy = cluster.start_proxy()
    rng = np.random.default_rng(11)
    n_events = 80
    xs = {f"dev-{k}": events(rng, n_events) for k in range(64)}
    progress = [0]

    async def kill_at(fraction: float) -> None:
        while progress[0] < fraction * 64 * n_events:
            await asyncio.sleep(0.01)
        victim = cluster.replicas[1]
        assert victim.proc is not None
        victim.proc.kill()

    async def with_library(sid: str, x: np.ndarray) -> int:
        """The client library resumes on its own (seq; CANCELLED from the proxy retried)."""
        async with AsyncClient(proxy.address, window=1) as client:
            steps = [
                int(r.steps[0])
                async for r in client.stream(
                    (([sid], x[i : i + 1]) for i in range(len(x))), session_id=sid
                )
            ]
        assert steps == list(range(1, len(x) + 1))
        return 0

    async with grpc.aio.insecure_channel(proxy.address) as channel:
        stub = pb_grpc.LstmStreamStub(channel)
        ids = list(xs)
        results = await asyncio.gather(
            kill_at(0.4),
            *(stream_session(stub, sid, xs[sid], progress) for sid in ids[:48]),
            *(with_library(sid, xs[sid]) for sid in ids[48:]),
        )
        assert sum(results[1:]) > 0, "no stream was broken: the killed replica served none"
        for sid, x in xs.items():
            got = await stub.GetSession(pb.SessionRef(session_id=sid), metadata=header(sid))
            assert_state(got, x)
            assert got.last_seq == n_events


async def test_a_fourth_replica_takes_over_only_the_sessions_that_move(cluster: Cluster) -> None:
    for _ in range(3):
        cluster.add_replica()
    proxy = cluster.start_proxy()
    rng = np.random.default_rng(5)
    xs = {f"user-{k}": events(rng, 20) for k in range(64)}

    async def phase(rows: slice) -> None:
        async with grpc.aio.insecure_channel(proxy.address) as channel:  # a new connection
            stub = pb_grpc.LstmStreamStub(channel)

            async def one(sid: str) -> None:
                for i in range(rows.start, rows.stop):
                    message = request([Ev(sid, xs[sid][i], seq=i + 1)], columnar=True)
                    [a] = answers(await stub.Step(message, metadata=header(sid)))
                    assert a.code == 0 and a.step == i + 1, a

            await asyncio.gather(*(one(sid) for sid in xs))

    await phase(slice(0, 10))
    old = cluster.replicas[:]
    assert sum(counter(r, "lstm_live_sessions") for r in old) == 64  # one replica per session
    restored_before = [counter(r, RESTORED) for r in old]
    new = cluster.add_replica()
    proxy.reload([r.port for r in cluster.replicas])
    await asyncio.sleep(1.5)  # the new server's health checks (rise 2 x 500 ms)
    await phase(slice(10, 20))
    moved = counter(new, RESTORED)
    assert moved == counter(new, "lstm_live_sessions")  # every session it took was restored
    assert 0 < moved < 64
    # Unmoved sessions stayed warm: no replica that kept its sessions read one again.
    assert [counter(r, RESTORED) for r in old] == restored_before
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        stub = pb_grpc.LstmStreamStub(channel)
        for sid, x in xs.items():
            assert_state(
                await stub.GetSession(pb.SessionRef(session_id=sid), metadata=header(sid)), x
            )


async def test_acknowledged_state_survives_a_redis_restart(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    # fsync always: with everysec a busy disk lets Redis answer a write it has not yet put
    # in the file (up to 2 s), and a SIGKILL loses it; always is the no-loss setting.
    redis = RedisServer(tmp_path / "redis", fsync="always").start()
    try:
        server = await start_server(state_store=redis.url)
        xs = {f"s{k}": events(np.random.default_rng(k), 30) for k in range(8)}
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.LstmStreamStub(channel)
            for i in range(20):
                message = request([Ev(sid, x[i], seq=i + 1) for sid, x in xs.items()], True)
                assert all(a.code == 0 for a in answers(await stub.Step(message)))
            redis.kill()  # SIGKILL: only what the AOF holds comes back
            message = request([Ev(sid, x[20], seq=21) for sid, x in xs.items()], True)
            assert {a.code for a in answers(await stub.Step(message))} == {UNAVAILABLE}
            await wait_for_health(channel, "NOT_SERVING")
            redis.start()
            await wait_for_health(channel, "SERVING")
            for sid, x in xs.items():  # read from Redis, not from the replica's memory
                assert_state(await stub.GetSession(pb.SessionRef(session_id=sid)), x[:20])
            for i in range(20, 30):
                message = request([Ev(sid, x[i], seq=i + 1) for sid, x in xs.items()], True)
                assert all(a.code == 0 for a in answers(await stub.Step(message)))
        fresh = await start_server(state_store=redis.url)  # nothing in memory
        async with grpc.aio.insecure_channel(f"127.0.0.1:{fresh.port}") as channel:
            stub = pb_grpc.LstmStreamStub(channel)
            for sid, x in xs.items():
                assert_state(await stub.GetSession(pb.SessionRef(session_id=sid)), x)
    finally:
        redis.stop()


def test_the_sharded_client_keeps_each_session_on_its_rendezvous_owner(cluster: Cluster) -> None:
    replicas = [cluster.add_replica(), cluster.add_replica()]
    ids = [f"gw-{k}" for k in range(64)]
    x = events(np.random.default_rng(9), 2 * len(ids)).reshape(2, len(ids), E)
    ref = Reference()
    with ShardedClient([r.address for r in replicas]) as client:
        owners = [rendezvous(sid, client.addresses) for sid in ids]
        r = client.step_many(ids, x[0])
        assert r.ok and r.steps.tolist() == [1] * len(ids)
        for i, sid in enumerate(ids):
            np.testing.assert_allclose(r.outputs[i], ref.step(sid, x[0][i]), atol=1e-5)
    for k, replica in enumerate(replicas):  # each session lives on its owner only
        assert counter(replica, "lstm_live_sessions") == owners.count(k)
    replicas.append(cluster.add_replica())
    with ShardedClient([r.address for r in replicas]) as client:
        r = client.step_many(ids, x[1])
        assert r.ok and r.steps.tolist() == [2] * len(ids)
        for i, sid in enumerate(ids):
            np.testing.assert_allclose(r.outputs[i], ref.step(sid, x[1][i]), atol=1e-5)
        moved = [rendezvous(sid, client.addresses) == 2 for sid in ids]
    # Adding an address moves only the sessions the new one wins; they come from Redis.
    assert 0 < sum(moved) < len(ids)
    assert counter(replicas[2], RESTORED) == sum(moved)
    assert [counter(r, RESTORED) for r in replicas[:2]] == [0, 0]


def test_a_replica_without_its_redis_refuses_to_start() -> None:
    command = [*procs.server_command(), "--state-store", f"redis://127.0.0.1:{free_port()}/0"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "cannot open state store redis://127.0.0.1:" in done.stderr
    assert "Connection refused" in done.stderr


def test_the_client_library_routes_each_session_to_one_replica(cluster: Cluster) -> None:
    """Client sends x-session-id on single-session calls; without it HAProxy would spread
    a session's calls round robin over the replicas."""
    for _ in range(3):
        cluster.add_replica()
    proxy = cluster.start_proxy()
    ids = [f"car-{k}" for k in range(16)]
    x = events(np.random.default_rng(2), 3 * len(ids)).reshape(3, len(ids), E)
    ref = Reference()
    with Client(proxy.address) as client:
        for k in range(3):
            for i, sid in enumerate(ids):
                out = client.step(sid, x[k][i])
                np.testing.assert_allclose(out, ref.step(sid, x[k][i]), atol=1e-5)
        assert client.get_session(ids[0]).step == 3
        client.reset_session(ids[1])
        client.delete_session(ids[2])
    live = [counter(r, "lstm_live_sessions") for r in cluster.replicas]
    assert sum(live) == len(ids) - 1  # each session on one replica; one deleted
    assert sum(counter(r, CONFLICTS) for r in cluster.replicas) == 0
    assert sum(counter(r, RESTORED) for r in cluster.replicas) == 0
