"""A step plan: which pending events one run applies, and applying its result.

``StepPlan.make`` takes the earliest pending event of each session (``of_request``:
one request's events, straight from admission's scan), marks duplicates, gathers
the rows' state and zeroes the rows of resets; ``apply``
scatters the new rows back; ``requeue`` puts events whose rows turned out to be
stale back at the front of the pool.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from service.core.pool import Events, Pool, select
from service.core.scan import Scanned
from service.counts import any_nonzero
from service.state.table import SessionTable


@dataclass
class StepPlan:
    """One run: its events (pool rows), which are duplicates, and the inputs of the rest."""

    events: Events
    duplicate: np.ndarray
    """Per event: its seq was applied already; answered as is, not run."""
    all_apply: bool
    run_slots: np.ndarray
    """The rows that step: those of the events that are not duplicates."""
    values: np.ndarray
    states: list[np.ndarray]
    """Copies of the rows' states, zeroed where the event resets."""
    run_seqs: np.ndarray | None
    """The applied events' seqs when any event of the run has one."""
    run_resets: np.ndarray | None = None
    """The applied events' reset flags (None: none resets)."""
    started: float = 0.0
    """When the plan was made (``perf_counter``)."""
    seconds: float = -1.0
    """How long the model ran (-1: it did not)."""
    cpu: float = 0.0
    """ONNX Runtime's CPU time in the run."""
    slots: np.ndarray = field(init=False)
    """Every event's row, duplicates included."""

    @classmethod
    def make(cls, pool: Pool, table: SessionTable, max_batch: int) -> StepPlan:
        """The next run of ``pool``: the earliest pending event of each session."""
        started = time.perf_counter()
        return cls._of(pool.take(pool.pick(max_batch, table.capacity)), table, started)

    @classmethod
    def of_request(cls, found: Scanned, table: SessionTable) -> StepPlan:
        """A run of one request's own events, as admission scanned them (each of a
        distinct session in ``table``, none pending): no pool in between."""
        started = time.perf_counter()
        events = {
            "slots": found.slots,
            "values": found.values,
            "seqs": found.seqs,
            "resets": found.resets,
            "t0": found.t0,
        }
        return cls._of(events, table, started)

    @classmethod
    def _of(cls, events: Events, table: SessionTable, started: float) -> StepPlan:
        slots, seqs = events["slots"], events["seqs"]
        sequenced = any_nonzero(seqs)
        if sequenced:
            duplicate = (seqs > 0) & (seqs <= table.last_seqs(slots))
            all_apply = not duplicate.any()
        else:
            duplicate = np.zeros(slots.size, np.bool_)
            all_apply = True
        run_slots, values, resets = slots, events["values"], events["resets"]
        if not all_apply:
            run = ~duplicate
            run_slots, values, resets, seqs = slots[run], values[run], resets[run], seqs[run]
        states: list[np.ndarray] = []
        run_resets = None
        if run_slots.size:
            states = table.gather(run_slots)
            if any_nonzero(resets):
                run_resets = resets
                for s in states:
                    s[resets] = 0.0
        run_seqs = seqs if sequenced else None
        plan = cls(
            events, duplicate, all_apply, run_slots, values, states, run_seqs, run_resets, started
        )
        plan.slots = slots
        return plan

    @property
    def queued_at(self) -> np.ndarray:
        """When the applied events' requests arrived."""
        t0 = self.events["t0"]
        return t0 if self.all_apply else t0[~self.duplicate]

    def counters(self, table: SessionTable) -> tuple[np.ndarray, np.ndarray]:
        """The rows' ``step`` and ``last_seq`` once the run is applied."""
        return table.advanced(self.run_slots, self.run_seqs)

    def apply(
        self,
        table: SessionTable,
        output: np.ndarray,
        states: list[np.ndarray],
        step: np.ndarray,
        last_seq: np.ndarray,
        now: float,
    ) -> None:
        table.scatter(self.run_slots, states, output, step, last_seq, now)
        if table.kept_events:
            table.record(self.run_slots, self.values, self.run_resets)

    def requeue(self, pool: Pool, stale: np.ndarray) -> None:
        """Put the events of ``stale`` (positions in ``run_slots``) back first in the pool,
        still pending, and leave them out of this plan."""
        again = stale if self.all_apply else np.flatnonzero(~self.duplicate)[stale]
        keep = np.ones(self.duplicate.size, np.bool_)
        keep[again] = False
        pool.push_front(select(self.events, again))
        self.events = select(self.events, keep)
        self.slots = self.events["slots"]
        self.duplicate = self.duplicate[keep]
        self.run_slots = np.delete(self.run_slots, stale)
        self.values = np.delete(self.values, stale, axis=0)
        if self.run_resets is not None:
            self.run_resets = np.delete(self.run_resets, stale)
