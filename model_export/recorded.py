"""``--check recorded.npz``: the exported step model against a framework's own recorded outputs."""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass

import numpy as np
import onnx
from numpy.typing import NDArray

F64 = NDArray[np.float64]

STATE_KEYS = {"h_n": "hidden", "c_n": "cell"}
"""Recorded final states (as ``nn.LSTM``/``nn.GRU`` return them) and the step model's states."""
KEYS = ("inputs", "outputs", *STATE_KEYS)
FORMAT = (
    "inputs [T, B, E], outputs [T, B, O], optionally h_n and c_n [L, B, width] "
    "(T steps, B sequences)"
)


class RecordingError(ValueError):
    """A recorded file that cannot be compared; the message names the problem."""


@dataclass(frozen=True)
class Recording:
    """What a framework computed: ``outputs[t]`` after ``inputs[:t + 1]``, from zero state."""

    name: str
    inputs: F64
    outputs: F64
    finals: dict[str, F64]
    """``h_n``/``c_n`` when recorded, each ``[L, B, width]``."""

    @property
    def steps(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def sequences(self) -> int:
        return int(self.inputs.shape[1])


@dataclass(frozen=True)
class Comparison:
    """The largest difference between the export and the recording, and whether it is in bounds."""

    passed: bool
    largest: float
    where: str
    """E.g. ``outputs, step 0, sequence 2, output 1``: the worst beyond tolerance, if any."""
    exported: float
    recorded: float
    compared: tuple[str, ...]


def load_recording(path: str) -> Recording:
    """Read and check the file on its own (keys, ranks, matching T and B, finite numbers)."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise RecordingError(f"--check {path}: no such file")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise RecordingError(f"--check {name}: not a readable .npz file ({exc})") from exc
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise RecordingError(f"--check {name}: one .npy array; expected an .npz of {FORMAT}")
    try:
        with data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        # An object array (allow_pickle=False) or a damaged member.
        raise RecordingError(f"--check {name}: not a readable .npz file ({exc})") from exc
    unknown = sorted(set(arrays) - set(KEYS))
    if unknown:
        raise RecordingError(
            f"--check {name}: unknown key(s) {', '.join(unknown)}; expected {FORMAT}"
        )
    missing = [key for key in ("inputs", "outputs") if key not in arrays]
    if missing:
        raise RecordingError(f"--check {name}: no key {' or '.join(missing)}; expected {FORMAT}")
    values = {key: _numbers(name, key, value) for key, value in arrays.items()}
    inputs, outputs = values["inputs"], values["outputs"]
    for key, letters in (("inputs", "T, B, E"), ("outputs", "T, B, O")):
        if values[key].ndim != 3 or 0 in values[key].shape:
            raise RecordingError(
                f"--check {name}: {key} has shape {list(values[key].shape)}; expected "
                f"[{letters}] with T steps and B sequences (time first, as nn.LSTM's default)"
            )
    if outputs.shape[:2] != inputs.shape[:2]:
        raise RecordingError(
            f"--check {name}: outputs has shape {list(outputs.shape)} but inputs "
            f"{list(inputs.shape)}: both need the same T steps and B sequences first"
        )
    finals = {key: values[key] for key in STATE_KEYS if key in values}
    for key, value in finals.items():
        if value.ndim != 3 or value.shape[1] != inputs.shape[1]:
            raise RecordingError(
                f"--check {name}: {key} has shape {list(value.shape)}; expected "
                f"[L, {inputs.shape[1]}, width] (layers, the B sequences of inputs, state width)"
            )
    return Recording(name, inputs, outputs, finals)


def _numbers(name: str, key: str, value: np.ndarray) -> F64:
    if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
        raise RecordingError(f"--check {name}: {key} has dtype {value.dtype}; expected numbers")
    out = value.astype(np.float64)
    if not np.all(np.isfinite(out)):
        raise RecordingError(f"--check {name}: {key} contains NaN or Inf")
    return out


def _fits(recording: Recording, model: onnx.ModelProto, layers: int) -> dict[str, int]:
    """The model's state widths, once the recording's sizes are known to fit it."""
    widths = {v.name: int(v.type.tensor_type.shape.dim[1].dim_value) for v in model.graph.input}
    out_size = int(
        next(v for v in model.graph.output if v.name == "output")
        .type.tensor_type.shape.dim[1]
        .dim_value
    )
    event_size = widths.pop("event")
    name = recording.name
    if recording.inputs.shape[2] != event_size:
        raise RecordingError(
            f"--check {name}: inputs has shape {list(recording.inputs.shape)}; this model takes "
            f"events of {event_size} values ([T, B, {event_size}])"
        )
    if recording.outputs.shape[2] != out_size:
        raise RecordingError(
            f"--check {name}: outputs has shape {list(recording.outputs.shape)}; this model gives "
            f"{out_size} values per step ([T, B, {out_size}])"
        )
    for key, value in recording.finals.items():
        state = STATE_KEYS[key]
        if state not in widths:
            raise RecordingError(
                f"--check {name}: {key} given, but this model has no {state} state "
                f"(its states: {', '.join(widths)})"
            )
        width, rest = divmod(widths[state], layers)
        expected = [layers, recording.sequences, width]
        if rest or list(value.shape) != expected:
            raise RecordingError(
                f"--check {name}: {key} has shape {list(value.shape)}; this model's {state} "
                f"state is {expected} (layers, sequences, width)"
            )
    return widths


def compare(
    model: onnx.ModelProto, recording: Recording, layers: int, tolerance: float
) -> Comparison:
    """Run ``model`` over the recorded steps from zero state; ``|d| <= tol + tol*|recorded|``.

    Raises ``RecordingError`` when the recording's sizes do not fit the model.
    """
    import onnxruntime as ort

    widths = _fits(recording, model, layers)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    batch = recording.sequences
    states = {name: np.zeros((batch, width), np.float32) for name, width in widths.items()}
    names = ["output", *(f"{name}_out" for name in states)]
    outputs = []
    for t in range(recording.steps):
        got = session.run(names, {"event": recording.inputs[t].astype(np.float32), **states})
        outputs.append(np.asarray(got[0], np.float64))
        states = dict(zip(states, (np.asarray(v) for v in got[1:])))
    pairs: list[tuple[str, F64, F64]] = [("outputs", np.stack(outputs), recording.outputs)]
    for key, value in recording.finals.items():
        # The step model's state rows are layer-major: [B, L*width] -> [L, B, width].
        final = states[STATE_KEYS[key]].astype(np.float64)
        pairs.append((key, final.reshape(batch, layers, -1).transpose(1, 0, 2), value))
    return _worst(pairs, tolerance)


def _worst(pairs: list[tuple[str, F64, F64]], tolerance: float) -> Comparison:
    best: tuple[bool, float, str, int, F64, F64] | None = None
    passed = True
    for key, exported, recorded in pairs:
        diff = np.abs(exported - recorded)
        diff = np.where(np.isfinite(diff), diff, np.inf)
        beyond = diff > tolerance + tolerance * np.abs(recorded)
        passed = passed and not bool(beyond.any())
        # Report the largest difference, among the values beyond tolerance when there are any.
        ranked = np.where(beyond, diff, -1.0) if beyond.any() else diff
        index = int(np.argmax(ranked))
        candidate = (bool(beyond.any()), float(diff.flat[index]), key, index, exported, recorded)
        if best is None or candidate[:2] > best[:2]:
            best = candidate
    assert best is not None
    _, largest, key, index, exported, recorded = best
    position = np.unravel_index(index, recorded.shape)
    return Comparison(
        passed,
        largest,
        _where(key, tuple(int(i) for i in position)),
        float(exported.flat[index]),
        float(recorded.flat[index]),
        tuple(key for key, _, _ in pairs),
    )


def _where(key: str, position: tuple[int, ...]) -> str:
    a, b, c = position
    if key == "outputs":
        return f"outputs, step {a}, sequence {b}, output {c}"
    return f"{key}, layer {a}, sequence {b}, unit {c}"
