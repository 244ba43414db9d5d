"""Domain types of the core: event blocks, jobs, answer codes, and the core's errors."""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


class Code(enum.IntEnum):
    """The ``google.rpc.Code`` numbers an event can be answered with."""

    OK = 0
    INVALID_ARGUMENT = 3
    NOT_FOUND = 5
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    INTERNAL = 13
    UNAVAILABLE = 14


OUTCOME = {
    Code.INVALID_ARGUMENT: "invalid",
    Code.NOT_FOUND: "invalid",
    Code.FAILED_PRECONDITION: "invalid",
    Code.RESOURCE_EXHAUSTED: "over_capacity",
    Code.INTERNAL: "failed",
    Code.UNAVAILABLE: "unavailable",
}
"""The ``lstm_events_total`` outcome of each refusal code."""
NOT_FINITE = "values contain NaN or Inf"
MODEL_FAILED = "the model failed on this event's batch"
STORE_FAILED = "the state store is unavailable; the event was not applied, retry later"
INTERNAL_ERROR = "internal error in the batcher"

Failure = tuple[Code, str]
"""How every event of a run that did not happen is answered."""


class EngineClosed(Exception):
    """The engine is draining or stopped and takes no new events."""


class NotReady(Exception):
    """No model is loaded yet."""


class InvalidRequest(ValueError):
    """The call's arguments are wrong (INVALID_ARGUMENT); nothing was changed."""


class UnknownModel(LookupError):
    """No such model, or no such version of it, is serving (NOT_FOUND)."""


class CannotMove(Exception):
    """A session cannot move that way (FAILED_PRECONDITION): the message says why."""


@dataclass
class EventBlock:
    """The events of one request, decoded: n ids, ``[n, E]`` float32 values, seqs, resets.

    ``seqs``/``resets`` may be None (all 0 / all false). ``bad`` holds per-event
    problems found while decoding (e.g. a wrong number of values); those rows of
    ``values`` are ignored.
    """

    session_ids: Sequence[str]
    values: np.ndarray
    seqs: np.ndarray | None = None
    resets: np.ndarray | None = None
    bad: dict[int, str] | None = None


class Job:
    """One request in flight; ``future`` resolves (to None) when every event is answered.

    None rather than the job: a future holding the job that holds it is a
    reference cycle per request, left to the garbage collector (docs/PERFORMANCE.md).

    The result arrays are views into arrays shared by every request admitted in
    the same intake, so a request costs no allocation of its own.
    """

    __slots__ = (
        "block",
        "codes",
        "duplicates",
        "errors",
        "future",
        "include_state",
        "model",
        "n",
        "outputs",
        "remaining",
        "state_names",
        "states",
        "steps",
        "t0",
        "version",
        "versions",
    )

    def __init__(
        self,
        block: EventBlock,
        include_state: bool,
        future: asyncio.Future[None],
        model: str = "",
        version: int = 0,
    ):
        self.block = block
        self.n = block.values.shape[0]
        self.include_state = include_state
        self.future = future
        self.model = model
        self.version = version
        """The version the request asked for; 0: each session's own."""
        self.t0 = time.perf_counter()
        self.errors: dict[int, str] = {}
        self.remaining = 0
        self.steps: np.ndarray
        self.outputs: np.ndarray
        self.codes: np.ndarray
        self.duplicates: np.ndarray
        self.versions: np.ndarray
        """Which version answered each event (0: refused)."""
        self.states: list[np.ndarray] | None = None
        self.state_names: tuple[str, ...] = ()
        """The names of ``states`` (the model's newest version's when the job was admitted)."""

    def fail(self, i: int, code: Code, message: str) -> None:
        self.codes[i] = code
        self.errors[i] = message

    def resolve(self) -> None:
        """Every event is answered. The caller may have gone meanwhile (its future cancelled):
        that changes nothing for the other requests of the run."""
        if not self.future.done():
            self.future.set_result(None)

    def fail_whole(self, message: str) -> None:
        """Answer every event INTERNAL (the intake that should have answered it failed)."""
        if self.future.done():
            return
        self.steps = np.zeros(self.n, np.uint64)
        self.outputs = np.zeros((self.n, 0), np.float32)
        self.codes = np.full(self.n, Code.INTERNAL, np.int32)
        self.duplicates = np.zeros(self.n, np.bool_)
        self.versions = np.zeros(self.n, np.uint64)
        self.states = None
        self.errors = dict.fromkeys(range(self.n), message)
        self.resolve()
