"""Trained PyTorch and Keras models through lstm-export and a real server, step by step.

Every framework fixture is exported with its own ``export_args``, served, and
streamed: 3 sessions x 50 steps, both request forms; every output equals the
framework's, and the final states equal PyTorch's ``h_n``/``c_n`` (layer-major).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from lstm_stream.v1 import lstm_stream_pb2 as pb
from lstm_stream.v1 import lstm_stream_pb2_grpc as pb_grpc
from tests.conftest import ServerFactory
from tests.model_export.frameworks import FIXTURES, SPECS, export, layer_major, run_steps, spec
from tests.service.client import Ev, answers, request
from tests.service.models import failing_model

TOLERANCE = 1e-5


def exported(name: str, tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """The fixture exported through the CLI, and its data (inputs, framework outputs)."""
    info = spec(FIXTURES / f"{name}.json")
    for arg in info["export_args"]:
        if (FIXTURES / arg).is_file():
            shutil.copy(FIXTURES / arg, tmp_path / arg)
    result = export([*info["export_args"], "--out", "model.onnx"], where=tmp_path)
    assert result.code == 0, result.stderr
    data = dict(np.load(FIXTURES / f"{name}.npz"))
    return tmp_path / "model.onnx", data


async def stream_all(
    stub: pb_grpc.LstmStreamStub, inputs: np.ndarray, output_size: int, prefix: str = "s"
) -> tuple[np.ndarray, list[pb.StepResponse]]:
    """One StreamSteps call, pipelined: step t of every session per request, alternating forms
    (the per-event requests also ask for the state). Outputs ``[S, T, O]``."""
    sessions, steps, _ = inputs.shape
    ids = [f"{prefix}{i}" for i in range(sessions)]

    async def requests():  # type: ignore[no-untyped-def]
        for t in range(steps):
            events = [Ev(ids[i], inputs[i, t]) for i in range(sessions)]
            columnar = t % 2 == 1
            yield request(events, columnar=columnar, include_state=not columnar)

    got = np.zeros((sessions, steps, output_size), np.float32)
    responses = []
    t = 0
    async for response in stub.StreamSteps(requests()):
        for i, answer in enumerate(answers(response, output_size)):
            assert answer.code == 0, answer.error
            assert answer.step == t + 1
            got[i, t] = answer.output
        responses.append(response)
        t += 1
    assert t == steps
    return got, responses


def state_of(session: pb.Session | pb.Result, name: str) -> np.ndarray:
    if name in ("hidden", "cell"):
        return np.array(getattr(session, name), np.float32)
    (named,) = [s for s in session.states if s.name == name]
    return np.array(named.values, np.float32)


@pytest.mark.parametrize("fixture", [p.stem for p in SPECS])
async def test_every_fixture_is_served_as_the_framework_computes_it(
    fixture: str, tmp_path: Path, start_server: ServerFactory
) -> None:
    model, data = exported(fixture, tmp_path)
    inputs, want = data["inputs"].astype(np.float32), data["outputs"]
    server = await start_server(model=str(model))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.LstmStreamStub(channel)
        info = await stub.GetModelInfo(pb.ModelInfoRequest())
        got, responses = await stream_all(stub, inputs, info.output_size)
        np.testing.assert_allclose(got, want, atol=TOLERANCE, rtol=0)
        framework = spec(FIXTURES / f"{fixture}.json")["framework"]
        assert info.architecture.source_framework == framework
        assert info.architecture.cell == spec(FIXTURES / f"{fixture}.json")["cell"]
        # The state after the last event: from the framework where it says (PyTorch's
        # h_n/c_n), else from the exported graph run offline.
        if "h_n" in data:
            final = {"hidden": layer_major(data["h_n"])}
            if "c_n" in data:
                final["cell"] = layer_major(data["c_n"])
        else:
            _, final = run_steps(model, inputs)
        assert set(final) == set(info.state_names)
        last_with_state = responses[-1] if len(responses) % 2 == 1 else responses[-2]
        for i in range(inputs.shape[0]):
            session = await stub.GetSession(pb.SessionRef(session_id=f"s{i}"))
            assert session.step == inputs.shape[1]
            for name, rows in final.items():
                np.testing.assert_allclose(state_of(session, name), rows[i], atol=TOLERANCE)
            if len(responses) % 2 == 1:  # the last request was per-event, with state
                result = last_with_state.results[i]
                for name, rows in final.items():
                    np.testing.assert_allclose(state_of(result, name), rows[i], atol=TOLERANCE)


async def test_pytorch_exporters_own_graph_is_served(
    tmp_path: Path, start_server: ServerFactory
) -> None:
    """A step graph written by torch.onnx.export that keeps the contract, served as it is."""
    data = np.load(FIXTURES / "torch_step_2layer_linear_sigmoid.npz")
    model = FIXTURES / "torch_step_2layer_linear_sigmoid.onnx"
    server = await start_server(model=str(model))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.LstmStreamStub(channel)
        info = await stub.GetModelInfo(pb.ModelInfoRequest())
        assert list(info.state_names) == ["hidden", "cell"] and info.architecture.cell == ""
        got, _ = await stream_all(stub, data["inputs"].astype(np.float32), info.output_size)
        np.testing.assert_allclose(got, data["outputs"], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("fixture", ["gru_2layer_linear_softmax", "lstm_3layer_proj_linear"])
async def test_named_states_read_and_written(
    fixture: str, tmp_path: Path, start_server: ServerFactory
) -> None:
    """GetSession equals PyTorch's h_n (and c_n); a copy made with PutSession from it
    answers the next events exactly as the original does."""
    model, data = exported(fixture, tmp_path)
    inputs = data["inputs"].astype(np.float32)
    server = await start_server(model=str(model))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.LstmStreamStub(channel)
        info = await stub.GetModelInfo(pb.ModelInfoRequest())
        await stream_all(stub, inputs, info.output_size)
        original = await stub.GetSession(pb.SessionRef(session_id="s0"))
        np.testing.assert_allclose(original.hidden, layer_major(data["h_n"])[0], atol=TOLERANCE)
        if "c_n" in data:
            np.testing.assert_allclose(original.cell, layer_major(data["c_n"])[0], atol=TOLERANCE)
        else:
            assert not original.cell and info.state_names == ["hidden"]
        copy = pb.Session(
            session_id="copy",
            step=original.step,
            last_seq=original.last_seq,
            hidden=original.hidden,
            cell=original.cell,
        )
        put = await stub.PutSession(copy)
        assert list(put.hidden) == list(original.hidden) and list(put.cell) == list(original.cell)
        rng = np.random.default_rng(0)
        for _ in range(5):
            x = rng.standard_normal(inputs.shape[2]).astype(np.float32)
            a, b = answers(await stub.Step(request([Ev("s0", x), Ev("copy", x)])), info.output_size)
            assert a.code == b.code == 0
            np.testing.assert_array_equal(a.output, b.output)
        a_state = await stub.GetSession(pb.SessionRef(session_id="s0"))
        b_state = await stub.GetSession(pb.SessionRef(session_id="copy"))
        assert list(a_state.hidden) == list(b_state.hidden)
        assert list(a_state.cell) == list(b_state.cell)
        # A state the model does not have is refused by name, nothing changed.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.PutSession(
                pb.Session(session_id="copy", states=[pb.NamedState(name="nope", values=[1.0])])
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "no state 'nope'" in (refused.value.details() or "")
        if "c_n" not in data:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.PutSession(pb.Session(session_id="copy", cell=[0.0] * 12))
            assert "no state 'cell'" in (refused.value.details() or "")
        after = await stub.GetSession(pb.SessionRef(session_id="copy"))
        assert list(after.hidden) == list(b_state.hidden)


async def test_states_not_named_hidden_or_cell_travel_by_name(
    tmp_path: Path, start_server: ServerFactory
) -> None:
    """A graph whose state is called ``state``: in include_state results, GetSession and
    PutSession under that name."""
    path = tmp_path / "model.onnx"
    path.write_bytes(failing_model())  # output = event, state_out = state (width 2)
    server = await start_server(model=str(path))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.LstmStreamStub(channel)
        put = await stub.PutSession(
            pb.Session(session_id="a", states=[pb.NamedState(name="state", values=[1.0, 2.0])])
        )
        assert [(s.name, list(s.values)) for s in put.states] == [("state", [1.0, 2.0])]
        response = await stub.Step(request([Ev("a", [0.5, 0.5])], include_state=True))
        (result,) = response.results
        assert not result.hidden and not result.cell
        assert [s.name for s in result.states] == ["state"]
        session = await stub.GetSession(pb.SessionRef(session_id="a"))
        np.testing.assert_allclose(state_of(session, "state"), state_of(result, "state"))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.PutSession(
                pb.Session(
                    session_id="a",
                    states=[pb.NamedState(name="state", values=[1.0])],
                )
            )
        assert "state has 1 values; the model's state has 2" in (refused.value.details() or "")


async def test_lstm_client_info_shows_the_architecture(
    tmp_path: Path, start_server: ServerFactory
) -> None:
    model, _ = exported("lstm_3layer_proj_linear", tmp_path)
    server = await start_server(model=str(model))
    shown = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "lstm_stream.cli", "--address", f"127.0.0.1:{server.port}", "info"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert info["architecture"] == {
        "cell": "lstm",
        "layers": 3,
        "hidden_size": 24,
        "proj_size": 8,
        "head": "linear(8->1)",
        "output_activation": "none",
        "source_framework": "torch",
        "source_file": "lstm_3layer_proj_linear.safetensors",
    }
    assert info["state_names"] == ["hidden", "cell"] and info["state_sizes"] == [24, 72]
    assert info["event_size"] == 6 and info["output_size"] == 1 and info["hidden_size"] == 24
    assert info["metadata"]["fingerprint"] == info["fingerprint"]
