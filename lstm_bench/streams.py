"""What the ordered-stream machinery alone costs per request, without gRPC or an engine.

``python -m lstm_bench.streams [--streams 256 --window 1]`` serves ``--streams``
streams through ``service.api.streams.Streams`` with a stand-in for gRPC's call
(``read`` hands over the client's next request at once, while fewer than
``--window`` are unanswered; ``write`` takes the answer) and a stand-in engine (a run
loop task that resolves every job begun since its last run, as one batch). It prints
CPU µs per request: the reader and writer tasks, their wake-ups and the window,
which is what an end-to-end run against the echo cannot resolve on a noisy machine.
Run it from two checkouts (``PYTHONPATH``) to compare two versions of the module.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import grpc

from service.api.streams import Streams

EOF_ = grpc.aio.EOF  # type: ignore[attr-defined]  # not in grpc-stubs


class _Job:
    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[None]):
        self.future = future


class _Begun:
    __slots__ = ("job", "number")

    def __init__(self, job: _Job, number: int):
        self.job = job
        self.number = number


class _Engine:
    """Resolves every job begun since its last run, one run per turn of its task."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.jobs: list[_Job] = []
        self.wake = asyncio.Event()
        self.task = self.loop.create_task(self._run())

    def begin(self, request: int) -> _Begun:
        job = _Job(self.loop.create_future())
        self.jobs.append(job)
        self.wake.set()
        return _Begun(job, request)

    async def _run(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            jobs, self.jobs = self.jobs, []
            for job in jobs:
                job.future.set_result(None)


class _Call:
    """gRPC's side of one stream: a client with ``window`` requests in flight, numbered;
    an answer out of order fails the run."""

    def __init__(self, total: int, window: int):
        self.total = total
        self.window = window
        self.sent = 0
        self.answered = 0
        self.waiting: asyncio.Future[None] | None = None

    async def read(self) -> Any:
        while self.sent - self.answered >= self.window and self.sent < self.total:
            self.waiting = asyncio.get_running_loop().create_future()
            await self.waiting
        if self.sent == self.total:
            return EOF_
        self.sent += 1
        return self.sent

    async def write(self, response: int) -> None:
        if response != self.answered + 1:
            raise AssertionError(f"answer to request {response} after {self.answered}")
        self.answered += 1
        waiting = self.waiting
        if waiting is not None and not waiting.done():
            self.waiting = None
            waiting.set_result(None)


async def measure(streams: int, window: int, requests: int) -> float:
    """CPU µs per request over every stream's ``requests``."""
    engine = _Engine()
    served = Streams(max(window, 1))
    calls = [_Call(requests, window) for _ in range(streams)]
    start = time.process_time()
    await asyncio.gather(
        *(
            served.serve(call, engine.begin, _respond, _refuse)  # type: ignore[arg-type]
            for call in calls
        )
    )
    cpu = time.process_time() - start
    engine.task.cancel()
    assert all(call.answered == requests for call in calls)
    return cpu / (streams * requests) * 1e6


def _respond(item: _Begun) -> int:
    return item.number


def _refuse(exc: Exception) -> None:
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lstm_bench.streams", description=__doc__, allow_abbrev=False
    )
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--window", type=int, default=1, help="requests in flight per stream")
    parser.add_argument("--requests", type=int, default=200, help="per stream")
    parser.add_argument("--repeat", type=int, default=5, help="rounds; the median is kept")
    args = parser.parse_args(argv)
    rounds = [
        asyncio.run(measure(args.streams, args.window, args.requests)) for _ in range(args.repeat)
    ]
    print(
        f"{args.streams} streams, window {args.window}: "
        f"{statistics.median(rounds):.2f} us CPU per request "
        f"(rounds {', '.join(f'{r:.2f}' for r in rounds)})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
