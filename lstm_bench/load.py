"""The load itself: worker processes driving gRPC streams with pre-serialised requests."""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from lstm_bench.procs import die_with_parent
from lstm_stream.oip.v2 import inference_pb2 as oip
from lstm_stream.v1 import lstm_stream_pb2 as pb

STREAM_METHOD = "/lstm_stream.v1.LstmStream/StreamSteps"
OIP_STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
EOF = grpc.aio.EOF  # type: ignore[attr-defined]  # not in grpc-stubs
Counter = Any  # a multiprocessing.Value("q"), shared with the parent for the progress line


@dataclass(frozen=True)
class Shape:
    """One measurement's load: how many streams, what each request holds, how it is paced."""

    streams: int = 16
    sessions: int = 256
    events_per_request: int = 16
    form: str = "columnar"  # or "events", or "oip" (Triton's ModelStreamInfer)
    window: int = 4
    """Requests in flight per stream (closed loop)."""
    rate: float = 0.0
    """Requests per second over all streams; 0 = closed loop."""
    duration: float = 5.0
    warmup: float = 1.0
    event_size: int = 32
    session_prefix: str = "bench"
    routed: bool = False
    """Each stream sends an ``x-session-id`` routing key of its own (its sessions are its
    own), so a hashing proxy keeps all of a stream's sessions on one replica."""


@dataclass
class WorkerResult:
    requests: int = 0
    events: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)


def build_requests(shape: Shape, stream: int, variants: int = 4) -> list[bytes]:
    """Serialised StepRequests for one stream: its own sessions, round-robin over them."""
    rng = np.random.default_rng(stream)
    per_stream = max(shape.sessions // shape.streams, 1)
    first = stream * per_stream
    out = []
    for v in range(variants):
        ids = [
            f"{shape.session_prefix}-{first + (v * shape.events_per_request + k) % per_stream}"
            for k in range(shape.events_per_request)
        ]
        values = rng.standard_normal((len(ids), shape.event_size)).astype("<f4")
        if shape.form == "oip":
            out.append(oip_request(ids[0], values).SerializeToString())
            continue
        if shape.form == "columnar":
            request = pb.StepRequest(batch=pb.EventBatch(session_ids=ids, values=values.tobytes()))
        else:
            request = pb.StepRequest(
                events=[pb.Event(session_id=i, values=row.tolist()) for i, row in zip(ids, values)]
            )
        out.append(request.SerializeToString())
    return out


def oip_request(sequence: str, rows: np.ndarray) -> oip.ModelInferRequest:
    """What Triton's client sends on a stream: rows of one sequence, raw FP32 bytes.

    Every request starts its sequence (the bench cannot order a first one per sequence
    across variants); a start costs a reset of the state, not another run.
    """
    request = oip.ModelInferRequest(model_name="lstm", id=sequence)
    request.parameters["sequence_id"].string_param = sequence
    request.parameters["sequence_start"].bool_param = True
    tensor = request.inputs.add(name="event", datatype="FP32", shape=list(rows.shape))
    del tensor  # the data travels in raw_input_contents, as tritonclient sends it
    request.raw_input_contents.append(rows.astype("<f4").tobytes())
    return request


async def _stream(
    channel: grpc.aio.Channel,
    shape: Shape,
    stream: int,
    t_start: float,
    t_end: float,
    result: WorkerResult,
    progress: Counter,
) -> None:
    # Raw bytes both ways: the client neither serialises nor parses per message.
    method = channel.stream_stream(
        OIP_STREAM_METHOD if shape.form == "oip" else STREAM_METHOD,
        request_serializer=None,
        response_deserializer=None,
    )
    key = f"{shape.session_prefix}-stream-{stream}"
    call = method(metadata=(("x-session-id", key),) if shape.routed else None)  # type: ignore[call-arg]
    requests = build_requests(shape, stream)
    sent: deque[float] = deque()
    done = asyncio.Event()
    interval = shape.streams / shape.rate if shape.rate > 0 else 0.0

    async def writer() -> None:
        i = 0
        next_at = time.perf_counter() + (stream / shape.streams) * interval
        credits = asyncio.Semaphore(shape.window if interval == 0 else 1 << 30)
        writer.credits = credits  # type: ignore[attr-defined]
        while time.perf_counter() < t_end:
            if interval:
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                stamp = next_at  # open loop: latency counts from the scheduled time
                next_at += interval
            else:
                await credits.acquire()
                stamp = time.perf_counter()
            sent.append(stamp)
            await call.write(requests[i % len(requests)])
            i += 1
        await call.done_writing()
        done.set()

    writer_task = asyncio.ensure_future(writer())
    await asyncio.sleep(0)
    try:
        while True:
            response = await call.read()
            if response is EOF:
                break
            now = time.perf_counter()
            stamp = sent.popleft()
            if shape.form == "oip" and not result.requests:  # spot check: no error answers
                assert isinstance(response, bytes)
                parsed = oip.ModelStreamInferResponse.FromString(response)
                result.errors += bool(parsed.error_message)
            if t_start <= stamp:
                result.requests += 1
                result.events += shape.events_per_request
                result.latencies.append(now - stamp)
            with progress.get_lock():
                progress.value += shape.events_per_request
            if not interval:
                writer.credits.release()  # type: ignore[attr-defined]
    except grpc.aio.AioRpcError:
        result.errors += 1
    finally:
        writer_task.cancel()


async def _run_worker(
    target: str, shape: Shape, streams: list[int], progress: Counter
) -> WorkerResult:
    result = WorkerResult()
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        await channel.channel_ready()
        t0 = time.perf_counter()
        t_start, t_end = t0 + shape.warmup, t0 + shape.warmup + shape.duration
        await asyncio.gather(
            *(_stream(channel, shape, s, t_start, t_end, result, progress) for s in streams)
        )
    return result


def worker_main(
    target: str,
    shape: Shape,
    streams: list[int],
    cpus: set[int] | None,
    progress: Counter,
    out: Any,
) -> None:
    die_with_parent()  # a load process never outlives the bench (or a test) that started it
    if cpus:
        os.sched_setaffinity(0, cpus)
    result = asyncio.run(_run_worker(target, shape, streams, progress))
    out.put((result.requests, result.events, result.errors, np.asarray(result.latencies).tobytes()))
