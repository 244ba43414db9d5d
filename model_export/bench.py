"""``make bench-export``: time one ONNX Runtime step for each graph form and batch size."""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from model_export.lstm import Parameters
from model_export.onnx_export import OPS, build_model


def time_runs(model_bytes: bytes, e: int, h: int, batch: int, seconds: float) -> float:
    """Median wall time of one ``session.run`` in microseconds, one intra-op thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {
        "event": rng.standard_normal((batch, e)).astype(np.float32),
        "hidden": rng.standard_normal((batch, h)).astype(np.float32),
        "cell": rng.standard_normal((batch, h)).astype(np.float32),
    }
    for _ in range(20):
        session.run(None, feeds)
    samples = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(10):
            session.run(None, feeds)
        samples.append((time.perf_counter() - start) / 10 * 1e6)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench-export", description=__doc__)
    parser.add_argument("--event-size", type=int, default=32)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--batches", default="1,16,256,1024")
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    args = parser.parse_args(argv)
    e, h = args.event_size, args.hidden_size
    parameters = Parameters.random(e, h, seed=0)
    print(f"E={e} H={h}, one intra-op thread, median of 10-call groups")
    print(f"{'op':<8}{'batch':>7}{'us/call':>10}{'us/event':>10}")
    for op in OPS:
        model_bytes = build_model(parameters, op=op).SerializeToString()
        for batch in (int(b) for b in args.batches.split(",")):
            us = time_runs(model_bytes, e, h, batch, args.seconds)
            print(f"{op:<8}{batch:>7}{us:>10.1f}{us / batch:>10.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
