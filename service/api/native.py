"""The native gRPC servicer: converts protobuf to data-plane calls and back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import onnxruntime
from google.protobuf.timestamp_pb2 import Timestamp

from lstm_stream.v1 import lstm_stream_pb2 as pb
from service.api.codec import (
    MalformedBatch,
    StepRequestWire,
    encode_batch,
    encode_results,
    read_step_request,
)
from service.api.errors import ServiceError, Undecodable, rpc, status_of
from service.api.security import Authenticator
from service.api.streams import Streams
from service.dataplane import DataPlane, EventBlock, Found, Job
from service.metrics import Metrics
from service.settings import Settings

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LstmStream"].full_name
READERS = {"StepRequest": read_step_request}
"""Requests read straight from their bytes rather than parsed into messages."""
WRITTEN = ("Step", "StreamSteps")
"""Methods whose every answer is already the response's bytes."""


@dataclass
class _Begun:
    """A request that has been decoded and queued; its response waits on ``job.future``."""

    columnar: bool
    block: EventBlock
    job: Job
    ids: list[str]
    """The session ids as the client sent them (the block's carry the tenant's namespace)."""


class LstmStreamServicer:
    """``lstm_stream.v1.LstmStream``; answers UNAVAILABLE until the data plane has a model."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        plane: DataPlane,
        auth: Authenticator | None = None,
    ):
        self.settings = settings
        self.metrics = metrics
        self.plane = plane
        self.auth = auth if auth is not None else Authenticator(None, False)
        self.streams = Streams(settings.max_inflight, metrics.active_streams)
        self.last_call_at = 0.0

    def start_drain(self) -> None:
        self.streams.start_drain()

    # -- event RPCs --------------------------------------------------------------------

    @rpc("Step")
    async def Step(
        self, request: StepRequestWire, context: grpc.aio.ServicerContext, tenant: str
    ) -> bytes:
        begun = self._begin(request, tenant)  # refused by the engine once it drains
        await begun.job.future
        return self._response(begun)

    @rpc("StreamSteps")
    async def StreamSteps(
        self, requests: object, context: grpc.aio.ServicerContext, tenant: str
    ) -> None:
        """One response per request, in order; a request refused whole is answered in-stream.

        Written with ``context.read``/``context.write`` rather than an async
        generator: one layer less per message, measured in docs/PERFORMANCE.md.
        """
        await self.streams.serve(
            context, lambda request: self._begin(request, tenant), self._response, _refusal
        )

    def _begin(self, request: StepRequestWire, tenant: str = "") -> _Begun:
        """Decode a request and queue its events; ServiceError for a whole-request problem.

        ``request`` is an ``Undecodable`` when its bytes were not a ``StepRequest``.
        """
        if request.__class__ is Undecodable:  # (no call per request, as isinstance is)
            raise request.error()  # type: ignore[attr-defined]
        if request.mixed:
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "a StepRequest carries either events or batch, not both",
            )
        n = request.n
        limit = self.settings.max_events_per_request
        if n > limit:
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{n} events in one request; the limit is {limit} (--max-events-per-request)",
            )
        route = self.plane.route(request.model)
        try:
            values, bad = request.values(route.event_size)
        except MalformedBatch as exc:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        ids = request.session_ids
        block = EventBlock(ids, values, request.seqs, request.resets, bad)
        job = self.plane.step(
            tenant,
            block,
            include_state=request.include_state and not request.columnar,
            model=request.model,
            version=request.model_version,
            route=route,
        )
        return _Begun(request.columnar, block, job, ids)

    def _response(self, begun: _Begun) -> bytes:
        """The answer to a request, as the bytes of its ``StepResponse``."""
        job = begun.job
        if begun.columnar:
            return encode_batch(
                job.steps,
                job.outputs,
                job.codes,
                job.duplicates,
                job.errors,
                job.versions,
            )
        seqs = begun.block.seqs
        errors = job.errors
        failed = {i: (int(job.codes[i]), m) for i, m in errors.items()} if errors else {}
        states = list(zip(job.state_names, job.states)) if job.states is not None else []
        return encode_results(
            begun.ids,
            seqs,
            job.steps,
            job.outputs,
            job.duplicates,
            failed,
            states,
            job.versions,
        )

    # -- session RPCs ------------------------------------------------------------------

    def _session(self, found: Found, model: str) -> pb.Session:
        snap = found.snapshot
        message = pb.Session(
            session_id=snap.session_id,
            step=snap.step,
            last_seq=snap.last_seq,
            output=snap.output.tolist(),
            created=_timestamp(snap.created),
            updated=_timestamp(snap.updated),
            model=model,
            model_version=found.version,
        )
        for name, values in zip(found.state_names, snap.states):
            if name == "hidden":
                message.hidden.extend(values.tolist())
            elif name == "cell":
                message.cell.extend(values.tolist())
            else:
                message.states.add(name=name, values=values.tolist())
        return message

    def _model_name(self, name: str) -> str:
        return self.plane.model(name).name

    @staticmethod
    def _found(found: Found | None, session_id: str) -> Found:
        if found is None:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"no session {session_id!r}")
        return found

    @rpc("GetSession")
    async def GetSession(
        self, request: pb.SessionRef, context: grpc.aio.ServicerContext, tenant: str
    ) -> pb.Session:
        found = await self.plane.get(tenant, request.session_id, request.model)
        model = self._model_name(request.model)
        return self._session(self._found(found, request.session_id), model)

    @rpc("PutSession")
    async def PutSession(
        self, request: pb.Session, context: grpc.aio.ServicerContext, tenant: str
    ) -> pb.Session:
        states: dict[str, Sequence[float]] = {}
        for name, values in (("hidden", request.hidden), ("cell", request.cell)):
            if len(values):
                states[name] = values
        for named in request.states:
            if named.name in states:
                raise ServiceError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"state {named.name!r} is given twice"
                )
            states[named.name] = named.values
        found = await self.plane.put(
            tenant,
            request.session_id,
            request.step,
            request.last_seq,
            states,
            request.model,
            request.model_version,
        )
        return self._session(found, self._model_name(request.model))

    @rpc("ResetSession")
    async def ResetSession(
        self, request: pb.SessionRef, context: grpc.aio.ServicerContext, tenant: str
    ) -> pb.Session:
        found = await self.plane.reset(tenant, request.session_id, request.model)
        model = self._model_name(request.model)
        return self._session(self._found(found, request.session_id), model)

    @rpc("DeleteSession")
    async def DeleteSession(
        self, request: pb.SessionRef, context: grpc.aio.ServicerContext, tenant: str
    ) -> pb.Session:
        found = self._found(
            await self.plane.delete(tenant, request.session_id, request.model), request.session_id
        )
        self.metrics.evictions.labels("deleted").inc()
        return self._session(found, self._model_name(request.model))

    @rpc("MigrateSession")
    async def MigrateSession(
        self, request: pb.MigrateRequest, context: grpc.aio.ServicerContext, tenant: str
    ) -> pb.Session:
        found = await self.plane.migrate(
            tenant, request.session_id, request.model, request.to_version, request.mode
        )
        model = self._model_name(request.model)
        return self._session(self._found(found, request.session_id), model)

    @rpc("GetModelInfo")
    async def GetModelInfo(
        self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext, tenant: str
    ) -> pb.ModelInfo:
        info = self.plane.info(tenant, request.model, request.version)
        spec = info.spec
        sizes = dict(zip(spec.state_names, spec.state_sizes))
        meta = spec.metadata
        return pb.ModelInfo(
            event_size=spec.event_size,
            hidden_size=sizes.get("hidden", 0),
            output_size=spec.output_size,
            exporter_version=spec.exporter_version,
            fingerprint=spec.fingerprint,
            execution_provider=info.provider,
            source=spec.source,
            state_names=list(spec.state_names),
            onnxruntime_version=onnxruntime.__version__,
            live_sessions=info.live_sessions,  # with tenants, the caller's own
            max_sessions=info.max_sessions,
            state_sizes=list(spec.state_sizes),
            architecture=pb.ModelArchitecture(
                cell=meta.get("cell", ""),
                layers=_number(meta.get("layers")),
                hidden_size=_number(meta.get("hidden_size")),
                proj_size=_number(meta.get("proj_size")),
                head=meta.get("head", ""),
                output_activation=meta.get("output_activation", ""),
                source_framework=meta.get("source_framework", ""),
                source_file=meta.get("source_file", ""),
            ),
            metadata=meta,
            model=info.model,
            version=info.version,
            versions=list(info.versions),
            retire_policy=info.retire_policy,
        )

    @rpc("ListModels")
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext, tenant: str
    ) -> pb.ModelList:
        statuses = self.plane.versions()
        newest = {}
        for name in {s.model for s in statuses}:
            try:
                lane = self.plane.model(name).newest
            except LookupError:
                continue
            if lane is not None:
                newest[name] = lane.version
        return pb.ModelList(
            versions=[
                pb.ModelVersionStatus(
                    model=s.model,
                    version=s.version,
                    state=s.state,
                    reason=s.reason,
                    live_sessions=self.plane.live_sessions(tenant, s.model, s.version),
                    newest=newest.get(s.model) == s.version,
                )
                for s in statuses
            ],
            default_model=self.plane.default_model,
        )


def _refusal(exc: Exception) -> bytes | None:
    """A request refused whole is answered in the stream, which goes on; None for a bug."""
    code, message = status_of(exc)
    if code is grpc.StatusCode.INTERNAL:
        return None
    return pb.StepResponse(code=code.value[0], error=message).SerializeToString()


def _number(text: str | None) -> int:
    """A metadata number; 0 when absent or not a number (another exporter's graph)."""
    try:
        return max(int(text or 0), 0)
    except ValueError:
        return 0


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts
