"""Interleaved rounds: the echo, lstm-serve from another checkout, and this one's.

``python -m lstm_bench.pairs --before DIR`` starts the echo, a server from the
checkout at DIR (its compiled modules built there: ``python setup.py build_ext
--inplace``) and this checkout's server, all pinned like the suite's; then runs
each shape on the three in rotation for ``--rounds`` rounds and prints, per shape,
each server's figures and its ratio to the echo round by round (the three ran back
to back), with the median. Before/after figures in docs/PERFORMANCE.md come from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
from pathlib import Path
from typing import Any

from lstm_bench import procs
from lstm_bench.cli import API_SCENARIOS, SCENARIOS, cpu_split, measure

KINDS = ("echo", "before", "after")
SHAPES = {**SCENARIOS, "events-1x16": API_SCENARIOS["events-1x16"]}
"""The suite's target shapes and one event per request over 16 streams (the echo has no
Triton API, so the OIP shape is left out)."""


def value(name: str, figures: dict[str, Any]) -> float:
    """Ping-pong's p50 (ms), every other shape's events/s."""
    return float(figures["latency_ms"]["p50"] if name == "ping-pong" else figures["events_per_s"])


def run(before: Path, shapes: list[str], rounds: int, duration: float) -> dict[str, Any]:
    server_cpus, client_cpus = cpu_split(True)
    targets: dict[str, procs.Target] = {}
    here = os.getcwd()
    try:
        targets["echo"] = procs.start("echo", server_cpus)
        os.chdir(before)  # `-m service` finds the checkout it starts in first
        try:
            targets["before"] = procs.start("server", server_cpus)
        finally:
            os.chdir(here)
        targets["after"] = procs.start("server", server_cpus)
        figures: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for r in range(rounds):
            order = KINDS[r % 3 :] + KINDS[: r % 3]
            for name in shapes:
                shape = dataclasses.replace(SHAPES[name], duration=duration, warmup=1.0)
                for kind in order:
                    f = measure(targets[kind], shape, f"{kind} {name} #{r + 1}", 2, client_cpus)
                    figures.setdefault(name, {}).setdefault(kind, []).append(f)
    finally:
        for target in targets.values():
            target.stop()
    return figures


def report(figures: dict[str, Any]) -> str:
    lines = []
    for name, kinds in figures.items():
        lines.append(name)
        for kind in KINDS:
            values = [value(name, f) for f in kinds[kind]]
            cpu = statistics.median(f["server_cpu_us_per_event"] for f in kinds[kind])
            lines.append(
                f"  {kind:6s} median {statistics.median(values):,.3f} "
                f"({', '.join(f'{v:,.3f}' for v in values)}), server CPU {cpu:.1f} us/event"
            )
        echo = [value(name, f) for f in kinds["echo"]]
        for kind in ("before", "after"):
            ratios = [value(name, f) / e for f, e in zip(kinds[kind], echo)]
            lines.append(
                f"  {kind}/echo by round {', '.join(f'{x:.2f}' for x in ratios)}; "
                f"median {statistics.median(ratios):.2f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lstm_bench.pairs", description=__doc__)
    parser.add_argument("--before", type=Path, required=True, help="the other checkout")
    parser.add_argument(
        "--shapes",
        default="columnar-16x16,one-event-256-streams,ping-pong",
        help=f"comma-separated, of: {', '.join(SHAPES)}",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per run")
    args = parser.parse_args(argv)
    shapes = args.shapes.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape {unknown[0]!r}; known: {', '.join(SHAPES)}")
    print(report(run(args.before.resolve(), shapes, args.rounds, args.duration)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
