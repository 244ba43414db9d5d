"""Model versions against real servers: live upgrades under load by every retire policy,
two models at once, model control and its permissions, versions that fail to load."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lstm_stream.oip.v2 import inference_pb2 as oip
from lstm_stream.oip.v2 import inference_pb2_grpc as oip_grpc
from lstm_stream.v1 import lstm_stream_pb2 as pb
from lstm_stream.v1 import lstm_stream_pb2_grpc as pb_grpc
from model_export import lstm
from service.server import Server
from tests.conftest import ServerFactory
from tests.service.client import Ev, request
from tests.service.versions import (
    E,
    H,
    PolicyReference,
    add_file,
    add_stacked,
    add_version,
    parameters,
    repository,
)

SESSIONS, STREAMS, ROUNDS = 64, 4, 90


def index_of(server: Server) -> dict[tuple[str, int], tuple[str, str]]:
    """(model, version) -> (state, reason), as ListModels has them."""
    assert server.registry is not None
    return {(v.model, v.version): (v.state, v.reason) for v in server.registry.index()}


async def until(check: Any, timeout: float = 15.0) -> None:
    """Wait until ``check()`` is true (the server applies the repository in the background)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def scrape(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def answers_of(response: pb.StepResponse, n: int) -> list[tuple[int, int, np.ndarray, str]]:
    """(code, version, output, error) per event, from either form."""
    if response.HasField("batch"):
        b = response.batch
        outputs = np.frombuffer(b.outputs, "<f4").reshape(n, -1)
        return [(b.codes[i], b.model_versions[i], outputs[i], b.errors[i]) for i in range(n)]
    return [
        (r.code, r.model_version, np.array(r.output, np.float32), r.error) for r in response.results
    ]


async def run_streams(
    stub: pb_grpc.LstmStreamStub,
    xs: np.ndarray,
    record: list,
    upgrades: asyncio.Task,
    upgraded: asyncio.Event,
) -> None:
    """4 pipelined streams of 16 sessions each, one event per session per request, both
    forms, paced so that the upgrades happen while they run; the second half of the rounds
    waits for ``upgraded`` (a slow machine loads versions slowly)."""

    async def one(k: int) -> None:
        ids = [f"s{k * 16 + i}" for i in range(SESSIONS // STREAMS)]

        async def requests():  # type: ignore[no-untyped-def]
            for t in range(ROUNDS):
                if t == ROUNDS // 2:
                    await upgraded.wait()
                yield request([Ev(sid, xs[t, k * 16 + i]) for i, sid in enumerate(ids)], t % 2)
                await asyncio.sleep(0.004)

        t = 0
        async for response in stub.StreamSteps(requests()):
            for i, got in enumerate(answers_of(response, len(ids))):
                record.append((ids[i], t, got))
            t += 1
        assert t == ROUNDS

    await asyncio.gather(*(one(k) for k in range(STREAMS)), upgrades)


@pytest.mark.parametrize("policy", ["drain", "carry", "reset", "replay"])
async def test_live_upgrade_under_load(
    policy: str, tmp_path: Path, start_server: ServerFactory
) -> None:
    """64 sessions over 4 pipelined streams while versions 2 and 3 are put into a polled
    repository: no event fails, every answer names its version and equals that version's
    reference on the state the policy says; retired versions unload once left."""
    replay = 8
    repo = repository(tmp_path / "repo", "m", policy, replay_events=str(replay))
    versions = {1: parameters(1)}
    server = await start_server(
        model_repository=str(repo), model_control="poll", repository_poll_secs=0.05
    )
    xs = np.random.default_rng(0).standard_normal((ROUNDS, SESSIONS, E)).astype(np.float32)
    record: list[tuple[str, int, tuple[int, int, np.ndarray, str]]] = []
    newcomers: list[tuple[str, int]] = []
    upgraded = asyncio.Event()

    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.LstmStreamStub(channel)

        async def upgrades() -> None:
            for version, after in ((2, 0.08), (3, 0.12)):
                await asyncio.sleep(after)
                versions[version] = add_version(repo, "m", version)
                await until(lambda v=version: index_of(server).get(("m", v), ("",))[0] == "READY")
                # A session that starts now starts on the new version.
                sid = f"new-{version}"
                got = answers_of(await stub.Step(request([Ev(sid, np.ones(E))])), 1)[0]
                newcomers.append((sid, got[1]))
            upgraded.set()

        await run_streams(stub, xs, record, asyncio.ensure_future(upgrades()), upgraded)

        ref = PolicyReference(policy, versions, replay)
        seen: dict[str, list[int]] = {}
        for sid, t, (code, version, output, error) in sorted(record, key=lambda r: r[1]):
            assert code == 0, error
            assert version in versions
            k = int(sid[1:])
            want = ref.answer(sid, xs[t, k], version)
            np.testing.assert_allclose(output, want, atol=1e-5, err_msg=f"{sid} step {t + 1}")
            seen.setdefault(sid, []).append(version)
        assert len(seen) == SESSIONS
        assert newcomers == [("new-2", 2), ("new-3", 3)]
        if policy == "drain":
            assert all(set(v) == {1} for v in seen.values())  # pinned: they stay on 1
            assert index_of(server)[("m", 1)][0] == "RETIRING"
            for sid in [*seen, "new-2"]:
                await stub.DeleteSession(pb.SessionRef(session_id=sid))
            # Its last sessions gone, each retired version unloads.
            await until(lambda: index_of(server)[("m", 1)][0] == "UNAVAILABLE")
            await until(lambda: index_of(server)[("m", 2)][0] == "UNAVAILABLE")
        else:
            # Every session moved on: none stays behind on a retired version.
            await until(lambda: index_of(server)[("m", 2)][0] == "UNAVAILABLE")
            assert index_of(server)[("m", 1)][0] == "UNAVAILABLE"
            moved = [v for v in seen.values() if v[-1] == 3 and v[0] == 1]
            assert moved, "no session saw the whole upgrade"
        state, reason = index_of(server)[("m", 1)]
        assert reason.startswith("retired"), reason
        assert index_of(server)[("m", 3)] == ("READY", "")
        samples = scrape(server)
        assert metric(samples, "lstm_model_unloads_total", model="m") == 2
        assert metric(samples, "lstm_model_loads_total", model="m") == 3
        assert metric(samples, "lstm_model_version_state", model="m", version="1", state=state)
        if policy != "drain":
            assert metric(samples, "lstm_migrations_total", model="m", policy=policy) >= SESSIONS
        if policy != "drain":
            session = await stub.GetSession(pb.SessionRef(session_id="s0"))
            assert session.model == "m" and session.model_version == 3


async def test_two_models_at_once_keep_their_sessions_apart(
    tmp_path: Path, start_server: ServerFactory
) -> None:
    repo = repository(tmp_path / "repo", "a")
    (repo / "b").mkdir()
    other = add_version(repo, "b", 1, lstm.Parameters.random(E, 5, seed=7))
    server = await start_server(model_repository=str(repo))
    x = np.ones(E, np.float32)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.LstmStreamStub(channel)
        for _ in range(2):
            await stub.Step(pb.StepRequest(model="a", events=[pb.Event(session_id="s", values=x)]))
        got = await stub.Step(
            pb.StepRequest(model="b", events=[pb.Event(session_id="s", values=x)])
        )
        assert got.results[0].step == 1  # a new session: another model's "s" is not it
        h, _ = lstm.step(x.astype(np.float64), np.zeros(5), np.zeros(5), other)
        np.testing.assert_allclose(got.results[0].output, h, atol=1e-5)
        a = await stub.GetSession(pb.SessionRef(session_id="s", model="a"))
        b = await stub.GetSession(pb.SessionRef(session_id="s", model="b"))
        assert (a.step, len(a.hidden), a.model) == (2, 6, "a")
        assert (b.step, len(b.hidden), b.model) == (1, 5, "b")
        listed = await stub.ListModels(pb.ListModelsRequest())
        assert {(v.model, v.version, v.state) for v in listed.versions} == {
            ("a", 1, "READY"),
            ("b", 1, "READY"),
        }
        info = await stub.GetModelInfo(pb.ModelInfoRequest(model="b"))
        assert (info.model, info.version, list(info.versions), info.state_sizes) == (
            "b",
            1,
            [1],
            [5, 5],
        )
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.Step(pb.StepRequest(model="c", events=[pb.Event(session_id="s", values=x)]))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        # Without a model name and two models, a request has no model to go to.
        with pytest.raises(grpc.aio.AioRpcError) as ambiguous:
            await stub.Step(pb.StepRequest(events=[pb.Event(session_id="s", values=x)]))
        assert ambiguous.value.code() == grpc.StatusCode.NOT_FOUND


async def test_model_control_needs_an_admin_tenant(
    tmp_path: Path, start_server: ServerFactory
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("admin-token-0123456789 ops\nuser-token-0123456789 shop\n")
    repo = repository(tmp_path / "repo", "m")
    server = await start_server(
        model_repository=str(repo),
        model_control="explicit",
        auth_tokens=str(tokens),
        admin_tenants="ops",
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        user = (("authorization", "Bearer user-token-0123456789"),)
        admin = (("authorization", "Bearer admin-token-0123456789"),)
        for call, message in (
            (stub.RepositoryIndex, oip.RepositoryIndexRequest()),
            (stub.RepositoryModelLoad, oip.RepositoryModelLoadRequest(model_name="m")),
            (stub.RepositoryModelUnload, oip.RepositoryModelUnloadRequest(model_name="m")),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await call(message, metadata=user)
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        index = await stub.RepositoryIndex(oip.RepositoryIndexRequest(), metadata=admin)
        assert [(m.name, m.version, m.state) for m in index.models] == [("m", "1", "READY")]
        add_version(repo, "m", 2)
        await stub.RepositoryModelLoad(
            oip.RepositoryModelLoadRequest(model_name="m"), metadata=admin
        )
        index = await stub.RepositoryIndex(oip.RepositoryIndexRequest(ready=True), metadata=admin)
        assert [(m.name, m.version) for m in index.models] == [("m", "2")]


async def test_a_version_that_cannot_load_changes_nothing_that_serves(
    tmp_path: Path, start_server: ServerFactory
) -> None:
    """A corrupt file, and (under carry) a version with other state sizes, are refused while
    traffic goes on, each with its reason in the index; the serving version keeps serving."""
    repo = repository(tmp_path / "repo", "m", "carry")
    server = await start_server(
        model_repository=str(repo), model_control="poll", repository_poll_secs=0.05
    )
    ref = PolicyReference("carry", {1: parameters(1)})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.LstmStreamStub(channel)
        stop = asyncio.Event()
        served: list[tuple[int, int]] = []

        async def traffic() -> None:
            rng = np.random.default_rng(3)
            while not stop.is_set():
                x = rng.standard_normal(E).astype(np.float32)
                code, version, output, error = answers_of(
                    await stub.Step(request([Ev("live", x)])), 1
                )[0]
                assert code == 0, error
                np.testing.assert_allclose(output, ref.answer("live", x, version), atol=1e-5)
                served.append((code, version))

        running = asyncio.ensure_future(traffic())
        add_file(repo, "m", 2, b"this is not an ONNX model")
        await until(lambda: index_of(server).get(("m", 2), ("",))[0] == "UNAVAILABLE")
        assert "load failed" in index_of(server)[("m", 2)][1]
        add_stacked(repo, "m", 3, layers=2, output=H)  # the same output, states [12] vs [6]
        await until(lambda: index_of(server).get(("m", 3), ("",))[0] == "UNAVAILABLE")
        reason = index_of(server)[("m", 3)][1]
        assert "carry" in reason and "hidden[12]" in reason and "hidden[6]" in reason
        event_size = lstm.Parameters.random(E + 1, 6, seed=4)
        add_version(repo, "m", 4, event_size)
        await until(lambda: index_of(server).get(("m", 4), ("",))[0] == "UNAVAILABLE")
        assert "takes 5 values" in index_of(server)[("m", 4)][1]
        await asyncio.sleep(0.2)
        stop.set()
        await running
        assert index_of(server)[("m", 1)] == ("READY", "")
        assert served and {version for _, version in served} == {1}
        oip_stub = oip_grpc.GRPCInferenceServiceStub(channel)
        index = await oip_stub.RepositoryIndex(oip.RepositoryIndexRequest())
        reasons = {(m.name, m.version): (m.state, m.reason) for m in index.models}
        assert reasons[("m", "2")][0] == "UNAVAILABLE" and "load failed" in reasons[("m", "2")][1]
        samples = scrape(server)
        assert metric(samples, "lstm_model_load_failures_total", model="m") == 3


async def test_migrate_session_moves_one_session_now(
    tmp_path: Path, start_server: ServerFactory
) -> None:
    repo = repository(tmp_path / "repo", "m", "drain")
    server = await start_server(model_repository=str(repo), model_control="explicit")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.LstmStreamStub(channel)
        x = np.random.default_rng(1).standard_normal((4, E)).astype(np.float32)
        for k in range(2):
            await stub.Step(request([Ev("a", x[k]), Ev("b", x[k])]))
        p2 = add_version(repo, "m", 2)
        await oip_grpc.GRPCInferenceServiceStub(channel).RepositoryModelLoad(
            oip.RepositoryModelLoadRequest(model_name="m")
        )
        before = await stub.GetSession(pb.SessionRef(session_id="a"))
        assert before.model_version == 1  # drain: it stays
        moved = await stub.MigrateSession(pb.MigrateRequest(session_id="a", mode="carry"))
        assert moved.model_version == 2 and list(moved.hidden) == list(before.hidden)
        got = answers_of(await stub.Step(request([Ev("a", x[2]), Ev("b", x[2])])), 2)
        assert [g[1] for g in got] == [2, 1]  # a on 2 now, b still on 1
        wrong = await stub.Step(
            pb.StepRequest(model_version=1, events=[pb.Event(session_id="a", values=x[3])])
        )
        assert wrong.results[0].code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert "runs on version 2" in wrong.results[0].error
        h, _ = lstm.step(
            x[2].astype(np.float64), np.array(before.hidden), np.array(before.cell), p2
        )
        np.testing.assert_allclose(got[0][2], h, atol=1e-5)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.MigrateSession(pb.MigrateRequest(session_id="b", mode="replay"))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        reset = await stub.MigrateSession(pb.MigrateRequest(session_id="b", mode="reset"))
        assert reset.model_version == 2 and not any(reset.hidden) and reset.step == 3
        # Its last session gone, version 1 unloads; asking for it is then NOT_FOUND.
        await until(lambda: index_of(server)[("m", 1)][0] == "UNAVAILABLE")
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await stub.Step(
                pb.StepRequest(model_version=1, events=[pb.Event(session_id="b", values=x[3])])
            )
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND


async def test_lstm_client_names_the_model_and_lists_versions(
    tmp_path: Path, start_server: ServerFactory
) -> None:
    import json
    import subprocess
    import sys

    repo = repository(tmp_path / "repo", "m")
    (repo / "other").mkdir()
    add_version(repo, "other", 3)
    server = await start_server(model_repository=str(repo))
    address = f"127.0.0.1:{server.port}"

    def client(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "lstm_stream.cli", "--address", address, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )

    listed = await asyncio.to_thread(client, "models")
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["model"], r["version"], r["state"]) for r in rows] == [
        ("m", 1, "READY"),
        ("other", 3, "READY"),
    ]
    line = json.dumps({"session_id": "a", "values": [0.5] * E}) + "\n"
    streamed = await asyncio.to_thread(client, "stream", "--model", "other", stdin=line)
    assert streamed.returncode == 0, streamed.stderr
    assert json.loads(streamed.stdout)["model_version"] == 3
    got = await asyncio.to_thread(client, "get", "a", "--model", "other")
    assert json.loads(got.stdout)["model"] == "other"
    missing = await asyncio.to_thread(client, "get", "a", "--model", "m")
    assert missing.returncode == 3 and "no session 'a'" in missing.stderr


async def test_drain_moves_what_is_left_by_reset_after_retire_after_s(
    tmp_path: Path, start_server: ServerFactory
) -> None:
    repo = repository(tmp_path / "repo", "m", "drain", retire_after_s="0.5")
    server = await start_server(
        model_repository=str(repo), model_control="poll", repository_poll_secs=0.05
    )
    x = np.random.default_rng(4).standard_normal((2, E)).astype(np.float32)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.LstmStreamStub(channel)
        assert answers_of(await stub.Step(request([Ev("a", x[0])])), 1)[0][1] == 1
        p2 = add_version(repo, "m", 2)
        await until(lambda: index_of(server).get(("m", 2), ("",))[0] == "READY")
        assert index_of(server)[("m", 1)][0] == "RETIRING"  # drains: "a" stays for now
        await until(lambda: index_of(server)[("m", 1)][0] == "UNAVAILABLE")
        code, version, output, _ = answers_of(await stub.Step(request([Ev("a", x[1])])), 1)[0]
        assert (code, version) == (0, 2)
        h, _ = lstm.step(x[1].astype(np.float64), np.zeros(H), np.zeros(H), p2)
        np.testing.assert_allclose(output, h, atol=1e-5)  # moved by reset: from zero state
        session = await stub.GetSession(pb.SessionRef(session_id="a"))
        assert session.step == 2 and session.model_version == 2
