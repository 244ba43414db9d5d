"""ONNX Runtime: loads the step model, checks its I/O contract, runs batches."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
EMBEDDED_SOURCE = "embedded-default"


class ModelContractError(ValueError):
    """The model does not follow the step contract (names, dtypes, shapes)."""


class ModelOutputError(RuntimeError):
    """A run returned tensors of other shapes than the model declares."""


class DeviceUnavailableError(RuntimeError):
    """The requested execution provider cannot be used on this machine."""


@dataclass(frozen=True)
class ModelSpec:
    """What the server needs to know about a step model."""

    event_size: int
    output_size: int
    state_names: tuple[str, ...]
    """Inputs other than ``event``; each is fed back from output ``<name>_out``."""
    state_sizes: tuple[int, ...]
    source: str
    metadata: dict[str, str] = field(default_factory=dict)
    output_alias: int | None = None
    """Index of the state whose new value *is* ``output`` (``output = Identity(S_out)``)."""

    @property
    def fingerprint(self) -> str:
        return self.metadata.get("fingerprint", "")

    @property
    def exporter_version(self) -> str:
        return self.metadata.get("exporter_version", "")


def load_model_bytes(path: str | None) -> tuple[bytes, str]:
    """The model file's bytes, or the embedded default model built in memory."""
    if path is None:
        from model_export.default import default_model

        return default_model().SerializeToString(), EMBEDDED_SOURCE
    try:
        with open(path, "rb") as f:
            return f.read(), path
    except OSError as exc:
        raise ModelContractError(f"cannot read model {path}: {exc.strerror}") from exc


# TF32 matmuls would cost ~1e-3 of precision; the served outputs must match float32.
_CUDA_OPTIONS = {"use_tf32": "0"}


def _providers(device: str) -> list[str | tuple[str, dict[str, str]]]:
    available = ort.get_available_providers()
    if device == "cpu":
        return [CPU]
    if device == "cuda" and CUDA not in available:
        raise DeviceUnavailableError(
            "--device cuda: this onnxruntime build has no CUDA execution provider "
            f"(available: {', '.join(available)}); install onnxruntime-gpu on a machine with "
            "an NVIDIA GPU, or use --device cpu / auto"
        )
    if CUDA not in available:
        return [CPU]
    if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from the nvidia-* wheels, when installed so
        ort.preload_dlls()
    return [(CUDA, _CUDA_OPTIONS), CPU]


class Runtime:
    """One ``InferenceSession`` for the step model; ``run`` is called from one thread at a time."""

    def __init__(self, model: bytes, source: str, device: str = "auto", threads: int = 1):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        providers = _providers(device)
        try:
            self._session = ort.InferenceSession(model, options, providers=providers)
        except Exception as exc:  # ORT raises several private exception types here
            raise ModelContractError(f"ONNX Runtime cannot load {source}: {exc}") from exc
        self.provider = self._session.get_providers()[0]
        if device == "cuda" and self.provider != CUDA:
            raise DeviceUnavailableError(
                "--device cuda: the CUDA execution provider failed to initialise "
                "(no usable NVIDIA GPU or CUDA/cuDNN libraries); see the log above"
            )
        self.spec = _check_contract(self._session, source, _output_alias(model))
        self._outputs = ["output", *(f"{name}_out" for name in self.spec.state_names)]
        log.info(
            "model loaded: source=%s provider=%s event_size=%d output_size=%d states=%s",
            source,
            self.provider,
            self.spec.event_size,
            self.spec.output_size,
            ",".join(f"{n}[{s}]" for n, s in zip(self.spec.state_names, self.spec.state_sizes)),
        )

    def run(
        self, event: np.ndarray, states: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One step for a batch: ``(output [B, O], new states)``; inputs are float32 rows."""
        feeds = {"event": event}
        feeds.update(zip(self.spec.state_names, states))
        output, *new_states = self._session.run(self._outputs, feeds)
        # A graph can compute other shapes than it declares; never store those.
        batch = event.shape[0]
        if output.shape != (batch, self.spec.output_size) or any(
            s.shape != (batch, size) for s, size in zip(new_states, self.spec.state_sizes)
        ):
            got = ", ".join(str(a.shape) for a in (output, *new_states))
            raise ModelOutputError(f"the model returned shapes {got} for a batch of {batch}")
        return output, new_states

    def timed_run(
        self, event: np.ndarray, states: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray], float]:
        """``run`` plus the CPU seconds this thread spent in it (for the inference-share metric)."""
        start = time.thread_time()
        output, new_states = self.run(event, states)
        return output, new_states, time.thread_time() - start

    def warm_up(self, max_batch: int) -> None:
        """Run a few batch sizes so the first real request pays no allocation cost."""
        for batch in sorted({1, min(16, max_batch), max_batch}):
            event = np.zeros((batch, self.spec.event_size), np.float32)
            states = [np.zeros((batch, size), np.float32) for size in self.spec.state_sizes]
            for _ in range(2):
                self.run(event, states)


def _output_alias(model: bytes) -> str | None:
    """The state output that ``output`` merely copies, if the graph says so (plain LSTM)."""
    try:
        graph = onnx.load_model_from_string(model).graph
    except Exception:  # ORT has loaded it; an unparsable graph just gets no aliasing
        return None
    if any(o.name == "output" for o in graph.input) or len(graph.node) == 0:
        return None
    for node in graph.node:
        if "output" in node.output:
            if node.op_type == "Identity" and node.input[0].endswith("_out"):
                return node.input[0][: -len("_out")]
            return None
    return None


def _check_contract(
    session: ort.InferenceSession, source: str, alias: str | None = None
) -> ModelSpec:
    def describe(args: Sequence[ort.NodeArg]) -> dict[str, ort.NodeArg]:
        return {a.name: a for a in args}

    inputs, outputs = describe(session.get_inputs()), describe(session.get_outputs())

    def width(arg: ort.NodeArg, role: str) -> int:
        shape = arg.shape
        if arg.type != "tensor(float)":
            raise ModelContractError(
                f"{source}: {role} '{arg.name}' is {arg.type}; expected tensor(float)"
            )
        if len(shape) != 2 or not isinstance(shape[1], int) or shape[1] < 1:
            raise ModelContractError(
                f"{source}: {role} '{arg.name}' has shape {shape}; "
                "expected [batch, n] with a fixed n"
            )
        if isinstance(shape[0], int):
            raise ModelContractError(
                f"{source}: {role} '{arg.name}' has a fixed batch dimension {shape[0]}; "
                "expected a dynamic first dimension"
            )
        return int(shape[1])

    if "event" not in inputs:
        raise ModelContractError(f"{source}: no input named 'event' (inputs: {', '.join(inputs)})")
    if "output" not in outputs:
        raise ModelContractError(
            f"{source}: no output named 'output' (outputs: {', '.join(outputs)})"
        )
    state_names = tuple(name for name in inputs if name != "event")
    sizes = []
    for name in state_names:
        size = width(inputs[name], "state input")
        out = outputs.get(f"{name}_out")
        if out is None:
            raise ModelContractError(
                f"{source}: state input '{name}' has no matching output '{name}_out'"
            )
        if width(out, "state output") != size:
            raise ModelContractError(
                f"{source}: '{name}_out' has width {out.shape[1]}; '{name}' has {size}"
            )
        sizes.append(size)
    meta = session.get_modelmeta().custom_metadata_map
    event_size = width(inputs["event"], "input")
    output_size = width(outputs["output"], "output")
    return ModelSpec(
        event_size=event_size,
        output_size=output_size,
        state_names=state_names,
        state_sizes=tuple(sizes),
        source=source,
        metadata=dict(meta),
        output_alias=(
            state_names.index(alias)
            if alias in state_names and sizes[state_names.index(alias)] == output_size
            else None
        ),
    )
