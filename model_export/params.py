"""Parameter files: ``.npz`` archives keyed by the seed's attribute names."""

from __future__ import annotations

import hashlib
import os
import zipfile

import numpy as np

from model_export.lstm import PARAMETER_NAMES, Parameters


class ParameterFileError(ValueError):
    """A parameter file that cannot be used; the message names the key at fault."""


def save_parameters(path: str | os.PathLike[str], parameters: Parameters) -> None:
    """Write every attribute as float64 (a scalar bias stays a 0-d array)."""
    arrays = {
        name: np.asarray(getattr(parameters, name), dtype=np.float64) for name in PARAMETER_NAMES
    }
    with open(path, "wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]


def load_parameters(path: str | os.PathLike[str]) -> Parameters:
    """Read and check a parameter file; sizes come from ``event_forget_weights``."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ParameterFileError(f"{path}: not a readable .npz parameter file ({exc})") from exc
    return parameters_from_arrays(arrays, source=str(path))


def parameters_from_arrays(arrays: dict[str, np.ndarray], source: str = "parameters") -> Parameters:
    """Build ``Parameters`` from named arrays, rejecting anything the seed form does not allow."""
    missing = [k for k in PARAMETER_NAMES if k not in arrays]
    if missing:
        raise ParameterFileError(f"{source}: missing key(s) {', '.join(missing)}")
    unknown = sorted(k for k in arrays if k not in PARAMETER_NAMES)
    if unknown:
        raise ParameterFileError(
            f"{source}: unknown key(s) {', '.join(unknown)}; expected exactly "
            f"{', '.join(PARAMETER_NAMES)}"
        )
    for key in PARAMETER_NAMES:
        value = arrays[key]
        if not np.issubdtype(value.dtype, np.floating):
            raise ParameterFileError(
                f"{source}: key {key} has dtype {value.dtype}; expected a float array"
            )
        if not np.all(np.isfinite(value)):
            raise ParameterFileError(
                f"{source}: key {key} contains NaN or Inf; expected finite values"
            )
    reference = arrays["event_forget_weights"]
    if reference.ndim != 2 or 0 in reference.shape:
        raise ParameterFileError(
            f"{source}: key event_forget_weights has shape {reference.shape}; "
            "expected a non-empty [hidden_size, event_size] matrix"
        )
    hidden_size, event_size = (int(n) for n in reference.shape)
    parameters = Parameters(event_size, hidden_size)
    for key, shape in parameters.expected_shapes().items():
        value = arrays[key]
        allowed = [shape, ()] if key.endswith("_bias") else [shape]
        if value.shape not in allowed:
            wanted = " or ".join(str(list(s)) if s else "a scalar" for s in allowed)
            raise ParameterFileError(
                f"{source}: key {key} has shape {list(value.shape)}; expected {wanted} "
                f"(event_size={event_size}, hidden_size={hidden_size})"
            )
        setattr(parameters, key, value.astype(np.float64) if value.ndim else float(value))
    return parameters


def fingerprint(parameters: Parameters) -> str:
    """SHA-256 over names, shapes and float32 values: identifies a model's weights."""
    digest = hashlib.sha256()
    for name in PARAMETER_NAMES:
        value = np.ascontiguousarray(getattr(parameters, name), dtype="<f4")
        digest.update(name.encode())
        digest.update(repr(value.shape).encode())
        digest.update(value.tobytes())
    return digest.hexdigest()
