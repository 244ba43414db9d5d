"""What lstm-export refuses: exit 2, one line naming the problem, no file written."""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import onnx
import pytest
from safetensors.numpy import load_file, save_file

from .frameworks import FIXTURES, export, keras_variant, refused

TORCH_MLP = "lstm_nobias_mlp.safetensors"
TORCH_2LAYER = "lstm_2layer_linear_sigmoid.safetensors"
KERAS_LSTM = "keras_lstm_2layer_dense_sigmoid.keras"


def torch_variant(
    tmp_path: Path, source: str, change: Callable[[dict[str, np.ndarray]], None]
) -> str:
    state = load_file(str(FIXTURES / source))
    change(state)
    save_file(state, str(tmp_path / "variant.safetensors"))
    return "variant.safetensors"


def keras_layer(config: dict[str, Any], name: str) -> dict[str, Any]:
    return next(
        layer["config"] for layer in config["config"]["layers"] if layer["config"]["name"] == name
    )


# -- PyTorch ----------------------------------------------------------------------------------


def test_bidirectional_torch_is_refused(tmp_path: Path) -> None:
    shutil.copy(FIXTURES / "lstm_bidirectional.safetensors", tmp_path)
    refused(
        ["--from-torch", "lstm_bidirectional.safetensors"],
        tmp_path,
        "bidirectional",
        "_reverse",
    )


def test_missing_key_is_named(tmp_path: Path) -> None:
    name = torch_variant(tmp_path, TORCH_2LAYER, lambda s: s.pop("encoder.bias_hh_l1"))
    refused(["--from-torch", name, "--rnn", "encoder", "--head", "fc"], tmp_path, "missing key")
    msg = refused(["--from-torch", name, "--rnn", "encoder", "--head", "fc"], tmp_path)
    assert "encoder.bias_hh_l1" in msg


def test_missing_middle_layer_is_named(tmp_path: Path) -> None:
    def drop_layer_1(state: dict[str, np.ndarray]) -> None:
        for key in [k for k in state if k.endswith("_l1")]:
            del state[key]
        state["encoder.weight_hh_l2"] = state["encoder.weight_hh_l0"][:, :16]

    name = torch_variant(tmp_path, TORCH_2LAYER, drop_layer_1)
    refused(["--from-torch", name, "--head", "fc"], tmp_path, "missing key", "weight_ih_l1")


def test_extra_key_is_named(tmp_path: Path) -> None:
    def add(state: dict[str, np.ndarray]) -> None:
        state["norm.running_mean"] = np.zeros(16, np.float32)

    name = torch_variant(tmp_path, TORCH_2LAYER, add)
    refused(
        ["--from-torch", name, "--rnn", "encoder", "--head", "fc"],
        tmp_path,
        "extra key",
        "norm.running_mean",
    )


def test_extra_rnn_key_of_a_biasless_lstm_is_named(tmp_path: Path) -> None:
    def add(state: dict[str, np.ndarray]) -> None:
        state["lstm.bias_ih_l0"] = np.zeros(64, np.float32)

    name = torch_variant(tmp_path, TORCH_MLP, add)
    refused(
        ["--from-torch", name, "--head", "head_seq.0,relu,head_seq.2"],
        tmp_path,
        "lstm.bias_hh_l0",
    )


def test_head_left_out_is_refused_with_a_hint(tmp_path: Path) -> None:
    # One Linear fits the top layer (head_seq.0); head_seq.2 would be silently dropped.
    shutil.copy(FIXTURES / TORCH_MLP, tmp_path)
    refused(["--from-torch", TORCH_MLP], tmp_path, "extra key", "head_seq.2.weight", "--head")


def test_unsupported_activation_is_named(tmp_path: Path) -> None:
    shutil.copy(FIXTURES / TORCH_MLP, tmp_path)
    refused(
        ["--from-torch", TORCH_MLP, "--head", "head_seq.0,leaky_relu,head_seq.2"],
        tmp_path,
        "'leaky_relu'",
        "unsupported activation",
    )


def test_head_that_does_not_chain_is_refused(tmp_path: Path) -> None:
    shutil.copy(FIXTURES / TORCH_MLP, tmp_path)
    refused(
        ["--from-torch", TORCH_MLP, "--head", "head_seq.2,relu,head_seq.0"],
        tmp_path,
        "shapes do not chain",
        "head_seq.2",
    )


def test_layers_that_do_not_chain_are_refused(tmp_path: Path) -> None:
    def widen(state: dict[str, np.ndarray]) -> None:
        state["encoder.weight_ih_l1"] = np.zeros((64, 8), np.float32)

    name = torch_variant(tmp_path, TORCH_2LAYER, widen)
    refused(
        ["--from-torch", name, "--head", "fc"],
        tmp_path,
        "shapes do not chain",
        "encoder.weight_ih_l1",
        "[64, 16]",
    )


def test_unknown_rnn_prefix_lists_the_modules(tmp_path: Path) -> None:
    shutil.copy(FIXTURES / TORCH_2LAYER, tmp_path)
    refused(
        ["--from-torch", TORCH_2LAYER, "--rnn", "lstm"], tmp_path, "lstm.weight_ih_l0", "encoder"
    )


def test_vanilla_rnn_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    state = {
        "rnn.weight_ih_l0": rng.standard_normal((5, 3)).astype(np.float32),
        "rnn.weight_hh_l0": rng.standard_normal((5, 5)).astype(np.float32),
    }
    save_file(state, str(tmp_path / "rnn.safetensors"))
    refused(["--from-torch", "rnn.safetensors"], tmp_path, "nn.RNN")


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed")
def test_pt_without_torch_says_what_to_do(tmp_path: Path) -> None:
    shutil.copy(FIXTURES / "lstm_2layer_linear_sigmoid.pt", tmp_path)
    refused(
        ["--from-torch", "lstm_2layer_linear_sigmoid.pt", "--rnn", "encoder"],
        tmp_path,
        "install torch",
        "safetensors",
    )


def test_options_of_another_source_are_refused(tmp_path: Path) -> None:
    result = export(["--from-keras", KERAS_LSTM, "--head", "fc", "--out", str(tmp_path / "m")])
    assert result.code == 2 and "--head go(es) with --from-torch only" in result.stderr
    result = export(["--from-torch", TORCH_MLP, "--op", "native", "--out", str(tmp_path / "m")])
    assert result.code == 2 and "--op native applies to --params/--random only" in result.stderr
    assert not (tmp_path / "m").exists()


def test_abbreviated_options_are_not_accepted(tmp_path: Path) -> None:
    result = export(["--from-t", TORCH_MLP, "--out", str(tmp_path / "m.onnx")])
    assert result.code == 2 and "one of the arguments --from-torch" in result.stderr
    assert not (tmp_path / "m.onnx").exists()


# -- Keras ------------------------------------------------------------------------------------


def test_go_backwards_is_refused(tmp_path: Path) -> None:
    def backwards(config: dict[str, Any]) -> None:
        keras_layer(config, "lstm_1")["go_backwards"] = True

    name = keras_variant(tmp_path, KERAS_LSTM, backwards)
    refused(["--from-keras", name], tmp_path, "'lstm_1'", "go_backwards")


def test_keras_bidirectional_is_refused(tmp_path: Path) -> None:
    def wrap(config: dict[str, Any]) -> None:
        layer = config["config"]["layers"][1]
        layer["class_name"] = "Bidirectional"
        layer["config"] = {"name": "bidirectional", "layer": dict(layer)}

    name = keras_variant(tmp_path, KERAS_LSTM, wrap)
    refused(["--from-keras", name], tmp_path, "Bidirectional")


def test_unsupported_keras_layer_is_named(tmp_path: Path) -> None:
    def conv(config: dict[str, Any]) -> None:
        config["config"]["layers"][3]["class_name"] = "Conv1D"

    name = keras_variant(tmp_path, KERAS_LSTM, conv)
    refused(["--from-keras", name], tmp_path, "unsupported layer", "Conv1D")


def test_unsupported_keras_activation_is_named(tmp_path: Path) -> None:
    def leaky(config: dict[str, Any]) -> None:
        keras_layer(config, "head")["activation"] = "leaky_relu"

    name = keras_variant(tmp_path, KERAS_LSTM, leaky)
    refused(["--from-keras", name], tmp_path, "'head'", "'leaky_relu'")


def test_non_standard_recurrent_activation_is_named(tmp_path: Path) -> None:
    def hard(config: dict[str, Any]) -> None:
        keras_layer(config, "lstm_0")["recurrent_activation"] = "hard_sigmoid"

    name = keras_variant(tmp_path, KERAS_LSTM, hard)
    refused(["--from-keras", name], tmp_path, "'lstm_0'", "recurrent_activation", "hard_sigmoid")


def test_intermediate_layer_without_sequences_is_refused(tmp_path: Path) -> None:
    def last_only(config: dict[str, Any]) -> None:
        keras_layer(config, "lstm_0")["return_sequences"] = False

    name = keras_variant(tmp_path, KERAS_LSTM, last_only)
    refused(["--from-keras", name], tmp_path, "return_sequences")


def test_missing_keras_weight_is_named(tmp_path: Path) -> None:
    def drop(h5: h5py.File) -> None:
        del h5["layers/lstm_1/cell/vars/2"]

    name = keras_variant(tmp_path, KERAS_LSTM, change_weights=drop)
    refused(["--from-keras", name], tmp_path, "'lstm_1'", "layers/lstm_1/cell/vars")


def test_keras_weights_that_do_not_chain_are_refused(tmp_path: Path) -> None:
    def shrink(h5: h5py.File) -> None:
        del h5["layers/dense/vars/0"]
        h5["layers/dense/vars/0"] = np.zeros((7, 3), np.float32)

    name = keras_variant(tmp_path, KERAS_LSTM, change_weights=shrink)
    refused(["--from-keras", name], tmp_path, "shapes do not chain", "head")


def test_weights_file_alone_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    refused(["--from-keras", "model.weights.h5"], tmp_path, "model.save('model.keras')")


# -- the check --------------------------------------------------------------------------------


def test_failed_check_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    head = ["--head", "head_seq.0,relu,head_seq.2"]
    result = export(["--from-torch", TORCH_MLP, *head, "--tolerance", "1e-12", "--out", str(out)])
    assert result.code == 1
    assert "validation FAILED" in result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_written_file_is_readable_by_others(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    result = export(["--from-keras", KERAS_LSTM, "--out", str(out)])
    assert result.code == 0
    umask = os.umask(0)
    os.umask(umask)
    # Written through a temporary file, yet with the mode a plain open() would give it.
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
    onnx.checker.check_model(onnx.load(out))
