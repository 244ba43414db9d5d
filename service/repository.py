"""The model repository on disk, in Triton's layout: ``DIR/<model>/<version>/model.onnx``.

Each model may have ``DIR/<model>/config.pbtxt`` in Triton's text format, read
with protobuf's ``text_format`` into the Open Inference Protocol's
``ModelConfig`` (fields this server does not use are ignored): the version
policy, the idle TTL (``sequence_batching.max_sequence_idle_microseconds``),
``default_model_filename``, and lstm-stream's own settings in Triton's
``parameters`` map: ``retire_policy`` (drain, carry, reset, replay),
``retire_after_s`` and ``replay_events``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeAlias

from google.protobuf import text_format

from lstm_stream.oip.v2 import inference_pb2 as oip
from service.core.model import RETIRE_POLICIES, RetirePolicy

CONFIG = "config.pbtxt"
DEFAULT_FILENAME = "model.onnx"

Signature: TypeAlias = tuple[tuple[str, int, int], ...]
"""What a version's files are on disk: (path, size, mtime_ns) of each file of its folder
and of the model's config.pbtxt. A failed version is tried again when this changes."""


class ConfigError(ValueError):
    """A model's config.pbtxt cannot be used; the message says where and why."""


@dataclass(frozen=True)
class VersionPolicy:
    """Which of a model's versions serve: the latest ``count``, all, or the ones listed."""

    kind: str = "latest"
    count: int = 1
    versions: tuple[int, ...] = ()

    def allows(self, available: list[int]) -> list[int]:
        """The versions to serve among ``available``, oldest first."""
        ordered = sorted(available)
        if self.kind == "all":
            return ordered
        if self.kind == "specific":
            return [v for v in ordered if v in self.versions]
        return ordered[-self.count :] if self.count else []

    def describe(self) -> str:
        if self.kind == "latest":
            return f"latest {self.count}"
        if self.kind == "specific":
            return "specific " + ",".join(map(str, self.versions))
        return "all"


@dataclass(frozen=True)
class ModelConfig:
    """What a model's config says (defaults where it is silent or absent)."""

    name: str
    policy: VersionPolicy = field(default_factory=VersionPolicy)
    filename: str = DEFAULT_FILENAME
    idle_ttl: float | None = None
    """Seconds a session may stay idle in memory; None: the server's --session-ttl."""
    retire: RetirePolicy = field(default_factory=RetirePolicy)


@dataclass
class RepositoryModel:
    """One model as found on disk."""

    name: str
    config: ModelConfig | None
    versions: dict[int, str | None]
    """Version -> model file (None: the embedded default model)."""
    problem: str | None = None
    """Why the model cannot load at all (its config), or None."""
    missing: dict[int, str] = field(default_factory=dict)
    """Versions whose folder holds no model file, and why."""
    signatures: dict[int, Signature] = field(default_factory=dict)
    """Version -> its files as found (empty: nothing on disk to watch, e.g. ``--model``)."""


def newest_change_ns(signature: Signature) -> int:
    """When the newest of a signature's files was last modified (ns since the epoch)."""
    return max((mtime for _, _, mtime in signature), default=0)


def _stat_files(folder: Path, under: str) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of every file below ``folder``; a file that vanishes while
    being read is left out (the next scan sees the folder as it then is)."""
    found = []
    for top, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(top, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            found.append(
                (os.path.join(under, os.path.relpath(path, folder)), st.st_size, st.st_mtime_ns)
            )
    return found


def parse_config(text: str, name: str, where: str = CONFIG) -> ModelConfig:
    """A config.pbtxt's settings; ConfigError naming the problem."""
    message = oip.ModelConfig()
    try:
        text_format.Parse(text, message, allow_unknown_field=True)
    except text_format.ParseError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    if message.name and message.name != name:
        raise ConfigError(f"{where}: name {message.name!r} is not the folder's name {name!r}")
    policy = VersionPolicy()
    choice = message.version_policy.WhichOneof("policy_choice")
    if choice == "all":
        policy = VersionPolicy("all")
    elif choice == "specific":
        policy = VersionPolicy("specific", versions=tuple(message.version_policy.specific.versions))
    elif choice == "latest":
        count = message.version_policy.latest.num_versions or 1
        policy = VersionPolicy("latest", count)
    params = {key: value.string_value for key, value in message.parameters.items()}
    unknown = sorted(set(params) - {"retire_policy", "retire_after_s", "replay_events"})
    if unknown:
        raise ConfigError(
            f"{where}: unknown parameters {unknown}; known: retire_policy, retire_after_s, "
            "replay_events"
        )
    retire_policy = params.get("retire_policy", "drain").strip()
    if retire_policy not in RETIRE_POLICIES:
        known = ", ".join(RETIRE_POLICIES)
        raise ConfigError(f"{where}: retire_policy {retire_policy!r}; expected one of {known}")
    try:
        after = float(params.get("retire_after_s", "0") or 0)
        replay = int(params.get("replay_events", "0") or 0)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    if after < 0 or replay < 0:
        raise ConfigError(f"{where}: retire_after_s and replay_events must be >= 0")
    if retire_policy == "replay" and replay < 1:
        raise ConfigError(f"{where}: retire_policy replay needs replay_events >= 1")
    idle = message.sequence_batching.max_sequence_idle_microseconds
    return ModelConfig(
        name=name,
        policy=policy,
        filename=message.default_model_filename or DEFAULT_FILENAME,
        idle_ttl=idle / 1e6 if idle else None,
        retire=RetirePolicy(retire_policy, after, replay),
    )


class ModelRepository:
    """``--model-repository DIR``: every model folder under DIR."""

    def __init__(self, root: str):
        self.root = Path(root)

    def scan(self) -> dict[str, RepositoryModel]:
        """Every model folder and its numeric version folders, as they are now."""
        if not self.root.is_dir():
            raise ConfigError(f"--model-repository {self.root}: not a directory")
        found = {}
        for entry in sorted(self.root.iterdir()):
            if entry.is_dir() and not entry.name.startswith("."):
                found[entry.name] = self._model(entry)
        return found

    def _model(self, folder: Path) -> RepositoryModel:
        name = folder.name
        config = None
        problem = None
        path = folder / CONFIG
        try:
            text = path.read_text() if path.is_file() else ""
            config = parse_config(text, name, f"{name}/{CONFIG}")
        except (OSError, ConfigError) as exc:
            problem = str(exc)
        filename = config.filename if config is not None else DEFAULT_FILENAME
        config_files: list[tuple[str, int, int]] = []
        with contextlib.suppress(OSError):
            st = path.stat()
            config_files.append((CONFIG, st.st_size, st.st_mtime_ns))
        versions: dict[int, str | None] = {}
        missing: dict[int, str] = {}
        signatures: dict[int, Signature] = {}
        for entry in folder.iterdir():
            if not (entry.is_dir() and entry.name.isdigit()):
                continue
            version = int(entry.name)
            if version < 1:
                continue
            file = entry / filename
            if file.is_file():
                versions[version] = os.fspath(file)
                signatures[version] = tuple(config_files + _stat_files(entry, entry.name))
            else:
                missing[version] = f"no {filename} in {name}/{entry.name}"
        return RepositoryModel(name, config, versions, problem, missing, signatures)


class SingleModel:
    """``--model FILE`` (or the embedded default model): a repository of one model, version 1."""

    def __init__(self, name: str, path: str | None):
        self.name = name
        self.path = path

    def scan(self) -> dict[str, RepositoryModel]:
        return {self.name: RepositoryModel(self.name, ModelConfig(self.name), {1: self.path})}
