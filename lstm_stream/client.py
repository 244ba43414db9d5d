"""A client for lstm-serve: ``from lstm_stream import Client, AsyncClient``.

Events go as numpy rows in the columnar form (one buffer per request) and come
back as numpy. With ``exactly_once`` (the default) every event gets the next
``seq`` of its session, starting after the ``last_seq`` the server holds, so a
call retried after a reconnect is applied once: what was applied comes back
``duplicate``. An event may bring its own seq (``seqs``; 0 = number it for me): it
is sent as it is, and the session's numbering continues after the highest seq sent
so far, so explicit and automatic seqs mixed in one session never apply an event
twice (an explicit seq at or below one already applied comes back ``duplicate``).

Calls are retried on ``UNAVAILABLE`` (a restart, a drain) for up to ``retry_for``
seconds; a stream is reopened and its unanswered requests re-sent. With
``connect_timeout`` given, a client that has not reached a server yet first waits
that long for a connection: a wrong address (refused, a name that does not
resolve, a listener that never answers the handshake) fails in that time, while a
server that answered once and then went away is retried for ``retry_for``. Giving
up on a server that cannot be reached raises ``Unreachable`` ("cannot reach
HOST:PORT (connection refused)"). ``on_retry(code, details)``, when given, is
called each time a call or a stream starts retrying for ``retry_for`` (once per
outage, not per attempt; the connect timeout is not announced).

An address is ``HOST:PORT`` (``[V6]:PORT``) or a gRPC target with a scheme
(``unix:PATH``, ``dns:///HOST:PORT``...); one without a port is refused
(``ValueError``) rather than meaning gRPC's 443. A name under ``.invalid`` never
resolves (RFC 6761) and fails at once, without a lookup.

Calls for one session carry an ``x-session-id`` header, so a proxy hashing on it
(deploy/haproxy/haproxy.cfg) routes a session to the replica that holds it;
``ShardedClient`` spreads a multi-session workload over replica addresses itself.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lstm_stream.v1 import lstm_stream_pb2 as pb
from lstm_stream.v1 import lstm_stream_pb2_grpc as pb_grpc

Batch = (
    tuple[Sequence[str], np.ndarray]
    | tuple[Sequence[str], np.ndarray, Sequence[bool] | None]
    | tuple[Sequence[str], np.ndarray, Sequence[bool] | None, Sequence[int] | None]
)
"""``(session_ids, values [n, E])``, optionally with ``resets`` and ``seqs`` (either None)."""

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
"""Codes after which a call is sent again (gRPC's own INTERNAL race at a restart too).
These calls never cancel themselves: CANCELLED is a proxy dropping the call's stream
because its replica went away."""
SESSION_HEADER = "x-session-id"
MAX_SEQ = (1 << 64) - 1
SCHEMES = ("dns", "unix", "unix-abstract", "ipv4", "ipv6", "vsock")
"""gRPC target schemes: such an address goes to gRPC as it is, unchecked."""
REASONS = (
    ("connection refused", "connection refused"),
    ("dns resolution failed", "name does not resolve"),
    ("errors resolving", "name does not resolve"),
    ("lookup failed", "name does not resolve"),
    ("domain name not found", "name does not resolve"),
    ("name or service not known", "name does not resolve"),
    ("no route to host", "no route to host"),
    ("network is unreachable", "network unreachable"),
    ("connection reset", "connection reset"),
    ("timeout", "timed out"),
    ("timed out", "timed out"),
    ("deadline", "timed out"),
    ("handshake", "TLS handshake failed"),
    ("socket closed", "connection closed"),
    ("failed to connect", "cannot connect"),
)
"""gRPC's transport errors (lower-cased fragments of its details) in words; anything
else with UNAVAILABLE came from a server that was reached."""

RetryHook = Callable[[grpc.StatusCode, str], None]
"""``on_retry(code, details)``: a call or stream failed with a retryable status and is
about to be retried for up to ``retry_for`` seconds."""


def session_header(session_id: str) -> str:
    """``x-session-id``'s value: the id, percent-encoded unless it is printable ASCII."""
    if session_id.isascii() and session_id.isprintable():
        return session_id
    return quote(session_id, safe="")


def rendezvous(session_id: str, addresses: Sequence[str]) -> int:
    """Which of ``addresses`` owns a session: highest random weight (rendezvous) hashing.

    Every client computes the same owner; adding an address moves only the sessions
    it now wins (about 1/N), removing one moves only its own.
    """
    key = session_id.encode("utf-8", "surrogatepass")
    weights = [hashlib.blake2b(key, digest_size=8, key=a.encode()[:64]).digest() for a in addresses]
    return max(range(len(addresses)), key=weights.__getitem__)


def check_address(address: str) -> str | None:
    """The host of ``HOST:PORT`` (None for a target with a scheme); ValueError without a port."""
    scheme, colon, _ = address.partition(":")
    if colon and scheme.lower() in SCHEMES:
        return None
    if address.startswith("["):
        host, bracket, rest = address[1:].partition("]")
        port = rest[1:] if bracket and rest.startswith(":") else ""
    elif address.count(":") > 1:
        raise ValueError(f"address {address!r}: write an IPv6 address as [ADDRESS]:PORT")
    else:
        host, _, port = address.partition(":")
    if not port:
        raise ValueError(
            f"address {address!r} has no port: give HOST:PORT (lstm-serve listens on 50051)"
        )
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address {address!r}: the port must be a number from 1 to 65535")
    return host


def never_resolves(host: str | None) -> bool:
    """RFC 6761: resolvers answer names under ``.invalid`` negatively at once, so do we."""
    name = (host or "").lower().rstrip(".")
    return name == "invalid" or name.endswith(".invalid")


def unreachable_reason(details: str) -> str | None:
    """gRPC's details of a call that never got to a server, in words; None otherwise."""
    lowered = details.lower()
    return next((words for fragment, words in REASONS if fragment in lowered), None)


class LstmError(Exception):
    """A call failed for good: the server's status code and message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class Unreachable(LstmError):
    """No server answered at the address: ``str()`` is "cannot reach HOST:PORT (reason)".

    ``code`` is UNAVAILABLE, ``message`` gRPC's own details, ``reason`` the words.
    """

    def __init__(self, address: str, reason: str, details: str = ""):
        super().__init__(grpc.StatusCode.UNAVAILABLE, details or reason)
        self.args = (f"cannot reach {address} ({reason})",)
        self.address = address
        self.reason = reason


@dataclass
class Results:
    """The answers to ``n`` events, as arrays: row ``i`` answers event ``i``."""

    steps: np.ndarray
    outputs: np.ndarray
    """``[n, O]`` float32; zeros where ``codes[i] != 0``."""
    codes: np.ndarray
    duplicates: np.ndarray
    errors: list[str]
    seqs: np.ndarray
    """The seq each event was sent with (its own, or the one the client numbered)."""
    versions: np.ndarray
    """The model version that computed each answer (the protocol's ``model_version``;
    0 where refused)."""

    @property
    def ok(self) -> bool:
        return not self.codes.any()


@dataclass
class _Request:
    ids: list[str]
    values: np.ndarray
    seqs: np.ndarray
    resets: np.ndarray
    message: pb.StepRequest


def _retryable(exc: grpc.RpcError) -> bool:
    code = exc.code()  # type: ignore[attr-defined]
    details = exc.details() or ""  # type: ignore[attr-defined]
    return code in RETRYABLE or (
        code == grpc.StatusCode.INTERNAL and "Internal error from Core" in details
    )


def _credentials(
    tls_ca: str | None, tls_cert: str | None, tls_key: str | None
) -> grpc.ChannelCredentials | None:
    if not (tls_ca or tls_cert):
        return None

    def read(path: str | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()

    return grpc.ssl_channel_credentials(read(tls_ca), read(tls_key), read(tls_cert))


class _Core:
    """What both clients share: seq numbering and message building; no I/O."""

    def __init__(
        self,
        address: str,
        token: str | None,
        exactly_once: bool,
        retry_for: float,
        form: str,
        on_retry: RetryHook | None = None,
        model: str = "",
        connect_timeout: float | None = None,
    ):
        if form not in ("columnar", "events"):
            raise ValueError("form must be 'columnar' or 'events'")
        self.address = address
        self.never_resolves = never_resolves(check_address(address))
        self.connect_timeout = connect_timeout
        self.reached = False
        """Whether a server has answered (anything, errors included) on this client."""
        self.form = form
        self.model = model
        """The model every call names ("": the server's default model)."""
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.exactly_once = exactly_once
        self.retry_for = retry_for
        self.on_retry = on_retry
        self.last_seq: dict[str, int] = {}
        """Per session, the highest seq sent (or the server's ``last_seq``, read first)."""
        self.output_size = 0

    def check_name(self) -> None:
        """Before a call: a name that can never resolve fails without a lookup."""
        if self.never_resolves:
            raise Unreachable(self.address, "name does not resolve")

    def connecting(self) -> float | None:
        """Before a call: how long to wait for a connection first (None: do not wait).

        "Never reached" and "went away" look alike to gRPC (both UNAVAILABLE); what tells
        them apart is whether this client has reached a server yet. Until it has, with
        ``connect_timeout`` given, the channel gets that long to connect (a refused
        connection, a name that does not resolve, a handshake that hangs); after, a failure
        is retried for ``retry_for``.
        """
        self.check_name()
        return None if self.reached else self.connect_timeout

    def not_connected(self, probe: grpc.RpcError) -> Unreachable | None:
        """Why the channel did not connect, from a short call made after the wait."""
        code, details = probe.code(), probe.details() or ""  # type: ignore[attr-defined]
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return Unreachable(self.address, "timed out", details)
        if code == grpc.StatusCode.UNAVAILABLE:
            return Unreachable(
                self.address, unreachable_reason(details) or "cannot connect", details
            )
        return None  # a server answered it after all

    def retrying(self, exc: grpc.RpcError) -> None:
        """Tell ``on_retry`` that a call or stream starts retrying after ``exc``."""
        if self.on_retry is not None:
            self.on_retry(exc.code(), exc.details() or "")  # type: ignore[attr-defined]

    def error(self, exc: grpc.RpcError) -> LstmError:
        """The error a failed call raises: ``Unreachable`` when no server answered it."""
        code, details = exc.code(), exc.details() or ""  # type: ignore[attr-defined]
        reason = unreachable_reason(details) if code == grpc.StatusCode.UNAVAILABLE else None
        if reason is not None:
            return Unreachable(self.address, reason, details)
        return LstmError(code, details)

    def unknown(self, ids: Iterable[str]) -> list[str]:
        if not self.exactly_once:
            return []
        return [i for i in dict.fromkeys(ids) if i not in self.last_seq]

    def routed(self, ids: Sequence[str]) -> tuple[tuple[str, str], ...]:
        """The call's metadata: with ``x-session-id`` when every event is for one session."""
        if not ids:
            return self.metadata
        first = ids[0]
        if len(ids) > 1 and any(sid != first for sid in ids):
            return self.metadata
        return (*self.metadata, (SESSION_HEADER, session_header(first)))

    def learn(self, session_id: str, session: pb.Session | None) -> None:
        self.last_seq[session_id] = session.last_seq if session is not None else 0

    def request(
        self,
        ids: Sequence[str],
        values: np.ndarray,
        resets: Sequence[bool] | None,
        given: Sequence[int] | np.ndarray | None = None,
    ) -> _Request:
        ids = list(ids)
        values = _float32(values)
        if values.ndim != 2 or values.shape[0] != len(ids):
            raise ValueError(f"values must be [{len(ids)}, E]; got {list(values.shape)}")
        n = len(ids)
        seqs = np.zeros(n, np.uint64) if given is None else _seqs(given, n)
        if self.exactly_once:
            # One counter per session for both kinds: an automatic seq comes after every
            # seq sent before it, so no two events of a session ever share one.
            last = self.last_seq
            for i, sid in enumerate(ids):
                own = int(seqs[i])
                if own:
                    last[sid] = max(last[sid], own)
                else:
                    last[sid] += 1
                    seqs[i] = last[sid]
        sequenced = self.exactly_once or bool(seqs.any())
        reset_array = np.zeros(n, np.bool_) if resets is None else np.asarray(resets, np.bool_)
        if self.form == "events":
            message = pb.StepRequest(
                events=[
                    pb.Event(session_id=sid, seq=int(q), values=row.tolist(), reset=bool(r))
                    for sid, q, row, r in zip(ids, seqs, values, reset_array)
                ],
                model=self.model,
            )
            return _Request(ids, values, seqs, reset_array, message)
        batch = pb.EventBatch(
            session_ids=ids,
            values=values.tobytes(),
            seqs=seqs.tolist() if sequenced else [],
            resets=reset_array.tolist() if reset_array.any() else [],
        )
        return _Request(
            ids, values, seqs, reset_array, pb.StepRequest(batch=batch, model=self.model)
        )

    def ref(self, session_id: str) -> pb.SessionRef:
        return pb.SessionRef(session_id=session_id, model=self.model)

    def results(self, request: _Request, response: pb.StepResponse) -> Results:
        if response.code:
            raise LstmError(grpc.StatusCode(_code(response.code)), response.error)
        if not response.HasField("batch"):
            rs = response.results
            width = max((len(r.output) for r in rs), default=0)
            outputs = np.zeros((len(rs), width), np.float32)
            for i, r in enumerate(rs):
                if len(r.output):
                    outputs[i] = r.output
            return Results(
                steps=np.array([r.step for r in rs], np.uint64),
                outputs=outputs,
                codes=np.array([r.code for r in rs], np.int32),
                duplicates=np.array([r.duplicate for r in rs], np.bool_),
                errors=[r.error for r in rs],
                seqs=request.seqs,
                versions=np.array([r.model_version for r in rs], np.uint64),
            )
        b = response.batch
        n = len(b.steps)
        outputs = np.frombuffer(b.outputs, "<f4").reshape(n, -1) if n else np.zeros((0, 0))
        return Results(
            steps=np.array(b.steps, np.uint64),
            outputs=outputs,
            codes=np.array(b.codes, np.int32),
            duplicates=np.array(b.duplicates, np.bool_),
            errors=list(b.errors),
            seqs=request.seqs,
            versions=np.array(b.model_versions, np.uint64)
            if len(b.model_versions)
            else np.zeros(n, np.uint64),
        )


def _float32(values: np.ndarray) -> np.ndarray:
    """``values`` as contiguous little-endian float32; ValueError where one does not fit."""
    array = np.asarray(values)
    if array.dtype == np.float32:
        return np.ascontiguousarray(array, "<f4")
    with np.errstate(over="raise", invalid="ignore"):
        try:
            return np.ascontiguousarray(array, "<f4")
        except FloatingPointError:
            raise ValueError("values out of float32 range") from None


def _seqs(given: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    """Explicit seqs (0: numbered by the client) as uint64; ValueError when not n of 0..2^64-1."""
    if len(given) != n:
        raise ValueError(f"seqs must have {n} entries; got {len(given)}")
    as_ints = [int(q) for q in given]
    if any(not 0 <= q <= MAX_SEQ for q in as_ints):
        raise ValueError("seqs must be whole numbers from 0 to 2^64-1")
    return np.array(as_ints, np.uint64)


def _resets_seqs(extra: list[Any]) -> tuple[Sequence[bool] | None, Any]:
    """A batch's optional third and fourth items (resets, seqs)."""
    return (extra[0] if extra else None), (extra[1] if len(extra) > 1 else None)


def _code(number: int) -> tuple[int, str]:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code.value  # type: ignore[no-any-return]
    return grpc.StatusCode.UNKNOWN.value  # type: ignore[no-any-return]


class Client:
    """Blocking client. ``with Client("host:50051") as c: out = c.step("user-7", x)``."""

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        *,
        token: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        exactly_once: bool = True,
        retry_for: float = 30.0,
        window: int = 8,
        form: str = "columnar",
        on_retry: RetryHook | None = None,
        model: str = "",
        connect_timeout: float | None = None,
    ):
        core = _Core(
            address, token, exactly_once, retry_for, form, on_retry, model, connect_timeout
        )
        credentials = _credentials(tls_ca, tls_cert, tls_key)
        options = [("grpc.max_receive_message_length", 64 << 20)]
        self.channel = (
            grpc.secure_channel(address, credentials, options)
            if credentials
            else grpc.insecure_channel(address, options)
        )
        self.stub = pb_grpc.LstmStreamStub(self.channel)
        self.core = core
        self.window = window

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method: Any, message: Any, ids: Sequence[str] = ()) -> Any:
        """``method(message)``, retried; ``ids``: the sessions it is for (routing header)."""
        self._connect()
        deadline = None
        delay = 0.05
        metadata = self.core.routed(ids)
        while True:
            try:
                reply = method(message, metadata=metadata)
                self.core.reached = True
                return reply
            except grpc.RpcError as exc:
                if not _retryable(exc):
                    self.core.reached = True
                    raise self.core.error(exc) from exc
                first = deadline is None
                if deadline is None:
                    deadline = time.monotonic() + self.core.retry_for
                if time.monotonic() + delay > deadline:
                    raise self.core.error(exc) from exc
                if first:
                    self.core.retrying(exc)
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _connect(self) -> None:
        """Before this client's first answer: wait ``connect_timeout`` for a connection."""
        timeout = self.core.connecting()
        if timeout is None:
            return
        ready = grpc.channel_ready_future(self.channel)
        try:
            ready.result(timeout=timeout)
        except grpc.FutureTimeoutError:
            ready.cancel()
            try:  # fails at once with gRPC's reason, or times out while it still connects
                health_pb2_grpc.HealthStub(self.channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=0.3
                )
            except grpc.RpcError as probe:
                failure = self.core.not_connected(probe)
                if failure is not None:
                    raise failure from None
        self.core.reached = True

    def _on(self, method: Any, session_id: str) -> pb.Session:
        return self._call(method, self.core.ref(session_id), [session_id])  # type: ignore[no-any-return]

    def _prepare(self, ids: Sequence[str]) -> None:
        for sid in self.core.unknown(ids):
            try:
                session = self.get_session(sid)
            except LstmError as exc:
                if exc.code != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                session = None  # a bad id: its events are refused one by one
            self.core.learn(sid, session)

    def step_many(
        self,
        session_ids: Sequence[str],
        values: np.ndarray,
        resets: Sequence[bool] | None = None,
        seqs: Sequence[int] | np.ndarray | None = None,
    ) -> Results:
        """Apply ``values[i]`` to ``session_ids[i]``, in order; one request. ``seqs[i]``:
        the event's own seq (0 or no ``seqs``: the client numbers it)."""
        self._prepare(session_ids)
        request = self.core.request(session_ids, values, resets, seqs)
        return self.core.results(request, self._call(self.stub.Step, request.message, request.ids))

    def step(
        self, session_id: str, values: np.ndarray, reset: bool = False, seq: int = 0
    ) -> np.ndarray:
        """One event; its output, or LstmError when the server refused it."""
        r = self.step_many([session_id], np.asarray(values)[None, :], [reset], [seq])
        if r.codes[0]:
            raise LstmError(grpc.StatusCode(_code(int(r.codes[0]))), r.errors[0])
        return r.outputs[0]

    def stream(self, batches: Iterable[Batch], session_id: str | None = None) -> Iterator[Results]:
        """Pipeline ``(session_ids, values[, resets[, seqs]])`` batches over one stream,
        ``window`` in flight; yields each batch's results in order. A broken stream is
        reopened and what it had not answered is sent again (applied once, thanks to seq).
        ``session_id``: the one session the stream is for, sent as ``x-session-id`` for a
        hashing proxy."""
        self._connect()
        metadata = self.core.routed([session_id] if session_id is not None else [])
        source = iter(batches)
        pending: collections.deque[_Request] = collections.deque()
        deadline = None
        current = [0]  # the live stream's number; an older request iterator stops
        exhausted = False
        # A replaced stream's iterator may still be blocked reading ``source`` (a pipe, a
        # terminal) in gRPC's thread: ``reading`` lets one iterator read at a time, and a
        # batch it reads for a stream already replaced is handed to the live one, in order.
        reading = threading.Lock()
        handed: list[Any] = []
        # ``switching``: a request is numbered and queued wholly before or after a reconnect
        # takes its snapshot of what to send again.
        switching = threading.Lock()
        # A batch that cannot be sent (values of the wrong shape, the caller's iterable
        # raising): nothing more is read, the batches before it are answered and yielded,
        # then the stream raises that error (gRPC would only say "Exception iterating").
        failure: list[Exception] = []
        while True:
            with switching:
                current[0] += 1
                replay = tuple(pending)

            def requests(
                mine: int = current[0], replay: tuple[_Request, ...] = replay
            ) -> Iterator[pb.StepRequest]:
                nonlocal exhausted
                for request in replay:
                    yield request.message
                while True:
                    while len(pending) >= self.window and mine == current[0]:
                        time.sleep(0.0005)  # the reader below frees room as answers arrive
                    with reading:
                        if mine != current[0] or exhausted:
                            return  # a reconnect replaced this stream
                        try:
                            batch = handed.pop() if handed else next(source)
                            ids, values, *extra = batch
                            self._prepare(ids)
                            with switching:
                                if mine != current[0]:
                                    handed.append(batch)
                                    return
                                request = self.core.request(ids, values, *_resets_seqs(extra))
                                pending.append(request)
                        except StopIteration:
                            exhausted = True
                            return
                        except Exception as exc:
                            failure.append(exc)
                            exhausted = True
                            return
                    yield request.message

            call = self.stub.StreamSteps(requests(), metadata=metadata)
            try:
                for response in call:
                    deadline = None
                    self.core.reached = True
                    yield self.core.results(pending.popleft(), response)
                if exhausted and not pending:
                    if failure:
                        raise failure[0]
                    return
            except grpc.RpcError as exc:
                if not _retryable(exc):
                    self.core.reached = True
                    raise self.core.error(exc) from exc
                if deadline is None:  # the first failure since the last answer
                    deadline = time.monotonic() + self.core.retry_for
                    if self.core.retry_for > 0:
                        self.core.retrying(exc)
                if time.monotonic() > deadline:
                    raise self.core.error(exc) from exc
                time.sleep(0.2)

    def get_session(self, session_id: str) -> pb.Session | None:
        try:
            return self._on(self.stub.GetSession, session_id)
        except LstmError as exc:
            if exc.code == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    def reset_session(self, session_id: str) -> pb.Session:
        return self._on(self.stub.ResetSession, session_id)

    def delete_session(self, session_id: str) -> pb.Session:
        self.core.last_seq.pop(session_id, None)
        return self._on(self.stub.DeleteSession, session_id)

    def model_info(self, version: int = 0) -> pb.ModelInfo:
        message = pb.ModelInfoRequest(model=self.core.model, version=version)
        return self._call(self.stub.GetModelInfo, message)  # type: ignore[no-any-return]

    def list_models(self) -> pb.ModelList:
        """Every model version the server knows, with its state."""
        return self._call(self.stub.ListModels, pb.ListModelsRequest())  # type: ignore[no-any-return]

    def health(self) -> str:
        """SERVING, NOT_SERVING, or the error that prevented asking ("CODE: details"; not
        retried)."""
        try:
            self._connect()
        except Unreachable as exc:
            return f"UNAVAILABLE: {exc}"
        stub = health_pb2_grpc.HealthStub(self.channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
        self.core.reached = True
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


class AsyncClient:
    """The asyncio client: the same calls, awaited. ``async with AsyncClient(...) as c:``."""

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        *,
        token: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        exactly_once: bool = True,
        retry_for: float = 30.0,
        window: int = 8,
        form: str = "columnar",
        on_retry: RetryHook | None = None,
        model: str = "",
        connect_timeout: float | None = None,
    ):
        core = _Core(
            address, token, exactly_once, retry_for, form, on_retry, model, connect_timeout
        )
        credentials = _credentials(tls_ca, tls_cert, tls_key)
        options = [("grpc.max_receive_message_length", 64 << 20)]
        self.channel = (
            grpc.aio.secure_channel(address, credentials, options)
            if credentials
            else grpc.aio.insecure_channel(address, options)
        )
        self.stub = pb_grpc.LstmStreamStub(self.channel)
        self.core = core
        self.window = window

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def _call(self, method: Any, message: Any, ids: Sequence[str] = ()) -> Any:
        await self._connect()
        deadline = None
        delay = 0.05
        metadata = self.core.routed(ids)
        while True:
            try:
                reply = await method(message, metadata=metadata)
                self.core.reached = True
                return reply
            except grpc.aio.AioRpcError as exc:
                if not _retryable(exc):
                    self.core.reached = True
                    raise self.core.error(exc) from exc
                first = deadline is None
                if deadline is None:
                    deadline = time.monotonic() + self.core.retry_for
                if time.monotonic() + delay > deadline:
                    raise self.core.error(exc) from exc
                if first:
                    self.core.retrying(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _connect(self) -> None:
        """As ``Client._connect``."""
        timeout = self.core.connecting()
        if timeout is None:
            return
        try:
            await asyncio.wait_for(self.channel.channel_ready(), timeout)
        except asyncio.TimeoutError:
            try:
                await health_pb2_grpc.HealthStub(self.channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=0.3
                )
            except grpc.aio.AioRpcError as probe:
                failure = self.core.not_connected(probe)
                if failure is not None:
                    raise failure from None
        self.core.reached = True

    async def _on(self, method: Any, session_id: str) -> pb.Session:
        return await self._call(method, self.core.ref(session_id), [session_id])  # type: ignore[no-any-return]

    async def _prepare(self, ids: Sequence[str]) -> None:
        unknown = self.core.unknown(ids)
        found = await asyncio.gather(*(self._known(sid) for sid in unknown))
        for sid, session in zip(unknown, found):
            self.core.learn(sid, session)

    async def _known(self, session_id: str) -> pb.Session | None:
        try:
            return await self.get_session(session_id)
        except LstmError as exc:
            if exc.code != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            return None  # a bad id: its events are refused one by one

    async def step_many(
        self,
        session_ids: Sequence[str],
        values: np.ndarray,
        resets: Sequence[bool] | None = None,
        seqs: Sequence[int] | np.ndarray | None = None,
    ) -> Results:
        await self._prepare(session_ids)
        request = self.core.request(session_ids, values, resets, seqs)
        return self.core.results(
            request, await self._call(self.stub.Step, request.message, request.ids)
        )

    async def step(
        self, session_id: str, values: np.ndarray, reset: bool = False, seq: int = 0
    ) -> np.ndarray:
        r = await self.step_many([session_id], np.asarray(values)[None, :], [reset], [seq])
        if r.codes[0]:
            raise LstmError(grpc.StatusCode(_code(int(r.codes[0]))), r.errors[0])
        return r.outputs[0]

    async def stream(
        self, batches: Iterable[Batch], session_id: str | None = None
    ) -> AsyncIterator[Results]:
        """As ``Client.stream``: pipelined, in order, resumed after a reconnect."""
        await self._connect()
        metadata = self.core.routed([session_id] if session_id is not None else [])
        source = iter(batches)
        pending: collections.deque[_Request] = collections.deque()
        handed: list[Any] = []
        exhausted = False
        failure: list[Exception] = []  # as in Client.stream: raised once the rest is answered
        deadline = None
        while True:
            call = self.stub.StreamSteps(metadata=metadata)
            room = asyncio.Semaphore(self.window)

            async def write(
                call: Any = call,
                room: asyncio.Semaphore = room,
                replay: tuple[_Request, ...] = tuple(pending),
            ) -> None:
                nonlocal exhausted
                try:
                    for request in replay:
                        await room.acquire()
                        await call.write(request.message)
                    while True:
                        await room.acquire()
                        if exhausted:
                            await call.done_writing()
                            return
                        request = await self._next_request(source, handed, failure)
                        if request is None:
                            exhausted = True
                            await call.done_writing()
                            return
                        pending.append(request)
                        await call.write(request.message)
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    return  # the stream broke: the reader sees why and opens another

            writer = asyncio.ensure_future(write())
            try:
                async for response in call:
                    deadline = None
                    self.core.reached = True
                    room.release()
                    yield self.core.results(pending.popleft(), response)
                await writer
                if exhausted and not pending:
                    if failure:
                        raise failure[0]
                    return
            except grpc.aio.AioRpcError as exc:
                writer.cancel()
                if not _retryable(exc):
                    self.core.reached = True
                    raise self.core.error(exc) from exc
                if deadline is None:  # the first failure since the last answer
                    deadline = time.monotonic() + self.core.retry_for
                    if self.core.retry_for > 0:
                        self.core.retrying(exc)
                if time.monotonic() > deadline:
                    raise self.core.error(exc) from exc
                await asyncio.sleep(0.2)
            finally:
                writer.cancel()

    async def _next_request(
        self, source: Iterator[Batch], handed: list[Any], failure: list[Exception]
    ) -> _Request | None:
        """The next batch of ``stream``'s as a request; None once there are no more, or when
        one cannot be sent (the error is put in ``failure``)."""
        try:
            batch = handed.pop() if handed else next(source)
            ids, values, *extra = batch
            await self._prepare(ids)
            return self.core.request(ids, values, *_resets_seqs(extra))
        except StopIteration:
            return None
        except asyncio.CancelledError:  # only _prepare awaits: the batch is read by then
            handed.append(batch)  # the stream broke: the next one sends it
            raise
        except Exception as exc:
            failure.append(exc)
            return None

    async def get_session(self, session_id: str) -> pb.Session | None:
        try:
            return await self._on(self.stub.GetSession, session_id)
        except LstmError as exc:
            if exc.code == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    async def reset_session(self, session_id: str) -> pb.Session:
        return await self._on(self.stub.ResetSession, session_id)

    async def delete_session(self, session_id: str) -> pb.Session:
        self.core.last_seq.pop(session_id, None)
        return await self._on(self.stub.DeleteSession, session_id)

    async def model_info(self, version: int = 0) -> pb.ModelInfo:
        message = pb.ModelInfoRequest(model=self.core.model, version=version)
        return await self._call(self.stub.GetModelInfo, message)  # type: ignore[no-any-return]

    async def list_models(self) -> pb.ModelList:
        """Every model version the server knows, with its state."""
        return await self._call(self.stub.ListModels, pb.ListModelsRequest())  # type: ignore[no-any-return]

    async def health(self) -> str:
        """SERVING, NOT_SERVING, or the error that prevented asking (not retried)."""
        try:
            await self._connect()
        except Unreachable as exc:
            return f"UNAVAILABLE: {exc}"
        stub = health_pb2_grpc.HealthStub(self.channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
        self.core.reached = True
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


class ShardedClient:
    """A ``Client`` per replica address; each session always goes to the same one.

    The owner is chosen by rendezvous hashing (``rendezvous``), so no proxy is needed
    and adding an address moves only ~1/N of the sessions. ``step_many`` splits a
    request by owner and sends the parts concurrently; results come back in order.
    Keyword arguments are those of ``Client``.
    """

    def __init__(self, addresses: Sequence[str], **options: Any):
        if not addresses:
            raise ValueError("ShardedClient needs at least one address")
        self.addresses = list(addresses)
        self.clients = [Client(a, **options) for a in self.addresses]
        self._pool = ThreadPoolExecutor(len(self.clients), thread_name_prefix="lstm-shard")

    def __enter__(self) -> ShardedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for client in self.clients:
            client.close()

    def owner(self, session_id: str) -> Client:
        return self.clients[rendezvous(session_id, self.addresses)]

    def step_many(
        self,
        session_ids: Sequence[str],
        values: np.ndarray,
        resets: Sequence[bool] | None = None,
        seqs: Sequence[int] | np.ndarray | None = None,
    ) -> Results:
        """Apply ``values[i]`` to ``session_ids[i]``: one request per replica, concurrently."""
        values = _float32(values)
        owners = np.array([rendezvous(sid, self.addresses) for sid in session_ids], np.int64)
        parts = [np.flatnonzero(owners == k) for k in range(len(self.clients))]

        def send(k: int) -> Results:
            rows = parts[k]
            return self.clients[k].step_many(
                [session_ids[i] for i in rows.tolist()],
                values[rows],
                None if resets is None else [bool(resets[i]) for i in rows.tolist()],
                None if seqs is None else [int(seqs[i]) for i in rows.tolist()],
            )

        busy = [k for k, rows in enumerate(parts) if rows.size]
        answered = dict(zip(busy, self._pool.map(send, busy)))
        n = len(session_ids)
        width = max((r.outputs.shape[1] for r in answered.values()), default=0)
        out = Results(
            steps=np.zeros(n, np.uint64),
            outputs=np.zeros((n, width), np.float32),
            codes=np.zeros(n, np.int32),
            duplicates=np.zeros(n, np.bool_),
            errors=[""] * n,
            seqs=np.zeros(n, np.uint64),
            versions=np.zeros(n, np.uint64),
        )
        for k, r in answered.items():
            rows = parts[k]
            out.steps[rows] = r.steps
            out.outputs[rows] = r.outputs
            out.codes[rows] = r.codes
            out.duplicates[rows] = r.duplicates
            out.seqs[rows] = r.seqs
            out.versions[rows] = r.versions
            for i, error in zip(rows.tolist(), r.errors):
                out.errors[i] = error
        return out

    def step(
        self, session_id: str, values: np.ndarray, reset: bool = False, seq: int = 0
    ) -> np.ndarray:
        return self.owner(session_id).step(session_id, values, reset, seq)

    def get_session(self, session_id: str) -> pb.Session | None:
        return self.owner(session_id).get_session(session_id)

    def reset_session(self, session_id: str) -> pb.Session:
        return self.owner(session_id).reset_session(session_id)

    def delete_session(self, session_id: str) -> pb.Session:
        return self.owner(session_id).delete_session(session_id)
