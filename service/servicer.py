"""The gRPC servicer: converts protobuf to domain values and back, and calls the batcher."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType

import grpc
import numpy as np
import onnxruntime
from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp

from lstm_stream.v1 import lstm_stream_pb2 as pb
from service.batcher import Batcher, BatcherClosed, EventBlock, Job
from service.codec import encode_results, event_values
from service.errors import ClientGone, ServiceError, Undecodable, rpc, status_of
from service.metrics import Metrics
from service.runtime import ModelSpec
from service.security import Authenticator
from service.sessions import SessionSnapshot, session_id_error
from service.settings import Settings

EOF = grpc.aio.EOF  # type: ignore[attr-defined]  # not in grpc-stubs

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LstmStream"].full_name

_END = object()
_DRAIN = object()


@dataclass
class _Begun:
    """A request that has been decoded and queued; its response waits on ``job.future``."""

    columnar: bool
    block: EventBlock
    job: Job
    ids: Sequence[str]
    """The session ids as the client sent them (the block's carry the tenant's namespace)."""


class LstmStreamServicer:
    spec: ModelSpec

    """Registered before the model loads; answers UNAVAILABLE until ``attach`` is called."""

    def __init__(self, settings: Settings, metrics: Metrics, auth: Authenticator | None = None):
        self.settings = settings
        self.metrics = metrics
        self.auth = auth if auth is not None else Authenticator(None, False)
        self._batcher: Batcher | None = None
        self._streams: set[asyncio.Queue[object]] = set()
        self._draining = False
        self._state_index: dict[str, int] = {}
        self.last_call_at = 0.0

    def attach(self, batcher: Batcher) -> None:
        """Start answering: the model is loaded and warmed up."""
        self.spec = batcher.runtime.spec
        self._state_index = {name: i for i, name in enumerate(self.spec.state_names)}
        self._batcher = batcher

    @property
    def batcher(self) -> Batcher:
        if self._batcher is None:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        return self._batcher

    def start_drain(self) -> None:
        """Every stream ends, with UNAVAILABLE, once the requests it has read are answered.

        The marker goes behind what each stream has queued; its reader is stopped
        only after the status is sent (cancelling a pending read before that was
        seen to end streams with INTERNAL "Internal error from Core").
        """
        self._draining = True
        for queue in list(self._streams):
            queue.put_nowait(_DRAIN)

    # -- event RPCs --------------------------------------------------------------------

    @rpc("Step")
    async def Step(
        self, request: pb.StepRequest, context: grpc.aio.ServicerContext, ns: str
    ) -> pb.StepResponse | bytes:
        begun = self._begin(request, ns)  # refused by the batcher once it drains
        await begun.job.future
        return self._response(begun)

    @rpc("StreamSteps")
    async def StreamSteps(
        self, requests: object, context: grpc.aio.ServicerContext, ns: str
    ) -> None:
        """A reader task queues requests; this coroutine writes their responses in order.

        Written with ``context.read``/``context.write`` rather than an async
        generator: one layer less per message, measured in docs/PERFORMANCE.md.
        """
        if self._draining:
            raise BatcherClosed()
        queue: asyncio.Queue[object] = asyncio.Queue()
        window = asyncio.Semaphore(self.settings.max_inflight)
        reader = asyncio.get_running_loop().create_task(self._read(context, queue, window, ns))
        self._streams.add(queue)
        self.metrics.active_streams.inc()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _Begun):
                    await item.job.future
                    await _send(context, self._response(item))
                elif isinstance(item, pb.StepResponse):
                    await _send(context, item)
                elif item is _END:
                    return
                elif item is _DRAIN:
                    raise BatcherClosed()
                else:
                    raise item  # type: ignore[misc]
                window.release()
        finally:
            reader.cancel()
            self._streams.discard(queue)
            self.metrics.active_streams.dec()

    async def _read(
        self,
        context: grpc.aio.ServicerContext,
        queue: asyncio.Queue[object],
        window: asyncio.Semaphore,
        ns: str,
    ) -> None:
        """Read ahead at most ``max_inflight`` requests; past that the client feels flow control."""
        try:
            while True:
                await window.acquire()
                request = await context.read()
                if request is EOF:
                    queue.put_nowait(_END)
                    return
                try:
                    queue.put_nowait(self._begin(request, ns))
                except Exception as exc:  # a request rejected whole; the stream goes on
                    code, message = status_of(exc)
                    if code is grpc.StatusCode.INTERNAL:
                        raise
                    queue.put_nowait(pb.StepResponse(code=code.value[0], error=message))
        except Exception as exc:
            queue.put_nowait(exc)

    def _begin(self, request: pb.StepRequest, ns: str = "") -> _Begun:
        """Decode a request and queue its events; ServiceError for a whole-request problem.

        ``ns`` (the tenant's namespace) prefixes every session id the batcher sees.
        """
        batcher = self.batcher
        if isinstance(request, Undecodable):
            raise request.error()
        columnar = request.HasField("batch")
        if columnar and len(request.events):
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "a StepRequest carries either events or batch, not both",
            )
        block = self._decode_batch(request.batch) if columnar else self._decode_events(request)
        ids = block.session_ids
        if ns:
            self._namespace(block, ns)
        job = batcher.submit(block, include_state=request.include_state and not columnar)
        return _Begun(columnar, block, job, ids)

    def _namespace(self, block: EventBlock, ns: str) -> None:
        """Prefix the block's ids with ``ns``; ids refused as sent are marked bad here."""
        ids = block.session_ids
        lengths = list(map(len, ids))
        limit = self.settings.max_session_id_bytes
        if lengths and (min(lengths) == 0 or 4 * max(lengths) > limit):
            bad = block.bad if block.bad is not None else {}
            for i, sid in enumerate(ids):
                problem = session_id_error(sid, limit)
                if problem is not None and i not in bad:
                    bad[i] = problem
            block.bad = bad or None
        block.session_ids = [ns + sid for sid in ids]

    def _check_count(self, n: int) -> None:
        limit = self.settings.max_events_per_request
        if n > limit:
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{n} events in one request; the limit is {limit} (--max-events-per-request)",
            )

    def _decode_events(self, request: pb.StepRequest) -> EventBlock:
        events = request.events
        n = len(events)
        self._check_count(n)
        e = self.spec.event_size
        if not n:
            return EventBlock([], np.zeros((0, e), np.float32))
        # One pass over the messages; the columns are then built from plain tuples.
        ids, seq_list, reset_list, lengths = zip(
            *[(ev.session_id, ev.seq, ev.reset, len(ev.values)) for ev in events]
        )
        seqs = np.array(seq_list, np.uint64) if any(seq_list) else None
        resets = np.array(reset_list, np.bool_) if any(reset_list) else None
        bad: dict[int, str] | None = None
        if lengths.count(e) == n:
            request.DiscardUnknownFields()  # nothing may follow the values (codec.event_values)
            values = event_values(events, reset_list, e)
        else:
            values = np.zeros((n, e), np.float32)
            bad = {}
            for i, (ev, length) in enumerate(zip(events, lengths)):
                if length == e:
                    values[i] = ev.values
                else:
                    bad[i] = f"event has {length} values; the model takes {e}"
        return EventBlock(ids, values, seqs, resets, bad)

    def _decode_batch(self, batch: pb.EventBatch) -> EventBlock:
        n = len(batch.session_ids)
        self._check_count(n)
        e = self.spec.event_size
        problems = []
        if len(batch.seqs) not in (0, n):
            problems.append(f"seqs has {len(batch.seqs)} entries; expected 0 or {n}")
        if len(batch.resets) not in (0, n):
            problems.append(f"resets has {len(batch.resets)} entries; expected 0 or {n}")
        if len(batch.values) != n * e * 4:
            problems.append(
                f"values has {len(batch.values)} bytes; expected {n} x {e} float32 = {n * e * 4}"
            )
        if problems:
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT, "malformed batch: " + "; ".join(problems)
            )
        values = np.frombuffer(batch.values, dtype="<f4").reshape(n, e)
        seqs = np.array(batch.seqs, np.uint64) if len(batch.seqs) else None
        resets = np.array(batch.resets, np.bool_) if len(batch.resets) else None
        # One str per id, made once: the table keeps these very objects for new sessions.
        return EventBlock(list(batch.session_ids), values, seqs, resets)

    def _response(self, begun: _Begun) -> pb.StepResponse | bytes:
        """The answer to a request: a message (columnar) or its bytes (per-event form)."""
        job = begun.job
        if begun.columnar:
            errors = job.errors
            return pb.StepResponse(
                batch=pb.ResultBatch(
                    steps=job.steps.tolist(),
                    outputs=job.outputs.astype("<f4", copy=False).tobytes(),
                    codes=job.codes.tolist(),
                    duplicates=job.duplicates.tolist(),
                    errors=[errors.get(i, "") for i in range(job.n)] if errors else [""] * job.n,
                )
            )
        block = begun.block
        seqs = block.seqs.tolist() if block.seqs is not None else [0] * job.n
        failed = {i: (int(job.codes[i]), message) for i, message in job.errors.items()}
        hidden = cell = None
        if job.states is not None:
            hidden, cell = (
                self._named_state(job.states, "hidden"),
                self._named_state(job.states, "cell"),
            )
        return encode_results(
            begun.ids,
            seqs,
            job.steps.tolist(),
            job.outputs,
            job.duplicates.tolist(),
            failed,
            hidden,
            cell,
        )

    def _named_state(self, states: list[np.ndarray], name: str) -> np.ndarray | None:
        i = self._state_index.get(name)
        return None if i is None else states[i]

    # -- session RPCs ------------------------------------------------------------------

    def _session(self, snap: SessionSnapshot, ns: str) -> pb.Session:
        message = pb.Session(
            session_id=snap.session_id[len(ns) :],
            step=snap.step,
            last_seq=snap.last_seq,
            output=snap.output.tolist(),
            created=_timestamp(snap.created),
            updated=_timestamp(snap.updated),
        )
        for name, field in (("hidden", message.hidden), ("cell", message.cell)):
            i = self._state_index.get(name)
            if i is not None:
                field.extend(snap.states[i].tolist())
        return message

    def _known_id(self, session_id: str) -> None:
        problem = session_id_error(session_id, self.settings.max_session_id_bytes)
        if problem is not None:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, problem)

    @staticmethod
    def _not_found(session_id: str) -> ServiceError:
        return ServiceError(grpc.StatusCode.NOT_FOUND, f"no session {session_id!r}")

    @rpc("GetSession")
    async def GetSession(
        self, request: pb.SessionRef, context: grpc.aio.ServicerContext, ns: str
    ) -> pb.Session:
        self._known_id(request.session_id)
        snap = await self.batcher.get(ns + request.session_id)
        if snap is None:
            raise self._not_found(request.session_id)
        return self._session(snap, ns)

    @rpc("PutSession")
    async def PutSession(
        self, request: pb.Session, context: grpc.aio.ServicerContext, ns: str
    ) -> pb.Session:
        self._known_id(request.session_id)
        batcher = self.batcher
        states: list[np.ndarray | None] = [None] * len(self.spec.state_names)
        for name, values in (("hidden", request.hidden), ("cell", request.cell)):
            i = self._state_index.get(name)
            if i is None or not len(values):
                continue
            size = self.spec.state_sizes[i]
            array = np.array(values, np.float32)
            if array.size != size:
                raise ServiceError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{name} has {array.size} values; the model's {name} has {size}",
                )
            if not np.isfinite(array).all():
                raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"{name} contains NaN or Inf")
            states[i] = array
        if self._draining:
            raise BatcherClosed()
        snap = await batcher.put(ns + request.session_id, request.step, request.last_seq, states)
        return self._session(snap, ns)

    @rpc("ResetSession")
    async def ResetSession(
        self, request: pb.SessionRef, context: grpc.aio.ServicerContext, ns: str
    ) -> pb.Session:
        self._known_id(request.session_id)
        snap = await self.batcher.reset(ns + request.session_id)
        if snap is None:
            raise self._not_found(request.session_id)
        return self._session(snap, ns)

    @rpc("DeleteSession")
    async def DeleteSession(
        self, request: pb.SessionRef, context: grpc.aio.ServicerContext, ns: str
    ) -> pb.Session:
        self._known_id(request.session_id)
        snap = await self.batcher.delete(ns + request.session_id)
        if snap is None:
            raise self._not_found(request.session_id)
        self.metrics.evictions.labels("deleted").inc()
        return self._session(snap, ns)

    @rpc("GetModelInfo")
    async def GetModelInfo(
        self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext, ns: str
    ) -> pb.ModelInfo:
        batcher = self.batcher
        spec = self.spec
        sizes = dict(zip(spec.state_names, spec.state_sizes))
        return pb.ModelInfo(
            event_size=spec.event_size,
            hidden_size=sizes.get("hidden", 0),
            output_size=spec.output_size,
            exporter_version=spec.exporter_version,
            fingerprint=spec.fingerprint,
            execution_provider=batcher.runtime.provider,
            source=spec.source,
            state_names=list(spec.state_names),
            onnxruntime_version=onnxruntime.__version__,
            # With tenants, a tenant sees its own count only.
            live_sessions=batcher.table.tenant_live[ns[:-1]] if ns else len(batcher.table),
            max_sessions=self.settings.max_sessions,
        )


async def _send(context: grpc.aio.ServicerContext, response: pb.StepResponse | bytes) -> None:
    """Write one response; a write fails only once the call is over from the client's side."""
    try:
        await context.write(response)
    except Exception as exc:
        raise ClientGone() from exc


def add_to_server(servicer: LstmStreamServicer, server: grpc.aio.Server) -> None:
    """Register the service like the generated ``add_LstmStreamServicer_to_server``,
    with parsers that turn undecodable messages into ``Undecodable``."""
    register(servicer, server, pb, "LstmStream")


def register(servicer: object, server: grpc.aio.Server, module: ModuleType, service: str) -> None:
    """Register ``servicer``'s methods for ``service`` of a generated ``*_pb2`` module."""
    descriptor = module.DESCRIPTOR.services_by_name[service]
    handlers = {}
    for method in descriptor.methods:
        request_type = getattr(module, method.input_type.name)
        response_type = getattr(module, method.output_type.name)
        kind = (
            grpc.stream_stream_rpc_method_handler
            if method.client_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = kind(
            getattr(servicer, method.name),
            request_deserializer=_parser(request_type),
            response_serializer=_serializer(response_type),
        )
    generic = grpc.method_handlers_generic_handler(descriptor.full_name, handlers)
    server.add_generic_rpc_handlers((generic,))


def _serializer(message_type: type[Message]) -> Callable[[object], bytes]:
    """``SerializeToString``, except for answers the servicer has already written as bytes."""
    serialize = message_type.SerializeToString

    def write(message: object) -> bytes:
        return message if isinstance(message, bytes) else serialize(message)  # type: ignore[arg-type]

    return write


def _parser(message_type: type[Message]) -> Callable[[bytes], object]:
    name = message_type.DESCRIPTOR.full_name

    def parse(data: bytes) -> object:
        try:
            return message_type.FromString(data)
        except DecodeError:
            return Undecodable(name)

    return parse


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts
