"""Small real ONNX models that misbehave on purpose, for the failure tests."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def failing_model() -> bytes:
    """A real model ONNX Runtime refuses to run when an event's first value is >= 10.

    ``output = event + 0 * table[int(event[:, 0])]``: Gather fails on an index out of bounds.
    """
    nodes = [
        helper.make_node("Slice", ["event", "zero", "one", "one"], ["first"]),
        helper.make_node("Cast", ["first"], ["index"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "index"], ["looked_up"]),
        helper.make_node("Mul", ["looked_up", "nothing"], ["zeroed"]),
        helper.make_node("Add", ["event", "zeroed"], ["output"]),
        helper.make_node("Identity", ["state"], ["state_out"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.arange(10, dtype=np.float32), "table"),
        numpy_helper.from_array(np.array(0, np.float32), "nothing"),
    ]
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes,
        "failing",
        [
            helper.make_tensor_value_info("event", f, ["batch", 2]),
            helper.make_tensor_value_info("state", f, ["batch", 2]),
        ],
        [
            helper.make_tensor_value_info("output", f, ["batch", 2]),
            helper.make_tensor_value_info("state_out", f, ["batch", 2]),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def lying_model() -> bytes:
    """A real model whose state output is wider than it declares ([batch, 3], not 2).

    ONNX Runtime runs it (with a warning); the runtime must refuse the result.
    """
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["event"], ["output"]),
            helper.make_node("Concat", ["state", "event"], ["wide"], axis=1),
            # The width comes from the data (max event value), so no shape inference
            # can see the lie at load time; events of 3.0 make it 3.
            helper.make_node("ReduceMax", ["event"], ["peak"], keepdims=0),
            helper.make_node("Reshape", ["peak", "one"], ["peak1"]),
            helper.make_node("Cast", ["peak1"], ["end"], to=TensorProto.INT64),
            helper.make_node("Slice", ["wide", "zero", "end", "one"], ["state_out"]),
        ],
        "lying",
        [
            helper.make_tensor_value_info("event", f, ["batch", 2]),
            helper.make_tensor_value_info("state", f, ["batch", 2]),
        ],
        [
            helper.make_tensor_value_info("output", f, ["batch", 2]),
            helper.make_tensor_value_info("state_out", f, ["batch", 2]),
        ],
        initializer=[
            numpy_helper.from_array(np.array([0], np.int64), "zero"),
            numpy_helper.from_array(np.array([1], np.int64), "one"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()
