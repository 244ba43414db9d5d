"""The numpy reference step of any ``Architecture``, in float64."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from numpy.typing import ArrayLike, NDArray

from model_export.arch import Architecture, GruLayer, Linear, LstmLayer
from model_export.lstm import sigmoid as _sigmoid

F64 = NDArray[np.float64]

_erf = np.vectorize(math.erf, otypes=[np.float64])


def sigmoid(x: F64) -> F64:
    """The seed's overflow-free logistic function, typed for float64."""
    return np.asarray(_sigmoid(x), np.float64)


def activate(name: str, x: F64) -> F64:
    """Apply a canonical activation (``arch.ACTIVATIONS`` or an output activation)."""
    if name in ("identity", "none"):
        return x
    if name == "relu":
        return np.maximum(x, 0.0)
    if name == "tanh":
        return np.tanh(x)
    if name == "sigmoid":
        return sigmoid(x)
    if name == "elu":
        return np.where(x > 0, x, np.expm1(np.minimum(x, 0.0)))
    if name == "gelu":
        # The exact (erf) form: PyTorch's nn.GELU() and Keras's "gelu" default.
        return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))
    if name == "silu":
        return x * sigmoid(x)
    if name == "softmax":
        shifted = np.exp(x - x.max(axis=-1, keepdims=True))
        return shifted / shifted.sum(axis=-1, keepdims=True)
    raise ValueError(f"unknown activation {name!r}")


def _affine(x: F64, weight: np.ndarray, bias: np.ndarray | None) -> F64:
    out: F64 = x @ np.asarray(weight, np.float64).T
    return out if bias is None else out + np.asarray(bias, np.float64)


def lstm_layer_step(layer: LstmLayer, x: F64, h: F64, c: F64) -> tuple[F64, F64]:
    """One LSTM layer: ``(h', c')``; gates i, f, g, o as PyTorch stacks them."""
    z = _affine(x, layer.weight_ih, layer.bias_ih) + _affine(h, layer.weight_hh, layer.bias_hh)
    i, f, g, o = np.split(z, 4, axis=-1)
    c_new = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    h_new = sigmoid(o) * np.tanh(c_new)
    if layer.weight_hr is not None:
        h_new = h_new @ np.asarray(layer.weight_hr, np.float64).T
    return h_new, c_new


def gru_layer_step(layer: GruLayer, x: F64, h: F64) -> F64:
    """One GRU layer: ``h'``; gates r, z, n as PyTorch stacks them."""
    hs = layer.hidden_size
    gx = _affine(x, layer.weight_ih, layer.bias_ih)
    w_hh = np.asarray(layer.weight_hh, np.float64)
    b_hh = None if layer.bias_hh is None else np.asarray(layer.bias_hh, np.float64)
    gh_rz = _affine(h, w_hh[: 2 * hs], None if b_hh is None else b_hh[: 2 * hs])
    r = sigmoid(gx[..., :hs] + gh_rz[..., :hs])
    z = sigmoid(gx[..., hs : 2 * hs] + gh_rz[..., hs:])
    b_hn = None if b_hh is None else b_hh[2 * hs :]
    if layer.linear_before_reset:
        n = np.tanh(gx[..., 2 * hs :] + r * _affine(h, w_hh[2 * hs :], b_hn))
    else:
        n = np.tanh(gx[..., 2 * hs :] + _affine(r * h, w_hh[2 * hs :], b_hn))
    return (1.0 - z) * n + z * h


def zero_states(arch: Architecture, batch: int) -> dict[str, F64]:
    """The state of new sessions: zeros, one row per session."""
    return {name: np.zeros((batch, size)) for name, size in arch.state_sizes.items()}


def step(
    arch: Architecture, event: ArrayLike, states: Mapping[str, ArrayLike]
) -> tuple[F64, dict[str, F64]]:
    """One step of the whole model: ``(event [B, E], states) -> (output [B, O], new states)``.

    ``states`` maps the state names of ``arch.state_sizes`` to ``[B, n]`` rows,
    layer-major (``[h_0 | h_1 | ...]``).
    """
    x = np.asarray(event, np.float64)
    hidden = np.asarray(states["hidden"], np.float64)
    w, hs = arch.width, arch.hidden_size
    new_h: list[F64] = []
    new_c: list[F64] = []
    cell = np.asarray(states["cell"], np.float64) if arch.cell == "lstm" else None
    for k, layer in enumerate(arch.layers):
        h = hidden[..., k * w : (k + 1) * w]
        if isinstance(layer, LstmLayer):
            assert cell is not None
            x, c = lstm_layer_step(layer, x, h, cell[..., k * hs : (k + 1) * hs])
            new_c.append(c)
        else:
            x = gru_layer_step(layer, x, h)
        new_h.append(x)
    y = x
    for item in arch.head:
        y = _affine(y, item.weight, item.bias) if isinstance(item, Linear) else activate(item, y)
    y = activate(arch.output_activation, y)
    out_states = {"hidden": np.concatenate(new_h, axis=-1)}
    if new_c:
        out_states["cell"] = np.concatenate(new_c, axis=-1)
    return y, out_states


def run_sequences(arch: Architecture, inputs: ArrayLike) -> tuple[F64, dict[str, F64]]:
    """Whole sequences ``[S, T, E]`` from zero state: outputs ``[S, T, O]`` and final states."""
    xs = np.asarray(inputs, np.float64)
    states: dict[str, F64] = zero_states(arch, xs.shape[0])
    outputs = []
    for t in range(xs.shape[1]):
        y, states = step(arch, xs[:, t], states)
        outputs.append(y)
    return np.stack(outputs, axis=1), states
