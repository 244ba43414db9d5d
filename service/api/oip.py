"""The Open Inference Protocol (KServe V2) with Triton's sequence extension, on the same data plane.

A request's ``n`` rows of input ``event`` are ``n`` consecutive steps of the
sequence named by its ``sequence_id`` parameter; that sequence *is* the native
session of the same id (int 42 is session "42"), in the same table and store,
under the same tenant rules. ``sequence_start`` resets it first;
``sequence_end`` deletes it after the step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from importlib import metadata

import grpc
import numpy as np

from lstm_stream.oip.v2 import inference_pb2 as pb
from service.api.errors import ServiceError, Undecodable, rpc, status_of
from service.api.security import Authenticator
from service.api.streams import Streams
from service.dataplane import Code, DataPlane, EventBlock, Job
from service.metrics import Metrics
from service.settings import Settings

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
PLATFORM = "onnxruntime_onnx"
EXTENSIONS = (
    "model_configuration",
    "model_repository",
    "sequence",
    "sequence_string_id",
    "statistics",
)
"""What ``ServerMetadata`` lists: the model config, the repository and model control,
sequences with int or string ids, stats."""

_STATUS = {
    Code.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Code.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Code.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Code.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Code.INTERNAL: grpc.StatusCode.INTERNAL,
    Code.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}


def _invalid(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclass
class _Stats:
    """What ``ModelStatistics`` reports: counts and cumulative nanoseconds since start."""

    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    success: list[int] = field(default_factory=lambda: [0, 0])
    fail: list[int] = field(default_factory=lambda: [0, 0])
    queue: list[int] = field(default_factory=lambda: [0, 0])
    compute_input: list[int] = field(default_factory=lambda: [0, 0])
    compute_infer: list[int] = field(default_factory=lambda: [0, 0])
    compute_output: list[int] = field(default_factory=lambda: [0, 0])


@dataclass
class _Begun:
    """A decoded request whose rows are with the data plane."""

    request: pb.ModelInferRequest
    tenant: str
    model: str
    sequence: str
    end: bool
    raw: bool
    wanted: list[str]
    job: Job
    t0: int
    submitted: int


class InferenceServicer:
    """``inference.GRPCInferenceService``: converts V2 messages to event blocks and back."""

    def __init__(self, settings: Settings, metrics: Metrics, plane: DataPlane, auth: Authenticator):
        self.settings = settings
        self.metrics = metrics
        self.plane = plane
        self.auth = auth
        self.last_call_at = 0.0
        self.streams = Streams(settings.max_inflight)
        self._stats: dict[tuple[str, int], _Stats] = {}

    def start_drain(self) -> None:
        self.streams.start_drain()

    # -- health and metadata -------------------------------------------------------

    @rpc("ServerLive", api="oip")
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext, tenant: str
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @rpc("ServerReady", api="oip")
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext, tenant: str
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._serving())

    def _serving(self) -> bool:
        return self.plane.serving and not self.streams.draining

    @rpc("ModelReady", api="oip")
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext, tenant: str
    ) -> pb.ModelReadyResponse:
        try:
            model, version = self._model(request.name, request.version)
        except ServiceError:
            return pb.ModelReadyResponse(ready=False)
        lane = self.plane.model(model).lanes.get(version) if version else True
        return pb.ModelReadyResponse(ready=bool(lane) and self._serving())

    @rpc("ServerMetadata", api="oip")
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext, tenant: str
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="lstm-stream", version=_package_version(), extensions=list(EXTENSIONS)
        )

    def _model(self, name: str, version: str) -> tuple[str, int]:
        """The model and version (0: any) a request names; NOT_FOUND in Triton's words."""
        try:
            model = self.plane.model(name)
        except LookupError as exc:
            raise ServiceError(
                grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{name}' is not found"
            ) from exc
        if not version:
            return model.name, 0
        if not version.isdigit() or int(version) not in model.lanes:
            raise ServiceError(
                grpc.StatusCode.NOT_FOUND,
                f"Request for unknown model: '{name}' version {version} is not found; loaded: "
                + ", ".join(str(v) for v in sorted(model.lanes)),
            )
        return model.name, int(version)

    def _tensors(
        self, model: str, version: int = 0
    ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        spec = self.plane.spec(model, version)
        inputs = [("event", spec.event_size)]
        outputs = [("output", spec.output_size)]
        outputs += [(f"{n}_out", s) for n, s in zip(spec.state_names, spec.state_sizes)]
        return inputs, outputs

    @rpc("ModelMetadata", api="oip")
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext, tenant: str
    ) -> pb.ModelMetadataResponse:
        model, version = self._model(request.name, request.version)
        inputs, outputs = self._tensors(model, version)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        ready = self.plane.info(tenant, model).versions
        return pb.ModelMetadataResponse(
            name=model,
            versions=[str(v) for v in ready],
            platform=PLATFORM,
            inputs=[tensor(name=n, datatype="FP32", shape=[-1, size]) for n, size in inputs],
            outputs=[tensor(name=n, datatype="FP32", shape=[-1, size]) for n, size in outputs],
        )

    @rpc("ModelConfig", api="oip")
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext, tenant: str
    ) -> pb.ModelConfigResponse:
        model, version = self._model(request.name, request.version)
        inputs, outputs = self._tensors(model, version)
        config = self.plane.registry.configs.get(model)
        idle = self.settings.session_ttl
        if config is not None and config.idle_ttl:
            idle = config.idle_ttl
        policy = pb.ModelVersionPolicy()
        parameters = {}
        if config is not None:
            kind = config.policy.kind
            if kind == "all":
                policy.all.SetInParent()
            elif kind == "specific":
                policy.specific.versions.extend(config.policy.versions)
            else:
                policy.latest.num_versions = config.policy.count
            retire = config.retire
            parameters = {
                "retire_policy": pb.ModelParameter(string_value=retire.policy),
                "retire_after_s": pb.ModelParameter(string_value=f"{retire.after_s:g}"),
                "replay_events": pb.ModelParameter(string_value=str(retire.replay_events)),
            }
        return pb.ModelConfigResponse(
            config=pb.ModelConfig(
                name=model,
                platform=PLATFORM,
                backend="onnxruntime",
                version_policy=policy,
                max_batch_size=0,  # n rows of a request are n steps, not a batch
                input=[
                    pb.ModelInput(name=n, data_type=pb.TYPE_FP32, dims=[-1, s]) for n, s in inputs
                ],
                output=[
                    pb.ModelOutput(name=n, data_type=pb.TYPE_FP32, dims=[-1, s]) for n, s in outputs
                ],
                sequence_batching=pb.ModelSequenceBatching(
                    max_sequence_idle_microseconds=int(idle * 1e6)
                ),
                parameters=parameters,
            )
        )

    @rpc("ModelStatistics", api="oip")
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext, tenant: str
    ) -> pb.ModelStatisticsResponse:
        wanted: set[tuple[str, int]] = set()
        if request.name:
            model, version = self._model(request.name, request.version)
            lanes = self.plane.model(model).lanes
            wanted = {(model, v) for v in ([version] if version else list(lanes))}
        else:
            for status in self.plane.versions():
                if status.state in ("READY", "RETIRING"):
                    wanted.add((status.model, status.version))

        def duration(pair: list[int]) -> pb.StatisticDuration:
            return pb.StatisticDuration(count=pair[0], ns=pair[1])

        stats = []
        for model, version in sorted(wanted):
            st = self._stats.get((model, version), _Stats())
            stats.append(
                pb.ModelStatistics(
                    name=model,
                    version=str(version),
                    last_inference=st.last_inference_ms,
                    inference_count=st.inference_count,
                    execution_count=st.execution_count,
                    inference_stats=pb.InferStatistics(
                        success=duration(st.success),
                        fail=duration(st.fail),
                        queue=duration(st.queue),
                        compute_input=duration(st.compute_input),
                        compute_infer=duration(st.compute_infer),
                        compute_output=duration(st.compute_output),
                    ),
                )
            )
        return pb.ModelStatisticsResponse(model_stats=stats)

    # -- the model repository (Triton's extension) -------------------------------------

    def _admin(self, tenant: str, control: bool = False) -> None:
        """Model control: an admin tenant where auth is on; load/unload in explicit mode."""
        admins = self.settings.admin_tenant_set
        if self.auth.enabled and tenant not in admins:
            raise ServiceError(
                grpc.StatusCode.PERMISSION_DENIED,
                "model control needs an admin tenant (--admin-tenants)",
            )
        if control and self.settings.model_control != "explicit":
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "explicit model load / unload is not allowed: the server runs with "
                f"--model-control {self.settings.model_control}",
            )

    @rpc("RepositoryIndex", api="oip")
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext, tenant: str
    ) -> pb.RepositoryIndexResponse:
        self._admin(tenant)
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[
                index(name=s.model, version=str(s.version), state=s.state, reason=s.reason)
                for s in self.plane.versions()
                if not request.ready or s.state == "READY"
            ]
        )

    @rpc("RepositoryModelLoad", api="oip")
    async def RepositoryModelLoad(
        self,
        request: pb.RepositoryModelLoadRequest,
        context: grpc.aio.ServicerContext,
        tenant: str,
    ) -> pb.RepositoryModelLoadResponse:
        self._admin(tenant, control=True)
        try:
            await self.plane.load_model(request.model_name)
        except ValueError as exc:  # the model's files cannot load
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT, f"failed to load '{request.model_name}': {exc}"
            ) from exc
        return pb.RepositoryModelLoadResponse()

    @rpc("RepositoryModelUnload", api="oip")
    async def RepositoryModelUnload(
        self,
        request: pb.RepositoryModelUnloadRequest,
        context: grpc.aio.ServicerContext,
        tenant: str,
    ) -> pb.RepositoryModelUnloadResponse:
        self._admin(tenant, control=True)
        await self.plane.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # -- inference -----------------------------------------------------------------

    @rpc("ModelInfer", api="oip")
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext, tenant: str
    ) -> pb.ModelInferResponse:
        t0 = time.perf_counter_ns()
        try:
            begun = await self._begin(request, tenant, None, t0)
            await begun.job.future
            return await self._finish(begun)
        except Exception:
            self._failed(t0, request)
            raise

    @rpc("ModelStreamInfer", api="oip")
    async def ModelStreamInfer(
        self, requests: object, context: grpc.aio.ServicerContext, tenant: str
    ) -> None:
        """Requests begin at most ``--max-inflight`` ahead and are answered in order. A request
        that fails gets ``error_message``; the stream goes on. After a ``sequence_end``
        request nothing more is read until it is answered (the sequence is deleted first).
        """
        started: set[str] = set()

        async def begin(request: object) -> _Begun:
            t0 = time.perf_counter_ns()
            try:
                return await self._begin(request, tenant, started, t0)
            except Exception:
                self._failed(t0, request)
                raise

        async def respond(begun: _Begun) -> pb.ModelStreamInferResponse:
            try:
                return pb.ModelStreamInferResponse(infer_response=await self._finish(begun))
            except Exception:
                self._failed(begun.t0, begun.request)
                raise

        await self.streams.serve(context, begin, respond, _refusal, barrier=_ends)

    async def _begin(
        self, request: object, tenant: str, started: set[str] | None, t0: int
    ) -> _Begun:
        """Check and decode a request, then hand its rows to the data plane."""
        if isinstance(request, Undecodable):
            raise request.error()
        assert isinstance(request, pb.ModelInferRequest)
        model, version = self._model(request.model_name, request.model_version)
        plane = self.plane
        sequence, start, end = self._sequence(request, model)
        values, raw = self._event(request, model, version)
        wanted = self._wanted(request, model, version)
        if not start and not (
            (started is not None and sequence in started)
            or await plane.has_session(tenant, sequence, model)
        ):
            raise _invalid(
                f"inference request for sequence {sequence} to model '{model}' must "
                "specify the START flag on the first request of the sequence"
            )
        n = values.shape[0]
        resets = np.zeros(n, np.bool_)
        resets[0] = start
        block = EventBlock([sequence] * n, values, None, resets)
        submitted = time.perf_counter_ns()
        job = plane.step(
            tenant,
            block,
            include_state=any(w != "output" for w in wanted),
            model=model,
            version=version,
        )
        if started is not None:
            started.add(sequence)
        return _Begun(request, tenant, model, sequence, end, raw, wanted, job, t0, submitted)

    def _sequence(self, request: pb.ModelInferRequest, model: str) -> tuple[str, bool, bool]:
        params = request.parameters
        if "sequence_id" not in params:
            raise _invalid(
                f"model '{model}' is stateful: every request needs the parameter "
                "sequence_id (an int64 or a string)"
            )
        p = params["sequence_id"]
        kind = p.WhichOneof("parameter_choice")
        if kind == "string_param":
            sequence = p.string_param
        elif kind in ("int64_param", "uint64_param"):
            number = getattr(p, kind)
            sequence = str(number) if number else ""
        else:
            raise _invalid("sequence_id must be an int64, uint64 or string parameter")
        if not sequence:
            raise _invalid("sequence_id must not be 0 or empty")

        def flag(name: str) -> bool:
            if name not in params:
                return False
            q = params[name]
            if q.WhichOneof("parameter_choice") != "bool_param":
                raise _invalid(f"{name} must be a bool parameter")
            return q.bool_param

        return sequence, flag("sequence_start"), flag("sequence_end")

    def _event(
        self, request: pb.ModelInferRequest, model: str, version: int
    ) -> tuple[np.ndarray, bool]:
        """The ``[n, E]`` float32 rows of input ``event``, and whether they came raw."""
        e = self.plane.spec(model, version).event_size
        if len(request.inputs) != 1 or request.inputs[0].name != "event":
            names = [t.name for t in request.inputs]
            raise _invalid(f"model '{model}' takes one input named 'event'; got {names}")
        tensor = request.inputs[0]
        if tensor.datatype != "FP32":
            raise _invalid(f"input 'event' must be FP32; got {tensor.datatype or 'no datatype'}")
        shape = list(tensor.shape)
        if len(shape) == 1:
            shape = [1, *shape]
        if len(shape) != 2 or shape[1] != e or shape[0] < 1:
            got = list(tensor.shape)
            raise _invalid(f"input 'event' must have shape [n, {e}] with n >= 1; got {got}")
        n = shape[0]
        self._check_rows(n)
        raw = bool(request.raw_input_contents)
        if raw:
            if len(request.raw_input_contents) != 1:
                raise _invalid("raw_input_contents must hold one entry, for input 'event'")
            data = request.raw_input_contents[0]
            if len(data) != n * e * 4:
                raise _invalid(
                    f"input 'event' has {len(data)} bytes of raw content; shape [{n}, {e}] "
                    f"FP32 needs {n * e * 4}"
                )
            values = np.frombuffer(data, "<f4").reshape(n, e)
        else:
            contents = tensor.contents.fp32_contents
            if len(contents) != n * e:
                raise _invalid(
                    f"input 'event' has {len(contents)} fp32_contents; shape [{n}, {e}] needs "
                    f"{n * e}"
                )
            values = np.array(contents, np.float32).reshape(n, e)
        if not np.isfinite(values).all():  # refused whole: no row of it is applied
            raise _invalid("input 'event' contains NaN or Inf")
        return values, raw

    def _check_rows(self, n: int) -> None:
        limit = self.settings.max_events_per_request
        if n > limit:
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{n} rows in one request; the limit is {limit} (--max-events-per-request)",
            )

    def _wanted(self, request: pb.ModelInferRequest, model: str, version: int) -> list[str]:
        _, outputs = self._tensors(model, version)
        known = [name for name, _ in outputs]
        wanted = [o.name for o in request.outputs] or ["output"]
        for name in wanted:
            if name not in known:
                raise _invalid(f"unknown output '{name}'; model '{model}' has {known}")
        return wanted

    async def _finish(self, begun: _Begun) -> pb.ModelInferResponse:
        """Build the response once the rows are done; end the sequence if asked."""
        job = begun.job
        done = time.perf_counter_ns()
        if job.errors:
            i = min(job.errors)
            code = _STATUS.get(Code(int(job.codes[i])), grpc.StatusCode.INTERNAL)
            raise ServiceError(code, f"step {i} of the request: {job.errors[i]}")
        version = int(job.versions[0]) if job.n else 0
        response = pb.ModelInferResponse(
            model_name=begun.model, model_version=str(version), id=begun.request.id
        )
        for name in begun.wanted:
            if name == "output":
                array = job.outputs
            else:
                states = job.states
                state = name.removesuffix("_out")
                if states is None or state not in job.state_names:
                    raise ServiceError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"output '{name}': the session's version {version} has another state "
                        "layout than the model's newest; GetSession reads it",
                    )
                array = states[job.state_names.index(state)]
            tensor = response.outputs.add(name=name, datatype="FP32", shape=list(array.shape))
            if begun.raw:
                response.raw_output_contents.append(array.astype("<f4", copy=False).tobytes())
            else:
                tensor.contents.fp32_contents.extend(array.ravel().tolist())
        if begun.end:
            await self.plane.delete(begun.tenant, begun.sequence, begun.model)
        end = time.perf_counter_ns()
        st = self._stats.setdefault((begun.model, version), _Stats())
        st.inference_count += job.n
        st.execution_count += 1
        st.last_inference_ms = time.time_ns() // 1_000_000
        for pair, ns in (
            (st.success, end - begun.t0),
            (st.queue, 0),
            (st.compute_input, begun.submitted - begun.t0),
            (st.compute_infer, done - begun.submitted),
            (st.compute_output, end - done),
        ):
            pair[0] += 1
            pair[1] += ns
        return response

    def _failed(self, t0: int, request: object) -> None:
        """A failed request counts for the version that would have answered it."""
        if not isinstance(request, pb.ModelInferRequest):
            return
        try:
            model = self.plane.model(request.model_name)
        except LookupError:
            return
        version = int(request.model_version) if request.model_version.isdigit() else 0
        if not version and model.newest is not None:
            version = model.newest.version
        st = self._stats.setdefault((model.name, version), _Stats())
        st.fail[0] += 1
        st.fail[1] += time.perf_counter_ns() - t0


def _refusal(exc: Exception) -> pb.ModelStreamInferResponse | None:
    """A request that fails is answered in the stream, which goes on; None for a bug."""
    code, message = status_of(exc)
    if code is grpc.StatusCode.INTERNAL:
        return None
    return pb.ModelStreamInferResponse(error_message=message)


def _ends(begun: _Begun) -> bool:
    return begun.end


def _package_version() -> str:
    try:
        return metadata.version("lstm-stream")
    except metadata.PackageNotFoundError:
        return "0"
