"""lstm-export says what a state_dict made it assume, and --check holds an export to the
framework's own recorded outputs: a wrong export is refused, a right one written."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model_export.cli import KERAS_RECIPE, TORCH_RECIPE

from .frameworks import FIXTURES, SPECS, export, keras_variant, refused, run_steps, spec

ROOT = Path(__file__).resolve().parents[2]
TORCH_2LAYER = "lstm_2layer_linear_sigmoid"  # encoder (2 LSTM layers) -> fc -> sigmoid
KERAS_LSTM = "keras_lstm_2layer_dense_sigmoid"  # 2 LSTM layers -> Dense(sigmoid)
GRU = "gru_1layer"


def recording(fixture: str) -> dict[str, np.ndarray]:
    """The fixture's golden numbers as --check reads them: time first, [T, B, ...]."""
    golden = dict(np.load(FIXTURES / f"{fixture}.npz"))
    arrays = {
        "inputs": golden.pop("inputs").transpose(1, 0, 2),
        "outputs": golden.pop("outputs").transpose(1, 0, 2),
    }
    return {**arrays, **golden}  # h_n, c_n are already [L, B, width], as torch returns them


def save(where: Path, arrays: dict[str, Any], name: str = "recorded.npz") -> str:
    np.savez(where / name, **arrays)
    return str(where / name)


def test_a_state_dict_exported_without_its_activation_is_refused_by_check(
    tmp_path: Path,
) -> None:
    # Found automatically: the rnn (encoder) and the head (fc); the sigmoid is not in the file.
    source = str(FIXTURES / f"{TORCH_2LAYER}.safetensors")
    silent = export(["--from-torch", source, "--out", str(tmp_path / "silent.onnx")])
    assert silent.code == 0  # without --check nothing can tell: the self-check passes
    outputs, _ = run_steps(
        tmp_path / "silent.onnx", np.load(FIXTURES / f"{TORCH_2LAYER}.npz")["inputs"]
    )
    diff = np.abs(outputs - np.load(FIXTURES / f"{TORCH_2LAYER}.npz")["outputs"])
    s, t, o = np.unravel_index(int(np.argmax(diff)), diff.shape)

    check = save(tmp_path, recording(TORCH_2LAYER))
    line = refused(["--from-torch", source, "--check", check], tmp_path, "--check recorded.npz")
    # The largest difference and where it is, in the recording's own [T, B, O] indices.
    assert f"by {diff.max():.3g} in outputs, step {t}, sequence {s}, output {o}" in line
    assert "output activation none" in line and "--output-activation" in line
    assert "out.onnx not written" in line


def test_the_right_export_of_the_same_state_dict_passes_check(tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    check = save(tmp_path, recording(TORCH_2LAYER))
    args = ["--from-torch", str(FIXTURES / f"{TORCH_2LAYER}.safetensors")]
    result = export([*args, "--output-activation", "sigmoid", "--check", check, "--out", str(out)])
    assert result.code == 0, result.stderr
    assert out.exists()
    found = re.search(
        r"--check recorded\.npz: 50 steps of 3 sequences \(outputs, h_n, c_n\): "
        r"max \|exported - recorded\| = (\S+) \(tolerance 1e-05 \+ 1e-05\*\|recorded\|\)",
        result.stdout,
    )
    assert found, result.stdout
    assert float(found.group(1)) < 1e-5
    assert "these match the outputs in recorded.npz" in result.stderr


@pytest.mark.parametrize("json_path", SPECS, ids=lambda p: p.stem)
def test_every_framework_fixture_passes_check(json_path: Path, tmp_path: Path) -> None:
    desc = spec(json_path)
    arrays = recording(json_path.stem)
    check = save(tmp_path, arrays)
    args = [str(a) for a in desc["export_args"]]
    result = export([*args, "--check", check, "--out", str(tmp_path / "m.onnx")])
    assert result.code == 0, result.stderr
    compared = ", ".join(k for k in ("outputs", "h_n", "c_n") if k in arrays)
    assert f"50 steps of 3 sequences ({compared})" in result.stdout


def test_a_keras_export_unlike_its_recording_is_refused(tmp_path: Path) -> None:
    def no_sigmoid(config: dict[str, Any]) -> None:
        for layer in config["config"]["layers"]:
            if layer["class_name"] == "Dense":
                layer["config"]["activation"] = "linear"

    variant = keras_variant(tmp_path, f"{KERAS_LSTM}.keras", change_config=no_sigmoid)
    check = save(tmp_path, recording(KERAS_LSTM))
    line = refused(["--from-keras", variant, "--check", check], tmp_path, "differs", "step ")
    assert "state_dict" not in line  # a .keras file records its activations: no such hint


def test_a_wrong_final_state_is_found_even_when_the_outputs_agree(tmp_path: Path) -> None:
    arrays = recording(TORCH_2LAYER)
    arrays["c_n"][1, 2, 5] += 0.25
    check = save(tmp_path, arrays)
    args = ["--from-torch", str(FIXTURES / f"{TORCH_2LAYER}.safetensors")]
    refused(
        [*args, "--output-activation", "sigmoid", "--check", check],
        tmp_path,
        "in c_n, layer 1, sequence 2, unit 5",
    )


def test_tolerance_is_absolute_plus_relative_and_set_by_the_flag(tmp_path: Path) -> None:
    arrays = recording(KERAS_LSTM)
    arrays["outputs"] = arrays["outputs"] * (1 + 5e-5)  # sigmoid outputs: |d| up to 5e-5
    check = save(tmp_path, arrays)
    source = str(FIXTURES / f"{KERAS_LSTM}.keras")
    refused(["--from-keras", source, "--check", check], tmp_path, "tolerance 1e-05")
    out = tmp_path / "m.onnx"
    result = export(
        ["--from-keras", source, "--check", check, "--tolerance", "1e-4", "--out", str(out)]
    )
    assert result.code == 0, result.stderr
    assert out.exists()


# -- what was assumed -------------------------------------------------------------------------


def test_a_state_dict_export_says_what_it_assumed(tmp_path: Path) -> None:
    source = str(FIXTURES / f"{TORCH_2LAYER}.safetensors")
    result = export(["--from-torch", source, "--out", str(tmp_path / "m.onnx")])
    assert result.code == 0
    block = result.stderr
    assert block.startswith("lstm-export: from the state_dict lstm_2layer_linear_sigmoid")
    assert "encoder: LSTM, 2 layers, hidden 16 (found" in block
    assert "fc linear(16->4) (found: the only Linear that takes 16 inputs)" in block
    assert "output activation  none (the default)" in block
    assert "never activations" in block and "--check recorded.npz" in block
    assert len(block.splitlines()) <= 10


def test_given_head_and_activations_are_said_as_given(tmp_path: Path) -> None:
    source = str(FIXTURES / "lstm_nobias_mlp.safetensors")
    args = ["--from-torch", source, "--rnn", "lstm", "--head", "head_seq.0,relu,head_seq.2"]
    result = export([*args, "--out", str(tmp_path / "m.onnx")])
    assert result.code == 0
    assert "lstm: LSTM, 1 layer, hidden 16 (--rnn)" in result.stderr
    assert "head_seq.0 linear(16->8), relu, head_seq.2 linear(8->3) (--head)" in result.stderr


def test_a_keras_export_says_what_it_read_and_warns_of_nothing(tmp_path: Path) -> None:
    source = str(FIXTURES / f"{KERAS_LSTM}.keras")
    result = export(["--from-keras", source, "--out", str(tmp_path / "m.onnx")])
    assert result.code == 0
    assert result.stderr == ""
    assert (
        f"read from {KERAS_LSTM}.keras: LSTM, 2 layers, hidden 12; head: head linear(12->3); "
        "output activation: sigmoid (activations as the file records them)"
    ) in result.stdout


# -- recordings that cannot be compared -------------------------------------------------------


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda a: a.pop(key)


def _set(key: str, value: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], None]:
    return lambda a: a.__setitem__(key, value(a))


BAD_RECORDINGS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("no outputs", _drop("outputs"), "no key outputs"),
    ("no inputs", _drop("inputs"), "no key inputs"),
    ("a misspelt key", _set("hn", lambda a: a.pop("h_n")), "unknown key(s) hn"),
    ("inputs of rank 2", _set("inputs", lambda a: a["inputs"][0]), "inputs has shape [3, 8]"),
    ("no steps", _set("inputs", lambda a: a["inputs"][:0]), "inputs has shape [0, 3, 8]"),
    (
        "fewer steps of outputs",
        _set("outputs", lambda a: a["outputs"][:10]),
        "outputs has shape [10, 3, 4] but inputs [50, 3, 8]",
    ),
    ("another event size", _set("inputs", lambda a: a["inputs"][:, :, :7]), "events of 8 values"),
    ("another output size", _set("outputs", lambda a: a["outputs"][:, :, :3]), "4 values per step"),
    ("h_n of one layer", _set("h_n", lambda a: a["h_n"][:1]), "h_n has shape [1, 3, 16]"),
    (
        "h_n batch first",
        _set("h_n", lambda a: a["h_n"].transpose(1, 0, 2)),
        "h_n has shape [3, 2, 16]",
    ),
    ("NaN in outputs", _set("outputs", lambda a: a["outputs"] * np.nan), "outputs contains NaN"),
    ("text inputs", _set("inputs", lambda a: np.full((50, 3, 8), "x")), "expected numbers"),
]


@pytest.mark.parametrize(
    ("change", "needle"), [b[1:] for b in BAD_RECORDINGS], ids=[b[0] for b in BAD_RECORDINGS]
)
def test_a_recording_that_does_not_fit_is_refused_in_one_line(
    change: Callable[[dict[str, Any]], None], needle: str, tmp_path: Path
) -> None:
    arrays = recording(TORCH_2LAYER)
    change(arrays)
    check = save(tmp_path, arrays)
    args = ["--from-torch", str(FIXTURES / f"{TORCH_2LAYER}.safetensors")]
    refused([*args, "--output-activation", "sigmoid", "--check", check], tmp_path, needle)


def test_a_final_cell_state_for_a_gru_is_refused(tmp_path: Path) -> None:
    arrays = recording(GRU)
    arrays["c_n"] = arrays["h_n"]
    check = save(tmp_path, arrays)
    args = ["--from-torch", str(FIXTURES / f"{GRU}.safetensors")]
    refused([*args, "--check", check], tmp_path, "c_n given, but this model has no cell state")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "no such file"),
        (b"not a zip archive", "not a readable .npz file"),
        ("npy", "one .npy array"),
    ],
    ids=["missing", "garbage", "npy"],
)
def test_a_file_that_is_no_recording_is_refused(
    content: bytes | str | None, needle: str, tmp_path: Path
) -> None:
    path = tmp_path / "recorded.npz"
    if content == "npy":
        with path.open("wb") as f:
            np.save(f, np.zeros((50, 3, 8), np.float32))
    elif isinstance(content, bytes):
        path.write_bytes(content)
    args = ["--from-keras", str(FIXTURES / f"{KERAS_LSTM}.keras"), "--check", str(path)]
    refused(args, tmp_path, needle)


def test_a_negative_tolerance_is_a_usage_error(tmp_path: Path) -> None:
    source = str(FIXTURES / f"{KERAS_LSTM}.keras")
    result = export(["--from-keras", source, "--tolerance", "-1", "--out", str(tmp_path / "m")])
    assert result.code == 2 and "--tolerance must be a number >= 0" in result.stderr


# -- how to record one ------------------------------------------------------------------------


def test_help_and_docs_show_how_to_record_the_file(tmp_path: Path) -> None:
    shown = export(["--help"], where=tmp_path)
    assert shown.code == 0
    assert "--check RECORDED" in shown.stdout
    doc = (ROOT / "docs" / "EXPORT.md").read_text()
    for line in (*TORCH_RECIPE, *KERAS_RECIPE):
        assert line in shown.stdout
        assert line in doc, f"docs/EXPORT.md lacks the recipe line {line!r}"
