"""The server's own cost per request, without a network: servicer + engine + ONNX Runtime.

``python -m lstm_bench.inproc [--form columnar|events] [--profile]`` reads requests from
their bytes, queues and answers them as bytes exactly as lstm-serve does, with no gRPC
transport, and prints CPU per request; ``--profile`` adds the Python calls per request
(cProfile, over the measured rounds only) and the top functions by their own time.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time
from dataclasses import dataclass

import numpy as np
from prometheus_client import CollectorRegistry

from lstm_stream.v1 import lstm_stream_pb2 as pb
from service.api.native import READERS, LstmStreamServicer
from service.core.engine import Engine
from service.dataplane import DataPlane
from service.metrics import Metrics
from service.models import LoadSettings, Registry
from service.repository import SingleModel
from service.settings import Settings
from service.state.cache import StoreAccess
from service.state.table import Limits
from service.store import NullStore


def requests(form: str, streams: int, events: int, event_size: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for s in range(streams):
        ids = [f"s{s}-{k}" for k in range(events)]
        values = rng.standard_normal((events, event_size)).astype("<f4")
        if form == "columnar":
            out.append(
                pb.StepRequest(batch=pb.EventBatch(session_ids=ids, values=values.tobytes()))
            )
        else:
            out.append(
                pb.StepRequest(
                    events=[pb.Event(session_id=i, values=v.tolist()) for i, v in zip(ids, values)]
                )
            )
    return [r.SerializeToString() for r in out]


@dataclass
class InProcess:
    """lstm-serve's parts without a network: the embedded default model, an in-memory
    store, the engine running, the native servicer in front."""

    metrics: Metrics
    access: StoreAccess
    engine: Engine
    plane: DataPlane
    servicer: LstmStreamServicer

    async def stop(self) -> None:
        await self.engine.stop()
        await self.access.stop()


async def start(inline_batch: int) -> InProcess:
    """The server's parts as lstm-serve puts them together (``--inline-batch``)."""
    metrics = Metrics(CollectorRegistry())
    access = StoreAccess(NullStore(), metrics)
    engine = Engine(metrics, access, 1024, 128, inline_batch)
    registry = Registry(
        engine,
        access,
        Limits(10**6),
        metrics,
        SingleModel("lstm", None),  # the embedded default model
        LoadSettings("cpu", 1, 1024, 1024),
        "lstm",
    )
    await registry.sync()
    engine.start()
    plane = DataPlane(128, 10**6)
    plane.attach(engine, registry)
    return InProcess(metrics, access, engine, plane, LstmStreamServicer(Settings(), metrics, plane))


async def measure(
    form: str,
    streams: int,
    events: int,
    rounds: int,
    inline_batch: int,
    profiler: cProfile.Profile | None = None,
    pause: float = 0.0,
) -> None:
    server = await start(inline_batch)
    metrics, servicer = server.metrics, server.servicer
    batch = requests(form, streams, events, server.plane.spec().event_size)

    read = READERS["StepRequest"]

    async def round_trip() -> None:
        # Like `streams` concurrent streams: all requests read from their bytes and queued,
        # then all answered as bytes (what gRPC's parser and serializer see).
        begun = [servicer._begin(read(r)) for r in batch]  # type: ignore[arg-type]
        for b in begun:
            await b.job.future
            servicer._response(b)
        if pause:
            await asyncio.sleep(pause)  # the client's side of a round trip: the server idles

    for _ in range(20):
        await round_trip()
    ort0 = metrics.registry.get_sample_value("lstm_inference_cpu_seconds_total") or 0.0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    if profiler is not None:
        profiler.enable()
    for _ in range(rounds):
        await round_trip()
    if profiler is not None:
        profiler.disable()
    n = rounds * streams
    cpu = time.process_time() - cpu0
    ort = (metrics.registry.get_sample_value("lstm_inference_cpu_seconds_total") or 0.0) - ort0
    print(
        f"{form}: {streams} requests x {events} events per round: "
        f"{cpu / n * 1e6:.1f} us CPU per request (ONNX Runtime {ort / n * 1e6:.1f}), "
        f"wall {(time.perf_counter() - wall0 - rounds * pause) / n * 1e6:.1f} us"
    )
    await server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lstm_bench.inproc", description=__doc__, allow_abbrev=False
    )
    parser.add_argument("--form", choices=("columnar", "events"), default="columnar")
    parser.add_argument("--streams", type=int, default=16, help="requests per round")
    parser.add_argument("--events", type=int, default=16, help="events per request")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--inline-batch", type=int, default=16, help="as lstm-serve's flag")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--top", type=int, default=15, help="functions listed by --profile")
    parser.add_argument(
        "--pause-ms",
        type=float,
        default=0.0,
        help="idle time between rounds, as a network round trip leaves it (not counted in CPU)",
    )
    args = parser.parse_args(argv)
    profiler = cProfile.Profile() if args.profile else None
    asyncio.run(
        measure(
            args.form,
            args.streams,
            args.events,
            args.rounds,
            args.inline_batch,
            profiler,
            args.pause_ms / 1000,
        )
    )
    if profiler is not None:
        # Calls are deterministic where CPU time is not: the count per request is the figure
        # to compare between versions of the code.
        stats = pstats.Stats(profiler)
        calls = sum(entry[1] for entry in stats.stats.values())  # type: ignore[attr-defined]
        per_request = calls / (args.rounds * args.streams)
        print(f"Python calls per request (measured rounds only): {per_request:.1f}")
        stats.sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
