"""The Open Inference Protocol (KServe V2) with Triton's sequence extension, on the same batcher.

A request's ``n`` rows of input ``event`` are ``n`` consecutive steps of the
sequence named by its ``sequence_id`` parameter; that sequence *is* the native
session of the same id (int 42 is session "42"), in the same table and store,
under the same tenant rules. ``sequence_start`` resets it first;
``sequence_end`` deletes it after the step.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from importlib import metadata

import grpc
import numpy as np

from lstm_stream.oip.v2 import inference_pb2 as pb
from service.batcher import Batcher, BatcherClosed, Code, EventBlock, Job
from service.errors import ClientGone, ServiceError, Undecodable, rpc, status_of
from service.metrics import Metrics
from service.security import Authenticator
from service.settings import Settings

EOF = grpc.aio.EOF  # type: ignore[attr-defined]
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
VERSION = "1"
PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ("model_configuration", "sequence", "sequence_string_id", "statistics")
"""What ``ServerMetadata`` lists: the model config, sequences with int or string ids, stats."""

_STATUS = {
    Code.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Code.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Code.INTERNAL: grpc.StatusCode.INTERNAL,
    Code.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}
_END = object()
_DRAIN = object()


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
    """A decoded request whose rows are with the batcher."""

    request: pb.ModelInferRequest
    session_id: str
    end: bool
    raw: bool
    wanted: list[str]
    job: Job
    t0: int
    submitted: int
    finished: asyncio.Event | None = None


class InferenceServicer:
    """``inference.GRPCInferenceService``: converts V2 messages to event blocks and back."""

    def __init__(self, settings: Settings, metrics: Metrics, auth: Authenticator):
        self.settings = settings
        self.metrics = metrics
        self.auth = auth
        self.model_name = settings.model_name
        self.last_call_at = 0.0
        self._batcher: Batcher | None = None
        self._streams: set[asyncio.Queue[object]] = set()
        self._draining = False
        self._stats = _Stats()
        self._ready = lambda: True

    def attach(self, batcher: Batcher, ready: object) -> None:
        """Start answering; ``ready()`` tells ServerReady whether the server is serving."""
        self._batcher = batcher
        self._ready = ready  # type: ignore[assignment]
        spec = batcher.runtime.spec
        self._state_outputs = {f"{n}_out": i for i, n in enumerate(spec.state_names)}

    @property
    def batcher(self) -> Batcher:
        if self._batcher is None:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        return self._batcher

    def start_drain(self) -> None:
        self._draining = True
        for queue in list(self._streams):
            queue.put_nowait(_DRAIN)

    # -- health and metadata -------------------------------------------------------

    @rpc("ServerLive", api="oip")
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext, ns: str
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @rpc("ServerReady", api="oip")
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext, ns: str
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._serving())

    def _serving(self) -> bool:
        return self._batcher is not None and not self._draining and bool(self._ready())

    @rpc("ModelReady", api="oip")
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext, ns: str
    ) -> pb.ModelReadyResponse:
        known = request.name == self.model_name and request.version in ("", VERSION)
        return pb.ModelReadyResponse(ready=known and self._serving())

    @rpc("ServerMetadata", api="oip")
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext, ns: str
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="lstm-stream", version=_package_version(), extensions=list(EXTENSIONS)
        )

    def _check_model(self, name: str, version: str) -> None:
        if name != self.model_name:
            raise ServiceError(
                grpc.StatusCode.NOT_FOUND,
                f"Request for unknown model: '{name}' is not found; this server serves "
                f"'{self.model_name}'",
            )
        if version not in ("", VERSION):
            raise ServiceError(
                grpc.StatusCode.NOT_FOUND,
                f"Request for unknown model: '{name}' version {version} is not found; "
                f"the only version is {VERSION}",
            )

    def _tensors(self) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        spec = self.batcher.runtime.spec
        inputs = [("event", spec.event_size)]
        outputs = [("output", spec.output_size)]
        outputs += [(f"{n}_out", s) for n, s in zip(spec.state_names, spec.state_sizes)]
        return inputs, outputs

    @rpc("ModelMetadata", api="oip")
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext, ns: str
    ) -> pb.ModelMetadataResponse:
        self._check_model(request.name, request.version)
        inputs, outputs = self._tensors()
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=self.model_name,
            versions=[VERSION],
            platform=PLATFORM,
            inputs=[tensor(name=n, datatype="FP32", shape=[-1, size]) for n, size in inputs],
            outputs=[tensor(name=n, datatype="FP32", shape=[-1, size]) for n, size in outputs],
        )

    @rpc("ModelConfig", api="oip")
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext, ns: str
    ) -> pb.ModelConfigResponse:
        self._check_model(request.name, request.version)
        inputs, outputs = self._tensors()
        idle = self.settings.session_ttl
        return pb.ModelConfigResponse(
            config=pb.ModelConfig(
                name=self.model_name,
                platform=PLATFORM,
                backend="onnxruntime",
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
            )
        )

    @rpc("ModelStatistics", api="oip")
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext, ns: str
    ) -> pb.ModelStatisticsResponse:
        if request.name:
            self._check_model(request.name, request.version)
        st = self._stats

        def duration(pair: list[int]) -> pb.StatisticDuration:
            return pb.StatisticDuration(count=pair[0], ns=pair[1])

        return pb.ModelStatisticsResponse(
            model_stats=[
                pb.ModelStatistics(
                    name=self.model_name,
                    version=VERSION,
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
            ]
        )

    # -- inference -----------------------------------------------------------------

    @rpc("ModelInfer", api="oip")
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext, ns: str
    ) -> pb.ModelInferResponse:
        t0 = time.perf_counter_ns()
        try:
            begun = await self._begin(request, ns, None, t0)
            return await self._finish(begun)
        except (ServiceError, BatcherClosed):
            self._failed(t0)
            raise

    @rpc("ModelStreamInfer", api="oip")
    async def ModelStreamInfer(
        self, requests: object, context: grpc.aio.ServicerContext, ns: str
    ) -> None:
        """A reader task begins requests (at most ``--max-inflight`` ahead); this coroutine
        answers them in order. A request that fails gets ``error_message``; the stream goes on.
        """
        if self._draining:
            raise BatcherClosed()
        queue: asyncio.Queue[object] = asyncio.Queue()
        window = asyncio.Semaphore(self.settings.max_inflight)
        reader = asyncio.get_running_loop().create_task(self._read(context, queue, window, ns))
        self._streams.add(queue)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _Begun):
                    try:
                        response = await self._finish(item)
                        answer = pb.ModelStreamInferResponse(infer_response=response)
                    except (ServiceError, BatcherClosed) as exc:
                        self._failed(item.t0)
                        answer = pb.ModelStreamInferResponse(error_message=status_of(exc)[1])
                    finally:
                        if item.finished is not None:
                            item.finished.set()
                    await _send(context, answer)
                elif isinstance(item, pb.ModelStreamInferResponse):
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

    async def _read(
        self,
        context: grpc.aio.ServicerContext,
        queue: asyncio.Queue[object],
        window: asyncio.Semaphore,
        ns: str,
    ) -> None:
        started: set[str] = set()
        try:
            while True:
                await window.acquire()
                request = await context.read()
                if request is EOF:
                    queue.put_nowait(_END)
                    return
                t0 = time.perf_counter_ns()
                try:
                    begun = await self._begin(request, ns, started, t0)
                except (ServiceError, BatcherClosed) as exc:
                    self._failed(t0)
                    error = status_of(exc)[1]
                    queue.put_nowait(pb.ModelStreamInferResponse(error_message=error))
                    continue
                queue.put_nowait(begun)
                if begun.end:  # the sequence is deleted before anything after it begins
                    begun.finished = asyncio.Event()
                    await begun.finished.wait()
        except Exception as exc:
            queue.put_nowait(exc)

    async def _begin(self, request: object, ns: str, started: set[str] | None, t0: int) -> _Begun:
        """Check and decode a request, then hand its rows to the batcher."""
        if isinstance(request, Undecodable):
            raise request.error()
        assert isinstance(request, pb.ModelInferRequest)
        self._check_model(request.model_name, request.model_version)
        batcher = self.batcher
        sequence, start, end = self._sequence(request)
        values, raw = self._event(request)
        wanted = self._wanted(request)
        session_id = ns + sequence
        if not start and not (
            session_id in batcher.table
            or (started is not None and session_id in started)
            or await batcher.get(session_id) is not None
        ):
            raise _invalid(
                f"inference request for sequence {sequence} to model '{self.model_name}' must "
                "specify the START flag on the first request of the sequence"
            )
        n = values.shape[0]
        resets = np.zeros(n, np.bool_)
        resets[0] = start
        block = EventBlock([session_id] * n, values, None, resets)
        submitted = time.perf_counter_ns()
        job = batcher.submit(block, include_state=any(w != "output" for w in wanted))
        if started is not None:
            started.add(session_id)
        return _Begun(request, session_id, end, raw, wanted, job, t0, submitted)

    def _sequence(self, request: pb.ModelInferRequest) -> tuple[str, bool, bool]:
        params = request.parameters
        if "sequence_id" not in params:
            raise _invalid(
                f"model '{self.model_name}' is stateful: every request needs the parameter "
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

    def _event(self, request: pb.ModelInferRequest) -> tuple[np.ndarray, bool]:
        """The ``[n, E]`` float32 rows of input ``event``, and whether they came raw."""
        e = self.batcher.runtime.spec.event_size
        if len(request.inputs) != 1 or request.inputs[0].name != "event":
            names = [t.name for t in request.inputs]
            raise _invalid(f"model '{self.model_name}' takes one input named 'event'; got {names}")
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

    def _wanted(self, request: pb.ModelInferRequest) -> list[str]:
        _, outputs = self._tensors()
        known = [name for name, _ in outputs]
        wanted = [o.name for o in request.outputs] or ["output"]
        for name in wanted:
            if name not in known:
                raise _invalid(f"unknown output '{name}'; model '{self.model_name}' has {known}")
        return wanted

    async def _finish(self, begun: _Begun) -> pb.ModelInferResponse:
        """Wait for the rows, build the response, end the sequence if asked."""
        job = begun.job
        await job.future
        done = time.perf_counter_ns()
        if job.errors:
            i = min(job.errors)
            code = _STATUS.get(Code(int(job.codes[i])), grpc.StatusCode.INTERNAL)
            raise ServiceError(code, f"step {i} of the request: {job.errors[i]}")
        response = pb.ModelInferResponse(
            model_name=self.model_name, model_version=VERSION, id=begun.request.id
        )
        for name in begun.wanted:
            if name == "output":
                array = job.outputs
            else:
                assert job.states is not None
                array = job.states[self._state_outputs[name]]
            tensor = response.outputs.add(name=name, datatype="FP32", shape=list(array.shape))
            if begun.raw:
                response.raw_output_contents.append(array.astype("<f4", copy=False).tobytes())
            else:
                tensor.contents.fp32_contents.extend(array.ravel().tolist())
        if begun.end:
            await self.batcher.delete(begun.session_id)
        end = time.perf_counter_ns()
        st = self._stats
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

    def _failed(self, t0: int) -> None:
        self._stats.fail[0] += 1
        self._stats.fail[1] += time.perf_counter_ns() - t0


async def _send(context: grpc.aio.ServicerContext, response: pb.ModelStreamInferResponse) -> None:
    try:
        await context.write(response)
    except Exception as exc:
        raise ClientGone() from exc


def _package_version() -> str:
    try:
        return metadata.version("lstm-stream")
    except metadata.PackageNotFoundError:
        return "0"
