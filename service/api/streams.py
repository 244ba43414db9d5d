"""One ordered stream for every API: read ahead, answer in request order, drain."""

from __future__ import annotations

import asyncio
import types
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import grpc
from prometheus_client import Gauge

from service.api.errors import ClientGone
from service.dataplane import EngineClosed, Job

EOF = grpc.aio.EOF  # type: ignore[attr-defined]  # not in grpc-stubs


class Pending(Protocol):
    """A request whose events are with the data plane."""

    job: Job


P = TypeVar("P", bound=Pending)


class _Control:
    """What a stream's queue holds besides pending requests."""


_END = _Control()
_DRAIN = _Control()


class _Ready(_Control):
    """A request refused whole: its answer is already written."""

    def __init__(self, response: Any):
        self.response = response


class _Failed(_Control):
    """The reader failed: the stream ends with this error once earlier answers are sent."""

    def __init__(self, error: Exception):
        self.error = error


class _Barrier(_Control):
    """A request after which nothing is read until it is answered."""

    def __init__(self, item: Any):
        self.item = item
        self.done = asyncio.Event()


class _Writer:
    """Whether a stream's writer is answering a request (else it waits for the next one)."""

    __slots__ = ("busy",)

    def __init__(self) -> None:
        self.busy = False


class Streams:
    """The open streams of one API, answered in order and drained together.

    Each stream has a reader task, which reads at most ``window`` requests ahead
    (past that the client feels flow control) and begins each one, and a writer
    (the handler itself), which awaits each request's job in request order and
    writes its response. A request answered as it began (the engine was idle)
    while the writer has nothing to write is written by the reader itself: one
    task switch less for a lone request, and order is kept.
    """

    def __init__(self, window: int, gauge: Gauge | None = None):
        self.window = window
        self.draining = False
        self._gauge = gauge
        self._queues: set[asyncio.Queue[Any]] = set()

    def start_drain(self) -> None:
        """Every stream ends, with UNAVAILABLE, once the requests it has read are answered.

        The marker goes behind what each stream has queued; its reader is stopped
        only after the status is sent (cancelling a pending read before that was
        seen to end streams with INTERNAL "Internal error from Core").
        """
        self.draining = True
        for queue in list(self._queues):
            queue.put_nowait(_DRAIN)

    async def serve(
        self,
        context: grpc.aio.ServicerContext,
        begin: Callable[[Any], P | Any],
        respond: Callable[[P], Any],
        refuse: Callable[[Exception], Any | None],
        barrier: Callable[[P], bool] | None = None,
    ) -> None:
        """Serve one stream until the client ends it, it fails, or the server drains.

        ``begin(request)`` decodes a request and hands it to the data plane (it
        may be a coroutine function); ``respond(item)`` builds the answer once its
        job is done (it may be a coroutine function); ``refuse(exc)`` is the
        in-stream answer to a request either of them failed, or None to end the
        stream with that error; ``barrier(item)`` holds reading until the item is
        answered.
        """
        if self.draining:
            raise EngineClosed("the server is draining")
        queue: asyncio.Queue[Any] = asyncio.Queue()
        window = asyncio.Semaphore(self.window)
        writer = _Writer()
        reader = asyncio.get_running_loop().create_task(
            self._read(context, queue, window, begin, respond, refuse, barrier, writer)
        )
        self._queues.add(queue)
        if self._gauge is not None:
            self._gauge.inc()
        try:
            while True:
                writer.busy = False
                item = await queue.get()
                writer.busy = True
                if not isinstance(item, _Control):  # inline: once per request
                    try:
                        await item.job.future
                        response = respond(item)
                        if isinstance(response, types.CoroutineType):
                            response = await response
                    except Exception as exc:
                        response = refuse(exc)
                        if response is None:
                            raise
                    await _send(context, response)
                elif item is _END:
                    return
                elif item is _DRAIN:
                    raise EngineClosed("the server is draining")
                elif isinstance(item, _Ready):
                    await _send(context, item.response)
                elif isinstance(item, _Barrier):
                    try:
                        response = await _answer(item.item, respond, refuse)
                    finally:
                        item.done.set()
                    await _send(context, response)
                else:
                    assert isinstance(item, _Failed)
                    raise item.error
                window.release()
        finally:
            reader.cancel()
            self._queues.discard(queue)
            if self._gauge is not None:
                self._gauge.dec()

    @staticmethod
    async def _read(
        context: grpc.aio.ServicerContext,
        queue: asyncio.Queue[Any],
        window: asyncio.Semaphore,
        begin: Callable[[Any], Any],
        respond: Callable[[Any], Any],
        refuse: Callable[[Exception], Any | None],
        barrier: Callable[[Any], bool] | None,
        writer: _Writer,
    ) -> None:
        try:
            while True:
                await window.acquire()
                request = await context.read()
                if request is EOF:
                    queue.put_nowait(_END)
                    return
                try:
                    item = begin(request)
                    if isinstance(item, types.CoroutineType):
                        item = await item
                except Exception as exc:  # a request refused whole; the stream goes on
                    response = refuse(exc)
                    if response is None:
                        raise
                    queue.put_nowait(_Ready(response))
                    continue
                if barrier is not None and barrier(item):
                    held = _Barrier(item)
                    queue.put_nowait(held)
                    await held.done.wait()
                elif not writer.busy and item.job.future.done() and queue.empty():
                    # Answered already (the engine was idle) and nothing is ahead of it:
                    # written here, as an echo would, without a switch to the writer.
                    await _send(context, await _answer(item, respond, refuse))
                    window.release()
                else:
                    queue.put_nowait(item)
        except Exception as exc:
            queue.put_nowait(_Failed(exc))


async def _answer(item: Pending, respond: Callable[[Any], Any], refuse: Callable[..., Any]) -> Any:
    try:
        await item.job.future
        response = respond(item)
        if isinstance(response, types.CoroutineType):
            response = await response
    except Exception as exc:
        response = refuse(exc)
        if response is None:
            raise
    return response


async def _send(context: grpc.aio.ServicerContext, response: Any) -> None:
    """Write one response; a write fails only once the call is over from the client's side."""
    try:
        await context.write(response)
    except Exception as exc:
        raise ClientGone() from exc
