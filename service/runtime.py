"""ONNX Runtime: loads the step model, checks its I/O contract, runs batches."""

from __future__ import annotations

import ctypes
import logging
import sys
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


@dataclass(frozen=True)
class CudaOptions:
    """How the CUDA execution provider is set up (``--cuda-mem-limit``, ``--cuda-tf32``)."""

    mem_limit: int = 0
    """Bytes ONNX Runtime's CUDA arena may hold (``gpu_mem_limit``); 0 = no limit."""
    tf32: bool = False
    """Let cuBLAS/cuDNN round matmul inputs to TF32 (10-bit mantissa): faster, less exact."""


NO_CUDA_OPTIONS = CudaOptions()
"""The defaults: no memory limit, TF32 off."""

TF32_TOLERANCE = 5e-3
"""Largest |served - float64 reference| documented for one step with ``--cuda-tf32``.

TF32 keeps 10 of float32's 23 mantissa bits, so each matmul input is rounded by up
to 2^-11 (about 4.9e-4) relative; summed over a gate's inputs and through the
gates, a step of a unit-scaled model moves by about 1e-3. Without TF32 the
served outputs stay within 1e-5 of the reference, as on the CPU.
"""


def parse_device(device: str) -> tuple[str, int]:
    """``auto``/``cpu``/``cuda``/``cuda:N`` as (kind, device id); ValueError on anything else."""
    kind, sep, index = device.partition(":")
    if kind in ("auto", "cpu", "cuda") and not sep:
        return kind, 0
    if kind == "cuda" and index.isdigit() and index.isascii():
        return kind, int(index)
    raise ValueError(f"--device must be auto, cpu, cuda or cuda:N (got {device!r})")


def cuda_provider_options(device_id: int, cuda: CudaOptions) -> dict[str, str]:
    """The CUDA execution provider's options, each set on purpose."""
    options = {
        "device_id": str(device_id),
        # TF32 would round matmul inputs (TF32_TOLERANCE); off, served outputs match float32.
        "use_tf32": "1" if cuda.tf32 else "0",
        # Every run has another batch size: grow the arena by what a run asks for, not
        # to the next power of two, so --cuda-mem-limit bounds what the arena really holds.
        "arena_extend_strategy": "kSameAsRequested",
        # EXHAUSTIVE (the default) benchmarks cuDNN algorithms for every new input
        # shape, i.e. at every new batch size; the heuristic choice costs nothing.
        "cudnn_conv_algo_search": "HEURISTIC",
        # CUDA graphs need fixed shapes and the batch dimension changes every run.
        "enable_cuda_graph": "0",
    }
    if cuda.mem_limit:
        options["gpu_mem_limit"] = str(cuda.mem_limit)
    return options


Providers = list[str | tuple[str, dict[str, str]]]


def providers_for(
    device: str, available: Sequence[str], cuda: CudaOptions = NO_CUDA_OPTIONS
) -> Providers:
    """The providers for ``--device``, given the ones this build has (a pure function).

    ``auto`` takes CUDA only when this build has it; ``cuda`` without it is an error,
    never a quiet CPU run. CPU stays last so the few ops CUDA lacks still run.
    """
    kind, device_id = parse_device(device)
    if kind == "cpu":
        return [CPU]
    if CUDA not in available:
        if kind == "auto":
            return [CPU]
        raise DeviceUnavailableError(
            f"--device {device}: this onnxruntime build has no CUDA execution provider "
            f"(available: {', '.join(available)}); install onnxruntime-gpu on a machine with "
            "an NVIDIA GPU, or use --device cpu / auto"
        )
    return [(CUDA, cuda_provider_options(device_id, cuda)), CPU]


DRIVER_LIBRARY = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
"""The NVIDIA driver's CUDA library, which the driver (not a toolkit) installs."""


def probe_cuda(device: str, device_id: int, library: str = DRIVER_LIBRARY) -> None:
    """Raise DeviceUnavailableError saying why CUDA device ``device_id`` cannot be used.

    Asks the NVIDIA driver itself, so the reason is one line (no driver, no GPU,
    no such device) instead of ONNX Runtime's log of a failed provider.
    """
    try:
        driver = ctypes.CDLL(library)
    except OSError:
        raise DeviceUnavailableError(
            f"--device {device}: no NVIDIA driver on this machine (libcuda not found)"
        ) from None
    code = driver.cuInit(0)
    if code != 0:
        raise DeviceUnavailableError(
            f"--device {device}: the NVIDIA driver found no usable GPU (cuInit error {code})"
        )
    count = ctypes.c_int(0)
    driver.cuDeviceGetCount(ctypes.byref(count))
    if device_id >= count.value:
        have = f"cuda:0..cuda:{count.value - 1}" if count.value else "none visible"
        raise DeviceUnavailableError(
            f"--device {device}: this machine has {count.value} CUDA device(s) ({have}; "
            "CUDA_VISIBLE_DEVICES counts)"
        )


def open_session(
    model: bytes,
    source: str,
    device: str = "auto",
    threads: int = 1,
    cuda: CudaOptions = NO_CUDA_OPTIONS,
) -> tuple[ort.InferenceSession, str]:
    """An ``InferenceSession`` on ``--device`` and where it runs (``cpu`` or ``cuda:N``).

    ``cuda`` that cannot be had raises DeviceUnavailableError with a one-line
    reason; ``auto`` then runs on the CPU and logs why.
    """
    try:
        kind, device_id = parse_device(device)
    except ValueError as exc:
        raise DeviceUnavailableError(str(exc)) from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    providers = providers_for(device, ort.get_available_providers(), cuda)
    if providers[0] != CPU:
        try:
            probe_cuda(device, device_id)
        except DeviceUnavailableError as exc:
            if kind == "cuda":
                raise
            log.info("%s; running on the CPU", exc)
            providers = [CPU]
    if providers[0] != CPU and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA and cuDNN from the nvidia-* wheels, where installed so
    try:
        # No fallback under --device cuda: a CUDA provider that fails fails the load.
        session = ort.InferenceSession(
            model, options, providers=providers, enable_fallback=int(kind != "cuda")
        )
    except Exception as exc:  # ORT raises several private exception types here
        text = str(exc).strip()
        if kind == "cuda" and "cuda" in text.lower():
            raise DeviceUnavailableError(f"--device {device}: {text.splitlines()[0]}") from None
        raise ModelContractError(f"ONNX Runtime cannot load {source}: {exc}") from exc
    provider = session.get_providers()[0]
    if kind == "cuda" and provider != CUDA:
        raise DeviceUnavailableError(
            f"--device {device}: the CUDA execution provider failed to initialise "
            "(CUDA or cuDNN libraries not found: install onnxruntime-gpu[cuda,cudnn])"
        )
    return session, f"cuda:{device_id}" if provider == CUDA else "cpu"


class Runtime:
    """One ``InferenceSession`` for the step model; ``run`` is called from one thread at a time."""

    def __init__(
        self,
        model: bytes,
        source: str,
        device: str = "auto",
        threads: int = 1,
        cuda: CudaOptions = NO_CUDA_OPTIONS,
    ):
        self._session, self.device = open_session(model, source, device, threads, cuda)
        """``device``: where the model runs, ``cpu`` or ``cuda:N``."""
        self.provider = self._session.get_providers()[0]
        self.on_cpu = self.provider == CPU
        """A run's time is its thread's CPU time (no device to wait for)."""
        self.spec = _check_contract(self._session, source, _output_alias(model))
        self._outputs = ["output", *(f"{name}_out" for name in self.spec.state_names)]
        # InferenceSession.run checks the feeds' names and ownership and a WebGPU capture
        # mode on every call, and retries on another provider after a provider error. On
        # the CPU provider, with the names checked against the contract at load, none of
        # that applies, so its binding is called directly (about 10 us less per lone event
        # in a request's path); any other provider keeps the public call.
        self._inputs = ("event", *self.spec.state_names)
        binding = getattr(self._session, "_sess", None)
        self._one: _OneRow | None = None
        if self.on_cpu and binding is not None:
            self._run = binding.run
            self._one = _OneRow(self._session, self.spec, self._inputs, self._outputs)
        else:
            self._run = self._session.run
        self._widths = (self.spec.output_size, *self.spec.state_sizes)
        """Each result's width: the output's, then each state's."""
        log.info(
            "model loaded: source=%s provider=%s device=%s event_size=%d output_size=%d states=%s",
            source,
            self.provider,
            self.device,
            self.spec.event_size,
            self.spec.output_size,
            ",".join(f"{n}[{s}]" for n, s in zip(self.spec.state_names, self.spec.state_sizes)),
        )

    def run(
        self, event: np.ndarray, states: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One step for a batch: ``(output [B, O], new states)``; inputs are float32 rows."""
        results = self._run(self._outputs, dict(zip(self._inputs, (event, *states))), None)
        # A graph can compute other shapes than it declares; never store those.
        batch = event.shape[0]
        for result, width in zip(results, self._widths):
            if result.shape != (batch, width):
                got = ", ".join(str(a.shape) for a in results)
                raise ModelOutputError(f"the model returned shapes {got} for a batch of {batch}")
        return results[0], results[1:]

    def run_one(
        self, event: np.ndarray, states: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """``run`` for a batch of one on the CPU provider, through arrays bound to ONNX
        Runtime once (``_OneRow``); ``run`` elsewhere. Call it from one thread only (the
        event loop's): the results it returns are overwritten by its next call."""
        if self._one is None:
            return self.run(event, states)
        return self._one.run(event, states)

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
                if batch == 1:  # before the version serves: no other thread uses it yet
                    self.run_one(event, states)


class _OneRow:
    """ONNX Runtime's inputs and outputs for a batch of one, bound once to arrays of one row.

    A run copies the event and states in and reads the results where ONNX Runtime wrote
    them: no feeds to convert and no result arrays to allocate, which costs a lone event
    about 12-15 us less than ``run`` (docs/PERFORMANCE.md). A result of another shape than
    bound fails the run in ONNX Runtime, as ``run``'s own check would.
    """

    def __init__(
        self,
        session: ort.InferenceSession,
        spec: ModelSpec,
        inputs: Sequence[str],
        outputs: Sequence[str],
    ):
        binding = session.io_binding()
        self.inputs = [np.zeros((1, spec.event_size), np.float32)]
        self.inputs += [np.zeros((1, k), np.float32) for k in spec.state_sizes]
        for name, array in zip(inputs, self.inputs):
            binding.bind_cpu_input(name, array)
        self.results = [np.zeros((1, spec.output_size), np.float32)]
        self.results += [np.zeros((1, k), np.float32) for k in spec.state_sizes]
        for name, array in zip(outputs, self.results):
            binding.bind_output(name, "cpu", 0, np.float32, array.shape, array.ctypes.data)
        self._binding = binding  # keeps the bound arrays' OrtValues alive
        self._run = session._sess.run_with_iobinding
        self._bound = binding._iobinding

    def run(
        self, event: np.ndarray, states: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        inputs = self.inputs
        inputs[0][...] = event
        for bound, state in zip(inputs[1:], states):
            bound[...] = state
        self._run(self._bound, None)
        results = self.results
        return results[0], results[1:]


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
