"""Processes under test: start lstm-serve or the echo server, read their CPU, memory and metrics."""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import urllib.request
from dataclasses import dataclass

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Have the kernel kill this process when its parent dies, however it dies (SIGKILL,
    a test's timeout): ``preexec_fn`` of what this tool starts, and its load workers."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


_DIES_WITH_PARENT = (
    "import ctypes, os, signal, sys; "
    f"ctypes.CDLL(None).prctl({_PR_SET_PDEATHSIG}, signal.SIGKILL); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def dying(cmd: list[str]) -> list[str]:
    """``cmd`` (an absolute path first) behind a small exec wrapper that sets the death
    signal in the child itself: a ``preexec_fn`` forks this process as it is, and where it
    runs gRPC (a test's client) gRPC's fork handlers can break the child or this process's
    own channels. Same pid, same death signal, which survives the exec."""
    if not sys.platform.startswith("linux"):
        return cmd
    return [sys.executable, "-c", _DIES_WITH_PARENT, *cmd]


@dataclass
class Target:
    kind: str  # "server", "echo", "echo-pipelined" or "external"
    proc: subprocess.Popen[str] | None  # None: a server this tool did not start
    port: int
    metrics_port: int | None
    host: str = "127.0.0.1"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def visible(self) -> bool:
        """Whether this tool can read the target's CPU, memory and metrics: not for a
        server it did not start (``external``)."""
        return self.proc is not None

    def cpu_seconds(self) -> float:
        """User + system CPU of the process, all threads (NaN when not ``visible``)."""
        if self.proc is None:
            return float("nan")
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds per part of the target (one part here; a deployment has several)."""
        return {"server": self.cpu_seconds()}

    def rss_bytes(self) -> int:
        if self.proc is None:
            return 0
        with open(f"/proc/{self.proc.pid}/status") as f:
            match = re.search(r"VmRSS:\s+(\d+) kB", f.read())
        return int(match.group(1)) * 1024 if match else 0

    def metrics(self) -> dict[str, float]:
        """Unlabelled samples and ``name{labels}`` keys from /metrics (server only)."""
        if self.metrics_port is None:
            return {}
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def server_command() -> list[str]:
    """``lstm-serve`` as this tool starts it: free ports, CPU, warnings only, no TTL."""
    return [
        sys.executable,
        "-m",
        "service",
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--device",
        "cpu",
        "--log-level",
        "WARNING",
        "--session-ttl",
        "0",
    ]


def parse_ports(line: str) -> tuple[int, int | None]:
    """The gRPC and metrics ports from the line a server prints when it listens."""
    port = re.search(r"gRPC on [^,\s]+:(\d+)", line)
    if port is None:
        raise RuntimeError(f"not a start line: {line!r}")
    metrics = re.search(r"metrics on http://[^:]+:(\d+)/", line)
    return int(port.group(1)), int(metrics.group(1)) if metrics else None


def start(kind: str, cpus: set[int] | None, extra: list[str] | None = None) -> Target:
    """Start the server (embedded default model) or the echo baseline on free ports."""
    if kind == "server":
        cmd = server_command()
    else:
        cmd = [sys.executable, "-m", "lstm_bench.echo", "--port", "0"]
        if kind == "echo-pipelined":
            cmd.append("--pipelined")
    proc = subprocess.Popen(dying([*cmd, *(extra or [])]), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "gRPC on" not in line:
        proc.kill()
        raise RuntimeError(f"{kind} did not start: {line!r}")
    if cpus:
        os.sched_setaffinity(proc.pid, cpus)
        for tid in os.listdir(f"/proc/{proc.pid}/task"):  # threads started before the pin
            os.sched_setaffinity(int(tid), cpus)
    port, metrics = parse_ports(line)
    return Target(kind, proc, port, metrics)
