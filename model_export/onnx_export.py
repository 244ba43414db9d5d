"""Builds and validates the one-step ONNX model of the seed's single-layer LSTM."""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from model_export import __version__
from model_export.lstm import GATES, Parameters, step
from model_export.params import fingerprint

OPSET = 17
"""Opset 17 loads in every ONNX Runtime >= 1.14, CPU and CUDA builds alike."""
IR_VERSION = 8
"""The IR version that goes with opset 17 (newer ONNX writes newer IRs by default)."""

Op = Literal["native", "graph"]
OPS: tuple[Op, ...] = ("native", "graph")
DEFAULT_OP: Op = "graph"
"""Chosen by ``make bench-export`` (docs/PERFORMANCE.md): 5-10% faster at every batch size."""

# ONNX's LSTM operator stacks its gates as input, output, forget, cell.
_ONNX_GATE_ORDER = ("input", "output", "forget", "candidate")


def build_model(
    parameters: Parameters,
    op: Op = DEFAULT_OP,
    source_framework: str = "seed",
    source_file: str = "",
) -> onnx.ModelProto:
    """One LSTM step, batched: ``(event, hidden, cell) -> (output, hidden_out, cell_out)``.

    ``op="native"`` uses the ONNX ``LSTM`` operator; ``op="graph"`` spells the
    step out as Concat/Gemm/Split/Sigmoid/Tanh/Mul/Add. ``source_framework``
    (``seed`` or ``random``) and ``source_file`` are recorded in the metadata.
    """
    e, h = parameters.event_size, parameters.hidden_size
    arrays = {k: v.astype(np.float32) for k, v in parameters.arrays().items()}
    nodes, initializers = (_native if op == "native" else _graph)(arrays, h)
    inputs = [
        helper.make_tensor_value_info("event", TensorProto.FLOAT, ["batch", e]),
        helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", h]),
        helper.make_tensor_value_info("cell", TensorProto.FLOAT, ["batch", h]),
    ]
    outputs = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", h])
        for name in ("output", "hidden_out", "cell_out")
    ]
    graph = helper.make_graph(nodes, "lstm_step", inputs, outputs, initializer=initializers)
    model = helper.make_model(
        graph,
        producer_name="lstm-stream model_export",
        producer_version=__version__,
        opset_imports=[helper.make_opsetid("", OPSET)],
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(
        model,
        {
            "event_size": str(e),
            "hidden_size": str(h),
            "output_size": str(h),
            "exporter_version": __version__,
            "fingerprint": fingerprint(parameters),
            "op": op,
            # The architecture keys every exported model carries (see model_export.arch).
            "cell": "lstm",
            "layers": "1",
            "proj_size": "0",
            "head": "",
            "output_activation": "none",
            "source_framework": source_framework,
            "source_file": source_file,
        },
    )
    return model


def _native(
    arrays: dict[str, np.ndarray], h: int
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    w = np.concatenate([arrays[f"event_{g}_weights"] for g in _ONNX_GATE_ORDER])[None]
    r = np.concatenate([arrays[f"hidden_{g}_weights"] for g in _ONNX_GATE_ORDER])[None]
    b = np.concatenate(
        [arrays[f"event_{g}_bias"] for g in _ONNX_GATE_ORDER]
        + [arrays[f"hidden_{g}_bias"] for g in _ONNX_GATE_ORDER]
    )[None]
    initializers = [
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(r, "R"),
        numpy_helper.from_array(b, "B"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "axis0"),
    ]
    nodes = [
        helper.make_node("Unsqueeze", ["event", "axis0"], ["X"]),
        helper.make_node("Unsqueeze", ["hidden", "axis0"], ["initial_h"]),
        helper.make_node("Unsqueeze", ["cell", "axis0"], ["initial_c"]),
        helper.make_node(
            "LSTM",
            ["X", "W", "R", "B", "", "initial_h", "initial_c"],
            ["", "Y_h", "Y_c"],
            hidden_size=h,
        ),
        helper.make_node("Squeeze", ["Y_h", "axis0"], ["hidden_out"]),
        helper.make_node("Squeeze", ["Y_c", "axis0"], ["cell_out"]),
        helper.make_node("Identity", ["hidden_out"], ["output"]),
    ]
    return nodes, initializers


def _graph(
    arrays: dict[str, np.ndarray], h: int
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    # [x, h] @ [[We], [Wh]] + (be + bh): one GEMM for all four gates.
    weights = np.concatenate(
        [
            np.concatenate([arrays[f"event_{g}_weights"], arrays[f"hidden_{g}_weights"]], axis=1)
            for g in GATES
        ]
    ).T
    bias = np.concatenate([arrays[f"event_{g}_bias"] + arrays[f"hidden_{g}_bias"] for g in GATES])
    initializers = [
        numpy_helper.from_array(np.ascontiguousarray(weights), "Wt"),
        numpy_helper.from_array(bias, "b"),
        numpy_helper.from_array(np.array([h] * 4, dtype=np.int64), "split"),
    ]
    nodes = [
        helper.make_node("Concat", ["event", "hidden"], ["xh"], axis=1),
        helper.make_node("Gemm", ["xh", "Wt", "b"], ["z"]),
        helper.make_node("Split", ["z", "split"], ["z_f", "z_i", "z_g", "z_o"], axis=1),
        helper.make_node("Sigmoid", ["z_f"], ["f"]),
        helper.make_node("Sigmoid", ["z_i"], ["i"]),
        helper.make_node("Tanh", ["z_g"], ["g"]),
        helper.make_node("Sigmoid", ["z_o"], ["o"]),
        helper.make_node("Mul", ["f", "cell"], ["kept"]),
        helper.make_node("Mul", ["i", "g"], ["added"]),
        helper.make_node("Add", ["kept", "added"], ["cell_out"]),
        helper.make_node("Tanh", ["cell_out"], ["cell_tanh"]),
        helper.make_node("Mul", ["o", "cell_tanh"], ["hidden_out"]),
        helper.make_node("Identity", ["hidden_out"], ["output"]),
    ]
    return nodes, initializers


def max_difference(
    model: onnx.ModelProto,
    parameters: Parameters,
    batch_sizes: tuple[int, ...] = (1, 7, 64),
    steps: int = 5,
    seed: int = 0,
) -> float:
    """Largest |ONNX Runtime - numpy reference| over several batches of consecutive steps."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(seed)
    e, h = parameters.event_size, parameters.hidden_size
    worst = 0.0
    for batch in batch_sizes:
        hidden = rng.standard_normal((batch, h)).astype(np.float32)
        cell = rng.standard_normal((batch, h)).astype(np.float32)
        for _ in range(steps):
            event = rng.standard_normal((batch, e)).astype(np.float32)
            output, hidden_out, cell_out = session.run(
                ["output", "hidden_out", "cell_out"],
                {"event": event, "hidden": hidden, "cell": cell},
            )
            ref_h, ref_c = step(
                event.astype(np.float64),
                hidden.astype(np.float64),
                cell.astype(np.float64),
                parameters,
            )
            for got, want in ((output, ref_h), (hidden_out, ref_h), (cell_out, ref_c)):
                worst = max(worst, float(np.max(np.abs(got - want))))
            hidden, cell = hidden_out, cell_out
    return worst


def check(model: onnx.ModelProto) -> None:
    """The ONNX checker with full shape inference; raises on an invalid model."""
    onnx.checker.check_model(model, full_check=True)
