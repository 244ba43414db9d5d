"""A seconds-long run of the whole bench suite, so the tool cannot rot (no timing asserted)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.server import Server


# The whole suite but its Redis-backed runs: some fifty short runs of three servers (about
# 40 s on a quiet machine). A loaded CI machine has taken it past pytest's 120 s default, so it gets
# its own limit, well above that; what it starts dies with it (PR_SET_PDEATHSIG).
@pytest.mark.timeout(480)
def test_bench_suite_smoke(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lstm_bench.cli",
            "--suite",
            "--duration",
            "0.5",
            "--warmup",
            "0.2",
            "--sweep",
            "1,2",
            "--memory-sessions",
            "8192",
            "--repeat",
            "1",
            "--client-procs",
            "1",
            # The Redis-backed deployments' runs are left out to keep this run short;
            # tests/scale/ runs those deployments under load.
            "--no-scale-out",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    kinds = {(r["target"], r["scenario"]) for r in results["runs"]}
    for scenario in ("columnar-16x16", "events-16x16", "one-event-256-streams", "ping-pong"):
        assert ("server", scenario) in kinds and ("echo", scenario) in kinds
    server = next(
        r for r in results["runs"] if r["target"] == "server" and r["scenario"] == "columnar-16x16"
    )
    assert server["events_per_s"] > 0 and server["errors"] == 0
    assert server["mean_batch"] is not None and server["mean_batch"] >= 1
    assert results["memory"]["live_sessions"] == results["memory"]["sessions"] == 8192
    assert ("server-sqlite", "columnar-16x16") in kinds
    assert ("server", "oip-1x16") in kinds and ("server", "events-1x16") in kinds
    oip = next(r for r in results["runs"] if r["scenario"] == "oip-1x16")
    assert oip["events_per_s"] > 0 and oip["errors"] == 0
    assert not {"server-redis", "2-replicas-proxy"} & {r["target"] for r in results["runs"]}
    assert len(results["targets"]) == 10  # the two scale-out rows are not measured
    assert any("sqlite" in t["target"] for t in results["targets"])
    assert (
        "| target | goal | measured (each repetition) | holds |"
        in (tmp_path / "table.md").read_text()
    )
    for png in ("throughput_vs_streams.png", "latency_open_loop.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def tool(module: str, *args: str, timeout: float = 120) -> str:
    """Run ``python -m lstm_bench.<module> ARGS``; its stdout, once it has exited 0."""
    result = subprocess.run(
        [sys.executable, "-m", f"lstm_bench.{module}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_inproc_cost_tool_runs() -> None:
    out = tool("inproc", "--form", "events", "--rounds", "3")
    assert "us CPU per request (ONNX Runtime" in out


def test_stream_cost_tool_answers_every_request_in_order() -> None:
    """The stream machinery's own cost (lstm_bench.streams): every request of every stream is
    answered, through the server's Streams class, in its window."""
    out = tool("streams", "--streams", "8", "--window", "3", "--requests", "50", "--repeat", "1")
    assert "8 streams, window 3:" in out and "us CPU per request" in out


def test_phase_timer_times_each_step_of_the_direct_path() -> None:
    out = tool("phases", "--requests", "50", "--gap-us", "100")
    lines = dict(line.rsplit(None, 1) for line in out.splitlines() if " us" not in line)
    assert int(lines["direct-path requests"]) > 0  # the lone requests took the direct path
    for step in ("check", "plan", "run", "apply", "answer", "count", "response"):
        assert any(line.startswith(step + " ") for line in out.splitlines()), step


def test_pairs_tool_rotates_the_echo_and_two_checkouts() -> None:
    """lstm_bench.pairs against this very checkout as "before": one round of one shape."""
    out = tool(
        "pairs", "--before", ".", "--shapes", "ping-pong", "--rounds", "1", "--duration", "0.5",
        timeout=180,
    )  # fmt: skip
    assert out.startswith("ping-pong") and "before/echo by round" in out and "after/echo" in out


def no_nan(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


async def test_bench_against_an_external_address_writes_valid_json(
    server: Server, tmp_path: Path
) -> None:
    """A server the bench did not start: its CPU and memory are unknown, null in the JSON."""
    command = [
        *(sys.executable, "-m", "lstm_bench.cli", "--address", f"127.0.0.1:{server.port}"),
        *("--streams", "2", "--sessions", "4", "--events-per-request", "2", "--client-procs"),
        *("1", "--duration", "0.5", "--warmup", "0.2", "--out", str(tmp_path)),
    ]
    # In a thread: the server under test runs on this event loop.
    result = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = (tmp_path / "results.json").read_text()
    [run] = json.loads(text, parse_constant=no_nan)["runs"]
    assert run["target"] == "external" and run["events_per_s"] > 0 and run["errors"] == 0
    for key in ("server_cpu_util", "server_cpu_us_per_event", "server_rss_mb"):
        assert run[key] is None, key
    assert run["cpu_us_per_event_by_role"] is None
    table = (tmp_path / "table.md").read_text()
    assert "| unknown | unknown | unknown |" in table
    assert "unknown for an external server (--address)" in table
    assert table in result.stdout


def test_what_the_bench_starts_dies_when_the_bench_is_killed() -> None:
    """SIGKILL leaves no cleanup to run: the kernel ends the child (PR_SET_PDEATHSIG)."""
    script = (
        "import time; from lstm_bench import procs; "
        "t = procs.start('echo', None); print(t.proc.pid, flush=True); time.sleep(120)"
    )
    bench = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert bench.stdout is not None
        child = int(bench.stdout.readline())
        os.kill(child, 0)  # it runs
        bench.kill()
        bench.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child)
    finally:
        bench.kill()


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
