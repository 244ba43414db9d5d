"""One ordered stream for every API: read ahead, answer in request order, drain."""

from __future__ import annotations

import asyncio
import types
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import grpc
from prometheus_client import Gauge

from service.api.errors import ClientGone
from service.dataplane import EngineClosed

EOF = grpc.aio.EOF  # type: ignore[attr-defined]  # not in grpc-stubs


class Answerable(Protocol):
    """What a request's answer waits on (``Job`` for the data plane)."""

    @property
    def future(self) -> asyncio.Future[None]: ...


class Pending(Protocol):
    """A request whose events are with the data plane."""

    @property
    def job(self) -> Answerable: ...


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


class _Stream:
    """One stream's requests in order, and which of its two tasks waits for what.

    The writer waits on a future of its own only when nothing is queued; when the
    oldest request is not answered yet, it awaits that request's own future. When
    the reader queues a request into an empty queue, the request's future wakes
    the writer once it is answered. Either way one wake-up per request, not one to
    learn of the request and another for its answer. The reader waits only when
    ``window`` requests are unanswered.
    """

    __slots__ = ("loop", "queue", "reader", "room", "writer", "writing")

    def __init__(self, loop: asyncio.AbstractEventLoop, window: int):
        self.loop = loop
        self.queue: deque[Any] = deque()
        self.room = window
        """Requests the reader may still begin before one is answered."""
        self.writer: asyncio.Future[None] | None = None
        """Set while the writer waits (nothing to write yet)."""
        self.reader: asyncio.Future[None] | None = None
        """Set while the reader waits for room in the window."""
        self.writing = False
        """The reader is writing an answer itself: the writer stays asleep until it is done
        (ending the call meanwhile would race that write: gRPC refuses a status sent while
        the first message's headers are still on their way)."""

    def put(self, item: Any) -> None:
        """Queue an item behind the others; wake the writer when it waits for this one."""
        queue = self.queue
        queue.append(item)
        if self.writer is not None and len(queue) == 1 and not self.writing:
            if not isinstance(item, _Control):
                future = item.job.future
                if not future.done():
                    future.add_done_callback(self.wake)  # wake it once answered
                    return
            self.wake()

    def wake(self, _: object = None) -> None:
        """Let the writer look at the queue again."""
        writer = self.writer
        if writer is not None:
            self.writer = None
            if not writer.done():
                writer.set_result(None)

    def writer_waits(self) -> asyncio.Future[None]:
        self.writer = writer = self.loop.create_future()
        return writer

    def answered(self) -> None:
        """A request's answer is written: one more may be read."""
        self.room += 1
        reader = self.reader
        if reader is not None:
            self.reader = None
            if not reader.done():
                reader.set_result(None)


class Streams:
    """The open streams of one API, answered in order and drained together.

    Each stream has a reader task, which reads at most ``window`` requests ahead
    (past that the client feels flow control) and begins each one, and a writer
    (the handler itself), which writes each request's response in request order
    once its job is done. A request answered as it began (the engine was idle)
    while the writer has nothing to write is written by the reader itself: one
    task switch less for a lone request, and order is kept.
    """

    def __init__(self, window: int, gauge: Gauge | None = None):
        self.window = window
        self.draining = False
        self._gauge = gauge
        self._streams: set[_Stream] = set()

    def start_drain(self) -> None:
        """Every stream ends, with UNAVAILABLE, once the requests it has read are answered.

        The marker goes behind what each stream has queued, and the writer takes it
        only once the reader has finished writing an answer of its own (the status
        would race that write). The reader is cancelled as the writer ends the call;
        its pending read is not cancelled before that (doing so was seen to end
        streams with INTERNAL "Internal error from Core").
        """
        self.draining = True
        for stream in list(self._streams):
            stream.put(_DRAIN)

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
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, self.window)
        reader = loop.create_task(self._read(context, stream, begin, respond, refuse, barrier))
        self._streams.add(stream)
        if self._gauge is not None:
            self._gauge.inc()
        queue = stream.queue
        try:
            while True:
                if not queue:
                    await stream.writer_waits()
                    continue
                item = queue[0]
                if not isinstance(item, _Control):  # inline: once per request
                    future = item.job.future
                    if not future.done():
                        await future  # its answer wakes the writer, no future of its own
                    queue.popleft()
                    await _send(context, await _answer(item, respond, refuse))
                    stream.answered()
                    continue
                queue.popleft()
                if item is _END:
                    return
                if item is _DRAIN:
                    raise EngineClosed("the server is draining")
                if isinstance(item, _Ready):
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
                stream.answered()
        finally:
            reader.cancel()
            self._streams.discard(stream)
            if self._gauge is not None:
                self._gauge.dec()

    @staticmethod
    async def _read(
        context: grpc.aio.ServicerContext,
        stream: _Stream,
        begin: Callable[[Any], Any],
        respond: Callable[[Any], Any],
        refuse: Callable[[Exception], Any | None],
        barrier: Callable[[Any], bool] | None,
    ) -> None:
        queue = stream.queue
        try:
            while True:
                if not stream.room:
                    stream.reader = stream.loop.create_future()
                    await stream.reader
                    continue
                request = await context.read()
                if request is EOF:
                    stream.put(_END)
                    return
                stream.room -= 1
                try:
                    item = begin(request)
                    if isinstance(item, types.CoroutineType):
                        item = await item
                except Exception as exc:  # a request refused whole; the stream goes on
                    response = refuse(exc)
                    if response is None:
                        raise
                    stream.put(_Ready(response))
                    continue
                if barrier is not None and barrier(item):
                    held = _Barrier(item)
                    stream.put(held)
                    await held.done.wait()
                elif stream.writer is not None and not queue and item.job.future.done():
                    # Answered already (the engine was idle) and nothing is ahead of it:
                    # written here, as an echo would, without a switch to the writer.
                    stream.writing = True
                    try:
                        await _send(context, await _answer(item, respond, refuse))
                    finally:
                        stream.writing = False
                        if queue:  # a drain came meanwhile: the writer answers it now
                            stream.wake()
                    stream.answered()
                else:
                    stream.put(item)
        except Exception as exc:
            stream.put(_Failed(exc))


async def _answer(item: Pending, respond: Callable[[Any], Any], refuse: Callable[..., Any]) -> Any:
    """The response to a request once its job is done, or its refusal."""
    try:
        await item.job.future  # done already, except behind a barrier
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
