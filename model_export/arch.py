"""Step-model architectures beyond the seed: stacked LSTM/GRU layers, projections and heads."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from model_export import __version__
from model_export.lstm import Parameters

Cell = Literal["lstm", "gru"]
CELLS: tuple[Cell, ...] = ("lstm", "gru")

ACTIVATIONS = ("relu", "tanh", "sigmoid", "identity", "elu", "gelu", "silu", "softmax")
"""Activations a head may hold between (or after) its linear layers; each computed exactly."""
ACTIVATION_ALIASES = {"linear": "identity", "none": "identity", "swish": "silu"}
"""Other spellings: Keras calls identity ``linear`` and SiLU ``swish``."""
OUTPUT_ACTIVATIONS = ("none", "sigmoid", "tanh", "softmax")
"""What may follow the head as the model's output activation."""

SOURCE_FRAMEWORKS = ("seed", "random", "torch", "keras")

F32 = NDArray[np.float32]


class ModelImportError(ValueError):
    """A model that cannot be served as a step model; the message names the problem."""


def canonical_activation(name: str) -> str | None:
    """The activation's canonical name, or None if it is not supported."""
    key = name.strip().lower()
    key = ACTIVATION_ALIASES.get(key, key)
    return key if key in ACTIVATIONS else None


def _f32(value: object) -> F32:
    return np.ascontiguousarray(np.asarray(value, dtype=np.float32))


@dataclass(frozen=True)
class LstmLayer:
    """One LSTM layer in PyTorch's layout: gates stacked ``i, f, g, o`` along rows.

    ``weight_ih`` ``[4H, in]``, ``weight_hh`` ``[4H, W]``, optional biases ``[4H]``
    (``bias_hh`` absent when the source has a single bias), optional projection
    ``weight_hr`` ``[P, H]`` (then ``W = P``, else ``W = H``).
    """

    weight_ih: F32
    weight_hh: F32
    bias_ih: F32 | None = None
    bias_hh: F32 | None = None
    weight_hr: F32 | None = None
    names: Mapping[str, str] = field(default_factory=dict)
    """Where each array came from (a state_dict key, an h5 path), for error messages."""

    gates = 4

    @property
    def hidden_size(self) -> int:
        return int(self.weight_hh.shape[0]) // 4

    @property
    def width(self) -> int:
        """The size of this layer's ``h``: the projection size, or H."""
        return int(self.weight_hr.shape[0]) if self.weight_hr is not None else self.hidden_size


@dataclass(frozen=True)
class GruLayer:
    """One GRU layer in PyTorch's layout: gates stacked ``r, z, n`` along rows.

    ``linear_before_reset=True`` is PyTorch's (and Keras ``reset_after=True``):
    ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``. False is Keras
    ``reset_after=False``: ``n = tanh(W_in x + b_in + W_hn (r * h) + b_hn)``.
    """

    weight_ih: F32
    weight_hh: F32
    bias_ih: F32 | None = None
    bias_hh: F32 | None = None
    linear_before_reset: bool = True
    names: Mapping[str, str] = field(default_factory=dict)

    gates = 3

    @property
    def hidden_size(self) -> int:
        return int(self.weight_hh.shape[0]) // 3

    @property
    def width(self) -> int:
        return self.hidden_size


@dataclass(frozen=True)
class Linear:
    """A dense layer ``y = x W^T + b`` with ``weight`` ``[out, in]`` (PyTorch's layout)."""

    weight: F32
    bias: F32 | None = None
    name: str = ""

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])


Layer = LstmLayer | GruLayer
HeadItem = Linear | str
"""A linear layer, or the canonical name of an activation."""


def _shape(a: np.ndarray | None) -> list[int] | None:
    return None if a is None else [int(n) for n in a.shape]


@dataclass(frozen=True)
class Architecture:
    """A whole step model: recurrent layers, then a head, then an output activation.

    The state is layer-major: ``hidden = [h_0 | h_1 | ...]`` (each W wide) and,
    for an LSTM, ``cell = [c_0 | c_1 | ...]`` (each H wide).
    """

    cell: Cell
    layers: tuple[Layer, ...]
    head: tuple[HeadItem, ...] = ()
    output_activation: str = "none"
    source_framework: str = "random"
    source_file: str = ""

    def __post_init__(self) -> None:
        self._validate()

    # -- sizes ----------------------------------------------------------------------

    @property
    def event_size(self) -> int:
        return int(self.layers[0].weight_ih.shape[1])

    @property
    def hidden_size(self) -> int:
        return self.layers[0].hidden_size

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def proj_size(self) -> int:
        first = self.layers[0]
        return first.width if isinstance(first, LstmLayer) and first.weight_hr is not None else 0

    @property
    def width(self) -> int:
        """The size of each layer's ``h`` (P with a projection, else H)."""
        return self.layers[0].width

    @property
    def output_size(self) -> int:
        linears = [item for item in self.head if isinstance(item, Linear)]
        return linears[-1].out_features if linears else self.width

    @property
    def state_sizes(self) -> dict[str, int]:
        """The state inputs of the step model and their widths, in graph order."""
        sizes = {"hidden": self.num_layers * self.width}
        if self.cell == "lstm":
            sizes["cell"] = self.num_layers * self.hidden_size
        return sizes

    @property
    def head_description(self) -> str:
        """E.g. ``linear(24->8),relu,linear(8->1)``; empty without a head."""
        return ",".join(
            f"linear({item.in_features}->{item.out_features})" if isinstance(item, Linear) else item
            for item in self.head
        )

    def metadata(self) -> dict[str, str]:
        """The ONNX ``metadata_props`` that describe this model (shown by GetModelInfo)."""
        return {
            "event_size": str(self.event_size),
            "hidden_size": str(self.hidden_size),
            "output_size": str(self.output_size),
            "exporter_version": __version__,
            "fingerprint": self.fingerprint(),
            "cell": self.cell,
            "layers": str(self.num_layers),
            "proj_size": str(self.proj_size),
            "head": self.head_description,
            "output_activation": self.output_activation,
            "source_framework": self.source_framework,
            "source_file": self.source_file,
        }

    def fingerprint(self) -> str:
        """SHA-256 over the structure and every array's name, shape and float32 bytes."""
        digest = hashlib.sha256()
        digest.update(f"cell={self.cell};output_activation={self.output_activation}".encode())
        for k, layer in enumerate(self.layers):
            if isinstance(layer, GruLayer):
                digest.update(
                    f"layers.{k}.linear_before_reset={layer.linear_before_reset}".encode()
                )
            for name, value in _layer_arrays(layer).items():
                _digest_array(digest.update, f"layers.{k}.{name}", value)
        for j, item in enumerate(self.head):
            if isinstance(item, Linear):
                _digest_array(digest.update, f"head.{j}.weight", item.weight)
                _digest_array(digest.update, f"head.{j}.bias", item.bias)
            else:
                digest.update(f"head.{j}={item}".encode())
        return digest.hexdigest()

    # -- validation -------------------------------------------------------------------

    def _validate(self) -> None:
        if self.cell not in CELLS:
            raise ModelImportError(f"cell {self.cell!r} is not supported (lstm or gru)")
        if not self.layers:
            raise ModelImportError("a model needs at least one recurrent layer")
        if self.output_activation not in OUTPUT_ACTIVATIONS:
            raise ModelImportError(
                f"output activation {self.output_activation!r} is not supported "
                f"({', '.join(OUTPUT_ACTIVATIONS)})"
            )
        kind = LstmLayer if self.cell == "lstm" else GruLayer
        first = self.layers[0]
        for k, layer in enumerate(self.layers):
            if not isinstance(layer, kind):
                raise ModelImportError(
                    f"layer {k} is not an {self.cell.upper()} layer: every layer must be one"
                )
            _validate_layer(k, layer, self.event_size if k == 0 else first.width)
            if layer.hidden_size != first.hidden_size or layer.width != first.width:
                raise ModelImportError(
                    f"layer {k} has hidden size {layer.hidden_size} (width {layer.width}) but "
                    f"layer 0 has {first.hidden_size} (width {first.width}): the state layout "
                    "needs the same sizes in every layer"
                )
        width, where = first.width, f"the top recurrent layer (width {first.width})"
        for j, item in enumerate(self.head):
            if isinstance(item, Linear):
                name = item.name or f"head linear {j}"
                if item.weight.ndim != 2 or 0 in item.weight.shape:
                    raise ModelImportError(
                        f"{name}: weight has shape {_shape(item.weight)}; expected [out, in]"
                    )
                if item.in_features != width:
                    raise ModelImportError(
                        f"shapes do not chain: {name} takes {item.in_features} inputs "
                        f"but {where} gives {width}"
                    )
                if item.bias is not None and _shape(item.bias) != [item.out_features]:
                    raise ModelImportError(
                        f"{name}: bias has shape {_shape(item.bias)}; "
                        f"expected [{item.out_features}]"
                    )
                width, where = item.out_features, f"{name} (out {item.out_features})"
            elif item not in ACTIVATIONS:
                raise ModelImportError(
                    f"unsupported activation {item!r} in the head; supported: "
                    f"{', '.join(ACTIVATIONS)}"
                )


def _validate_layer(k: int, layer: Layer, in_size: int) -> None:
    names = layer.names

    def label(field_name: str) -> str:
        return names.get(field_name, f"layer {k} {field_name}")

    g = layer.gates
    if layer.weight_hh.ndim != 2 or layer.weight_hh.shape[0] % g or layer.weight_hh.shape[0] == 0:
        raise ModelImportError(
            f"{label('weight_hh')} has shape {_shape(layer.weight_hh)}; expected "
            f"[{g}*hidden_size, width]"
        )
    h = layer.hidden_size
    w = layer.width
    hr = layer.weight_hr if isinstance(layer, LstmLayer) else None
    if hr is not None and (hr.ndim != 2 or hr.shape[1] != h or w < 1):
        raise ModelImportError(
            f"{label('weight_hr')} has shape {_shape(hr)}; expected [proj_size, {h}]"
        )
    expected = {
        "weight_ih": [g * h, in_size],
        "weight_hh": [g * h, w],
        "bias_ih": [g * h],
        "bias_hh": [g * h],
    }
    for name, want in expected.items():
        value = getattr(layer, name)
        if value is not None and _shape(value) != want:
            hint = " (the layer below's width)" if name == "weight_ih" and k > 0 else ""
            if name == "weight_ih" and k == 0:
                hint = " (event_size is taken from layer 0)"
            raise ModelImportError(
                f"shapes do not chain: {label(name)} has shape {_shape(value)}; "
                f"expected {want}{hint}"
            )


def _layer_arrays(layer: Layer) -> dict[str, F32 | None]:
    arrays: dict[str, F32 | None] = {
        "weight_ih": layer.weight_ih,
        "weight_hh": layer.weight_hh,
        "bias_ih": layer.bias_ih,
        "bias_hh": layer.bias_hh,
    }
    if isinstance(layer, LstmLayer):
        arrays["weight_hr"] = layer.weight_hr
    return arrays


def _digest_array(update: Callable[[bytes], None], name: str, value: np.ndarray | None) -> None:
    update(name.encode())
    if value is None:
        update(b"absent")
        return
    array = np.ascontiguousarray(value, dtype="<f4")
    update(repr(array.shape).encode())
    update(array.tobytes())


# -- builders -----------------------------------------------------------------------------


def from_seed(parameters: Parameters, source_framework: str = "seed") -> Architecture:
    """The seed's single-layer LSTM as an ``Architecture`` (gates reordered to i, f, g, o)."""
    a = parameters.arrays()
    order = ("input", "forget", "candidate", "output")
    layer = LstmLayer(
        weight_ih=_f32(np.concatenate([a[f"event_{g}_weights"] for g in order])),
        weight_hh=_f32(np.concatenate([a[f"hidden_{g}_weights"] for g in order])),
        bias_ih=_f32(np.concatenate([a[f"event_{g}_bias"] for g in order])),
        bias_hh=_f32(np.concatenate([a[f"hidden_{g}_bias"] for g in order])),
    )
    return Architecture("lstm", (layer,), source_framework=source_framework)


def random_architecture(
    cell: Cell,
    event_size: int,
    hidden_size: int,
    *,
    layers: int = 1,
    proj_size: int = 0,
    bias: bool = True,
    linear_before_reset: bool = True,
    head: Sequence[int | str] = (),
    output_activation: str = "none",
    seed: int = 0,
    scale: float = 1.0,
) -> Architecture:
    """Uniform(-s/sqrt(H), s/sqrt(H)) weights, as PyTorch initialises; for tests and demos.

    ``head`` lists output sizes of linear layers and activation names in order,
    e.g. ``(8, "relu", 3)``.
    """
    rng = np.random.default_rng(seed)
    bound = scale / np.sqrt(hidden_size)

    def u(*shape: int) -> F32:
        return _f32(rng.uniform(-bound, bound, size=shape))

    built: list[Layer] = []
    g = 4 if cell == "lstm" else 3
    width = proj_size if (cell == "lstm" and proj_size) else hidden_size
    for k in range(layers):
        in_size = event_size if k == 0 else width
        w_ih, w_hh = u(g * hidden_size, in_size), u(g * hidden_size, width)
        b_ih = u(g * hidden_size) if bias else None
        b_hh = u(g * hidden_size) if bias else None
        if cell == "lstm":
            w_hr = u(proj_size, hidden_size) if proj_size else None
            built.append(LstmLayer(w_ih, w_hh, b_ih, b_hh, w_hr))
        else:
            built.append(GruLayer(w_ih, w_hh, b_ih, b_hh, linear_before_reset))
    items: list[HeadItem] = []
    size = width
    for item in head:
        if isinstance(item, str):
            items.append(item)
        else:
            b = 1.0 / np.sqrt(size)
            weight = _f32(rng.uniform(-b, b, size=(item, size)))
            items.append(Linear(weight, _f32(rng.uniform(-b, b, size=item)) if bias else None))
            size = item
    return Architecture(
        cell, tuple(built), tuple(items), output_activation, source_framework="random"
    )
