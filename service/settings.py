"""The server's one typed settings object: flags, then ``LSTM_*`` variables, then defaults."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from service.store import check_url


@dataclass(frozen=True)
class Settings:
    """Everything ``lstm-serve`` can be told; field ``x_y`` is flag ``--x-y`` and ``LSTM_X_Y``."""

    model: str | None = field(
        default=None,
        metadata={"help": "ONNX model file; empty serves the embedded default model (E=32, H=64)"},
    )
    model_name: str = field(
        default="lstm",
        metadata={
            "help": "the name of --model's model (or the embedded default's), and the model "
            "requests without a model name go to when a repository has it"
        },
    )
    model_repository: str = field(
        default="",
        metadata={
            "help": "a directory of models in Triton's layout: DIR/<model>/<version>/model.onnx "
            "with an optional DIR/<model>/config.pbtxt (instead of --model)"
        },
    )
    model_control: str = field(
        default="none",
        metadata={
            "help": "none (load the repository at start; SIGHUP rescans), poll (rescan every "
            "--repository-poll-secs) or explicit (RepositoryModelLoad/Unload)",
            "choices": ("none", "poll", "explicit"),
        },
    )
    repository_poll_secs: float = field(
        default=15.0, metadata={"help": "with --model-control poll: seconds between rescans"}
    )
    load_model: str = field(
        default="*",
        metadata={
            "help": "with --model-control explicit: the models loaded at start, comma-separated "
            "(* = all, empty = none)"
        },
    )
    admin_tenants: str = field(
        default="",
        metadata={
            "help": "with auth: the tenants (comma-separated) allowed to use the repository "
            "RPCs (RepositoryIndex, RepositoryModelLoad/Unload); others get PERMISSION_DENIED"
        },
    )
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind the gRPC port"})
    port: int = field(default=50051, metadata={"help": "gRPC port (0 picks a free one)"})
    metrics_host: str = field(
        default="",
        metadata={"help": "address for /metrics (default: 127.0.0.1 when auth is on, else --host)"},
    )
    metrics_port: int = field(
        default=9464, metadata={"help": "Prometheus /metrics port (0 picks a free one)"}
    )
    device: str = field(
        default="auto",
        metadata={
            "help": "auto (CUDA if usable, else CPU), cpu, cuda or cuda:N (GPU number N); "
            "cuda fails at start when no GPU can be used"
        },
    )
    cuda_mem_limit: str = field(
        default="0",
        metadata={
            "help": "with CUDA: most GPU memory ONNX Runtime's arena may take, in bytes or "
            "with a unit (8GiB, 512MiB); 0 = no limit"
        },
    )
    cuda_tf32: bool = field(
        default=False,
        metadata={
            "help": "with CUDA: allow TF32 matmuls (faster on Ampere and later; outputs "
            "then differ from float32 by up to 5e-3)"
        },
    )
    ort_threads: int = field(default=1, metadata={"help": "ONNX Runtime intra-op threads"})
    max_sessions: int = field(default=1_000_000, metadata={"help": "hard cap on live sessions"})
    session_ttl: float = field(
        default=3600.0, metadata={"help": "evict sessions idle this many seconds (0 = never)"}
    )
    max_batch: int = field(default=1024, metadata={"help": "most events in one ONNX Runtime run"})
    inline_batch: int = field(
        default=16,
        metadata={
            "help": "runs of at most this many events run on the event loop, without the hop "
            "to the ONNX Runtime thread; such a request that finds the engine idle runs at "
            "once (0 = every run in the thread)"
        },
    )
    max_events_per_request: int = field(
        default=65536, metadata={"help": "most events in one StepRequest"}
    )
    max_inflight: int = field(
        default=64, metadata={"help": "requests read ahead per stream before it stops reading"}
    )
    max_message_bytes: int = field(
        default=16 * 1024 * 1024, metadata={"help": "largest gRPC message received or sent"}
    )
    max_session_id_bytes: int = field(
        default=128, metadata={"help": "longest accepted session id, in UTF-8 bytes"}
    )
    initial_capacity: int = field(
        default=1024, metadata={"help": "session rows preallocated at start (grown x2 on demand)"}
    )
    state_store: str = field(
        default="memory",
        metadata={
            "help": "where sessions live: memory (lost on restart), sqlite:///path/state.db "
            "(every answered event is stored first) or redis://HOST:PORT/DB (shared by "
            "replicas; every write a compare-and-set)"
        },
    )
    store_sync: str = field(
        default="normal",
        metadata={
            "help": "SQLite synchronous: normal (survives a process crash) or full "
            "(also a power loss; an fsync per commit)",
            "choices": ("normal", "full"),
        },
    )
    store_ttl: float = field(
        default=7 * 86400.0,
        metadata={"help": "delete sessions idle this many seconds from the store (0 = never)"},
    )
    store_timeout: float = field(
        default=1.0,
        metadata={
            "help": "seconds a store call may take (SQLite: lock wait; Redis: connect and "
            "reply) before the store counts as failing"
        },
    )
    store_reset: bool = field(
        default=False,
        metadata={
            "help": "delete every stored session at start (needed to open a store written "
            "for another model)"
        },
    )
    tls_cert: str = field(
        default="", metadata={"help": "PEM certificate (chain) for TLS on the gRPC port"}
    )
    tls_key: str = field(default="", metadata={"help": "PEM private key of --tls-cert"})
    tls_client_ca: str = field(
        default="",
        metadata={"help": "PEM CA(s): require client certificates signed by it (mutual TLS)"},
    )
    auth_tokens: str = field(
        default="",
        metadata={
            "help": "file of 'TOKEN TENANT' lines; calls then need 'authorization: Bearer TOKEN'"
        },
    )
    tenant_from_cert: bool = field(
        default=False,
        metadata={
            "help": "with --tls-client-ca: a call without a token belongs to the tenant named "
            "by its client certificate's common name"
        },
    )
    max_sessions_per_tenant: int = field(
        default=0, metadata={"help": "with auth: live sessions one tenant may hold (0 = no cap)"}
    )
    grace: float = field(
        default=10.0, metadata={"help": "seconds to finish in-flight work on SIGTERM"}
    )
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING or ERROR"})
    log_format: str = field(
        default="json",
        metadata={"help": "json (one object per line) or text", "choices": ("json", "text")},
    )

    def __post_init__(self) -> None:
        checks = [
            (0 <= self.port <= 65535, "--port must be 0..65535"),
            (bool(self.model_name.strip()), "--model-name must not be empty"),
            (
                not (self.model and self.model_repository),
                "--model and --model-repository exclude each other",
            ),
            (self.repository_poll_secs > 0, "--repository-poll-secs must be > 0"),
            (
                self.model_control in ("none", "poll", "explicit"),
                "--model-control must be none, poll or explicit",
            ),
            (0 <= self.metrics_port <= 65535, "--metrics-port must be 0..65535"),
            (self.ort_threads >= 0, "--ort-threads must be >= 0 (0 = ONNX Runtime's default)"),
            (self.max_sessions >= 1, "--max-sessions must be >= 1"),
            (self.session_ttl >= 0, "--session-ttl must be >= 0"),
            (self.max_batch >= 1, "--max-batch must be >= 1"),
            (self.inline_batch >= 0, "--inline-batch must be >= 0"),
            (self.max_events_per_request >= 1, "--max-events-per-request must be >= 1"),
            (self.max_inflight >= 1, "--max-inflight must be >= 1"),
            (self.max_message_bytes >= 1024, "--max-message-bytes must be >= 1024"),
            (self.max_session_id_bytes >= 1, "--max-session-id-bytes must be >= 1"),
            (self.initial_capacity >= 1, "--initial-capacity must be >= 1"),
            (self.grace >= 0, "--grace must be >= 0"),
            (self.store_sync in ("normal", "full"), "--store-sync must be normal or full"),
            (self.store_ttl >= 0, "--store-ttl must be >= 0"),
            (self.store_timeout >= 0, "--store-timeout must be >= 0"),
            (bool(self.tls_cert) == bool(self.tls_key), "--tls-cert and --tls-key go together"),
            (not self.tls_client_ca or self.tls_cert, "--tls-client-ca needs --tls-cert"),
            (
                not self.tenant_from_cert or self.tls_client_ca,
                "--tenant-from-cert needs --tls-client-ca",
            ),
            (self.max_sessions_per_tenant >= 0, "--max-sessions-per-tenant must be >= 0"),
            (
                _DEVICE.fullmatch(self.device) is not None,
                f"--device must be auto, cpu, cuda or cuda:N (got {self.device!r})",
            ),
            (
                _byte_count(self.cuda_mem_limit) is not None,
                f"--cuda-mem-limit must be a byte count like 8589934592, 8GiB or 512MiB "
                f"(got {self.cuda_mem_limit!r})",
            ),
            (self.log_format in ("json", "text"), "--log-format must be json or text"),
            (
                self.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"),
                f"--log-level must be DEBUG, INFO, WARNING or ERROR (got {self.log_level!r})",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        problem = check_url(self.state_store)
        if problem is not None:
            raise ValueError(problem)

    @property
    def admin_tenant_set(self) -> frozenset[str]:
        return frozenset(t.strip() for t in self.admin_tenants.split(",") if t.strip())

    @property
    def auth_enabled(self) -> bool:
        return bool(self.auth_tokens) or self.tenant_from_cert

    @property
    def cuda_mem_limit_bytes(self) -> int:
        """``--cuda-mem-limit`` in bytes (0 = no limit)."""
        return _byte_count(self.cuda_mem_limit) or 0

    @property
    def metrics_bind_host(self) -> str:
        if self.metrics_host:
            return self.metrics_host
        return "127.0.0.1" if self.auth_enabled else self.host

    @classmethod
    def from_args(
        cls, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
    ) -> Settings:
        """Parse flags over ``LSTM_*`` variables over defaults; bad input exits 2 with one
        line (``--help`` has the usage)."""
        env = os.environ if env is None else env
        parser = _OneLineParser(
            prog="lstm-serve",
            allow_abbrev=False,
            description="Serve a stateful LSTM step model over gRPC. Every flag is also an "
            "LSTM_* environment variable (--max-batch -> LSTM_MAX_BATCH); flags win.",
        )
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            var = "LSTM_" + f.name.upper()
            kind = _scalar_type(f)
            default = f.default
            if var in env:
                try:
                    default = kind(env[var]) if env[var] != "" or kind is str else None
                except ValueError:
                    parser.error(f"{var}={env[var]!r} is not a valid {f.type}")
            extra: dict[str, Any] = {"nargs": "?", "const": True} if kind is _boolean else {}
            parser.add_argument(
                flag,
                type=kind,
                default=default,
                choices=f.metadata.get("choices"),
                help=f"{f.metadata['help']} [env {var}; default {f.default!r}]",
                **extra,
            )
        parser.flags = ["--" + f.name.replace("_", "-") for f in dataclasses.fields(cls)]
        values = vars(parser.parse_args(argv))
        if values.get("model") == "":
            values["model"] = None
        try:
            return cls(**values)
        except ValueError as exc:
            parser.error(str(exc))
            raise  # unreachable: parser.error exits


_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40})


def _byte_count(text: str) -> int | None:
    """``8GiB``, ``512 MiB``, ``1.5GB`` or plain bytes as an int; None if it is none of these."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if match is None or match.group(2).lower() not in _UNITS:
        return None
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


class _OneLineParser(argparse.ArgumentParser):
    """A usage error is one line: the problem, the flag meant where a flag was mistyped,
    and where the usage is (argparse's own usage block lists every flag: 25 lines)."""

    flags: list[str] = []

    def error(self, message: str) -> NoReturn:
        hint = ""
        if "unrecognized arguments" in message:
            typed = [word.split("=")[0] for word in message.split() if word.startswith("--")]
            near = [difflib.get_close_matches(word, self.flags, n=1) for word in typed]
            meant = [match[0] for match in near if match]
            if meant:
                hint = f"; did you mean {' / '.join(meant)}?"
        self.exit(2, f"{self.prog}: error: {message}{hint} (--help lists every flag)\n")


def _boolean(text: str) -> bool:
    """``--flag`` alone, or 1/0, true/false, yes/no, on/off (flags and ``LSTM_*`` alike)."""
    word = text.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(text)


def _scalar_type(f: dataclasses.Field[Any]) -> Any:
    annotation = str(f.type)
    for name, kind in (("int", int), ("float", float), ("bool", _boolean)):
        if annotation == name:
            return kind
    return str
