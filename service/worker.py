"""A thread that runs blocking calls for the event loop, one at a time, in order."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class Worker:
    """One thread running calls for the event loop, one at a time, in order.

    What ``run_in_executor`` on a one-thread pool does, without the
    ``concurrent.futures`` future chained to an asyncio one: 25 instead of 39 µs
    of CPU per call when loop and thread share a core (docs/PERFORMANCE.md).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str):
        self._loop = loop
        self._calls: queue.SimpleQueue[
            tuple[asyncio.Future[Any], Callable[..., Any], tuple[Any, ...]] | None
        ] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """``fn(*args)`` in the thread; the future is settled on the loop."""
        future: asyncio.Future[T] = self._loop.create_future()
        self._calls.put((future, fn, args))
        return future

    def _serve(self) -> None:
        settle = self._loop.call_soon_threadsafe
        while (item := self._calls.get()) is not None:
            future, fn, args = item
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to the awaiting coroutine, as an executor does
                settle(_settle, future, None, exc)
            else:
                settle(_settle, future, result, None)

    def stop(self) -> None:
        """Finish the calls already queued, then end the thread."""
        self._calls.put(None)
        self._thread.join()


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():  # its awaiter was cancelled meanwhile (the server stopping)
        return
    if exc is None:
        future.set_result(result)
    else:
        future.set_exception(exc)
