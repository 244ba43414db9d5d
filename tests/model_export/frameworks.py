"""Helpers for the framework fixtures: where they are, how to export and run them."""

from __future__ import annotations

import contextlib
import io
import json
import os
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import onnxruntime as ort

from model_export.cli import main

# make fixtures points this at freshly generated fixtures to check them before copying.
FIXTURES = Path(
    os.environ.get(
        "LSTM_FRAMEWORK_FIXTURES", Path(__file__).resolve().parents[1] / "fixtures" / "frameworks"
    )
)
SPECS = sorted(FIXTURES.glob("*.json"))


@dataclass
class Exported:
    code: int
    stdout: str
    stderr: str


@contextlib.contextmanager
def cwd(path: Path) -> Iterator[None]:
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def export(args: list[str], where: Path = FIXTURES) -> Exported:
    """Run ``lstm-export`` in-process from ``where`` (relative file names resolve there)."""
    out, err = io.StringIO(), io.StringIO()
    with cwd(where), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as exc:  # argparse errors
            code = int(exc.code or 0)
    return Exported(code, out.getvalue(), err.getvalue())


def spec(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def run_steps(model_path: Path, inputs: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Feed ``inputs [S, T, E]`` one step at a time from zero state, as the server does."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    state_inputs = [i for i in session.get_inputs() if i.name != "event"]
    s, t, _ = inputs.shape
    states = {i.name: np.zeros((s, int(i.shape[1])), np.float32) for i in state_inputs}
    names = ["output", *(f"{name}_out" for name in states)]
    outputs = []
    for k in range(t):
        got = session.run(names, {"event": inputs[:, k].astype(np.float32), **states})
        outputs.append(got[0])
        states = dict(zip(states, got[1:]))
    return np.stack(outputs, axis=1), states


def layer_major(final: np.ndarray) -> np.ndarray:
    """A framework's ``[L, S, width]`` final state as the step model's ``[S, L*width]`` rows."""
    layers, sessions, width = final.shape
    return final.transpose(1, 0, 2).reshape(sessions, layers * width)


def keras_variant(
    tmp_path: Path,
    source: str,
    change_config: Callable[[dict[str, Any]], None] | None = None,
    change_weights: Callable[[h5py.File], None] | None = None,
) -> str:
    """A copy of a .keras fixture with its config.json or model.weights.h5 edited."""
    with zipfile.ZipFile(FIXTURES / source) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    if change_config is not None:
        config = json.loads(files["config.json"])
        change_config(config)
        files["config.json"] = json.dumps(config).encode()
    if change_weights is not None:
        h5_path = tmp_path / "weights.h5"
        h5_path.write_bytes(files["model.weights.h5"])
        with h5py.File(h5_path, "r+") as h5:
            change_weights(h5)
        files["model.weights.h5"] = h5_path.read_bytes()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    (tmp_path / "variant.keras").write_bytes(buffer.getvalue())
    return "variant.keras"


def refused(args: list[str], where: Path, *needles: str) -> str:
    """Export into ``where/out.onnx`` (a file already there); check that nothing changed."""
    out = where / "out.onnx"
    out.write_bytes(b"the previous model")
    result = export([*args, "--out", str(out)], where=where)
    assert result.code == 2, result.stdout + result.stderr
    assert result.stderr.startswith("lstm-export: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr
    assert out.read_bytes() == b"the previous model"
    assert sorted(p.name for p in where.iterdir() if p.name.endswith(".tmp")) == []
    return result.stderr
