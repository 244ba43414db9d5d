"""Answers: the result arrays of admitted requests, filled in as their events are done."""

from __future__ import annotations

from asyncio import InvalidStateError
from collections.abc import Callable, Sequence
from itertools import accumulate

import numpy as np

from service.core.pool import Events
from service.core.scan import job_counts, result_columns, stretches
from service.core.types import Code, Failure, Job
from service.state.rows import put_rows


class Intake:
    """Result arrays for the requests admitted together; jobs hold views of them."""

    __slots__ = (
        "codes",
        "duplicates",
        "jobs",
        "outputs",
        "starts",
        "state_sizes",
        "states",
        "steps",
        "versions",
    )

    def __init__(
        self,
        jobs: list[Job],
        output_size: int,
        state_sizes: Sequence[int],
        state_names: Sequence[str] = (),
    ):
        self.jobs = jobs
        self.starts = list(accumulate([job.n for job in jobs], initial=0))
        """Row of each job's first event; ``starts[-1]`` is the number of events."""
        n = self.starts[-1]
        self.steps, self.outputs, self.codes, self.duplicates, self.versions = result_columns(
            n, output_size
        )
        self.state_sizes = tuple(state_sizes)
        """States are given for events computed with this layout (the model's newest at intake)."""
        with_state = any([job.include_state for job in jobs])
        self.states = [np.zeros((n, k), np.float32) for k in state_sizes] if with_state else None
        starts = self.starts
        for j, job in enumerate(jobs):
            lo, hi = starts[j], starts[j + 1]
            job.steps = self.steps[lo:hi]
            job.outputs = self.outputs[lo:hi]
            job.codes = self.codes[lo:hi]
            job.duplicates = self.duplicates[lo:hi]
            job.versions = self.versions[lo:hi]
            if job.include_state and self.states is not None:
                job.states = [s[lo:hi] for s in self.states]
                job.state_names = tuple(state_names)

    def __len__(self) -> int:
        return self.starts[-1]

    def fail(self, row: int, job: int, code: Code, message: str) -> None:
        """Refuse one event at admission (it will not count as remaining)."""
        self.jobs[job].fail(row - self.starts[job], code, message)


class Intakes:
    """Every admitted request with events still to answer, by intake key."""

    def __init__(self) -> None:
        self._open: dict[int, Intake] = {}
        self._next = 0

    def __len__(self) -> int:
        return len(self._open)

    def add(self, intake: Intake) -> int:
        """Keep an intake until its last event is answered; its key for the pool's rows."""
        key = self._next
        self._next += 1
        self._open[key] = intake
        return key

    def version_asked(self, key: int, job: int) -> int:
        """The model version a request asked for (0: each session's own)."""
        return self._open[key].jobs[job].version

    def answer(
        self,
        events: Events,
        steps: np.ndarray,
        outputs: np.ndarray | None,
        states: Callable[[], list[np.ndarray]],
        duplicate: np.ndarray,
        failure: Failure | None,
        version: int = 0,
        state_sizes: tuple[int, ...] = (),
    ) -> None:
        """Copy each event's result into its request; resolve requests that are complete.

        ``steps``/``outputs`` are the sessions' after the run, one row per event,
        computed by ``version`` (whose states have ``state_sizes``); ``states()``
        their states, asked for only when a request wants them (and its intake's
        layout is this version's). With a ``failure``, every event that is not a
        duplicate gets it instead.
        """
        intakes, rows, jobs = events["intake"], events["row"], events["job"]
        # One span per stretch of one intake's events, not one per intake: events that
        # waited (parked while their sessions were read from the store, requeued after a
        # conflict) join the pool behind later intakes', so an intake's events can come
        # back after another's, and the same intake at both ends says nothing of the middle.
        all_states: list[np.ndarray] | None = None
        for key, lo, hi in stretches(intakes):
            intake = self._open[key]
            r = rows[lo:hi]
            intake.steps[r] = steps[lo:hi]
            if outputs is not None:
                put_rows(intake.outputs, r, outputs[lo:hi])
                intake.versions[r] = version
            intake.duplicates[r] = duplicate[lo:hi]
            if (
                intake.states is not None
                and outputs is not None
                and intake.state_sizes == state_sizes
            ):
                if all_states is None:
                    all_states = states()
                for out, s in zip(intake.states, all_states):
                    out[r] = s[lo:hi]
            if failure is not None:
                bad = r[~duplicate[lo:hi]]
                intake.codes[bad] = failure[0]
                intake.outputs[bad] = 0.0
                intake.versions[bad] = 0
            self._done(key, intake, r, jobs[lo:hi], failure, duplicate[lo:hi])

    def fail(self, events: Events, code: Code, message: str) -> None:
        """Answer these events (none applied) with ``code``."""
        n = events["intake"].size
        self.answer(
            events,
            np.zeros(n, np.uint64),
            None,
            list,
            np.zeros(n, np.bool_),
            (code, message),
        )

    def _done(
        self,
        key: int,
        intake: Intake,
        rows: np.ndarray,
        jobs: np.ndarray,
        failure: Failure | None,
        duplicate: np.ndarray,
    ) -> None:
        finished = 0
        for j, count in job_counts(jobs):  # in any order (refused cold events come later)
            job = intake.jobs[j]
            if failure is not None:
                for i in rows[(jobs == j) & ~duplicate].tolist():
                    job.errors[i - intake.starts[j]] = failure[1]
            job.remaining -= count
            if job.remaining == 0:
                try:  # noqa: SIM105  (suppress() costs two calls per request)
                    job.future.set_result(None)
                except InvalidStateError:  # its caller left; the run goes on (Job.resolve)
                    pass
                finished += 1
        if finished and not any([jb.remaining for jb in intake.jobs]):
            del self._open[key]

    def fail_all(self, message: str) -> None:
        """After a core bug: answer every unanswered event INTERNAL; no caller hangs.

        An event counts as answered once it has a step or is a duplicate.
        """
        for intake in self._open.values():
            unanswered = (intake.codes == 0) & (intake.steps == 0) & ~intake.duplicates
            for j, job in enumerate(intake.jobs):
                if job.future.done():
                    continue
                lo, hi = intake.starts[j], intake.starts[j + 1]
                for i in np.flatnonzero(unanswered[lo:hi]).tolist():
                    job.fail(i, Code.INTERNAL, message)
                job.remaining = 0
                job.resolve()
        self._open.clear()


def answer_request(
    job: Job,
    steps: np.ndarray,
    outputs: np.ndarray,
    duplicate: np.ndarray,
    failure: Failure | None,
    version: int,
) -> None:
    """Answer a request whose events were a run of their own (``StepPlan.of_request``).

    What ``Intakes.answer`` writes into an intake's rows, written into arrays of the
    request's own: ``steps``/``outputs`` are its sessions' after the run, one row per
    event, computed by ``version``; with a ``failure``, every event that is not a
    duplicate gets it instead.
    """
    n = steps.size
    job.steps = steps
    job.outputs = outputs
    job.duplicates = duplicate
    job.codes = np.zeros(n, np.int32)
    job.versions = versions = np.empty(n, np.uint64)  # np.full, without its Python wrapper
    versions.fill(version)
    if failure is not None:
        failed = np.flatnonzero(~duplicate)
        job.codes[failed] = failure[0]
        job.outputs[failed] = 0.0
        job.versions[failed] = 0
        for i in failed.tolist():
            job.errors[i] = failure[1]
    job.remaining = 0
    job.resolve()
