"""Helpers for the model-version tests: repositories on disk and the policies' reference."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx

from model_export import lstm
from model_export.onnx_export import build_model

E, H = 4, 6
"""Small models: the tests are about versions, not sizes."""


def parameters(version: int, hidden: int = H, event: int = E) -> lstm.Parameters:
    """Version ``version``'s weights: random, one seed per version."""
    return lstm.Parameters.random(event, hidden, seed=100 + version)


def config(model: str, policy: str = "drain", **extra: str) -> str:
    """A config.pbtxt in Triton's text format, with our settings in ``parameters``."""
    lines = [f'name: "{model}"', "version_policy: { latest: { num_versions: 1 } }"]
    for key, value in {"retire_policy": policy, **extra}.items():
        lines.append(f'parameters: {{ key: "{key}" value: {{ string_value: "{value}" }} }}')
    return "\n".join(lines) + "\n"


def add_version(
    repo: Path, model: str, version: int, params: lstm.Parameters | None = None
) -> lstm.Parameters:
    """Put a version in the repository at once (written aside, then renamed into place)."""
    params = params or parameters(version)
    staging = repo / f".{model}-{version}"
    staging.mkdir(parents=True, exist_ok=True)
    onnx.save_model(build_model(params), staging / "model.onnx")
    (repo / model).mkdir(parents=True, exist_ok=True)
    os.replace(staging, repo / model / str(version))
    return params


def add_file(repo: Path, model: str, version: int, data: bytes) -> None:
    """A version folder holding ``data`` as its model file (e.g. a corrupt one)."""
    staging = repo / f".{model}-{version}"
    staging.mkdir(parents=True, exist_ok=True)
    (staging / "model.onnx").write_bytes(data)
    (repo / model).mkdir(parents=True, exist_ok=True)
    os.replace(staging, repo / model / str(version))


def add_stacked(repo: Path, model: str, version: int, layers: int, output: int) -> None:
    """A version that is a stacked LSTM with a linear head to ``output`` values."""
    from model_export.arch import random_architecture
    from model_export.graph import build_step_model

    arch = random_architecture("lstm", E, H, layers=layers, head=(output,), seed=version)
    add_file(repo, model, version, build_step_model(arch).SerializeToString())


def remove_version(repo: Path, model: str, version: int) -> None:
    shutil.rmtree(repo / model / str(version))


def repository(root: Path, model: str, policy: str = "drain", **extra: str) -> Path:
    """A repository of one model with version 1 and a config."""
    (root / model).mkdir(parents=True)
    (root / model / "config.pbtxt").write_text(config(model, policy, **extra))
    add_version(root, model, 1)
    return root


class PolicyReference:
    """What every answer of a session must be under a retire policy, given the version
    each answer names: the numpy reference of that version, applied to the state the
    policy says (carry: as is; reset: zero at the move; replay: the last K events run
    on the new version from zero)."""

    def __init__(self, policy: str, versions: dict[int, lstm.Parameters], replay: int = 0):
        self.policy = policy
        self.versions = versions
        self.replay = replay
        self.state: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.version: dict[str, int] = {}
        self.history: dict[str, list[np.ndarray]] = {}

    def answer(self, session: str, x: np.ndarray, version: int) -> np.ndarray:
        """The expected output of ``x`` answered by ``version``; raises on an impossible move."""
        params = self.versions[version]
        zeros = (np.zeros(params.hidden_size), np.zeros(params.hidden_size))
        h, c = self.state.get(session, zeros)
        before = self.version.get(session)
        if before is not None and before != version:
            assert version > before, f"{session} moved back from {before} to {version}"
            assert self.policy != "drain", f"{session} moved from {before} under drain"
            if self.policy == "reset":
                h, c = zeros
            elif self.policy == "replay":
                h, c = zeros
                for old in self.history.get(session, [])[-self.replay :]:
                    h, c = lstm.step(old.astype(np.float64), h, c, params)
        h, c = lstm.step(np.asarray(x, np.float64), h, c, params)
        self.state[session] = (h, c)
        self.version[session] = version
        self.history.setdefault(session, []).append(np.asarray(x, np.float32))
        return h
