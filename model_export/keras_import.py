"""Keras 3 ``.keras`` files: ``LSTM``/``GRU`` stacks followed by ``Dense`` layers."""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from model_export.arch import (
    OUTPUT_ACTIVATIONS,
    Architecture,
    GruLayer,
    HeadItem,
    Layer,
    Linear,
    LstmLayer,
    ModelImportError,
    canonical_activation,
)

RECURRENT = ("LSTM", "GRU")
SKIPPED = ("InputLayer", "Dropout")
"""Layers without weights that do nothing at inference."""


def _snake(name: str) -> str:
    """Keras's ``to_snake_case``: how a layer class names its group in the weights file."""
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def load_keras(path: str | os.PathLike[str]) -> Architecture:
    """The ``Architecture`` of a Keras 3 ``.keras`` file; refuses what it cannot serve."""
    name = os.fspath(path)
    base = os.path.basename(name)
    if not os.path.isfile(name):
        raise ModelImportError(f"{name}: no such file")
    if not zipfile.is_zipfile(name):
        hint = (
            " (a .weights.h5 or legacy .h5 file has no usable architecture; "
            "save the model with model.save('model.keras'))"
            if name.endswith(".h5")
            else ""
        )
        raise ModelImportError(f"{name}: not a Keras 3 .keras file (a zip archive){hint}")
    with zipfile.ZipFile(name) as archive:
        members = set(archive.namelist())
        for needed in ("config.json", "model.weights.h5"):
            if needed not in members:
                raise ModelImportError(f"{name}: the .keras archive has no {needed}")
        try:
            config = json.loads(archive.read("config.json"))
        except ValueError as exc:
            raise ModelImportError(f"{name}: config.json is not JSON ({exc})") from exc
        weights = archive.read("model.weights.h5")
    layers_config = _layer_list(config)
    with _open_h5(weights, name) as h5:
        return _build(layers_config, _Weights(h5), base)


def _open_h5(data: bytes, name: str) -> Any:
    import h5py

    try:
        return h5py.File(io.BytesIO(data), "r")
    except OSError as exc:
        raise ModelImportError(f"{name}: model.weights.h5 is not readable HDF5 ({exc})") from exc


def _layer_list(config: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    kind = config.get("class_name")
    layers = config.get("config", {}).get("layers")
    if kind == "Sequential" and isinstance(layers, list):
        return layers
    if kind == "Functional" and isinstance(layers, list):
        _check_chain(layers)
        return layers
    raise ModelImportError(
        f"the model is a {kind}: only Sequential models (and Functional models that are a "
        "single chain of layers) are supported"
    )


def _check_chain(layers: list[Mapping[str, Any]]) -> None:
    """A Functional model is accepted when each layer takes exactly the one before it."""
    previous = None
    for layer in layers:
        inbound = layer.get("inbound_nodes") or []
        sources = re.findall(r"'keras_history': \['([^']*)'", str(inbound))
        if previous is not None and sources != [previous]:
            raise ModelImportError(
                f"layer {layer.get('config', {}).get('name')!r} of the Functional model does not "
                "simply take the layer before it: only a single chain of layers is supported"
            )
        previous = layer.get("config", {}).get("name")


class _Weights:
    """The arrays of ``model.weights.h5``, found per layer; remembers what was read."""

    def __init__(self, h5: Any):
        self.h5 = h5
        self.used: set[str] = set()
        self.by_name: dict[str, str] = {}
        group = h5.get("layers")
        if group is not None:
            for key in group:
                for vars_path in (f"layers/{key}/vars", f"layers/{key}/cell/vars"):
                    vars_group = h5.get(vars_path)
                    if vars_group is not None and "name" in vars_group.attrs:
                        self.by_name.setdefault(str(vars_group.attrs["name"]), f"layers/{key}")
        self.counts: dict[str, int] = {}

    def group_of(self, layer_name: str, class_name: str) -> str:
        # Keras names the group after the class, numbered per class in layer order;
        # the vars' "name" attribute (written by recent versions) confirms it.
        snake = _snake(class_name)
        n = self.counts.get(snake, -1) + 1
        self.counts[snake] = n
        by_order = f"layers/{snake}" if n == 0 else f"layers/{snake}_{n}"
        return self.by_name.get(layer_name, by_order)

    def arrays(self, path: str, layer_name: str, count: int) -> list[np.ndarray]:
        group = self.h5.get(path)
        found = sorted(group.keys(), key=int) if group is not None else []
        if found != [str(i) for i in range(count)]:
            raise ModelImportError(
                f"layer {layer_name!r}: expected {count} weight arrays in {path}, found "
                f"{len(found)} (missing or extra weights)"
            )
        out = []
        for key in found:
            self.used.add(f"{path}/{key}")
            out.append(_as_float32(group[key], f"{path}/{key}"))
        return out

    def unused(self) -> list[str]:
        every: list[str] = []

        def visit(name: str, obj: Any) -> None:
            if hasattr(obj, "shape"):
                every.append(name)

        self.h5.visititems(visit)
        return sorted(p for p in every if p not in self.used)


def _as_float32(dataset: Any, where: str) -> np.ndarray:
    value = dataset[()]
    if str(dataset.attrs.get("dtype", "")) == "bfloat16":
        # Keras stores bfloat16 as its raw 16 bits; bfloat16 is the top half of a float32.
        bits = np.frombuffer(np.ascontiguousarray(value).tobytes(), "<u2").reshape(value.shape)
        value = (bits.astype(np.uint32) << 16).view(np.float32)
    if not np.issubdtype(np.asarray(value).dtype, np.floating):
        raise ModelImportError(f"{where}: dtype {value.dtype} is not a float type")
    value = np.ascontiguousarray(value, dtype=np.float32)
    if not np.all(np.isfinite(value)):
        raise ModelImportError(f"{where} contains NaN or Inf")
    return value


def _activation(layer_name: str, cfg: Mapping[str, Any]) -> str:
    raw = cfg.get("activation", "linear")
    name = canonical_activation(raw) if isinstance(raw, str) else None
    if name is None:
        raise ModelImportError(
            f"layer {layer_name!r}: unsupported activation {raw!r}; supported: relu, tanh, "
            "sigmoid, linear, elu, gelu, silu/swish, softmax"
        )
    return name


def _build(layers: list[Mapping[str, Any]], weights: _Weights, source_file: str) -> Architecture:
    recurrent: list[Layer] = []
    head: list[HeadItem] = []
    cell_class: str | None = None
    last_recurrent_returns_sequences = True
    for layer in layers:
        class_name = str(layer.get("class_name"))
        cfg = layer.get("config", {})
        name = str(cfg.get("name", class_name))
        if class_name in SKIPPED:
            continue
        if class_name in RECURRENT:
            if head:
                raise ModelImportError(
                    f"layer {name!r} ({class_name}) comes after a Dense or Activation layer: "
                    "only recurrent layers followed by Dense layers are supported"
                )
            if not last_recurrent_returns_sequences:
                raise ModelImportError(
                    f"layer {name!r} follows a recurrent layer with return_sequences=False: "
                    "every stacked layer but the last needs return_sequences=True"
                )
            if cell_class is not None and class_name != cell_class:
                raise ModelImportError(
                    f"layer {name!r} is a {class_name} after {cell_class} layers: "
                    "a stack must be all LSTM or all GRU"
                )
            cell_class = class_name
            recurrent.append(_recurrent(class_name, name, cfg, weights))
            last_recurrent_returns_sequences = bool(cfg.get("return_sequences", False))
        elif class_name == "Dense":
            if not recurrent:
                raise ModelImportError(
                    f"layer {name!r} (Dense) comes before any recurrent layer: only recurrent "
                    "layers followed by Dense layers are supported"
                )
            head.extend(_dense(name, cfg, weights))
        elif class_name == "Activation":
            if not recurrent:
                raise ModelImportError(
                    f"layer {name!r} (Activation) comes before any recurrent layer"
                )
            head.append(_activation(name, cfg))
        elif class_name == "Bidirectional":
            raise ModelImportError(
                f"layer {name!r} is Bidirectional: a stream cannot see future events, so a "
                "bidirectional model cannot be served one event at a time"
            )
        else:
            raise ModelImportError(
                f"unsupported layer {name!r} ({class_name}); supported: InputLayer, LSTM, GRU, "
                "Dense, Activation, Dropout"
            )
    if not recurrent:
        raise ModelImportError("the model has no LSTM or GRU layer")
    unused = weights.unused()
    if unused:
        raise ModelImportError(f"extra weights not used by the model: {', '.join(unused)}")
    # A final sigmoid/tanh/softmax is the output activation; identity items are dropped.
    items = [item for item in head if item != "identity"]
    output_activation = "none"
    if items and isinstance(items[-1], str) and items[-1] in OUTPUT_ACTIVATIONS:
        output_activation = str(items.pop())
    return Architecture(
        "lstm" if cell_class == "LSTM" else "gru",
        tuple(recurrent),
        tuple(items),
        output_activation,
        source_framework="keras",
        source_file=source_file,
    )


def _recurrent(class_name: str, name: str, cfg: Mapping[str, Any], weights: _Weights) -> Layer:
    if cfg.get("go_backwards"):
        raise ModelImportError(
            f"layer {name!r} has go_backwards=True: a stream cannot see future events, so "
            "a model that reads sequences backwards cannot be served one event at a time"
        )
    if cfg.get("return_state"):
        raise ModelImportError(f"layer {name!r} has return_state=True, which is not supported")
    for key, standard in (("activation", "tanh"), ("recurrent_activation", "sigmoid")):
        value = cfg.get(key, standard)
        if value != standard:
            raise ModelImportError(
                f"layer {name!r}: {key} {value!r} is not supported (only the standard {standard})"
            )
    units = int(cfg["units"])
    use_bias = bool(cfg.get("use_bias", True))
    group = weights.group_of(name, class_name)
    path = f"{group}/cell/vars"
    arrays = weights.arrays(path, name, 3 if use_bias else 2)
    kernel, recurrent_kernel = arrays[0], arrays[1]
    bias = arrays[2] if use_bias else None
    names = {
        "weight_ih": f"{path}/0 ({name} kernel)",
        "weight_hh": f"{path}/1 ({name} recurrent_kernel)",
        "bias_ih": f"{path}/2 ({name} bias)",
    }
    if kernel.ndim != 2 or recurrent_kernel.ndim != 2:
        raise ModelImportError(f"layer {name!r}: kernels must be 2-D")
    if class_name == "LSTM":
        # Keras kernels are [in, 4U] with gates i, f, c, o: the same order as PyTorch's rows.
        _expect(bias, [4 * units], names["bias_ih"])
        return LstmLayer(kernel.T, recurrent_kernel.T, bias, None, names=names)
    reset_after = bool(cfg.get("reset_after", True))
    # Keras stacks z, r, h; PyTorch (and the reference) r, z, n.
    bias_ih = bias_hh = None
    if bias is not None:
        if reset_after:
            _expect(bias, [2, 3 * units], names["bias_ih"])
            bias_ih, bias_hh = _zrh_to_rzn(bias[0], units), _zrh_to_rzn(bias[1], units)
        else:
            _expect(bias, [3 * units], names["bias_ih"])
            bias_ih = _zrh_to_rzn(bias, units)
    return GruLayer(
        _zrh_to_rzn(kernel.T, units),
        _zrh_to_rzn(recurrent_kernel.T, units),
        bias_ih,
        bias_hh,
        linear_before_reset=reset_after,
        names=names,
    )


def _zrh_to_rzn(array: np.ndarray, units: int) -> np.ndarray:
    if array.shape[0] != 3 * units:
        return array  # the architecture's shape check names it
    return np.ascontiguousarray(
        np.concatenate([array[units : 2 * units], array[:units], array[2 * units :]])
    )


def _expect(value: np.ndarray | None, shape: list[int], where: str) -> None:
    if value is not None and list(value.shape) != shape:
        raise ModelImportError(f"{where} has shape {list(value.shape)}; expected {shape}")


def _dense(name: str, cfg: Mapping[str, Any], weights: _Weights) -> list[HeadItem]:
    if cfg.get("lora_rank"):
        raise ModelImportError(f"layer {name!r}: a Dense with LoRA weights is not supported")
    activation = _activation(name, cfg)
    use_bias = bool(cfg.get("use_bias", True))
    path = f"{weights.group_of(name, 'Dense')}/vars"
    arrays = weights.arrays(path, name, 2 if use_bias else 1)
    kernel = arrays[0]
    if kernel.ndim != 2:
        raise ModelImportError(
            f"layer {name!r}: kernel has shape {list(kernel.shape)}; expected [in, units]"
        )
    bias = arrays[1] if use_bias else None
    return [Linear(np.ascontiguousarray(kernel.T), bias, name=name), activation]
