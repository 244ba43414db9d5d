"""A scaled deployment on loopback: redis-server, lstm-serve replicas, HAProxy in front.

The tests and the bench start these programs natively, as docker-compose's scaled
profile runs them; the proxy's configuration is ``deploy/haproxy/haproxy.cfg`` with
only its listening address and its servers replaced.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from lstm_bench import procs

ROOT = Path(__file__).resolve().parent.parent
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for programs that cannot take port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def need(program: str) -> str:
    path = shutil.which(program) or shutil.which(program, path="/usr/sbin:/sbin")
    if path is None:
        raise RuntimeError(f"{program} not found: `make tools` installs it (Debian package)")
    return path


class RedisServer:
    """redis-server on 127.0.0.1 with its data in ``directory``: AOF on, fsync every second.

    ``appendfsync everysec`` normally writes each command to the file before answering
    it, but while the previous second's fsync is still running (a busy disk) Redis puts
    the write off for up to two seconds and answers meanwhile, so even a killed process
    can lose up to ~2 s of acknowledged writes, and a crash of the machine as much.
    ``fsync="always"`` writes and fsyncs before answering: nothing acknowledged is lost.
    """

    def __init__(self, directory: Path, port: int | None = None, fsync: str = "everysec"):
        self.directory = directory
        self._pick_port = port is None
        """A port picked here may be taken by another program before Redis binds it."""
        self.port = port or free_port()
        self.fsync = fsync
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start (or restart, on the same port and files) and wait until it answers."""
        for _ in range(3 if self._pick_port else 1):
            if self._start():
                self._pick_port = False  # a restart keeps the port its clients know
                return self
            self.port = free_port()
        raise RuntimeError(f"redis-server did not start; see {self.directory}/redis.log")

    def _start(self) -> bool:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            procs.dying(  # dies with whoever started it (a test, the bench)
                [
                    need("redis-server"),
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--dir",
                    str(self.directory),
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    self.fsync,
                    "--save",
                    "",
                    "--logfile",
                    str(self.directory / "redis.log"),
                ]
            ),
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                return False
            time.sleep(0.02)
        return True

    def ping(self) -> bool:
        """Whether *this* redis-server answers on the port (not another one holding it)."""
        if self.proc is None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"INFO server\r\n")
                reply = b""
                while b"process_id:" not in reply or not reply.endswith(b"\r\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    reply += chunk
        except OSError:
            return False
        match = re.search(rb"process_id:(\d+)", reply)
        return match is not None and int(match.group(1)) == self.proc.pid

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all threads; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / procs.CLOCK_TICKS


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


class Deployment(procs.Target):
    """Replicas (and the Redis and proxy they need) measured as one target: CPU and RSS
    summed over every process, metrics summed over the replicas; the address is the
    proxy's, or the only replica's."""

    def __init__(
        self,
        kind: str,
        replicas: list[procs.Target],
        redis: RedisServer,
        proxy: Proxy | None = None,
    ):
        front = proxy.port if proxy is not None else replicas[0].port
        super().__init__(kind, None, front, None)
        self.replicas = replicas
        self.redis = redis
        self.proxy = proxy

    @property
    def visible(self) -> bool:
        return True

    def pids(self) -> list[int]:
        out = [r.proc.pid for r in self.replicas if r.proc is not None]
        if self.redis.proc is not None:
            out.append(self.redis.proc.pid)
        if self.proxy is not None and self.proxy.proc is not None:
            out += [self.proxy.proc.pid, *children(self.proxy.proc.pid)]
        return out

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids())

    def cpu_by_role(self) -> dict[str, float]:
        out = {"replicas": sum(cpu_seconds(r.proc.pid) for r in self.replicas if r.proc)}
        if self.redis.proc is not None:
            out["redis"] = cpu_seconds(self.redis.proc.pid)
        if self.proxy is not None and self.proxy.proc is not None:
            pid = self.proxy.proc.pid
            out["proxy"] = cpu_seconds(pid) + sum(cpu_seconds(c) for c in children(pid))
        return out

    def rss_bytes(self) -> int:
        total = 0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/status") as f:
                    match = re.search(r"VmRSS:\s+(\d+) kB", f.read())
            except OSError:
                continue
            total += int(match.group(1)) * 1024 if match else 0
        return total

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for replica in self.replicas:
            for key, value in replica.metrics().items():
                out[key] = out.get(key, 0.0) + value
        return out

    def stop(self) -> int:
        if self.proxy is not None:
            self.proxy.stop()
        codes = [r.stop() for r in self.replicas]
        self.redis.stop()
        return max(codes, default=0)


def start_replica(
    store_url: str, extra: list[str] | None = None, cpus: set[int] | None = None
) -> procs.Target:
    """One lstm-serve on free ports, sharing ``store_url``."""
    return procs.start("server", cpus, ["--state-store", store_url, *(extra or [])])


def start_deployment(
    kind: str,
    directory: Path,
    replicas: int,
    proxy: bool,
    extra: list[str] | None = None,
    cpus: set[int] | None = None,
) -> Deployment:
    """Redis, ``replicas`` lstm-serve sharing it (on ``cpus``), and HAProxy in front."""
    redis = RedisServer(directory / "redis").start()
    started = [start_replica(redis.url, extra, cpus) for _ in range(replicas)]
    front = Proxy(directory / "proxy", [r.port for r in started]).start() if proxy else None
    return Deployment(kind, started, redis, front)


class Proxy:
    """HAProxy in master-worker mode with deploy/haproxy/haproxy.cfg, on 127.0.0.1."""

    def __init__(self, directory: Path, backends: list[int], port: int | None = None):
        self.directory = directory
        self.port = port or free_port()
        self.config = directory / "haproxy.cfg"
        self.proc: subprocess.Popen[str] | None = None
        self._log: list[str] = []
        self._write(backends)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _write(self, backends: list[int]) -> None:
        text = HAPROXY_CFG.read_text()
        text = re.sub(r"(?m)^(\s*bind )\S+", rf"\g<1>127.0.0.1:{self.port}", text)
        servers = "".join(
            f"    server lstm-{i + 1} 127.0.0.1:{port}\n" for i, port in enumerate(backends)
        )
        text, n = re.subn(r"(?m)^\s*server-template .*\n", servers, text)
        assert n == 1, "deploy/haproxy/haproxy.cfg has no server-template line"
        text = re.sub(r"(?ms)^resolvers \S+\n.*?(?=^\S|\Z)", "", text)  # no DNS here
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config.write_text(text)

    def _loads(self) -> int:
        return sum("Loading success" in line for line in self._log)

    def _wait_loaded(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self._loads() < count:
            if time.monotonic() > deadline or (self.proc and self.proc.poll() is not None):
                raise RuntimeError("haproxy did not load:\n" + "".join(self._log[-20:]))
            time.sleep(0.02)

    def start(self) -> Proxy:
        self.proc = subprocess.Popen(
            procs.dying([need("haproxy"), "-W", "-db", "-f", str(self.config)]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

        def read(stream: object = self.proc.stderr) -> None:
            for line in stream:  # type: ignore[attr-defined]
                self._log.append(line)

        threading.Thread(target=read, daemon=True).start()
        self._wait_loaded(1)
        wait_for_port(self.port)
        return self

    def reload(self, backends: list[int]) -> None:
        """New servers, as an operator would: rewrite the file, SIGUSR2 to the master."""
        assert self.proc is not None
        loads = self._loads()
        self._write(backends)
        self.proc.send_signal(signal.SIGUSR2)
        self._wait_loaded(loads + 1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
