"""``lstm-bench``: measure lstm-serve against the echo baseline, side by side on this machine."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import multiprocessing as mp
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from lstm_bench import cluster, procs
from lstm_bench.load import EOF, Shape, worker_main
from lstm_stream.v1 import lstm_stream_pb2 as pb
from lstm_stream.v1 import lstm_stream_pb2_grpc as pb_grpc


def cpu_split(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """Server on the first CPU, clients on the rest, when there are at least two."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return None, None
    return {cpus[0]}, set(cpus[1:])


def measure(
    target: procs.Target, shape: Shape, label: str, client_procs: int, client_cpus: set[int] | None
) -> dict[str, Any]:
    """Run one load shape against a running target; figures cover the window after warm-up."""
    ctx = mp.get_context("spawn")
    progress = ctx.Value("q", 0)
    out: mp.Queue[Any] = ctx.Queue()
    n_procs = max(1, min(client_procs, shape.streams))
    streams = [list(range(shape.streams))[i::n_procs] for i in range(n_procs)]
    workers = [
        ctx.Process(
            target=worker_main,
            args=(target.address, shape, s, client_cpus, progress, out),
            daemon=True,
        )
        for s in streams
    ]
    for w in workers:
        w.start()
    # Worker start-up (imports) takes a while; the window starts at their warm-up's end.
    t0 = time.monotonic()
    while progress.value == 0 and time.monotonic() - t0 < 30:
        time.sleep(0.01)
    time.sleep(shape.warmup)
    roles0 = target.cpu_by_role()
    cpu0, m0, t_start = target.cpu_seconds(), target.metrics(), time.monotonic()
    last, last_t = progress.value, t_start
    while time.monotonic() - t_start < shape.duration:
        time.sleep(min(0.5, max(shape.duration - (time.monotonic() - t_start), 0.01)))
        now, count = time.monotonic(), progress.value
        rate = (count - last) / max(now - last_t, 1e-9)
        last, last_t = count, now
        print(
            f"\r  {label:<34} {now - t_start:4.1f}/{shape.duration:.0f}s {rate:>10,.0f} events/s",
            end="",
            file=sys.stderr,
            flush=True,
        )
    cpu1, m1, t_end = target.cpu_seconds(), target.metrics(), time.monotonic()
    roles1 = target.cpu_by_role()
    results = [out.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(timeout=30)
    print(file=sys.stderr)
    requests = sum(r[0] for r in results)
    events = sum(r[1] for r in results)
    errors = sum(r[2] for r in results)
    latencies = np.concatenate([np.frombuffer(r[3]) for r in results]) if requests else np.zeros(1)
    elapsed = t_end - t_start
    # The workers count a slightly different window than the CPU sample; rates use theirs.
    seconds = shape.duration
    server_cpu = cpu1 - cpu0

    def delta(key: str) -> float:
        return m1.get(key, 0.0) - m0.get(key, 0.0)

    def total(name: str) -> float:
        """A metric summed over its labels (e.g. every model version's)."""
        return sum(delta(k) for k in m1 if k == name or k.startswith(name + "{"))

    batches = total("lstm_batch_size_count")
    events_in_window = events * elapsed / seconds
    # A server this tool did not start (--address): its CPU, memory and metrics are unknown.
    seen = target.visible
    figures: dict[str, Any] = {
        "label": label,
        "target": target.kind,
        "shape": dataclasses.asdict(shape),
        "events_per_s": events / seconds,
        "requests_per_s": requests / seconds,
        "errors": errors,
        "latency_ms": {
            q: float(np.percentile(latencies, p)) * 1e3
            for q, p in (("p50", 50), ("p90", 90), ("p99", 99), ("p99.9", 99.9))
        },
        "server_cpu_util": server_cpu / elapsed if seen else None,
        "server_cpu_us_per_event": server_cpu / max(events_in_window, 1) * 1e6 if seen else None,
        "server_rss_mb": target.rss_bytes() / 2**20 if seen else None,
        "cpu_us_per_event_by_role": {
            role: (roles1[role] - roles0.get(role, 0.0)) / max(events_in_window, 1) * 1e6
            for role in roles1
        }
        if seen
        else None,
        "mean_batch": total("lstm_batch_size_sum") / batches if batches else None,
        "store_calls_per_s": sum(
            delta(k) for k in m1 if k.startswith("lstm_store_duration_seconds_count")
        )
        / elapsed
        if seen
        else None,
        "store_conflicts": delta("lstm_store_conflicts_total") if seen else None,
        "inference_share": (
            delta("lstm_inference_cpu_seconds_total") / server_cpu
            if batches and server_cpu > 0
            else None
        ),
    }
    return figures


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None (null in JSON: not measured)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def write_json(path: Path, results: dict[str, Any]) -> None:
    """Strict JSON: no NaN or Infinity, which JSON does not have."""
    path.write_text(json.dumps(finite(results), indent=2, default=str, allow_nan=False))


async def _create_sessions(address: str, total: int, per_request: int, streams: int) -> float:
    """Create ``total`` new sessions through the columnar form; returns the seconds it took."""
    values = np.zeros((per_request, 32), "<f4").tobytes()
    async with grpc.aio.insecure_channel(
        address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
    ) as channel:
        stub = pb_grpc.LstmStreamStub(channel)
        n_requests = -(-total // per_request)
        # Ids are built before the clock starts: the client's own cost is not the server's.
        requests = [
            pb.StepRequest(
                batch=pb.EventBatch(
                    session_ids=[f"m{r}-{k}" for k in range(per_request)], values=values
                )
            ).SerializeToString()
            for r in range(n_requests)
        ]
        raw = channel.stream_stream(
            "/lstm_stream.v1.LstmStream/StreamSteps",
            request_serializer=None,
            response_deserializer=None,
        )
        await stub.GetModelInfo(pb.ModelInfoRequest())
        start = time.perf_counter()

        async def one(chunk: list[bytes]) -> None:
            # Two requests in flight per stream: a steady client, not a burst of 250 MB.
            call = raw()  # type: ignore[call-arg]
            credits = asyncio.Semaphore(2)

            async def write() -> None:
                for request in chunk:
                    await credits.acquire()
                    await call.write(request)
                await call.done_writing()

            writer = asyncio.ensure_future(write())
            while await call.read() is not EOF:
                credits.release()
            await writer

        await asyncio.gather(*(one(requests[i::streams]) for i in range(streams)))
        return time.perf_counter() - start


def memory_scenario(
    sessions: int, server_cpus: set[int] | None, client_cpus: set[int] | None
) -> dict[str, Any]:
    rows = -(-sessions // 4096) * 4096
    # Rows are preallocated (zero pages cost no memory until used), so the rate
    # measured is creation, not array growth; growth is measured in the table's tests.
    target = procs.start(
        "server",
        server_cpus,
        [
            "--max-sessions",
            str(rows),
            "--initial-capacity",
            str(rows),
            "--max-batch",
            "4096",
            "--max-events-per-request",
            "65536",
        ],
    )
    try:
        rss0 = target.rss_bytes()
        per_request = min(4096, sessions)
        mine = os.sched_getaffinity(0)
        if client_cpus:  # this process is the client here: keep it off the server's CPU
            os.sched_setaffinity(0, client_cpus)
        try:
            seconds = asyncio.run(_create_sessions(target.address, sessions, per_request, 4))
        finally:
            os.sched_setaffinity(0, mine)
        created = -(-sessions // per_request) * per_request
        time.sleep(1.0)  # steady state: the last responses' buffers are gone
        live = target.metrics().get("lstm_live_sessions", 0.0)
        return {
            "label": f"memory: {created:,} sessions",
            "sessions": created,
            "live_sessions": live,
            "seconds": seconds,
            "sessions_per_s": created / seconds,
            "rss_mb_before": rss0 / 2**20,
            "rss_mb": target.rss_bytes() / 2**20,
        }
    finally:
        target.stop()


SCENARIOS = {
    "columnar-16x16": Shape(streams=16, sessions=256, events_per_request=16, form="columnar"),
    "events-16x16": Shape(streams=16, sessions=256, events_per_request=16, form="events"),
    "one-event-256-streams": Shape(
        streams=256, sessions=256, events_per_request=1, form="events", window=1
    ),
    "ping-pong": Shape(streams=1, sessions=1, events_per_request=1, form="events", window=1),
}
SWEEP_STREAMS = (1, 4, 16, 64)


KINDS = ("echo", "echo-pipelined", "server")
API_SCENARIOS = {
    "events-1x16": Shape(streams=16, sessions=256, events_per_request=1, form="events"),
    "oip-1x16": Shape(streams=16, sessions=256, events_per_request=1, form="oip"),
}
"""One event per request over 16 streams: the native per-event form and Triton's stream."""
STORED = "server-sqlite"
STORE_SCENARIO = "columnar-16x16"
REDIS = "server-redis"
"""One replica writing through to a local redis-server (AOF, fsync every second)."""
PROXIED = "2-replicas-proxy"
"""Two replicas sharing Redis behind HAProxy; each stream routed by its own key."""


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    """Every scenario; the target scenarios ``--repeat`` times, the three servers interleaved.

    All three servers stay up (idle ones cost nothing) and take turns, so slow
    drift of this shared machine hits them alike; the table reports medians.
    """
    server_cpus, client_cpus = cpu_split(not args.no_pin)
    timing = {"duration": args.duration, "warmup": args.warmup}
    runs: list[dict[str, Any]] = []
    started = {
        kind: procs.start(kind, server_cpus, args.server_arg if kind == "server" else None)
        for kind in KINDS
    }
    # The same server writing every run through to SQLite: what durability costs.
    store_dir = tempfile.TemporaryDirectory(prefix="lstm-bench-")
    store_args = [f"--state-store=sqlite://{store_dir.name}/state.db", "--store-sync=normal"]
    started[STORED] = procs.start("server", server_cpus, [*args.server_arg, *store_args])
    started[STORED].kind = STORED
    # The same load through the scaled deployment's parts (docs/SCALING.md).
    base = Path(store_dir.name)
    deployments = () if args.no_scale_out else ((REDIS, 1, False), (PROXIED, 2, True))
    for kind, n, proxied in deployments:
        started[kind] = cluster.start_deployment(
            kind, base / kind, n, proxied, args.server_arg, server_cpus
        )

    def run(kind: str, scenario: str, shape: Shape, label: str, rep: int = 0) -> dict[str, Any]:
        figures = measure(started[kind], shape, label, args.client_procs, client_cpus)
        runs.append({"scenario": scenario, "rep": rep, **figures})
        return figures

    try:
        for rep in range(args.repeat):
            order = KINDS[rep % 3 :] + KINDS[: rep % 3]
            for name, shape in SCENARIOS.items():
                for kind in order:
                    if kind == "echo-pipelined" and name == "ping-pong":
                        continue
                    label = f"{kind} {name} #{rep + 1}"
                    run(kind, name, dataclasses.replace(shape, **timing), label, rep)
            shape = dataclasses.replace(SCENARIOS[STORE_SCENARIO], routed=True, **timing)
            for kind in (STORED, *(kind for kind, _, _ in deployments)):
                run(kind, STORE_SCENARIO, shape, f"{kind} {STORE_SCENARIO} #{rep + 1}", rep)
            for name, shape in API_SCENARIOS.items():  # the two APIs, same load, same server
                shape = dataclasses.replace(shape, **timing)
                run("server", name, shape, f"server {name} #{rep + 1}", rep)
        for kind in ("echo", "server"):
            for form in ("columnar", "events"):
                for streams in args.sweep:
                    shape = Shape(
                        streams=streams,
                        sessions=16 * streams,
                        events_per_request=16,
                        form=form,
                        **timing,
                    )
                    run(kind, f"sweep-{form}-{streams}", shape, f"{kind} sweep {form} {streams}")
            peak = median_run(runs, kind, "columnar-16x16")["requests_per_s"]
            for share in (0.5, 0.9):
                shape = dataclasses.replace(
                    SCENARIOS["columnar-16x16"], rate=share * peak, window=1 << 20, **timing
                )
                run(
                    kind,
                    f"open-loop-{int(share * 100)}",
                    shape,
                    f"{kind} open loop {share:.0%} of max",
                )
    finally:
        for target in started.values():
            target.stop()
        store_dir.cleanup()
    memory = memory_scenario(args.memory_sessions, server_cpus, client_cpus)
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "pinned": server_cpus is not None,
            "python": sys.version.split()[0],
        },
        "settings": {k: str(v) for k, v in vars(args).items()},
        "runs": runs,
        "memory": memory,
    }


SCALE_KINDS = ("server", REDIS, PROXIED)


def run_scale(args: argparse.Namespace) -> dict[str, Any]:
    """The columnar target load on one in-memory server, one replica on Redis and two
    replicas on Redis behind HAProxy, interleaved ``--repeat`` times (docs/SCALING.md)."""
    server_cpus, client_cpus = cpu_split(not args.no_pin)
    shape = dataclasses.replace(
        SCENARIOS[STORE_SCENARIO], routed=True, duration=args.duration, warmup=args.warmup
    )
    work = tempfile.TemporaryDirectory(prefix="lstm-bench-")
    started: dict[str, procs.Target] = {}
    runs: list[dict[str, Any]] = []
    try:
        started["server"] = procs.start("server", server_cpus, args.server_arg)
        for kind, n, proxied in ((REDIS, 1, False), (PROXIED, 2, True)):
            started[kind] = cluster.start_deployment(
                kind, Path(work.name) / kind, n, proxied, args.server_arg, server_cpus
            )
        for rep in range(args.repeat):
            for kind in SCALE_KINDS[rep % 3 :] + SCALE_KINDS[: rep % 3]:
                label = f"{kind} {STORE_SCENARIO} #{rep + 1}"
                figures = measure(started[kind], shape, label, args.client_procs, client_cpus)
                runs.append({"scenario": STORE_SCENARIO, "rep": rep, **figures})
    finally:
        for target in started.values():
            target.stop()
        work.cleanup()
    return {"settings": {k: str(v) for k, v in vars(args).items()}, "runs": runs}


def scale_table(results: dict[str, Any]) -> str:
    memory = median_run(results["runs"], "server", STORE_SCENARIO)["events_per_s"]
    lines = [
        "| deployment | events/s | vs memory | CPU µs/event (all processes) | mean batch "
        "| p50 ms | p99 ms | store calls/s | CAS conflicts | CPU µs/event by process |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in SCALE_KINDS:
        r = median_run(results["runs"], kind, STORE_SCENARIO)
        lines.append(
            f"| {kind} | {r['events_per_s']:,.0f} | {r['events_per_s'] / memory:.2f} "
            f"| {r['server_cpu_us_per_event']:.1f} | {r['mean_batch'] or 0:.1f} "
            f"| {r['latency_ms']['p50']:.2f} | {r['latency_ms']['p99']:.2f} "
            f"| {r['store_calls_per_s']:,.0f} | {r['store_conflicts']:.0f} | "
            + ", ".join(f"{k} {v:.1f}" for k, v in r["cpu_us_per_event_by_role"].items())
            + " |"
        )
    return "\n".join(lines)


def median_run(runs: list[dict[str, Any]], target: str, scenario: str) -> dict[str, Any]:
    """The repetition with the median events/s (its latencies and CPU go with it)."""
    same = sorted(
        (r for r in runs if r["target"] == target and r["scenario"] == scenario),
        key=lambda r: r["events_per_s"],
    )
    return same[(len(same) - 1) // 2]


def paired(
    runs: list[dict[str, Any]], scenario: str, num: str, den: str, value: Callable[[Any], float]
) -> tuple[float, list[float]]:
    """The median over repetitions of ``value(num's run) / value(den's run)``, and each.

    Each repetition runs the servers back to back, so a ratio within one is not moved
    by the machine's drift between repetitions (a ratio of medians is: one slow
    stretch under the echo's runs alone once halved a ratio).
    """
    by_rep: dict[int, dict[str, dict[str, Any]]] = {}
    for r in runs:
        if r["scenario"] == scenario and r["target"] in (num, den):
            by_rep.setdefault(r["rep"], {})[r["target"]] = r
    ratios = [
        value(pair[num]) / max(value(pair[den]), 1e-9)
        for pair in by_rep.values()
        if num in pair and den in pair
    ]
    return float(np.median(ratios)), ratios


GOALS = {"columnar": 0.85, "events": 0.75, "256": 0.85, "ping-pong": 1.4, "cpu": 8.5}
"""Issue 22's goals: events/s against the echo's, ping-pong's p50 against the echo's, and
the server's CPU per event in the columnar scenario (µs)."""


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with its measured ratio and whether it holds.

    Ratios against the echo are medians of per-repetition ratios (``paired``).
    """
    runs = results["runs"]

    def run(target: str, scenario: str) -> dict[str, Any]:
        return median_run(runs, target, scenario)

    def cpu_per_event(r: dict[str, Any]) -> float:
        return float(r["server_cpu_us_per_event"] or 0.0)

    def events_per_s(r: dict[str, Any]) -> float:
        return float(r["events_per_s"])

    rows = []
    for scenario, key, goal, what in (
        (
            "columnar-16x16",
            "events_per_s",
            GOALS["columnar"],
            "columnar 16 streams x 16 events: events/s vs echo",
        ),
        (
            "events-16x16",
            "events_per_s",
            GOALS["events"],
            "per-event 16 streams x 16 events: events/s vs echo",
        ),
        (
            "one-event-256-streams",
            "requests_per_s",
            GOALS["256"],
            "1 event/request, 256 streams: requests/s vs echo",
        ),
    ):

        def rate(r: dict[str, Any], key: str = key) -> float:
            return float(r[key])

        ratio, each = paired(runs, scenario, "server", "echo", rate)
        # Rates can be capped by the client; CPU per event is what the server spends.
        rows.append(
            {
                "target": what,
                "goal": f">= {goal}",
                "measured": ratio,
                "repetitions": each,
                "holds": ratio >= goal,
                "pipelined_echo": paired(runs, scenario, "echo-pipelined", "echo", rate)[0],
                "cpu_per_event_ratio": paired(runs, scenario, "echo", "server", cpu_per_event)[0],
            }
        )
    cpu = cpu_per_event(run("server", "columnar-16x16"))
    rows.append(
        {
            "target": "columnar 16 x 16: server CPU per event (us)",
            "goal": f"<= {GOALS['cpu']}",
            "measured": cpu,
            "holds": cpu <= GOALS["cpu"],
        }
    )
    ratio, each = paired(
        runs, "ping-pong", "server", "echo", lambda r: float(r["latency_ms"]["p50"])
    )
    rows.append(
        {
            "target": "ping-pong p50 latency vs echo",
            "goal": f"<= {GOALS['ping-pong']}",
            "measured": ratio,
            "repetitions": each,
            "holds": ratio <= GOALS["ping-pong"],
        }
    )
    mem = results["memory"]
    rows.append(
        {
            "target": f"RSS with {mem['sessions']:,} sessions (MiB)",
            "goal": "<= 1024",
            "measured": mem["rss_mb"],
            "holds": mem["rss_mb"] <= 1024 and mem["sessions"] >= 1_000_000,
        }
    )
    rows.append(
        {
            "target": "session creation rate (sessions/s)",
            "goal": ">= 100000",
            "measured": mem["sessions_per_s"],
            "holds": mem["sessions_per_s"] >= 100_000,
        }
    )
    if any(r["target"] == STORED for r in runs):
        ratio = paired(runs, STORE_SCENARIO, STORED, "server", events_per_s)[0]
        rows.append(
            {
                "target": "columnar with --state-store sqlite (sync normal): events/s vs memory",
                "goal": ">= 0.5",
                "measured": ratio,
                "holds": ratio >= 0.5,
            }
        )
    for kind, what in (
        (REDIS, "columnar with --state-store redis (1 replica): events/s vs memory"),
        (PROXIED, "columnar, 2 replicas + Redis behind HAProxy: events/s vs 1 memory replica"),
    ):
        if any(r["target"] == kind for r in runs):
            ratio = paired(runs, STORE_SCENARIO, kind, "server", events_per_s)[0]
            rows.append({"target": what, "goal": "(reported)", "measured": ratio, "holds": None})
    if any(r["scenario"] == "oip-1x16" for r in results["runs"]):
        ratio = run("server", "oip-1x16")["events_per_s"] / max(
            run("server", "events-1x16")["events_per_s"], 1e-9
        )
        rows.append(
            {
                "target": "Triton ModelStreamInfer, 1 row x 16 streams: events/s vs per-event",
                "goal": "(reported)",
                "measured": ratio,
                "holds": None,
            }
        )
    share = run("server", "columnar-16x16")["inference_share"] or 0.0
    rows.append(
        {
            "target": "ONNX Runtime share of server CPU (columnar)",
            "goal": "<= 0.10",
            "measured": share,
            "holds": share <= 0.10,
        }
    )
    return rows


UNKNOWN = "unknown"
"""A table cell for a figure not measured (the server of --address is not this tool's)."""


def runs_table(runs: list[dict[str, Any]]) -> str:
    """One row per target and scenario: the median repetition's figures."""

    def cell(value: float | None, spec: str) -> str:
        return UNKNOWN if value is None else format(value, spec)

    lines = [
        "| run | events/s | requests/s | p50 ms | p90 ms | p99 ms | p99.9 ms | batch "
        "| server CPU | µs/event | RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    pairs = list(dict.fromkeys((r["target"], r["scenario"]) for r in runs))
    for target, scenario in pairs:
        r = median_run(runs, target, scenario)
        reps = sum(1 for x in runs if (x["target"], x["scenario"]) == (target, scenario))
        label = f"{target} {scenario}" + (f" (median of {reps})" if reps > 1 else "")
        lat = r["latency_ms"]
        batch = f"{r['mean_batch']:.1f}" if r["mean_batch"] else "-"
        lines.append(
            f"| {label} | {r['events_per_s']:,.0f} | {r['requests_per_s']:,.0f} | "
            f"{lat['p50']:.2f} | {lat['p90']:.2f} | {lat['p99']:.2f} | {lat['p99.9']:.2f} | "
            f"{batch} | {cell(r['server_cpu_util'], '.0%')} | "
            f"{cell(r['server_cpu_us_per_event'], '.1f')} | {cell(r['server_rss_mb'], '.0f')} |"
        )
    if any(r["server_cpu_util"] is None for r in runs):
        lines += [
            "",
            "Server CPU and RSS: unknown for an external server (--address): its process "
            "is not one this tool started, so it cannot read them. Measure them on the "
            "server's machine (its /metrics has process_cpu_seconds_total and "
            "process_resident_memory_bytes).",
        ]
    return "\n".join(lines)


def table(results: dict[str, Any]) -> str:
    lines = [runs_table(results["runs"])]
    mem = results["memory"]
    lines += [
        "",
        f"Memory: {mem['sessions']:,} sessions created in {mem['seconds']:.2f} s "
        f"({mem['sessions_per_s']:,.0f}/s); server RSS {mem['rss_mb_before']:.0f} MiB before, "
        f"{mem['rss_mb']:.0f} MiB after.",
        "",
        "| target | goal | measured (each repetition) | holds | pipelined echo vs echo "
        "| echo/server CPU per event |",
        "|---|---|---:|---|---:|---:|",
    ]
    for t in targets(results):
        bound = f"{t['pipelined_echo']:.2f}" if "pipelined_echo" in t else ""
        cpu = f"{t['cpu_per_event_ratio']:.2f}" if "cpu_per_event_ratio" in t else ""
        each = t.get("repetitions")
        reps = f" ({', '.join(f'{r:.2f}' for r in each)})" if each and len(each) > 1 else ""
        lines.append(
            f"| {t['target']} | {t['goal']} | {t['measured']:,.2f}{reps} | "
            f"{'-' if t['holds'] is None else 'yes' if t['holds'] else 'NO'} | {bound} | {cpu} |"
        )
    return "\n".join(lines)


def plots(results: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, style in (("server", "-o"), ("echo", "--s")):
        for form in ("columnar", "events"):
            pts = sorted(
                (r["shape"]["streams"], r["events_per_s"])
                for r in results["runs"]
                if r["target"] == kind and r["scenario"].startswith(f"sweep-{form}-")
            )
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, label=f"{kind}, {form} form")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent streams (16 events per request)")
    ax.set_ylabel("events / s")
    ax.set_title("Throughput vs streams: lstm-serve and the echo baseline")
    ax.grid(True, alpha=0.3)
    ax.legend()
    path = out / "throughput_vs_streams.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results["runs"]:
        if r["scenario"].startswith("open-loop-"):
            lat = r["latency_ms"]
            qs = [0.5, 0.9, 0.99, 0.999]
            ax.plot(
                qs,
                [lat["p50"], lat["p90"], lat["p99"], lat["p99.9"]],
                "-o",
                label=f"{r['label']} ({r['requests_per_s']:,.0f} req/s)",
            )
    ax.set_xscale("logit")
    ax.set_xticks([0.5, 0.9, 0.99, 0.999])
    ax.set_xticklabels(["p50", "p90", "p99", "p99.9"])
    ax.set_yscale("log")
    ax.set_ylabel("latency per request, ms")
    ax.set_title("Latency at 50% and 90% of the maximum rate (columnar, 16 x 16)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    path = out / "latency_open_loop.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


class HelpFormatter(argparse.HelpFormatter):
    """Every option's default in its help, unless it has none (None, off, or empty)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or default in (None, False, [], argparse.SUPPRESS):
            return text
        if isinstance(default, list):
            default = ",".join(map(str, default))
        return f"{text} (default: {default})"


def host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` as (host, port); argparse reports a ValueError as a usage error."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(text)
    return host.strip("[]"), int(port)


host_port.__name__ = "HOST:PORT"  # how argparse names the type in its error message


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lstm-bench", description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False
    )
    parser.add_argument(
        "--suite", action="store_true", help="run every scenario and target (make bench)"
    )
    parser.add_argument(
        "--scale",
        action="store_true",
        help="the columnar load on memory, one replica on Redis, two behind HAProxy "
        "(needs redis-server and haproxy)",
    )
    parser.add_argument("--echo", action="store_true", help="one scenario against the echo server")
    parser.add_argument(
        "--pipelined",
        action="store_true",
        help="with --echo: the echo with lstm-serve's stream structure",
    )
    parser.add_argument(
        "--address",
        type=host_port,
        metavar="HOST:PORT",
        help="one scenario against a server already running there (its CPU and memory "
        "are then unknown: null in the JSON)",
    )
    parser.add_argument("--streams", type=int, default=16, help="concurrent streams")
    parser.add_argument("--sessions", type=int, default=256, help="sessions in all")
    parser.add_argument("--events-per-request", type=int, default=16, help="events in each request")
    parser.add_argument(
        "--form", choices=("columnar", "events", "oip"), default="columnar", help="request form"
    )
    parser.add_argument("--window", type=int, default=4, help="requests in flight per stream")
    parser.add_argument(
        "--rate", type=float, default=0.0, help="requests/s in all (0 = closed loop)"
    )
    parser.add_argument("--duration", type=float, default=4.0, help="seconds measured per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument("--event-size", type=int, default=32, help="E of the model under test")
    parser.add_argument("--client-procs", type=int, default=2, help="load generator processes")
    parser.add_argument(
        "--no-pin", action="store_true", help="do not pin server and clients to CPUs"
    )
    parser.add_argument(
        "--sweep",
        type=lambda s: [int(x) for x in s.split(",")],
        default=list(SWEEP_STREAMS),
        help="with --suite: stream counts of the throughput sweep",
    )
    parser.add_argument(
        "--memory-sessions",
        type=int,
        default=1_000_000,
        help="with --suite: sessions created by the memory scenario",
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="repetitions of the target scenarios (median kept)"
    )
    parser.add_argument(
        "--no-scale-out",
        action="store_true",
        help="with --suite: leave out the Redis-backed runs (one replica on Redis, two behind "
        "HAProxy)",
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra lstm-serve flag (repeatable; none by default)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("bench-results"), help="JSON, table and plots go here"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.scale:
        results = run_scale(args)
        text = scale_table(results)
        write_json(args.out / "scale.json", results)
        (args.out / "scale.md").write_text(text + "\n")
        print(text)
        print(f"\nwrote {args.out / 'scale.json'}, {args.out / 'scale.md'}")
        return 0
    if args.suite:
        results = run_suite(args)
        text = table(results)
        results["targets"] = targets(results)
        write_json(args.out / "results.json", results)
        (args.out / "table.md").write_text(text + "\n")
        written = plots(results, args.out)
        print(text)
        print(
            f"\nwrote {args.out / 'results.json'}, {args.out / 'table.md'}, "
            + ", ".join(str(p) for p in written)
        )
        return 0
    shape = Shape(
        streams=args.streams,
        sessions=args.sessions,
        events_per_request=args.events_per_request,
        form=args.form,
        window=args.window,
        rate=args.rate,
        duration=args.duration,
        warmup=args.warmup,
        event_size=args.event_size,
    )
    server_cpus, client_cpus = cpu_split(not args.no_pin and not args.address)
    if args.address:
        host, port = args.address
        target = procs.Target("external", None, port, None, host)
    else:
        kind = ("echo-pipelined" if args.pipelined else "echo") if args.echo else "server"
        target = procs.start(kind, server_cpus, args.server_arg)
    try:
        run = measure(target, shape, f"{target.kind} {args.form}", args.client_procs, client_cpus)
    finally:
        if target.proc is not None:
            target.stop()
    results = {"runs": [{"scenario": "single", **run}]}
    text = runs_table(results["runs"])
    write_json(args.out / "results.json", results)
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    print(f"\nwrote {args.out / 'results.json'}, {args.out / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
