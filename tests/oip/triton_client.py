"""Runs in .venv-triton: Triton's own client (tritonclient[grpc] from PyPI) against lstm-stream.

``python triton_client.py ADDRESS SCENARIO DIR``: reads DIR/events.npy where a scenario
needs events, writes DIR/result.npz (arrays) and prints one JSON object (the rest).
"""

from __future__ import annotations

import json
import queue
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

MODEL = "lstm"


def event_input(rows: np.ndarray, name: str = "event", datatype: str = "FP32") -> object:
    tensor = grpcclient.InferInput(name, list(rows.shape), datatype)
    tensor.set_data_from_numpy(rows)
    return tensor


def meta(client: grpcclient.InferenceServerClient, out: Path) -> dict:
    return {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(MODEL),
        "other_model_ready": client.is_model_ready("nope"),
        "server": client.get_server_metadata(as_json=True),
        "model": client.get_model_metadata(MODEL, as_json=True),
        "config": client.get_model_config(MODEL, as_json=True),
        "stats": client.get_inference_statistics(MODEL, as_json=True),
    }


def infer(client: grpcclient.InferenceServerClient, out: Path) -> dict:
    """20 steps of an int sequence (left open) and a string sequence (ended), one row each;
    then 3 rows in one request with the states asked for, on a third sequence."""
    x = np.load(out / "events.npy")
    outputs = {}
    for key, sequence, end in (("int", 1001, False), ("string", "str-seq", True)):
        rows = []
        for k in range(20):
            result = client.infer(
                MODEL,
                [event_input(x[k : k + 1])],
                sequence_id=sequence,
                sequence_start=k == 0,
                sequence_end=end and k == 19,
                request_id=f"{key}-{k}",
            )
            assert result.get_response().id == f"{key}-{k}"
            rows.append(result.as_numpy("output")[0])
        outputs[key] = np.array(rows)
    wanted = [grpcclient.InferRequestedOutput(n) for n in ("output", "hidden_out", "cell_out")]
    result = client.infer(
        MODEL, [event_input(x[:3])], sequence_id=7, sequence_start=True, outputs=wanted
    )
    for name in ("output", "hidden_out", "cell_out"):
        outputs[f"three_{name}"] = result.as_numpy(name)
    # A sequence started natively (session "native-7"), continued here without START.
    result = client.infer(MODEL, [event_input(x[20:21])], sequence_id="native-7")
    outputs["continued"] = result.as_numpy("output")
    np.savez(out / "result.npz", **outputs)
    return {"stats": client.get_inference_statistics(MODEL, as_json=True)}


def stream(client: grpcclient.InferenceServerClient, out: Path) -> dict:
    """32 interleaved sequences x 10 steps on one stream, with a bad request in the middle."""
    x = np.load(out / "events.npy")  # [32, 10, E]
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    sent = 0
    for k in range(x.shape[1]):
        for s in range(x.shape[0]):
            client.async_stream_infer(
                MODEL,
                [event_input(x[s, k : k + 1])],
                request_id=f"{s}-{k}",
                sequence_id=s + 1,
                sequence_start=k == 0,
            )
            sent += 1
        if k == 4:  # one bad request: wrong input name; the stream must go on
            client.async_stream_infer(
                MODEL, [event_input(x[0, :1], name="evnt")], request_id="bad", sequence_id=1
            )
            sent += 1
    results, errors = {}, {}
    for _ in range(sent):
        result, error = answers.get(timeout=60)
        if error is not None:
            errors[len(errors)] = str(error)
        else:
            results[result.get_response().id] = result.as_numpy("output")[0]
    client.stop_stream()
    outputs = np.zeros((x.shape[0], x.shape[1], 64), np.float32)
    for key, value in results.items():
        s, k = map(int, key.split("-"))
        outputs[s, k] = value
    np.savez(out / "result.npz", outputs=outputs)
    return {"answered": len(results), "errors": list(errors.values())}


def errors(client: grpcclient.InferenceServerClient, out: Path) -> dict:
    x = np.zeros((1, 32), np.float32)
    cases = {
        "wrong input name": lambda: client.infer(
            MODEL, [event_input(x, "evnt")], sequence_id=5, sequence_start=True
        ),
        "wrong shape": lambda: client.infer(
            MODEL, [event_input(np.zeros((1, 31), np.float32))], sequence_id=5, sequence_start=True
        ),
        "wrong datatype": lambda: client.infer(
            MODEL,
            [event_input(x.astype(np.float64), "event", "FP64")],
            sequence_id=5,
            sequence_start=True,
        ),
        "unknown model": lambda: client.infer(
            "nope", [event_input(x)], sequence_id=5, sequence_start=True
        ),
        "missing sequence_id": lambda: client.infer(MODEL, [event_input(x)]),
        "not started": lambda: client.infer(MODEL, [event_input(x)], sequence_id=424242),
        "NaN": lambda: client.infer(
            MODEL,
            [event_input(np.full((1, 32), np.nan, np.float32))],
            sequence_id=5,
            sequence_start=True,
        ),
    }
    found = {}
    for name, call in cases.items():
        try:
            call()
            found[name] = None
        except InferenceServerException as exc:
            found[name] = {"status": exc.status(), "message": exc.message()}
    return found


def fields_of(message: object) -> dict:
    """Every field of a message type and its nested types: name -> [number, type, repeated]."""
    out = {}
    for f in message.fields:
        out[f.name] = [f.number, f.type, f.is_repeated]
    for nested in message.nested_types:
        out.update({f"{nested.name}.{k}": v for k, v in fields_of(nested).items()})
    return out


def descriptors(client: object, out: Path) -> dict:
    """tritonclient's own protocol: messages, fields, enum values and the service's methods."""
    from tritonclient.grpc import model_config_pb2, service_pb2

    messages = {}
    for module in (service_pb2, model_config_pb2):
        for name, message in module.DESCRIPTOR.message_types_by_name.items():
            messages[name] = fields_of(message)
    enum = model_config_pb2.DESCRIPTOR.enum_types_by_name["DataType"]
    service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    return {
        "package": service_pb2.DESCRIPTOR.package,
        "messages": messages,
        "DataType": {v.name: v.number for v in enum.values},
        "methods": {
            m.name: [m.input_type.name, m.output_type.name, m.client_streaming, m.server_streaming]
            for m in service.methods
        },
    }


def control(client: grpcclient.InferenceServerClient, out: Path) -> dict:
    """Model control as Triton's users do it: the repository index, load_model (a new
    version was put in the repository), inference on it, unload_model."""
    x = np.ones((1, 4), np.float32)
    before = client.get_model_repository_index(as_json=True)
    client.load_model(MODEL)
    loaded = client.get_model_repository_index(as_json=True)
    result = client.infer(MODEL, [event_input(x)], sequence_id=77, sequence_start=True)
    version = result.get_response().model_version
    ready = client.is_model_ready(MODEL, "2")
    client.unload_model(MODEL)
    unloaded = client.get_model_repository_index(as_json=True)
    try:
        client.infer(MODEL, [event_input(x)], sequence_id=78, sequence_start=True)
        after_unload = "answered"
    except InferenceServerException as exc:
        after_unload = exc.message()
    return {
        "before": before,
        "loaded": loaded,
        "version": version,
        "ready": ready,
        "unloaded": unloaded,
        "after_unload": after_unload,
    }


def main() -> None:
    address, scenario, directory = sys.argv[1:4]
    client = grpcclient.InferenceServerClient(address)
    scenarios = {
        "meta": meta,
        "infer": infer,
        "stream": stream,
        "errors": errors,
        "descriptors": descriptors,
        "control": control,
    }
    print(json.dumps(scenarios[scenario](client, Path(directory)), default=str))


if __name__ == "__main__":
    main()
