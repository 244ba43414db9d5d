"""What one more loaded model version costs: the server's RSS before and after it loads.

``python -m lstm_bench.versions [--sessions N]`` starts lstm-serve on a repository
with version 1 of a model (E=32, H=64), creates N sessions on it, puts version 2
in (``retire_policy drain``: version 1 stays loaded for its sessions), then
creates N sessions on version 2, and prints the RSS at each point. A version
should cost its weights and runtime and the rows of its own sessions, not a copy
of the other version's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import onnx

from lstm_bench import procs
from lstm_stream.v1 import lstm_stream_pb2 as pb
from lstm_stream.v1 import lstm_stream_pb2_grpc as pb_grpc
from model_export.lstm import Parameters
from model_export.onnx_export import build_model

E, H = 32, 64
CONFIG = 'parameters: { key: "retire_policy" value: { string_value: "drain" } }\n'


def add_version(repo: Path, version: int) -> None:
    staging = repo / f".m-{version}"
    staging.mkdir(parents=True)
    onnx.save_model(build_model(Parameters.random(E, H, seed=version)), staging / "model.onnx")
    os.replace(staging, repo / "m" / str(version))


async def create(address: str, prefix: str, n: int, chunk: int = 4096) -> None:
    values = np.zeros((chunk, E), "<f4").tobytes()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.LstmStreamStub(channel)
        for lo in range(0, n, chunk):
            ids = [f"{prefix}{i}" for i in range(lo, min(lo + chunk, n))]
            batch = pb.EventBatch(session_ids=ids, values=values[: len(ids) * E * 4])
            response = await stub.Step(pb.StepRequest(batch=batch))
            assert not any(response.batch.codes), set(response.batch.errors)


async def ready(address: str, version: int) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.LstmStreamStub(channel)
        while True:
            listed = await stub.ListModels(pb.ListModelsRequest())
            if any(v.version == version and v.state == "READY" for v in listed.versions):
                return
            await asyncio.sleep(0.05)


def rss(target: procs.Target) -> float:
    time.sleep(1.0)  # the last responses' buffers are gone
    return target.rss_bytes() / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    parser.add_argument("--sessions", type=int, default=200_000, help="sessions per version")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        (repo / "m").mkdir()
        (repo / "m" / "config.pbtxt").write_text(CONFIG)
        add_version(repo, 1)
        flags = ["--model-repository", str(repo), "--model-control", "poll"]
        flags += ["--repository-poll-secs", "0.2", "--session-ttl", "0", "--device", "cpu"]
        target = procs.start("server", None, flags)
        try:
            start = rss(target)
            asyncio.run(create(target.address, "a", args.sessions))
            one = rss(target)
            add_version(repo, 2)
            asyncio.run(ready(target.address, 2))
            two = rss(target)
            asyncio.run(create(target.address, "b", args.sessions))
            both = rss(target)
        finally:
            target.stop()
    n = args.sessions
    print(f"RSS at start (version 1, no session): {start:8.1f} MiB")
    print(f"{n:,} sessions on version 1:        {one:8.1f} MiB  (+{one - start:.1f})")
    print(f"version 2 loaded (1 keeps them):    {two:8.1f} MiB  (+{two - one:.1f})")
    print(f"{n:,} sessions on version 2:        {both:8.1f} MiB  (+{both - two:.1f})")
    print(
        f"per session: {(one - start) * 2**20 / n:.0f} bytes on version 1, "
        f"{(both - two) * 2**20 / n:.0f} on version 2; the second version itself: "
        f"{two - one:.1f} MiB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
