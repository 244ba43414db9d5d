"""PyTorch state_dicts (``.safetensors`` or ``.pt``) of ``nn.LSTM``/``nn.GRU`` plus a head."""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Mapping

import numpy as np

from model_export.arch import (
    ACTIVATIONS,
    OUTPUT_ACTIVATIONS,
    Architecture,
    Cell,
    GruLayer,
    HeadItem,
    Layer,
    Linear,
    LstmLayer,
    ModelImportError,
    canonical_activation,
)

_RNN_KEY = re.compile(r"^(weight_ih|weight_hh|weight_hr|bias_ih|bias_hh)_l(\d+)(_reverse)?$")


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every tensor of the file as a numpy array; float16/bfloat16/float64 become float32."""
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise ModelImportError(f"{name}: no such file")
    if name.endswith(".safetensors"):
        raw = _load_safetensors(name)
    elif name.endswith((".pt", ".pth", ".bin")):
        raw = _load_torch(name)
    else:
        raise ModelImportError(
            f"{name}: expected a .safetensors or .pt file (a state_dict saved with "
            "safetensors.torch.save_file or torch.save)"
        )
    return {key: _to_float32(key, value) for key, value in raw.items()}


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except TypeError:
        # numpy has no bfloat16: safetensors.numpy cannot return BF16 tensors.
        return _load_safetensors_bf16(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelImportError(f"{path}: not a readable safetensors file ({exc})") from exc


def _load_safetensors_bf16(path: str) -> dict[str, np.ndarray]:
    """Read the documented layout directly: u64 header length, JSON header, raw data."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
    except (struct.error, ValueError) as exc:
        raise ModelImportError(f"{path}: not a readable safetensors file ({exc})") from exc
    body = data[8 + length :]
    dtypes = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "I64": "<i8", "I32": "<i4", "BF16": "<u2"}
    out: dict[str, np.ndarray] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in dtypes:
            raise ModelImportError(f"{path}: key {key} has dtype {info['dtype']}; expected floats")
        start, end = info["data_offsets"]
        array = np.frombuffer(body[start:end], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
        if info["dtype"] == "BF16":
            # bfloat16 is the top half of a float32.
            array = (array.astype(np.uint32) << 16).view(np.float32)
        out[key] = array
    return out


def _load_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ModelImportError(
            f"{path}: reading a .pt file needs PyTorch, which is not installed; install torch, "
            "or save the state_dict with safetensors (safetensors.torch.save_file(model."
            "state_dict(), 'model.safetensors')) and pass that file"
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds (UnpicklingError, RuntimeError, ...)
        raise ModelImportError(
            f"{path}: torch.load(weights_only=True) could not read it ({exc})"
        ) from exc
    if not isinstance(state, Mapping):
        raise ModelImportError(
            f"{path}: holds a {type(state).__name__}, not a state_dict; save model.state_dict()"
        )
    out = {}
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise ModelImportError(f"{path}: key {key} is not a tensor")
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float32)
        out[str(key)] = tensor.detach().cpu().numpy()
    return out


def _to_float32(key: str, value: np.ndarray) -> np.ndarray:
    # ml_dtypes' bfloat16 (which safetensors returns once it is registered) is not a
    # numpy floating subtype, hence the name check.
    if np.issubdtype(value.dtype, np.floating) or value.dtype.name == "bfloat16":
        value = np.ascontiguousarray(value, dtype=np.float32)
        if not np.all(np.isfinite(value)):
            raise ModelImportError(f"key {key} contains NaN or Inf")
    return value


def rnn_prefixes(state: Mapping[str, np.ndarray]) -> list[str]:
    """Module prefixes that have a ``weight_ih_l0`` (``""`` for a bare nn.LSTM/nn.GRU)."""
    return sorted(k[: -len("weight_ih_l0")].rstrip(".") for k in state if _is_first_layer(k))


def _is_first_layer(key: str) -> bool:
    return key == "weight_ih_l0" or key.endswith(".weight_ih_l0")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def import_state_dict(
    state: Mapping[str, np.ndarray],
    rnn: str | None = None,
    head: str | None = None,
    output_activation: str = "none",
    source_file: str = "",
) -> Architecture:
    """The ``Architecture`` of a state_dict; refuses anything it cannot serve exactly."""
    prefix = _choose_rnn(state, rnn)
    layers, used = _recurrent_layers(state, prefix)
    width = layers[0].width
    if head is None:
        items, head_keys = _auto_head(state, used, width)
    else:
        items, head_keys = _parse_head(state, head)
    used |= head_keys
    extra = sorted(k for k in state if k not in used)
    if extra:
        hint = (
            " (name the head's Linear layers and activations in order with --head, e.g. "
            "--head fc or --head head.0,relu,head.2)"
            if head is None
            else " (--head must list every Linear layer of the head)"
        )
        raise ModelImportError(f"extra key(s) not used by the model: {', '.join(extra)}{hint}")
    if output_activation not in OUTPUT_ACTIVATIONS:
        raise ModelImportError(
            f"unsupported output activation {output_activation!r}; "
            f"supported: {', '.join(OUTPUT_ACTIVATIONS)}"
        )
    cell: Cell = "lstm" if isinstance(layers[0], LstmLayer) else "gru"
    return Architecture(
        cell,
        tuple(layers),
        tuple(items),
        output_activation,
        source_framework="torch",
        source_file=source_file,
    )


def _choose_rnn(state: Mapping[str, np.ndarray], rnn: str | None) -> str:
    prefixes = rnn_prefixes(state)
    if rnn is not None:
        prefix = rnn.rstrip(".")
        if _join(prefix, "weight_ih_l0") not in state:
            found = ", ".join(repr(p) for p in prefixes) or "none"
            raise ModelImportError(
                f"--rnn {rnn}: no key {_join(prefix, 'weight_ih_l0')} in the file "
                f"(recurrent modules found: {found})"
            )
    elif len(prefixes) == 1:
        prefix = prefixes[0]
    elif not prefixes:
        raise ModelImportError(
            "no recurrent layer: no key ends in weight_ih_l0 (expected an nn.LSTM or nn.GRU)"
        )
    else:
        raise ModelImportError(
            f"several recurrent modules ({', '.join(prefixes)}); name one with --rnn"
        )
    reverse = sorted(key for key, m in _module_keys(state, prefix).items() if m.group(3))
    if reverse:
        raise ModelImportError(
            f"bidirectional recurrent layer ({reverse[0]}): a stream cannot see future "
            "events, so a bidirectional model cannot be served one event at a time"
        )
    return prefix


def _module_keys(state: Mapping[str, np.ndarray], prefix: str) -> dict[str, re.Match[str]]:
    """The keys of the recurrent module itself (``weight_ih_l0`` ...), with their parts."""
    out = {}
    for key in state:
        if prefix and not key.startswith(prefix + "."):
            continue
        m = _RNN_KEY.match(key[len(prefix) + 1 :] if prefix else key)
        if m:
            out[key] = m
    return out


def _recurrent_layers(state: Mapping[str, np.ndarray], prefix: str) -> tuple[list[Layer], set[str]]:
    own = {(m.group(1), int(m.group(2))): key for key, m in _module_keys(state, prefix).items()}
    num_layers = 1 + max(index for _, index in own)
    if ("weight_hh", 0) not in own:
        raise ModelImportError(f"missing key {_join(prefix, 'weight_hh_l0')}")
    first_hh = state[own[("weight_hh", 0)]]
    projected = ("weight_hr", 0) in own
    biased = ("bias_ih", 0) in own or ("bias_hh", 0) in own
    rows, cols = first_hh.shape if first_hh.ndim == 2 else (0, 0)
    cell: Cell
    # With a projection weight_hh is [4H, P]; otherwise its rows say which cell it is.
    if projected or (cols and rows == 4 * cols):
        cell = "lstm"
    elif cols and rows == 3 * cols:
        cell = "gru"
    else:
        raise ModelImportError(
            f"{_join(prefix, 'weight_hh_l0')} has shape {list(first_hh.shape)}: neither an "
            "nn.LSTM ([4H, H]) nor an nn.GRU ([3H, H]); nn.RNN and other cells are not supported"
        )
    names = ["weight_ih", "weight_hh"]
    if biased:
        names += ["bias_ih", "bias_hh"]
    if projected:
        names.append("weight_hr")
    layers: list[Layer] = []
    used: set[str] = set()
    for k in range(num_layers):
        keys = {name: _join(prefix, f"{name}_l{k}") for name in names}
        missing = [key for key in keys.values() if key not in state]
        if missing:
            raise ModelImportError(
                f"missing key(s) {', '.join(missing)} (an {cell.upper()} of {num_layers} "
                f"layer(s){' with bias' if biased else ''}{' and proj_size' if projected else ''} "
                f"has {', '.join(f'{n}_l{k}' for n in names)})"
            )
        arrays = {name: state[key] for name, key in keys.items()}
        used |= set(keys.values())
        layer: Layer
        if cell == "lstm":
            layer = LstmLayer(
                arrays["weight_ih"],
                arrays["weight_hh"],
                arrays.get("bias_ih"),
                arrays.get("bias_hh"),
                arrays.get("weight_hr"),
                names=keys,
            )
        else:
            layer = GruLayer(
                arrays["weight_ih"],
                arrays["weight_hh"],
                arrays.get("bias_ih"),
                arrays.get("bias_hh"),
                linear_before_reset=True,
                names=keys,
            )
        layers.append(layer)
    for key in own.values():
        if key not in used:
            # A key of this module that no layer took, e.g. bias_ih_l1 in a bias=False LSTM.
            raise ModelImportError(
                f"extra key {key}: it does not belong to an {cell.upper()} of {num_layers} "
                f"layer(s){'' if biased else ' without bias'}"
                f"{' with proj_size' if projected else ''}"
            )
    return layers, used


def _linear_prefixes(state: Mapping[str, np.ndarray], exclude: set[str]) -> list[str]:
    return sorted(
        k[: -len(".weight")]
        for k, v in state.items()
        if k.endswith(".weight") and k not in exclude and v.ndim == 2
    )


def _linear(state: Mapping[str, np.ndarray], prefix: str) -> tuple[Linear, set[str]]:
    weight = state[f"{prefix}.weight"]
    if weight.ndim != 2:
        raise ModelImportError(
            f"{prefix}.weight has shape {list(weight.shape)}: --head takes nn.Linear layers "
            "([out, in] weights) and activations only"
        )
    bias = state.get(f"{prefix}.bias")
    keys = {f"{prefix}.weight"} | ({f"{prefix}.bias"} if bias is not None else set())
    return Linear(weight, bias, name=prefix), keys


def _auto_head(
    state: Mapping[str, np.ndarray], used: set[str], width: int
) -> tuple[list[HeadItem], set[str]]:
    fits = [p for p in _linear_prefixes(state, used) if state[f"{p}.weight"].shape[1] == width]
    if len(fits) != 1:
        return [], set()
    linear, keys = _linear(state, fits[0])
    return [linear], keys


def _parse_head(state: Mapping[str, np.ndarray], spec: str) -> tuple[list[HeadItem], set[str]]:
    items: list[HeadItem] = []
    keys: set[str] = set()
    for raw in spec.split(","):
        token = raw.strip()
        if not token:
            raise ModelImportError(f"--head {spec!r}: an empty item")
        if f"{token}.weight" in state:
            linear, more = _linear(state, token)
            if more & keys:
                raise ModelImportError(f"--head {spec!r}: {token} is listed twice")
            items.append(linear)
            keys |= more
            continue
        activation = canonical_activation(token)
        if activation is None:
            known = sorted({k.rsplit(".", 1)[0] for k in state if k.endswith(".weight")})
            raise ModelImportError(
                f"--head {spec!r}: {token!r} is neither a Linear in the file (no key "
                f"{token}.weight; modules with weights: {', '.join(known) or 'none'}) nor a "
                f"supported activation ({', '.join(ACTIVATIONS)}): unsupported activation "
                "or unknown layer"
            )
        if activation != "identity":
            items.append(activation)
    return items, keys
