"""Wiring and lifecycle: model, sessions, engine, data plane, APIs, health, metrics, signals."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import gc
import logging
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import Sequence
from threading import Thread
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from lstm_stream.oip.v2 import inference_pb2 as oip_pb
from lstm_stream.v1 import lstm_stream_pb2 as native_pb
from service import logs
from service.api.handlers import register
from service.api.native import READERS, SERVICE_NAME, WRITTEN, LstmStreamServicer
from service.api.oip import SERVICE_NAME as OIP_SERVICE
from service.api.oip import InferenceServicer
from service.api.security import (
    MAX_TENANT_BYTES,
    Authenticator,
    SecurityConfigError,
    TlsFiles,
    TokenFile,
)
from service.core.engine import Engine
from service.dataplane import DataPlane
from service.metrics import Metrics
from service.models import LoadSettings, Registry
from service.repository import ConfigError, ModelRepository, SingleModel
from service.runtime import CudaOptions, DeviceUnavailableError, ModelContractError
from service.settings import Settings
from service.state.cache import StoreAccess
from service.state.table import Limits
from service.store import StateStore, StoreError, StoreMismatchError, open_store

log = logging.getLogger(__name__)

DRAIN_QUIET_S = 0.1
"""While draining, the server stays up until calls have stopped arriving for this long."""

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Server:
    """One lstm-stream server: ``await start()``, then ``await stop()`` (or ``serve_forever``)."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None):
        self.settings = settings
        self.metrics = Metrics(registry)
        self.port = 0
        self.metrics_port = 0
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.plane = DataPlane(settings.max_session_id_bytes, settings.max_sessions)
        self.engine: Engine | None = None
        self.registry: Registry | None = None
        self._store_access: StoreAccess | None = None
        self._grpc: grpc.aio.Server | None = None
        self._servicer: LstmStreamServicer | None = None
        self._oip: InferenceServicer | None = None
        self._metrics_http: tuple[WSGIServer, Thread] | None = None
        self.store: StateStore | None = None
        self.tls: TlsFiles | None = None
        self.auth = Authenticator(None, False)
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()
        self._stopping = False
        self._served = False
        """Whether the start finished: a start that failed closes without "draining"."""

    async def start(self) -> None:
        """Bind the ports, load and warm up the model, then report SERVING."""
        await self.bind()
        await self.load()

    async def bind(self) -> None:
        """Listen on both ports; health is NOT_SERVING and calls get UNAVAILABLE until ``load``."""
        s = self.settings
        await self._set_health(NOT_SERVING)
        options = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        self._grpc = grpc.aio.server(options=options)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, OIP_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self._grpc
        )
        tokens = TokenFile(s.auth_tokens) if s.auth_tokens else None
        self.auth = Authenticator(tokens, s.tenant_from_cert)
        self._servicer = LstmStreamServicer(s, self.metrics, self.plane, self.auth)
        register(self._servicer, self._grpc, native_pb, "LstmStream", READERS, WRITTEN)
        self._oip = InferenceServicer(s, self.metrics, self.plane, self.auth)
        register(self._oip, self._grpc, oip_pb, "GRPCInferenceService")
        address = f"{_bracket(s.host)}:{s.port}"
        # Asked first: grpc would also print its own error line for a port in use.
        problem = _cannot_bind(s.host, s.port)
        if problem is not None:
            raise OSError(f"cannot listen for gRPC on {address}: {problem}")
        try:
            if s.tls_cert:
                self.tls = TlsFiles(s.tls_cert, s.tls_key, s.tls_client_ca or None)
                _check_tls_files(s.tls_cert, s.tls_key, s.tls_client_ca)
                self.port = self._grpc.add_secure_port(address, self.tls.credentials())
            else:
                self.port = self._grpc.add_insecure_port(address)
        except RuntimeError:  # grpcio's way of saying the port could not be bound
            self.port = 0
        if self.port == 0:  # _cannot_bind found no problem: grpc's log line says what it was
            raise OSError(f"cannot listen for gRPC on {address}")
        try:
            httpd, thread = start_http_server(
                s.metrics_port, addr=s.metrics_bind_host, registry=self.metrics.registry
            )
        except OSError as exc:
            where = f"{_bracket(s.metrics_bind_host)}:{s.metrics_port}"
            change = (
                "--metrics-port (or LSTM_METRICS_PORT; 0 picks a free one)"
                if exc.errno == errno.EADDRINUSE
                else "--metrics-host (or LSTM_METRICS_HOST)"
            )
            raise OSError(
                f"cannot serve metrics on {where}: {exc.strerror or exc}; pick another with "
                f"{change}"
            ) from exc
        self._metrics_http = (httpd, thread)
        self.metrics_port = httpd.server_port
        await self._grpc.start()

    async def load(self) -> None:
        """Open the store, load the models (checked and warmed up), then report SERVING."""
        s = self.settings
        assert self._servicer is not None
        loop = asyncio.get_running_loop()
        if s.model_repository and not os.path.isdir(s.model_repository):
            what = "not a directory" if os.path.exists(s.model_repository) else "no such directory"
            raise ConfigError(f"--model-repository {s.model_repository}: {what}")
        self.store = open_store(s.state_store, s.store_sync, s.store_timeout, s.store_ttl)
        await loop.run_in_executor(None, self.store.open, s.store_reset, s.model_name)
        access = self._store_access = StoreAccess(self.store, self.metrics)
        limits = Limits(s.max_sessions, self.auth.enabled, s.max_sessions_per_tenant)
        self.engine = Engine(
            self.metrics,
            access,
            s.max_batch,
            # The data plane checks ids as sent; the engine sees them with their tenant.
            s.max_session_id_bytes + (MAX_TENANT_BYTES + 1 if self.auth.enabled else 0),
            s.inline_batch,
        )
        repository: ModelRepository | SingleModel = (
            ModelRepository(s.model_repository)
            if s.model_repository
            else SingleModel(s.model_name, s.model)
        )
        self.registry = Registry(
            self.engine,
            access,
            limits,
            self.metrics,
            repository,
            LoadSettings(
                s.device,
                s.ort_threads,
                s.max_batch,
                s.initial_capacity,
                CudaOptions(s.cuda_mem_limit_bytes, s.cuda_tf32),
            ),
            s.model_name,
            poll_s=s.repository_poll_secs
            if s.model_repository and s.model_control == "poll"
            else None,
            # One model file that cannot load fails the start, which says why (serve()).
            log_failures=bool(s.model_repository),
        )
        self.engine.start()
        await self.registry.sync(self._models_at_start())
        if not self.engine.models and not s.model_repository:
            error = self.registry.load_error(s.model_name, 1)
            raise ModelContractError(error or "the model did not load")
        self.plane.attach(self.engine, self.registry)
        engine = self.engine
        self.metrics.track_live_sessions(
            lambda: [(lane.model, str(lane.version), len(lane.table)) for lane in engine.lanes]
        )
        self.metrics.max_sessions.set(s.max_sessions)
        self.metrics.track_loop(loop)
        self._tasks.append(loop.create_task(self._evict_loop(), name="ttl-eviction"))
        if self.store.persistent and s.store_ttl > 0:
            self._tasks.append(
                loop.create_task(self._expire_loop(s.store_ttl), name="store-expiry")
            )
        if s.model_repository and s.model_control == "poll":
            self._tasks.append(loop.create_task(self._poll_loop(), name="repository-poll"))
        serving = self.plane.serving
        await self._set_health(SERVING if serving else NOT_SERVING)
        if not serving:
            log.warning("no model is ready: health stays NOT_SERVING until one loads")
        self._tasks.append(loop.create_task(self._watch_store(access), name="store-health"))
        ready = [f"{v.model}:{v.version}" for v in self.registry.index() if v.state == "READY"]
        log.info(
            "serving on %s:%d, metrics on http://%s:%d/metrics, models %s, state store %s",
            s.host,
            self.port,
            s.metrics_bind_host,
            self.metrics_port,
            ", ".join(ready) or "none",
            self.store.url,
        )
        self._served = True

    def _models_at_start(self) -> list[str] | None:
        """Which models load at start (None: every model of the repository)."""
        s = self.settings
        if not s.model_repository or s.model_control != "explicit" or s.load_model.strip() == "*":
            return None
        return [name.strip() for name in s.load_model.split(",") if name.strip()]

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, stop reading, finish in-flight work within ``grace``, close."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        self.plane.close()
        grace = self.settings.grace if grace is None else grace
        if self._served:
            log.info("draining (grace %.1fs)", grace)
        await self._set_health(NOT_SERVING)
        for task in self._tasks:
            task.cancel()
        if self._servicer is not None:
            self._servicer.start_drain()
        if self._oip is not None:
            self._oip.start_drain()
        deadline = time.monotonic() + grace
        if self.engine is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.engine.drain(), grace)
        if self._servicer is not None:
            await self._quiet([self._servicer, self._oip], deadline)
        if self._grpc is not None:
            await self._grpc.stop(max(deadline - time.monotonic(), 0.0))
        if self.registry is not None:
            await self.registry.stop()
        if self.engine is not None:
            await self.engine.stop()
        if self._store_access is not None:
            await self._store_access.stop()
        if self.store is not None:
            self.store.close()
        if self._metrics_http is not None:
            httpd, thread = self._metrics_http
            httpd.shutdown()
            httpd.server_close()
            thread.join(timeout=5)
        if self._served:
            log.info("stopped")
        self._stopped.set()

    @staticmethod
    async def _quiet(servicers: Sequence[object], deadline: float) -> None:
        """Wait until no call has arrived for DRAIN_QUIET_S, counted from now (or the grace ends).

        Calls already queued in gRPC core when the server stops are cancelled,
        which clients do not retry; answering them UNAVAILABLE first lets them.
        """
        quiet_since = time.monotonic()
        while (now := time.monotonic()) < deadline:
            last = max(getattr(s, "last_call_at", 0.0) for s in servicers)
            idle = now - max(last, quiet_since)
            if idle >= DRAIN_QUIET_S:
                return
            await asyncio.sleep(min(DRAIN_QUIET_S - idle, deadline - now))

    def reload(self) -> None:
        """SIGHUP: re-read the TLS files, the token file and the model repository; live
        streams go on."""
        log.info("reloading TLS and token files, rescanning the model repository")
        if self.tls is not None:
            self.tls.reload()
        self.auth.reload()
        if self.registry is not None and self.settings.model_repository:
            names = None
            if self.settings.model_control == "explicit":
                names = list(self.engine.models) if self.engine is not None else []
            task = asyncio.get_running_loop().create_task(self._rescan(names), name="rescan")
            self._tasks.append(task)

    async def _rescan(self, names: list[str] | None) -> None:
        assert self.registry is not None
        await self.registry.sync(
            names, unload_missing=names is None and self.settings.model_control == "poll"
        )
        if not self._stopping:
            await self._set_health(SERVING if self.plane.serving else NOT_SERVING)

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.repository_poll_secs)
            await self._rescan(None)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def _watch_store(self, access: StoreAccess) -> None:
        """Health follows the state store's, except while draining."""
        async for ok in access.health.changes():
            if not self._stopping:
                await self._set_health(SERVING if ok and self.plane.serving else NOT_SERVING)

    def _ttl_of(self, model: str) -> float:
        """A model's idle TTL: its config's, else --session-ttl (0: never)."""
        assert self.registry is not None
        config = self.registry.configs.get(model)
        if config is not None and config.idle_ttl:
            return config.idle_ttl
        return self.settings.session_ttl

    async def _evict_loop(self) -> None:
        """Drop idle sessions from memory, each model by its own TTL."""
        assert self.engine is not None
        engine = self.engine
        while True:
            ttls = [self._ttl_of(lane.model) for lane in engine.lanes]
            ttls = [t for t in ttls if t > 0] or [self.settings.session_ttl or 60.0]
            await asyncio.sleep(min(max(min(ttls) / 4, 0.05), 5.0))
            for lane in list(engine.lanes):
                ttl = self._ttl_of(lane.model)
                if ttl > 0 and not lane.unloaded:
                    await lane.cache.evict_idle(ttl)

    async def _expire_loop(self, ttl: float) -> None:
        assert self.registry is not None
        period = min(max(ttl / 4, 0.05), 60.0)
        while True:
            await asyncio.sleep(period)
            await self.registry.expire_stored(ttl)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _check_tls_files(cert: str, key: str, client_ca: str) -> None:
    """SecurityConfigError if the files are not a certificate, its own key (unencrypted) and
    CA certificates: asked of Python's OpenSSL first, as grpc would print lines of its own
    and then fail to listen."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # A password callback, so that an encrypted key fails instead of asking on the tty.
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise SecurityConfigError(f"TLS key {key} is not the key of {cert}") from exc
        why = exc.reason or "a PEM key that is encrypted or damaged"
        raise SecurityConfigError(
            f"TLS certificate {cert} with key {key} cannot be used ({why}); grpc needs an "
            "unencrypted PEM key"
        ) from exc
    if client_ca:
        try:
            context.load_verify_locations(client_ca)
        except ssl.SSLError as exc:
            raise SecurityConfigError(
                f"client CA {client_ca} holds no usable certificate ({exc.reason or exc})"
            ) from exc


def _cannot_bind(host: str, port: int) -> str | None:
    """Why gRPC could not listen on ``host:port`` and the flag to change, or None.

    Tried with a throwaway socket set up as grpc sets up its own, because grpc, failing,
    prints a line of its own before ours.
    """
    try:
        found = socket.getaddrinfo(
            host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        return f"cannot resolve {host!r} ({exc.strerror}); pick another with --host"
    problems = []
    for family, kind, proto, _, address in found:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return (
                        "the address is in use; pick another with --port (or LSTM_PORT; "
                        "0 picks a free one)"
                    )
                problems.append(exc.strerror or str(exc))
    if problems and len(problems) == len(found):  # grpc listens if one address binds
        return f"{problems[0]}; pick another with --host (or LSTM_HOST)"
    return None


async def serve(settings: Settings, log_hold: logs.HeldUntilStarted | None = None) -> int:
    """Start, serve until SIGTERM/SIGINT; 1 after one line on stderr if the start fails."""
    server = Server(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop()))
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    try:
        await server.start()
    except (
        SecurityConfigError,
        ModelContractError,
        ConfigError,
        DeviceUnavailableError,
        OSError,
        StoreError,
        StoreMismatchError,
    ) as exc:
        # The one line a failed start prints; nothing else was logged about it.
        await server.stop(0)
        if log_hold is not None:
            log_hold.started(False)
        print(f"lstm-serve: {exc}", file=sys.stderr, flush=True)
        return 1
    if log_hold is not None:
        log_hold.started(True)
    tune_gc()
    print(
        f"lstm-serve: gRPC on {settings.host}:{server.port}, "
        f"metrics on http://{settings.metrics_bind_host}:{server.metrics_port}/metrics",
        flush=True,
    )
    await server.wait_stopped()
    return 0


MMAP_THRESHOLD_BYTES = 256 << 10
"""Buffers from this size up are mmapped by glibc and returned to the OS when freed."""


def fix_malloc_threshold() -> None:
    """Pin glibc's mmap threshold (the process entry point only; a no-op elsewhere).

    glibc raises the threshold dynamically each time a large block is freed, after
    which per-request buffers land in the heap between long-lived session objects
    and the heap cannot shrink: 1M sessions measured 1145 MiB RSS with the dynamic
    threshold and about 900 MiB with it pinned at 256 KiB (docs/PERFORMANCE.md).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, MMAP_THRESHOLD_BYTES)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        log.debug("mallopt not available; keeping the allocator's defaults")


GC_YOUNG_THRESHOLD = 10_000
"""Allocations between young-generation collections (CPython's default is 700)."""


def tune_gc() -> None:
    """Collect less often what serving allocates, and never rescan what startup built.

    Requests in flight keep many young objects alive (futures, tasks, messages);
    at the default threshold, collections took 7-10% of the server's time with 256
    streams of one event per request, and none ran in 4 s with this one
    (docs/PERFORMANCE.md).
    Objects alive once the model is loaded (modules, the graph, gRPC's machinery)
    live as long as the process: ``gc.freeze`` takes them out of every collection.
    Session state is never tracked by the collector (numpy rows, str ids, int slots).
    """
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def main(argv: Sequence[str] | None = None) -> int:
    settings = Settings.from_args(argv)
    log_hold = logs.configure(settings.log_level, settings.log_format)
    fix_malloc_threshold()
    return asyncio.run(serve(settings, log_hold))


if __name__ == "__main__":
    sys.exit(main())
