"""The echo baseline: the same service and message sizes as lstm-serve, no inference, no state."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import AsyncIterator

import grpc

from lstm_stream.v1 import lstm_stream_pb2 as pb
from lstm_stream.v1 import lstm_stream_pb2_grpc as pb_grpc
from service.api.streams import Streams


class EchoServicer(pb_grpc.LstmStreamServicer):
    """Answers Step/StreamSteps with responses as large as the real server's, filled with zeros."""

    def __init__(self, event_size: int, output_size: int):
        self.event_size = event_size
        self.output_size = output_size
        self._zeros = [0.0] * output_size

    def _answer(self, request: pb.StepRequest) -> pb.StepResponse:
        if request.HasField("batch"):
            n = len(request.batch.session_ids)
            return pb.StepResponse(
                batch=pb.ResultBatch(
                    steps=[1] * n,
                    outputs=bytes(4 * n * self.output_size),
                    codes=[0] * n,
                    duplicates=[False] * n,
                    errors=[""] * n,
                )
            )
        zeros = self._zeros
        return pb.StepResponse(
            results=[
                pb.Result(session_id=e.session_id, seq=e.seq, step=1, output=zeros)
                for e in request.events
            ]
        )

    async def Step(
        self, request: pb.StepRequest, context: grpc.aio.ServicerContext
    ) -> pb.StepResponse:
        return self._answer(request)

    async def StreamSteps(
        self, requests: AsyncIterator[pb.StepRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StepResponse]:
        async for request in requests:
            yield self._answer(request)


class _Echoed:
    """An echo's request as lstm-serve's stream sees one: a job whose future resolves on
    the loop's next turn (as a run's answer would), and the response waiting for it."""

    __slots__ = ("future", "job", "response")

    def __init__(self, future: asyncio.Future[None], response: pb.StepResponse):
        self.future = future
        self.job = self
        self.response = response


class PipelinedEchoServicer(EchoServicer):
    """The echo served by lstm-serve's own stream structure (``service.api.streams``): a
    reader task reading ahead, a writer answering in order. It bounds what that costs."""

    def __init__(self, event_size: int, output_size: int):
        super().__init__(event_size, output_size)
        self.streams = Streams(64)

    def _begin(self, request: pb.StepRequest) -> _Echoed:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        loop.call_soon(future.set_result, None)
        return _Echoed(future, self._answer(request))

    async def StreamSteps(self, requests: object, context: grpc.aio.ServicerContext) -> None:  # type: ignore[override]
        await self.streams.serve(context, self._begin, _response, _no_refusal)

    async def GetModelInfo(
        self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        return pb.ModelInfo(
            event_size=self.event_size,
            hidden_size=self.output_size,
            output_size=self.output_size,
            execution_provider="none (echo)",
            source="echo",
        )


async def serve(host: str, port: int, event_size: int, output_size: int, pipelined: bool) -> None:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            ("grpc.max_send_message_length", 16 * 1024 * 1024),
            ("grpc.so_reuseport", 0),
        ]
    )
    servicer = (PipelinedEchoServicer if pipelined else EchoServicer)(event_size, output_size)
    pb_grpc.add_LstmStreamServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"lstm-bench echo: gRPC on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lstm-bench-echo",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--event-size", type=int, default=32)
    parser.add_argument("--output-size", type=int, default=64)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    parser.add_argument(
        "--pipelined", action="store_true", help="read ahead like lstm-serve (reader + writer)"
    )
    args = parser.parse_args(argv)
    coro = serve(args.host, args.port, args.event_size, args.output_size, args.pipelined)
    if args.uvloop:
        import uvloop

        uvloop.run(coro)
    else:
        asyncio.run(coro)
    return 0


def _response(item: _Echoed) -> pb.StepResponse:
    return item.response


def _no_refusal(exc: Exception) -> None:
    """Nothing is refused in-stream: an error ends the stream."""
    return None


if __name__ == "__main__":
    sys.exit(main())
