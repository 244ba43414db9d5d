"""Session state on the model's device: pools that a Gather → step → Scatter graph updates in place.

The host table (``service.state.table``) keeps each session's row of every
state tensor in numpy arrays and gathers and scatters them around each run, so
on a GPU every run sends its states up and fetches them back. ``DeviceState``
keeps one pool ``[capacity, n_S]`` per state tensor on the runtime's device
instead: a wrapper graph reads the run's rows (``GatherND`` by slot), applies
the step model and writes the new rows back (``ScatterND``), with each pool
bound through IOBinding as both an input and an output, so the pool is updated
where it lies and only events, slots and outputs cross between host and device.

The host table stays the source of truth for ids, steps and seqs. Every
host-side change to a row's state must reach the device row in the same step,
through these verbs:

- ``write(slots, rows)``: PutSession, a restore from the state store, a move
  between versions, replay's rebuilt state;
- ``zero(slots)``: ResetSession, an event's ``reset``, a new session, a slot
  reused after eviction or delete;
- ``read(slots)``: GetSession/DeleteSession's snapshot, the rows the state
  store commits after a run;
- ``grow(capacity)``: the table grew.

It runs on ORT's CPU provider too, so the tests cover it without a GPU. It is
not wired into the engine yet: that waits for a GPU measurement showing that
the copies matter (docs/GPU.md), and on the CPU the host table stays the path.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from service.runtime import (
    NO_CUDA_OPTIONS,
    CudaOptions,
    ModelContractError,
    ModelSpec,
    open_session,
)

SLOTS = "devstate_slots"
"""The run's rows, ``int64 [batch, 1]`` (one index per event, as GatherND/ScatterND take them)."""
EXTRA = "devstate_extra_rows"
VERB_OPSET = 17
MIN_OPSET = 11
"""GatherND and ScatterND exist from opset 11 on."""


def pool_name(state: str) -> str:
    return f"devstate_pool_{state}"


def _pool_info(name: str, size: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["capacity", size])


def _slots_info() -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(SLOTS, TensorProto.INT64, ["batch", 1])


def wrap_step(model: bytes, spec: ModelSpec) -> bytes:
    """The step model inside ``(event, slots, pools) -> (output, pools_out)``.

    Each state input ``S`` becomes ``GatherND(pool_S, slots)``, and each
    ``S_out`` is written back by ``ScatterND(pool_S, slots, S_out)`` into
    output ``pool_S_out``, which the caller binds to the same buffer as
    ``pool_S``. The step's own nodes and initializers are kept as they are.
    """
    wrapped = onnx.load_model_from_string(model)
    graph = wrapped.graph
    opset = max((o.version for o in wrapped.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < MIN_OPSET:
        raise ModelContractError(
            f"{spec.source}: opset {opset}; keeping state on the device needs opset >= {MIN_OPSET}"
        )
    taken = {n for node in graph.node for n in (*node.input, *node.output)}
    taken |= {i.name for i in graph.initializer}
    for state in spec.state_names:
        if pool_name(state) in taken or f"{pool_name(state)}_out" in taken or SLOTS in taken:
            raise ModelContractError(f"{spec.source}: the graph already uses {pool_name(state)}")
    states = set(spec.state_names)
    state_outs = {f"{s}_out" for s in states}
    inputs = [i for i in graph.input if i.name not in states]
    outputs = [o for o in graph.output if o.name not in state_outs]
    gathers = [
        helper.make_node("GatherND", [pool_name(s), SLOTS], [s], name=f"devstate_gather_{s}")
        for s in spec.state_names
    ]
    scatters = [
        helper.make_node(
            "ScatterND",
            [pool_name(s), SLOTS, f"{s}_out"],
            [f"{pool_name(s)}_out"],
            name=f"devstate_scatter_{s}",
        )
        for s in spec.state_names
    ]
    nodes = [*gathers, *graph.node, *scatters]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.input[:]
    graph.input.extend(
        [
            *inputs,
            _slots_info(),
            *(_pool_info(pool_name(s), n) for s, n in zip(spec.state_names, spec.state_sizes)),
        ]
    )
    del graph.output[:]
    graph.output.extend(
        [
            *outputs,
            *(
                _pool_info(f"{pool_name(s)}_out", n)
                for s, n in zip(spec.state_names, spec.state_sizes)
            ),
        ]
    )
    return wrapped.SerializeToString()


def _verb_model(name: str, nodes: list, inputs: list, outputs: list, init: list) -> bytes:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", VERB_OPSET)])
    model.ir_version = 8
    return model.SerializeToString()


def _verb_models(spec: ModelSpec) -> dict[str, bytes]:
    """Small graphs for the host's changes: write, zero and read rows, grow the pools."""
    names, sizes = spec.state_names, spec.state_sizes
    pools = [_pool_info(pool_name(s), n) for s, n in zip(names, sizes)]
    pools_out = [_pool_info(f"{pool_name(s)}_out", n) for s, n in zip(names, sizes)]

    def rows(prefix: str) -> list[onnx.ValueInfoProto]:
        return [
            helper.make_tensor_value_info(f"{prefix}{s}", TensorProto.FLOAT, ["batch", n])
            for s, n in zip(names, sizes)
        ]

    write = [
        helper.make_node("ScatterND", [pool_name(s), SLOTS, f"rows_{s}"], [f"{pool_name(s)}_out"])
        for s in names
    ]
    zero_nodes: list[onnx.NodeProto] = [helper.make_node("Shape", [SLOTS], ["slots_shape"])]
    zero_init = []
    for s, n in zip(names, sizes):
        # [batch, 1] * [1, n] = the shape of the zero rows, computed where the slots are.
        zero_init.append(onnx.numpy_helper.from_array(np.array([1, n], np.int64), f"width_{s}"))
        zero_nodes += [
            helper.make_node("Mul", ["slots_shape", f"width_{s}"], [f"shape_{s}"]),
            helper.make_node(
                "ConstantOfShape",
                [f"shape_{s}"],
                [f"zeros_{s}"],
                value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]),
            ),
            helper.make_node(
                "ScatterND", [pool_name(s), SLOTS, f"zeros_{s}"], [f"{pool_name(s)}_out"]
            ),
        ]
    read = [helper.make_node("GatherND", [pool_name(s), SLOTS], [f"rows_{s}"]) for s in names]
    extra = helper.make_tensor_value_info(EXTRA, TensorProto.INT64, [4])
    grow = [helper.make_node("Pad", [pool_name(s), EXTRA], [f"{pool_name(s)}_out"]) for s in names]
    return {
        "write": _verb_model(
            "write", write, [*pools, _slots_info(), *rows("rows_")], pools_out, []
        ),
        "zero": _verb_model("zero", zero_nodes, [*pools, _slots_info()], pools_out, zero_init),
        "read": _verb_model("read", read, [*pools, _slots_info()], rows("rows_"), []),
        "grow": _verb_model("grow", grow, [*pools, extra], pools_out, []),
    }


class DeviceState:
    """The state pools of one model version on its device, and the runs that use them in place.

    Called from one thread at a time, like ``Runtime``. Slots in one call must be
    distinct (the engine puts at most one event per session in a run).
    """

    def __init__(
        self,
        model: bytes,
        spec: ModelSpec,
        capacity: int,
        device: str = "cpu",
        threads: int = 1,
        cuda: CudaOptions = NO_CUDA_OPTIONS,
    ):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.spec = spec
        self._step, self.device = open_session(
            wrap_step(model, spec), spec.source, device, threads, cuda
        )
        kind, _, index = self.device.partition(":")
        self._where = (kind, int(index or 0))
        self._verbs = {
            verb: open_session(data, f"{spec.source} ({verb})", self.device, 1, cuda)[0]
            for verb, data in _verb_models(spec).items()
        }
        self._pools = [
            ort.OrtValue.ortvalue_from_numpy(np.zeros((capacity, n), np.float32), *self._where)
            for n in spec.state_sizes
        ]
        self._bindings = {verb: session.io_binding() for verb, session in self._verbs.items()}
        self._bindings["step"] = self._step.io_binding()
        self._bind_pools()

    @property
    def capacity(self) -> int:
        return int(self._pools[0].shape()[0])

    def _bind_pools(self) -> None:
        """Bind every pool as input and, where a verb changes it, as its own output."""
        for verb, io in self._bindings.items():
            if verb == "step":  # first: get_outputs() lists outputs in the order bound
                io.bind_output("output", "cpu")
            for state, pool in zip(self.spec.state_names, self._pools):
                io.bind_ortvalue_input(pool_name(state), pool)
                if verb in ("step", "write", "zero"):
                    io.bind_ortvalue_output(f"{pool_name(state)}_out", pool)

    def _slots(self, slots: np.ndarray) -> np.ndarray:
        index = np.ascontiguousarray(slots, np.int64).reshape(-1, 1)
        if index.size and (index.min() < 0 or index.max() >= self.capacity):
            raise IndexError(f"slot out of range 0..{self.capacity - 1}")
        return index

    def run(self, event: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """One step for the sessions in ``slots``; their rows change in place; ``output [B, O]``."""
        io = self._bindings["step"]
        io.bind_cpu_input("event", np.ascontiguousarray(event, np.float32))
        io.bind_cpu_input(SLOTS, self._slots(slots))
        io.bind_output("output", "cpu")
        self._step.run_with_iobinding(io)
        return np.asarray(io.get_outputs()[0].numpy())

    def write(self, slots: np.ndarray, rows: Sequence[np.ndarray]) -> None:
        """Set these sessions' state rows (one ``[k, n_S]`` array per state)."""
        io = self._bindings["write"]
        index = self._slots(slots)
        for state, size, value in zip(self.spec.state_names, self.spec.state_sizes, rows):
            array = np.ascontiguousarray(value, np.float32)
            if array.shape != (len(index), size):
                raise ValueError(f"rows of {state}: shape {array.shape}, want {(len(index), size)}")
            io.bind_cpu_input(f"rows_{state}", array)
        io.bind_cpu_input(SLOTS, index)
        self._verbs["write"].run_with_iobinding(io)

    def zero(self, slots: np.ndarray) -> None:
        """Zero these sessions' rows (a reset, a new session, a reused slot)."""
        io = self._bindings["zero"]
        io.bind_cpu_input(SLOTS, self._slots(slots))
        self._verbs["zero"].run_with_iobinding(io)

    def read(self, slots: np.ndarray) -> list[np.ndarray]:
        """These sessions' rows, one ``[k, n_S]`` host array per state."""
        io = self._bindings["read"]
        io.bind_cpu_input(SLOTS, self._slots(slots))
        for state in self.spec.state_names:
            io.bind_output(f"rows_{state}", "cpu")
        self._verbs["read"].run_with_iobinding(io)
        return [np.asarray(v.numpy()) for v in io.get_outputs()]

    def grow(self, capacity: int) -> None:
        """Make room for ``capacity`` rows; existing rows keep their values, new ones are zero."""
        extra = capacity - self.capacity
        if extra <= 0:
            return
        io = self._bindings["grow"]
        io.bind_cpu_input(EXTRA, np.array([0, 0, extra, 0], np.int64))
        for state in self.spec.state_names:
            io.bind_output(f"{pool_name(state)}_out", *self._where)
        self._verbs["grow"].run_with_iobinding(io)
        self._pools = list(io.get_outputs())
        io.clear_binding_outputs()
        self._bind_pools()
