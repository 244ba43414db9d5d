"""The exported ONNX model against the numpy reference, and the lstm-export command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_export import __version__
from model_export.lstm import Parameters, step
from model_export.onnx_export import OPS, Op, build_model, check, max_difference
from model_export.params import fingerprint, save_parameters

LSTM_EXPORT = str(Path(sys.executable).with_name("lstm-export"))


@st.composite
def random_parameters(draw: st.DrawFn) -> Parameters:
    e = draw(st.integers(1, 64))
    h = draw(st.integers(1, 128))
    p = Parameters.random(e, h, seed=draw(st.integers(0, 2**32 - 1)))
    # Each bias independently a scalar or a vector, all non-zero.
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    for name in p.expected_shapes():
        if name.endswith("_bias") and draw(st.booleans()):
            setattr(p, name, float(rng.uniform(-1, 1)))
    return p


@pytest.mark.parametrize("op", OPS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=random_parameters(), batch=st.integers(1, 64), seed=st.integers(0, 1000))
def test_onnx_equals_reference_over_consecutive_steps(
    op: Op, p: Parameters, batch: int, seed: int
) -> None:
    model = build_model(p, op=op)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((batch, p.hidden_size)).astype(np.float32)
    c = rng.standard_normal((batch, p.hidden_size)).astype(np.float32)
    ref_h, ref_c = h.astype(np.float64), c.astype(np.float64)
    for _ in range(4):
        x = rng.standard_normal((batch, p.event_size)).astype(np.float32)
        output, h, c = session.run(
            ["output", "hidden_out", "cell_out"], {"event": x, "hidden": h, "cell": c}
        )
        ref_h, ref_c = step(x.astype(np.float64), ref_h, ref_c, p)
        np.testing.assert_allclose(output, ref_h, rtol=0, atol=1e-5)
        np.testing.assert_allclose(h, ref_h, rtol=0, atol=1e-5)
        np.testing.assert_allclose(c, ref_c, rtol=0, atol=1e-5)


@pytest.mark.parametrize("op", OPS)
def test_graph_follows_the_contract(op: Op) -> None:
    p = Parameters.random(5, 7, seed=0)
    model = build_model(p, op=op)
    check(model)

    def shapes(values: list[onnx.ValueInfoProto]) -> dict[str, list[object]]:
        return {
            v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in values
        }

    assert shapes(list(model.graph.input)) == {
        "event": ["batch", 5],
        "hidden": ["batch", 7],
        "cell": ["batch", 7],
    }
    assert shapes(list(model.graph.output)) == {
        "output": ["batch", 7],
        "hidden_out": ["batch", 7],
        "cell_out": ["batch", 7],
    }
    for v in [*model.graph.input, *model.graph.output]:
        assert v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    meta = {m.key: m.value for m in model.metadata_props}
    assert meta["event_size"] == "5"
    assert meta["hidden_size"] == "7"
    assert meta["exporter_version"] == __version__
    assert meta["fingerprint"] == fingerprint(p)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]


def test_max_difference_catches_a_wrong_model() -> None:
    p = Parameters.random(4, 6, seed=0)
    other = Parameters.random(4, 6, seed=1)
    assert max_difference(build_model(p), p) < 1e-5
    assert max_difference(build_model(other), p) > 1e-2


def test_seed_vector_through_onnx() -> None:
    p = Parameters(3, 3)
    p.event_forget_weights = np.eye(3)
    p.hidden_forget_weights = np.eye(3)
    # Forget gate only matters when input and candidate are zero: c' = f * c.
    session = ort.InferenceSession(
        build_model(p).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    _, _, cell = session.run(
        None,
        {
            "event": np.array([[10, 0, 0]], np.float32),
            "hidden": np.array([[0, 0, 10]], np.float32),
            "cell": np.ones((1, 3), np.float32),
        },
    )
    np.testing.assert_allclose(cell[0], [0.9999546, 0.5, 0.9999546], atol=1e-6)


def export(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LSTM_EXPORT, *args], capture_output=True, text=True, timeout=120)


def test_cli_random(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    result = export(
        "--random", "--event-size", "6", "--hidden-size", "10", "--seed", "3", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    assert "max |onnxruntime - reference|" in result.stdout
    meta = {m.key: m.value for m in onnx.load(out).metadata_props}
    assert meta["fingerprint"] == fingerprint(Parameters.random(6, 10, seed=3))


def test_cli_params_and_module_entry_point(tmp_path: Path) -> None:
    p = Parameters.random(3, 4, seed=9, vector_biases=False)
    save_parameters(tmp_path / "p.npz", p)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "model_export",
            "--params",
            str(tmp_path / "p.npz"),
            "--out",
            str(tmp_path / "m.onnx"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = np.ones((2, 3), np.float32)
    z = np.zeros((2, 4), np.float32)
    output, _, _ = session.run(None, {"event": x, "hidden": z, "cell": z})
    np.testing.assert_allclose(output, step(x, z, z, p)[0], atol=1e-6)


def test_cli_bad_params_file_names_the_key(tmp_path: Path) -> None:
    arrays = {
        name: np.asarray(getattr(Parameters(2, 2), name), np.float64)
        for name in Parameters(2, 2).expected_shapes()
    }
    arrays["event_input_weights"] = np.zeros((2, 5))
    np.savez(tmp_path / "bad.npz", **arrays)
    result = export("--params", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "m.onnx"))
    assert result.returncode == 2
    assert "event_input_weights" in result.stderr and "expected [2, 2]" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_fails_above_tolerance(tmp_path: Path) -> None:
    result = export(
        "--random",
        "--event-size",
        "3",
        "--hidden-size",
        "3",
        "--tolerance",
        "1e-12",
        "--out",
        str(tmp_path / "m.onnx"),
    )
    assert result.returncode == 1
    assert "validation FAILED" in result.stderr


def test_cli_random_needs_sizes(tmp_path: Path) -> None:
    result = export("--random", "--out", str(tmp_path / "m.onnx"))
    assert result.returncode == 2
    assert "--random needs --event-size and --hidden-size" in result.stderr
