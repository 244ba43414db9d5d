"""A lone event's path, each step timed in place: ``python -m lstm_bench.phases``.

One one-event request after another for one live session on an idle engine (applied
at once on the caller's turn, from the request's own columns: scanned, planned, run,
applied, answered), the core kept busy in between as a round trip's other
work would; each step's wall time per request (median), measured by wrapping the
step. ``timeit`` of a step alone flatters it: repeated in a loop, its code and data
stay in the caches, while one request walks the interpreter, numpy and ONNX Runtime
in turn. The wrappers add ~0.1 µs each.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

from lstm_bench import inproc
from service.api.native import READERS
from service.core import engine as engine_module
from service.core import plan as plan_module

STEPS = ("check", "plan", "run", "counters", "apply", "answer", "count")


async def measure(n: int, gap: float) -> dict[str, float]:
    """Median µs per request of each step, and of reading, beginning and answering it."""
    server = await inproc.start(16)
    engine, plane, servicer = server.engine, server.plane, server.servicer
    request = inproc.requests("events", 1, 1, plane.spec().event_size)[0]
    read = READERS["StepRequest"]
    times: dict[str, list[float]] = {}

    def timed(name: str, call: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any) -> Any:
            start = time.perf_counter()
            try:
                return call(*args)
            finally:
                times.setdefault(name, []).append(time.perf_counter() - start)

        return wrapper

    lane = engine.lanes[0]
    of_request = plan_module.StepPlan.of_request.__func__  # type: ignore[attr-defined]
    counters, apply = plan_module.StepPlan.counters, plan_module.StepPlan.apply
    originals = (plan_module.StepPlan.of_request, counters, apply)
    scan, answer = engine_module.scan, engine_module.answer_request
    plan_module.StepPlan.of_request = classmethod(  # type: ignore[method-assign,assignment]
        lambda cls, *a: timed("plan", lambda *b: of_request(cls, *b))(*a)
    )
    plan_module.StepPlan.counters = lambda self, *a: timed("counters", counters)(self, *a)  # type: ignore[method-assign]
    plan_module.StepPlan.apply = lambda self, *a: timed("apply", apply)(self, *a)  # type: ignore[method-assign]
    engine_module.scan = timed("check", scan)
    engine_module.answer_request = timed("answer", answer)
    lane.runtime.run = timed("run", lane.runtime.run)  # type: ignore[method-assign]
    lane.runtime.run_one = timed("run", lane.runtime.run_one)  # type: ignore[method-assign]
    engine._count = timed("count", engine._count)  # type: ignore[method-assign]
    try:
        direct = 0
        for i in range(n + 200):
            await asyncio.sleep(0)  # the run loop parks
            until = time.perf_counter() + gap
            while time.perf_counter() < until:  # busy, as the rest of a round trip is
                pass
            start = time.perf_counter()
            wire = read(request)
            begun_at = time.perf_counter()
            begun = servicer._begin(wire)  # type: ignore[arg-type]  # never None here
            answered_at = time.perf_counter()
            if not begun.job.future.done():
                await begun.job.future  # the batched path: not counted
                continue
            servicer._response(begun)
            end = time.perf_counter()
            if i >= 200:
                direct += 1
                times.setdefault("read", []).append(begun_at - start)
                times.setdefault("begin (all the steps above)", []).append(answered_at - begun_at)
                times.setdefault("response", []).append(end - answered_at)
    finally:
        step_plan = plan_module.StepPlan
        step_plan.of_request, step_plan.counters, step_plan.apply = originals  # type: ignore[method-assign,assignment]
        engine_module.scan, engine_module.answer_request = scan, answer
        await server.stop()
    figures = {name: statistics.median(v[-direct:]) * 1e6 for name, v in times.items() if v}
    figures["direct-path requests"] = direct
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lstm_bench.phases", description=__doc__)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument(
        "--gap-us", type=float, default=300.0, help="busy time between requests (µs)"
    )
    args = parser.parse_args(argv)
    figures = asyncio.run(measure(args.requests, args.gap_us / 1e6))
    for name in (*STEPS, "read", "begin (all the steps above)", "response"):
        if name in figures:
            print(f"{name:30s} {figures[name]:7.1f} us")
    print(f"{'direct-path requests':30s} {figures['direct-path requests']:7.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
