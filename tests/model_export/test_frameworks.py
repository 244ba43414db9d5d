"""Every framework fixture through lstm-export and ONNX Runtime, step by step, vs the framework."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest

from model_export.keras_import import load_keras
from model_export.reference import run_sequences
from model_export.torch_import import import_state_dict, load_state_dict

from .frameworks import FIXTURES, SPECS, export, layer_major, run_steps, spec

ATOL = 1e-5


def fixture_id(path: Path) -> str:
    return path.stem


def test_the_fixtures_are_there() -> None:
    frameworks = {spec(p)["framework"] for p in SPECS}
    assert frameworks == {"torch", "keras"} and len(SPECS) >= 8


@pytest.mark.parametrize("json_path", SPECS, ids=fixture_id)
def test_exported_model_follows_the_framework_step_by_step(json_path: Path, tmp_path: Path) -> None:
    desc = spec(json_path)
    out = tmp_path / "model.onnx"
    result = export([*map(str, desc["export_args"]), "--out", str(out)])
    assert result.code == 0, result.stderr
    golden = np.load(json_path.with_suffix(".npz"))

    outputs, states = run_steps(out, golden["inputs"])
    assert outputs.shape == golden["outputs"].shape
    np.testing.assert_allclose(outputs, golden["outputs"], rtol=0, atol=ATOL)
    if "h_n" in golden:
        np.testing.assert_allclose(states["hidden"], layer_major(golden["h_n"]), atol=ATOL)
    if "c_n" in golden:
        np.testing.assert_allclose(states["cell"], layer_major(golden["c_n"]), atol=ATOL)

    model = onnx.load(out)
    meta = {m.key: m.value for m in model.metadata_props}
    layers, hidden = int(desc["num_layers"]), int(desc["hidden_size"])
    proj = int(desc.get("proj_size") or 0)
    assert meta["cell"] == desc["cell"]
    assert meta["layers"] == str(layers)
    assert meta["hidden_size"] == str(hidden)
    assert meta["proj_size"] == str(proj)
    assert meta["event_size"] == str(desc["event_size"])
    assert meta["output_size"] == str(desc["output_size"])
    assert meta["output_activation"] == desc["output_activation"]
    assert meta["source_framework"] == desc["framework"]
    assert meta["source_file"] == desc["export_args"][1]
    assert (meta["head"] == "") == (desc["head"] is None)
    widths = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in model.graph.input
    }
    expected = {
        "event": ["batch", desc["event_size"]],
        "hidden": ["batch", layers * (proj or hidden)],
    }
    if desc["cell"] == "lstm":
        expected["cell"] = ["batch", layers * hidden]
    assert widths == expected


@pytest.mark.parametrize("json_path", SPECS, ids=fixture_id)
def test_reference_follows_the_framework(json_path: Path) -> None:
    desc = spec(json_path)
    args = [str(a) for a in desc["export_args"]]
    if desc["framework"] == "keras":
        arch = load_keras(FIXTURES / args[1])
    else:
        options = dict(zip(args[2::2], args[3::2]))
        arch = import_state_dict(
            load_state_dict(FIXTURES / args[1]),
            rnn=options.get("--rnn"),
            head=options.get("--head"),
            output_activation=options.get("--output-activation", "none"),
        )
    golden = np.load(json_path.with_suffix(".npz"))
    outputs, states = run_sequences(arch, golden["inputs"])
    np.testing.assert_allclose(outputs, golden["outputs"], rtol=0, atol=ATOL)
    if "h_n" in golden:
        np.testing.assert_allclose(states["hidden"], layer_major(golden["h_n"]), atol=ATOL)
    if "c_n" in golden:
        np.testing.assert_allclose(states["cell"], layer_major(golden["c_n"]), atol=ATOL)


def test_single_layer_lstm_output_is_identity_of_hidden_out(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    assert export(["--from-torch", "lstm_1layer.safetensors", "--out", str(out)]).code == 0
    nodes = onnx.load(out).graph.node
    producer = {o: n for n in nodes for o in n.output}["output"]
    assert producer.op_type == "Identity" and list(producer.input) == ["hidden_out"]


def test_torch_own_step_export_keeps_the_contract() -> None:
    # Exported by torch.onnx.export (not by us); the server serves it as it is.
    path = FIXTURES / "torch_step_2layer_linear_sigmoid.onnx"
    model = onnx.load(path)

    def dims(values: list[onnx.ValueInfoProto]) -> dict[str, list[object]]:
        return {
            v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in values
        }

    assert dims(list(model.graph.input)) == {
        "event": ["batch", 8],
        "hidden": ["batch", 32],
        "cell": ["batch", 32],
    }
    assert [o.name for o in model.graph.output] == ["output", "hidden_out", "cell_out"]
    golden = np.load(path.with_suffix(".npz"))
    outputs, _ = run_steps(path, golden["inputs"])
    np.testing.assert_allclose(outputs, golden["outputs"], rtol=0, atol=ATOL)


def test_pt_file_loads_with_torch_or_is_refused_without(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    args = ["--rnn", "encoder", "--head", "fc", "--output-activation", "sigmoid"]
    result = export(["--from-torch", "lstm_2layer_linear_sigmoid.pt", *args, "--out", str(out)])
    if importlib.util.find_spec("torch") is None:
        assert result.code == 2
        assert "install torch" in result.stderr and "safetensors" in result.stderr
        assert result.stderr.startswith("lstm-export: ") and result.stderr.count("\n") == 1
        assert not out.exists()
    else:
        assert result.code == 0, result.stderr
        ref = tmp_path / "ref.onnx"
        st = export(
            ["--from-torch", "lstm_2layer_linear_sigmoid.safetensors", *args, "--out", str(ref)]
        )
        assert st.code == 0

        def fingerprint(p: Path) -> str:
            return {m.key: m.value for m in onnx.load(p).metadata_props}["fingerprint"]

        assert fingerprint(out) == fingerprint(ref)
