"""Triton's own Python client, unchanged from PyPI, against the real server.

tritonclient pins protobuf < 7 and lstm-stream uses 7, so the client runs in
``.venv-triton`` (``make triton-client``, part of ``make test``) as a separate
process: ``tests/oip/triton_client.py``. Outputs are checked here against the
numpy reference.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from lstm_stream.v1 import lstm_stream_pb2 as pb
from lstm_stream.v1 import lstm_stream_pb2_grpc as pb_grpc
from service.server import Server
from tests.conftest import ServerFactory
from tests.service.client import Ev, request
from tests.service.reference import Reference, events
from tests.service.versions import E, add_version, repository

ROOT = Path(__file__).resolve().parents[2]
TRITON_PYTHON = ROOT / ".venv-triton" / "bin" / "python"
CLIENT = Path(__file__).with_name("triton_client.py")


async def triton(server: Server, scenario: str, directory: Path) -> dict[str, Any]:
    if not TRITON_PYTHON.exists():
        pytest.fail("no .venv-triton: run `make triton-client` (make test does)")
    done = await asyncio.to_thread(
        subprocess.run,
        [str(TRITON_PYTHON), str(CLIENT), f"127.0.0.1:{server.port}", scenario, str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


async def test_metadata_config_and_statistics(server: Server, tmp_path: Path) -> None:
    got = await triton(server, "meta", tmp_path)
    assert got["live"] and got["ready"] and got["model_ready"]
    assert not got["other_model_ready"]
    assert got["server"]["name"] == "lstm-stream"
    assert {"sequence", "sequence_string_id"} <= set(got["server"]["extensions"])
    model = got["model"]
    assert model["name"] == "lstm" and model["versions"] == ["1"]
    assert model["inputs"] == [{"name": "event", "datatype": "FP32", "shape": ["-1", "32"]}]
    assert [o["name"] for o in model["outputs"]] == ["output", "hidden_out", "cell_out"]
    config = got["config"]["config"]
    assert config.get("max_batch_size", 0) == 0
    assert "sequence_batching" in config
    assert config["input"][0] == {"name": "event", "data_type": "TYPE_FP32", "dims": ["-1", "32"]}
    stats = got["stats"]["model_stats"]
    assert [(s["name"], s["version"]) for s in stats] == [("lstm", "1")]


async def test_infer_with_int_and_string_sequences(server: Server, tmp_path: Path) -> None:
    x = events(np.random.default_rng(8), 21)
    np.save(tmp_path / "events.npy", x)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.LstmStreamStub(channel)
        await stub.Step(request([Ev("native-7", x[0])]))  # continued by Triton's client
        got = await triton(server, "infer", tmp_path)
        result = np.load(tmp_path / "result.npz")
        ref = Reference()
        for key, sequence in (("int", "1001"), ("string", "str-seq")):
            for k in range(20):
                expected = ref.step(sequence, x[k])
                np.testing.assert_allclose(result[key][k], expected, atol=1e-5)
        three = Reference()
        for k in range(3):
            expected = three.step("7", x[k])
            np.testing.assert_allclose(result["three_output"][k], expected, atol=1e-5)
            np.testing.assert_allclose(result["three_hidden_out"][k], expected, atol=1e-5)
        np.testing.assert_allclose(result["three_cell_out"][2], three.cell["7"], atol=1e-5)
        native = Reference()
        native.step("native-7", x[0])
        expected = native.step("native-7", x[20])
        np.testing.assert_allclose(result["continued"][0], expected, atol=1e-5)
        # The Triton API's sequences are native sessions: 1001 left open, str-seq ended.
        session = await stub.GetSession(pb.SessionRef(session_id="1001"))
        assert session.step == 20
        np.testing.assert_allclose(session.hidden, ref.hidden["1001"], atol=1e-5)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetSession(pb.SessionRef(session_id="str-seq"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    sample = server.metrics.registry.get_sample_value
    labels = {"api": "oip", "method": "ModelInfer", "code": "OK"}
    assert sample("lstm_rpcs_total", labels) == 42
    assert sample("lstm_rpcs_total", {**labels, "api": "native", "method": "Step"}) == 1
    stats = got["stats"]["model_stats"][0]
    assert int(stats["inference_count"]) == 44 and int(stats["execution_count"]) == 42
    inference = stats["inference_stats"]
    counts = {k: int(inference[k]["count"]) for k in ("queue", "compute_input", "compute_infer")}
    assert counts == {"queue": 42, "compute_input": 42, "compute_infer": 42}
    assert int(inference["compute_output"]["count"]) == 42


async def test_stream_of_32_interleaved_sequences(server: Server, tmp_path: Path) -> None:
    x = np.random.default_rng(9).standard_normal((32, 10, 32)).astype(np.float32)
    np.save(tmp_path / "events.npy", x)
    got = await triton(server, "stream", tmp_path)
    assert got["answered"] == 320
    assert len(got["errors"]) == 1 and "one input named 'event'" in got["errors"][0]
    outputs = np.load(tmp_path / "result.npz")["outputs"]
    ref = Reference()
    for k in range(10):
        for s in range(32):
            np.testing.assert_allclose(outputs[s, k], ref.step(str(s + 1), x[s, k]), atol=1e-5)


async def test_bad_requests_give_clear_errors(start_server: ServerFactory, tmp_path: Path) -> None:
    server = await start_server()
    got = await triton(server, "errors", tmp_path)
    expected = {
        "wrong input name": ("StatusCode.INVALID_ARGUMENT", "one input named 'event'"),
        "wrong shape": ("StatusCode.INVALID_ARGUMENT", "must have shape [n, 32]"),
        "wrong datatype": ("StatusCode.INVALID_ARGUMENT", "must be FP32; got FP64"),
        "unknown model": ("StatusCode.NOT_FOUND", "unknown model: 'nope'"),
        "missing sequence_id": ("StatusCode.INVALID_ARGUMENT", "needs the parameter sequence_id"),
        "not started": ("StatusCode.INVALID_ARGUMENT", "must specify the START flag"),
        "NaN": ("StatusCode.INVALID_ARGUMENT", "contains NaN or Inf"),
    }
    for case, (status, text) in expected.items():
        assert got[case] is not None, f"{case}: no error"
        assert got[case]["status"] == status, (case, got[case])
        assert text in got[case]["message"], (case, got[case])
    assert len(server.engine.lanes[0].table) == 0  # type: ignore[union-attr]  # nothing was applied


async def test_our_protocol_is_wire_compatible_with_tritonclient(
    server: Server, tmp_path: Path
) -> None:
    """Every message, field (number, type, repeated), enum value and method we define is
    Triton's; ours may leave fields out, never change one."""
    from lstm_stream.oip.v2 import inference_pb2 as ours

    theirs = await triton(server, "descriptors", tmp_path)
    assert ours.DESCRIPTOR.package == theirs["package"] == "inference"
    checked = 0
    for name, message in ours.DESCRIPTOR.message_types_by_name.items():
        assert name in theirs["messages"], name
        for key, spec in _fields(message).items():
            assert theirs["messages"][name].get(key) == spec, (name, key)
            checked += 1
    assert checked > 80
    enum = ours.DESCRIPTOR.enum_types_by_name["DataType"]
    assert {v.name: v.number for v in enum.values}.items() <= theirs["DataType"].items()
    service = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for m in service.methods:
        expected = [m.input_type.name, m.output_type.name, m.client_streaming, m.server_streaming]
        assert theirs["methods"][m.name] == expected, m.name


def _fields(message: Any) -> dict[str, list[Any]]:
    out = {f.name: [f.number, f.type, f.is_repeated] for f in message.fields}
    for nested in message.nested_types:
        out.update({f"{nested.name}.{k}": v for k, v in _fields(nested).items()})
    return out


async def test_calls_we_do_not_serve_are_unimplemented(server: Server) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        for method in ("SystemSharedMemoryStatus", "LogSettings", "TraceSetting"):
            call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(b"")
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_the_readme_triton_example_runs(server: Server) -> None:
    readme = (ROOT / "docs" / "TRITON.md").read_text()
    [block] = re.findall(r"```text\n(import numpy as np, tritonclient.*?)```", readme, re.S)
    code = block.replace("localhost:50051", f"127.0.0.1:{server.port}")
    done = await asyncio.to_thread(
        subprocess.run, [str(TRITON_PYTHON), "-c", code], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "(1, 64)"


async def test_model_control_through_tritonclient(
    tmp_path: Path, start_server: ServerFactory
) -> None:
    """tritonclient's get_model_repository_index, load_model and unload_model, unchanged:
    a new version put in the repository is loaded on request and answers new sequences;
    the session that was running stays on its version (drain) until the model unloads."""
    repo = repository(tmp_path / "repo", "lstm", "drain")
    server = await start_server(model_repository=str(repo), model_control="explicit")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.LstmStreamStub(channel)
        await stub.Step(request([Ev("running", np.ones(E, np.float32))]))
        add_version(repo, "lstm", 2)
        got = await triton(server, "control", tmp_path)
        assert [(m["name"], m["version"], m["state"]) for m in got["before"]["models"]] == [
            ("lstm", "1", "READY")
        ]
        loaded = {m["version"]: m["state"] for m in got["loaded"]["models"]}
        assert loaded == {"1": "RETIRING", "2": "READY"}  # 1 drains its running session
        assert got["version"] == "2" and got["ready"]
        assert {m["state"] for m in got["unloaded"]["models"]} <= {"UNAVAILABLE", "RETIRING"}
        assert got["after_unload"] == "Request for unknown model: 'lstm' is not found"
