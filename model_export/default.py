"""The embedded default model: deterministic parameters, built on demand, nothing downloaded."""

from __future__ import annotations

import onnx

from model_export.lstm import Parameters
from model_export.onnx_export import build_model

DEFAULT_EVENT_SIZE = 32
DEFAULT_HIDDEN_SIZE = 64
DEFAULT_SEED = 20261128


def default_parameters() -> Parameters:
    """The parameters ``lstm-serve`` uses when no ``--model`` is given."""
    return Parameters.random(DEFAULT_EVENT_SIZE, DEFAULT_HIDDEN_SIZE, seed=DEFAULT_SEED)


def default_model() -> onnx.ModelProto:
    """The default model as an in-memory ONNX graph."""
    return build_model(default_parameters(), source_framework="random")
