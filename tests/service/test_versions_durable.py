"""Versions that outlive the process: SIGKILL during an upgrade (SQLite), and pins that
replicas sharing Redis agree on."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import grpc
import numpy as np
import pytest

from lstm_bench import procs
from lstm_bench.cluster import RedisServer, start_replica
from lstm_stream.v1 import lstm_stream_pb2 as pb
from lstm_stream.v1 import lstm_stream_pb2_grpc as pb_grpc
from model_export import lstm
from tests.conftest import DEVICE
from tests.service.client import Ev, request
from tests.service.versions import E, H, add_version, parameters, repository

SESSIONS, STREAMS, STEPS = 32, 4, 240


def states_for(
    x: np.ndarray, versions: list[int], params: dict[int, lstm.Parameters]
) -> tuple[np.ndarray, np.ndarray]:
    """The state after events ``x`` run on ``versions`` (one each), carried across moves."""
    h, c = np.zeros(H), np.zeros(H)
    for event, version in zip(x, versions):
        h, c = lstm.step(event.astype(np.float64), h, c, params[version])
    return h, c


async def drive(
    port: int, x: np.ndarray, answered: list[list[int]], upgrade: asyncio.Event
) -> None:
    """STREAMS pipelined streams of seq'd per-event requests, one event per session each;
    ``answered[s]`` gets the version of each answered event. Ends when the server dies."""
    per = SESSIONS // STREAMS

    async def one(stub: pb_grpc.LstmStreamStub, owned: range) -> None:
        async def requests():  # type: ignore[no-untyped-def]
            for k in range(1, STEPS + 1):
                yield request([Ev(f"s{s}", x[s, k - 1], seq=k) for s in owned])
                if k == STEPS // 3:
                    upgrade.set()
                await asyncio.sleep(0.002)

        async for response in stub.StreamSteps(requests()):
            for s, result in zip(owned, response.results):
                assert result.code == 0, result.error
                answered[s].append(result.model_version)

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.LstmStreamStub(channel)
        await asyncio.gather(
            *(one(stub, range(i * per, (i + 1) * per)) for i in range(STREAMS)),
            return_exceptions=True,
        )


@pytest.mark.parametrize("moment", [0, 1])
async def test_sigkill_during_an_upgrade_keeps_every_session_on_its_version(
    tmp_path: Path, moment: int
) -> None:
    """Killed while version 2 takes over (carry): after the restart every session is on the
    version of its last acknowledged event, with the acknowledged state (or, for the events
    stored but not yet answered when the process died, the state they made)."""
    repo = repository(tmp_path / "repo", "m", "carry")
    params = {1: parameters(1)}
    rng = np.random.default_rng(moment)
    x = rng.standard_normal((SESSIONS, STEPS, E)).astype(np.float32)
    db = f"sqlite://{tmp_path / 's.db'}"
    args = ["--device", DEVICE, "--state-store", db, "--model-repository", str(repo)]
    args += ["--model-control", "poll", "--repository-poll-secs", "0.05"]
    target = procs.start("server", None, args)
    answered: list[list[int]] = [[] for _ in range(SESSIONS)]
    upgrade = asyncio.Event()
    assert target.proc is not None
    try:
        run = asyncio.ensure_future(drive(target.port, x, answered, upgrade))
        await upgrade.wait()
        params[2] = add_version(repo, "m", 2)
        # Kill once version 2 answers, some answers later (how many differs by run).
        while not any(2 in a for a in answered) and not run.done():
            await asyncio.sleep(0.001)
        at = sum(map(len, answered)) + random.Random(moment).randrange(32, 640)
        while sum(map(len, answered)) < at and not run.done():
            await asyncio.sleep(0.001)
        target.proc.kill()
        target.proc.wait()
        await run
    finally:
        target.stop()
    total = sum(map(len, answered))
    assert any(2 in a for a in answered), "the upgrade must have begun"
    assert total < SESSIONS * STEPS, "the kill must land mid-run"

    target = procs.start("server", None, args)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{target.port}") as channel:
            stub = pb_grpc.LstmStreamStub(channel)
            for s in range(SESSIONS):
                got = await stub.GetSession(pb.SessionRef(session_id=f"s{s}"))
                seen = answered[s]
                # Every answered event is stored; one stored but not answered may be there.
                assert len(seen) <= got.step <= len(seen) + 64, (s, len(seen), got.step)
                assert got.model_version >= (seen[-1] if seen else 1), s
                tail = got.step - len(seen)
                last = seen[-1] if seen else 1
                # The unanswered tail ran on the last answered version, then maybe on 2.
                options = [
                    seen + [last] * cut + [got.model_version] * (tail - cut)
                    for cut in range(tail + 1)
                ]
                found = [states_for(x[s, : got.step], v, params) for v in options]
                gaps = [
                    max(np.abs(h - got.hidden).max(), np.abs(c - got.cell).max()) for h, c in found
                ]
                assert min(gaps) <= 1e-5, (s, seen[-3:], got.step, got.model_version, gaps)
            # Every session goes on, on version 2 (carry), from its stored state.
            got = await stub.Step(request([Ev("s0", np.ones(E, np.float32))]))
            assert got.results[0].model_version == 2 and got.results[0].code == 0
    finally:
        assert target.stop() == 0


async def test_replicas_sharing_redis_see_the_same_pins(tmp_path: Path) -> None:
    """Two replicas, one repository, one Redis: a session pinned to version 1 (drain) stays
    on it through either replica after version 2 arrives; a new one starts on 2 for both."""
    repo = repository(tmp_path / "repo", "m", "drain")
    redis = RedisServer(tmp_path / "redis").start()
    extra = ["--device", DEVICE, "--model-repository", str(repo)]
    extra += ["--model-control", "poll", "--repository-poll-secs", "0.05"]
    replicas = [start_replica(redis.url, extra) for _ in range(2)]
    params = {1: parameters(1)}
    try:
        async with (
            grpc.aio.insecure_channel(replicas[0].address) as a,
            grpc.aio.insecure_channel(replicas[1].address) as b,
        ):
            stubs = [pb_grpc.LstmStreamStub(a), pb_grpc.LstmStreamStub(b)]
            x = np.random.default_rng(2).standard_normal((6, E)).astype(np.float32)
            first = await stubs[0].Step(request([Ev("old", x[0])]))
            assert first.results[0].model_version == 1
            params[2] = add_version(repo, "m", 2)

            async def both_ready() -> None:
                for stub in stubs:
                    while True:
                        listed = await stub.ListModels(pb.ListModelsRequest())
                        if any(v.version == 2 and v.state == "READY" for v in listed.versions):
                            break
                        await asyncio.sleep(0.05)

            await asyncio.wait_for(both_ready(), 30)
            h, c = lstm.step(x[0].astype(np.float64), np.zeros(H), np.zeros(H), params[1])
            for k, stub in enumerate([stubs[1], stubs[0], stubs[1]]):  # alternate replicas
                got = await stub.Step(request([Ev("old", x[k + 1])]))
                assert got.results[0].model_version == 1, k  # pinned
                h, c = lstm.step(x[k + 1].astype(np.float64), h, c, params[1])
                np.testing.assert_allclose(got.results[0].output, h, atol=1e-5)
            new = await stubs[1].Step(request([Ev("new", x[4])]))
            assert new.results[0].model_version == 2
            for stub in stubs:
                old = await stub.GetSession(pb.SessionRef(session_id="old"))
                fresh = await stub.GetSession(pb.SessionRef(session_id="new"))
                assert (old.model_version, old.step) == (1, 4)
                assert (fresh.model_version, fresh.step) == (2, 1)
            got = await stubs[0].Step(request([Ev("new", x[5])]))
            assert got.results[0].model_version == 2 and got.results[0].step == 2
    finally:
        for replica in replicas:
            replica.stop()
        redis.stop()


async def test_sighup_rescans_the_repository(tmp_path: Path) -> None:
    """--model-control none loads the repository at start and again on SIGHUP only."""
    import signal

    repo = repository(tmp_path / "repo", "m", "reset")
    target = procs.start("server", None, ["--device", DEVICE, "--model-repository", str(repo)])
    assert target.proc is not None
    try:
        async with grpc.aio.insecure_channel(target.address) as channel:
            stub = pb_grpc.LstmStreamStub(channel)

            async def versions() -> dict[int, str]:
                listed = await stub.ListModels(pb.ListModelsRequest())
                return {v.version: v.state for v in listed.versions}

            add_version(repo, "m", 2)
            await asyncio.sleep(0.5)
            assert await versions() == {1: "READY"}  # no polling
            target.proc.send_signal(signal.SIGHUP)
            for _ in range(200):
                if (await versions()).get(2) == "READY":
                    break
                await asyncio.sleep(0.05)
            assert (await versions())[2] == "READY"
            got = await stub.Step(request([Ev("a", np.ones(E, np.float32))]))
            assert got.results[0].model_version == 2
    finally:
        assert target.stop() == 0


async def test_replay_rebuilds_a_stored_session_on_the_new_version_after_a_restart(
    tmp_path: Path,
) -> None:
    """retire_policy replay keeps each session's last events in the store too: a server
    restarted with a newer version moves a stored session by replaying them on it."""
    from tests.service.versions import PolicyReference

    repo = repository(tmp_path / "repo", "m", "replay", replay_events="4")
    db = f"sqlite://{tmp_path / 's.db'}"
    args = ["--device", DEVICE, "--state-store", db, "--model-repository", str(repo)]
    x = np.random.default_rng(9).standard_normal((7, E)).astype(np.float32)
    versions = {1: parameters(1)}
    ref = PolicyReference("replay", versions, replay=4)
    target = procs.start("server", None, args)
    try:
        async with grpc.aio.insecure_channel(target.address) as channel:
            stub = pb_grpc.LstmStreamStub(channel)
            for k in range(6):
                got = (await stub.Step(request([Ev("a", x[k])]))).results[0]
                assert got.model_version == 1
                np.testing.assert_allclose(got.output, ref.answer("a", x[k], 1), atol=1e-5)
    finally:
        assert target.stop() == 0
    versions[2] = add_version(repo, "m", 2)
    target = procs.start("server", None, args)
    try:
        async with grpc.aio.insecure_channel(target.address) as channel:
            stub = pb_grpc.LstmStreamStub(channel)
            stored = await stub.GetSession(pb.SessionRef(session_id="a"))
            assert (stored.model_version, stored.step) == (1, 6)  # as acknowledged
            got = (await stub.Step(request([Ev("a", x[6])]))).results[0]
            assert (got.model_version, got.step) == (2, 7)
            np.testing.assert_allclose(got.output, ref.answer("a", x[6], 2), atol=1e-5)
    finally:
        assert target.stop() == 0
