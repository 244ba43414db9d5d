"""The runtime's I/O contract check and device choice, without a network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from onnx import TensorProto, helper

from model_export.lstm import Parameters, step
from model_export.onnx_export import build_model
from service.runtime import EMBEDDED_SOURCE, ModelContractError, Runtime, load_model_bytes


def model_bytes(inputs, outputs, nodes, initializer=()) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializer))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def tensor(name: str, shape: list, kind: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, kind, shape)


def identity_model(**change: object) -> bytes:
    """event -> output; state -> state_out, each an Identity; ``change`` swaps one value info."""
    values = {
        "event": tensor("event", ["batch", 4]),
        "state": tensor("state", ["batch", 3]),
        "output": tensor("output", ["batch", 4]),
        "state_out": tensor("state_out", ["batch", 3]),
    }
    values.update(change)  # type: ignore[arg-type]
    names = {k: v.name for k, v in values.items()}  # type: ignore[attr-defined]
    nodes = [
        helper.make_node("Identity", [names["event"]], [names["output"]]),
        helper.make_node("Identity", [names["state"]], [names["state_out"]]),
    ]
    return model_bytes(
        [values["event"], values["state"]], [values["output"], values["state_out"]], nodes
    )


def test_generic_state_contract() -> None:
    runtime = Runtime(identity_model(), "identity.onnx", "cpu")
    assert runtime.spec.state_names == ("state",)
    assert runtime.spec.state_sizes == (3,)
    assert (runtime.spec.event_size, runtime.spec.output_size) == (4, 4)
    output, (state,) = runtime.run(np.ones((2, 4), np.float32), [np.full((2, 3), 7, np.float32)])
    assert output.shape == (2, 4) and state.tolist() == [[7, 7, 7]] * 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"event": tensor("x", ["batch", 4])}, "no input named 'event'"),
        ({"output": tensor("y", ["batch", 4])}, "no output named 'output'"),
        (
            {"state_out": tensor("state_next", ["batch", 3])},
            "state input 'state' has no matching output 'state_out'",
        ),
        (
            {
                "event": tensor("event", ["batch", 4], TensorProto.DOUBLE),
                "output": tensor("output", ["batch", 4], TensorProto.DOUBLE),
            },
            "input 'event' is tensor(double); expected tensor(float)",
        ),
        (
            {"event": tensor("event", [1, 4]), "output": tensor("output", [1, 4])},
            "fixed batch dimension 1",
        ),
        (
            {"event": tensor("event", ["batch", "e"]), "output": tensor("output", ["batch", "e"])},
            "expected [batch, n] with a fixed n",
        ),
    ],
)
def test_contract_violations_are_named(change: dict, message: str) -> None:
    with pytest.raises(ModelContractError) as info:
        Runtime(identity_model(**change), "bad.onnx", "cpu")
    assert message in str(info.value)
    assert "bad.onnx" in str(info.value)


def test_state_width_mismatch() -> None:
    with pytest.raises(ModelContractError, match="'state_out' has width 5; 'state' has 3"):
        Runtime(
            model_bytes(
                [tensor("event", ["batch", 4]), tensor("state", ["batch", 3])],
                [tensor("output", ["batch", 4]), tensor("state_out", ["batch", 5])],
                [
                    helper.make_node("Identity", ["event"], ["output"]),
                    helper.make_node("Pad", ["state", "pads"], ["state_out"]),
                ],
                [onnx.numpy_helper.from_array(np.array([0, 0, 0, 2], np.int64), "pads")],
            ),
            "bad.onnx",
            "cpu",
        )


def test_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    data, source = load_model_bytes(str(tmp_path / "junk.onnx"))
    with pytest.raises(ModelContractError, match="ONNX Runtime cannot load"):
        Runtime(data, source, "cpu")
    with pytest.raises(ModelContractError, match="cannot read model"):
        load_model_bytes(str(tmp_path / "missing.onnx"))


def test_exported_file_runs_like_the_reference(tmp_path: Path) -> None:
    p = Parameters.random(5, 6, seed=2)
    onnx.save_model(build_model(p), tmp_path / "m.onnx")
    runtime = Runtime(*load_model_bytes(str(tmp_path / "m.onnx")), "cpu")
    assert runtime.spec.state_names == ("hidden", "cell")
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    z = np.zeros((3, 6), np.float32)
    output, (_, c) = runtime.run(x, [z, z])
    ref_h, ref_c = step(x, z, z, p)
    np.testing.assert_allclose(output, ref_h, atol=1e-5)
    np.testing.assert_allclose(c, ref_c, atol=1e-5)


def test_embedded_default() -> None:
    data, source = load_model_bytes(None)
    assert source == EMBEDDED_SOURCE
    runtime = Runtime(data, source, "cpu")
    runtime.warm_up(64)
    assert runtime.spec.metadata["event_size"] == "32"
