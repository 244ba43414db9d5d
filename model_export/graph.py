"""Builds and checks the one-step ONNX graph of any ``Architecture``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from model_export import __version__
from model_export.arch import Architecture, GruLayer, Linear, LstmLayer
from model_export.onnx_export import IR_VERSION, OPSET
from model_export.reference import step

_SQRT_HALF = np.array(1.0 / np.sqrt(2.0), np.float32)


class _Graph:
    """Nodes and initializers being collected; every tensor name is unique."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: Sequence[str], output: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, list(inputs), [output], **attrs))
        return output

    def split(self, value: str, sizes: Sequence[int], outputs: Sequence[str]) -> list[str]:
        sizes_name = self.const(f"{outputs[0]}_sizes", np.array(sizes, dtype=np.int64))
        self.nodes.append(helper.make_node("Split", [value, sizes_name], list(outputs), axis=1))
        return list(outputs)

    def gemm(self, x: str, weight_t: np.ndarray, bias: np.ndarray | None, name: str) -> str:
        """``x @ weight_t + bias``; a Gemm without C where there is no bias."""
        inputs = [x, self.const(f"{name}_Wt", weight_t.astype(np.float32))]
        if bias is not None:
            inputs.append(self.const(f"{name}_b", bias.astype(np.float32)))
        return self.node("Gemm", inputs, name)

    def activation(self, name: str, x: str, out: str) -> str:
        simple = {"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid", "identity": "Identity"}
        if name in simple:
            return self.node(simple[name], [x], out)
        if name == "elu":
            return self.node("Elu", [x], out, alpha=1.0)
        if name == "softmax":
            return self.node("Softmax", [x], out, axis=1)
        if name == "silu":
            return self.node("Mul", [x, self.node("Sigmoid", [x], f"{out}_sigmoid")], out)
        if name == "gelu":
            # Opset 17 has no Gelu: 0.5 * x * (1 + erf(x / sqrt(2))), the exact form.
            scaled = self.node("Mul", [x, self.const(f"{out}_c", _SQRT_HALF)], f"{out}_scaled")
            erf = self.node("Erf", [scaled], f"{out}_erf")
            one = self.node(
                "Add", [erf, self.const(f"{out}_one", np.array(1.0, np.float32))], f"{out}_1p"
            )
            half = self.node(
                "Mul", [x, self.const(f"{out}_half", np.array(0.5, np.float32))], f"{out}_hx"
            )
            return self.node("Mul", [half, one], out)
        raise ValueError(f"unknown activation {name!r}")


def _sum_bias(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    if a is None:
        return b
    return a if b is None else a.astype(np.float64) + b.astype(np.float64)


def _lstm_layer(
    g: _Graph, k: int, layer: LstmLayer, x: str, h: str, c: str, h_out: str, c_out: str
) -> None:
    # [x, h] @ [[W_ih^T], [W_hh^T]] + (b_ih + b_hh): one GEMM for all four gates.
    p = f"l{k}_"
    hs = layer.hidden_size
    weight_t = np.concatenate([layer.weight_ih, layer.weight_hh], axis=1).T
    xh = g.node("Concat", [x, h], f"{p}xh", axis=1)
    z = g.gemm(xh, weight_t, _sum_bias(layer.bias_ih, layer.bias_hh), f"{p}z")
    zi, zf, zg, zo = g.split(z, [hs] * 4, [f"{p}z_i", f"{p}z_f", f"{p}z_g", f"{p}z_o"])
    kept = g.node("Mul", [g.node("Sigmoid", [zf], f"{p}f"), c], f"{p}kept")
    added = g.node(
        "Mul", [g.node("Sigmoid", [zi], f"{p}i"), g.node("Tanh", [zg], f"{p}g")], f"{p}added"
    )
    g.node("Add", [kept, added], c_out)
    cell_tanh = g.node("Tanh", [c_out], f"{p}cell_tanh")
    o = g.node("Sigmoid", [zo], f"{p}o")
    if layer.weight_hr is None:
        g.node("Mul", [o, cell_tanh], h_out)
    else:
        m = g.node("Mul", [o, cell_tanh], f"{p}m")
        g.node("MatMul", [m, g.const(f"{p}Whr_t", layer.weight_hr.T.astype(np.float32))], h_out)


def _gru_layer(g: _Graph, k: int, layer: GruLayer, x: str, h: str, h_out: str) -> None:
    p = f"l{k}_"
    hs = layer.hidden_size
    w_ih, w_hh = layer.weight_ih, layer.weight_hh
    b_ih, b_hh = layer.bias_ih, layer.bias_hh
    b_hh_rz = None if b_hh is None else b_hh[: 2 * hs]
    b_hn = None if b_hh is None else b_hh[2 * hs :]
    xh = g.node("Concat", [x, h], f"{p}xh", axis=1)
    if layer.linear_before_reset:
        # One GEMM gives r, z (from x and h) and W_in x (h's block is zero there);
        # W_hn h + b_hn stays apart because r multiplies it.
        top = np.concatenate([w_hh[: 2 * hs], np.zeros((hs, w_hh.shape[1]), np.float32)])
        weight_t = np.concatenate([w_ih, top], axis=1).T
        bias = _sum_bias(b_ih, None if b_hh_rz is None else np.concatenate([b_hh_rz, np.zeros(hs)]))
        z_all = g.gemm(xh, weight_t, bias, f"{p}z")
        zr, zz, xn = g.split(z_all, [hs] * 3, [f"{p}z_r", f"{p}z_z", f"{p}xn"])
        r = g.node("Sigmoid", [zr], f"{p}r")
        hn = g.gemm(h, w_hh[2 * hs :].T, b_hn, f"{p}hn")
        n_pre = g.node("Add", [xn, g.node("Mul", [r, hn], f"{p}r_hn")], f"{p}n_pre")
    else:
        weight_t = np.concatenate([w_ih[: 2 * hs], w_hh[: 2 * hs]], axis=1).T
        bias = _sum_bias(None if b_ih is None else b_ih[: 2 * hs], b_hh_rz)
        z_rz = g.gemm(xh, weight_t, bias, f"{p}z")
        zr, zz = g.split(z_rz, [hs] * 2, [f"{p}z_r", f"{p}z_z"])
        r = g.node("Sigmoid", [zr], f"{p}r")
        xrh = g.node("Concat", [x, g.node("Mul", [r, h], f"{p}rh")], f"{p}xrh", axis=1)
        weight_n = np.concatenate([w_ih[2 * hs :], w_hh[2 * hs :]], axis=1).T
        b_in = None if b_ih is None else b_ih[2 * hs :]
        n_pre = g.gemm(xrh, weight_n, _sum_bias(b_in, b_hn), f"{p}n_pre")
    n = g.node("Tanh", [n_pre], f"{p}n")
    zt = g.node("Sigmoid", [zz], f"{p}zt")
    # h' = (1 - z) * n + z * h, written as n + z * (h - n).
    moved = g.node("Mul", [zt, g.node("Sub", [h, n], f"{p}h_minus_n")], f"{p}moved")
    g.node("Add", [n, moved], h_out)


def build_step_model(arch: Architecture) -> onnx.ModelProto:
    """The step model ``(event, states) -> (output, states_out)`` as explicit ONNX ops.

    A state of several layers is split into per-layer slices and concatenated
    back, layer-major. Without a head and an output activation, ``output`` is
    ``Identity(h_top)``; for one layer that is ``Identity(hidden_out)``, which
    the server uses to skip a copy.
    """
    g = _Graph()
    num, w, hs = arch.num_layers, arch.width, arch.hidden_size
    lstm = arch.cell == "lstm"

    def per_layer(state: str, size: int) -> list[str]:
        if num == 1:
            return [state]
        return g.split(state, [size] * num, [f"l{k}_{state}" for k in range(num)])

    hs_in = per_layer("hidden", w)
    cs_in = per_layer("cell", hs) if lstm else []
    hs_out = ["hidden_out"] if num == 1 else [f"l{k}_hidden_out" for k in range(num)]
    cs_out = ["cell_out"] if num == 1 else [f"l{k}_cell_out" for k in range(num)]
    x = "event"
    for k, layer in enumerate(arch.layers):
        if isinstance(layer, LstmLayer):
            _lstm_layer(g, k, layer, x, hs_in[k], cs_in[k], hs_out[k], cs_out[k])
        else:
            _gru_layer(g, k, layer, x, hs_in[k], hs_out[k])
        x = hs_out[k]
    if num > 1:
        g.node("Concat", hs_out, "hidden_out", axis=1)
        if lstm:
            g.node("Concat", cs_out, "cell_out", axis=1)

    steps: list[tuple[str, Linear | str]] = [(f"head{j}", item) for j, item in enumerate(arch.head)]
    if arch.output_activation != "none":
        steps.append(("output_activation", arch.output_activation))
    y = x
    for n, (name, item) in enumerate(steps):
        out = "output" if n == len(steps) - 1 else name
        if isinstance(item, Linear):
            y = g.gemm(y, item.weight.T, item.bias, out)
        else:
            y = g.activation(item, y, out)
    if not steps:
        g.node("Identity", [y], "output")

    sizes = arch.state_sizes
    inputs = [helper.make_tensor_value_info("event", TensorProto.FLOAT, ["batch", arch.event_size])]
    inputs += [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", size])
        for name, size in sizes.items()
    ]
    outputs = [
        helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", arch.output_size])
    ]
    outputs += [
        helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, ["batch", size])
        for name, size in sizes.items()
    ]
    graph = helper.make_graph(
        g.nodes, f"{arch.cell}_step", inputs, outputs, initializer=g.initializers
    )
    model = helper.make_model(
        graph,
        producer_name="lstm-stream model_export",
        producer_version=__version__,
        opset_imports=[helper.make_opsetid("", OPSET)],
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(model, {**arch.metadata(), "op": "graph"})
    return model


def max_step_difference(
    model: onnx.ModelProto,
    arch: Architecture,
    batch_sizes: tuple[int, ...] = (1, 7, 64),
    steps: int = 5,
    seed: int = 0,
) -> float:
    """Largest |ONNX Runtime - numpy reference| over several batches of consecutive steps.

    Every output and every state is compared; states start random, so a graph
    that mixes up layers or gates cannot hide behind a zero state.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(seed)
    names = list(arch.state_sizes)
    worst = 0.0
    for batch in batch_sizes:
        states = {
            name: rng.standard_normal((batch, size)).astype(np.float32)
            for name, size in arch.state_sizes.items()
        }
        for _ in range(steps):
            event = rng.standard_normal((batch, arch.event_size)).astype(np.float32)
            got = session.run(["output", *(f"{n}_out" for n in names)], {"event": event, **states})
            want_output, want_states = step(arch, event, states)
            wanted = [want_output, *(want_states[n] for n in names)]
            for have, want in zip(got, wanted):
                worst = max(worst, float(np.max(np.abs(np.asarray(have) - want))))
            states = dict(zip(names, (np.asarray(v) for v in got[1:])))
    return worst
