"""Admission: validate one model's queued events in one vectorised pass and place them.

An event is refused here (with its code) or placed: in the pending pool of the
lane (model version) its session is pinned to, or of the version a new session
starts on; or *parked* while its session is read from the store or moves to
another version. Parked events join their lane's pool, in arrival order, once
their sessions are placed; other sessions never wait for them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from service.core.lane import Lane
from service.core.model import ServedModel
from service.core.newids import new_ids, valid_ids, within_caps
from service.core.parking import Parking
from service.core.results import Intake, Intakes
from service.core.scan import scan
from service.core.types import NOT_FINITE, OUTCOME, Code, Failure, Job
from service.metrics import Metrics


class Admission:
    """Turns a model's queued jobs into pool rows of its lanes."""

    def __init__(
        self, model: ServedModel, intakes: Intakes, metrics: Metrics, max_session_id_bytes: int
    ):
        self.model = model
        self.intakes = intakes
        self.metrics = metrics
        self.max_session_id_bytes = max_session_id_bytes
        self.parking = Parking(model, intakes, metrics)

    def admit(self, jobs: list[Job]) -> list[str]:
        """Refuse or place every event of ``jobs``; the ids to read from the store now.

        Rejected events get their code here and never touch a session; a new
        session is created only for an event that will be applied.
        """
        model = self.model
        lanes = model.by_age
        newest = model.newest or lanes[0]
        spec = newest.spec
        intake = Intake(jobs, spec.output_size, spec.state_sizes, spec.state_names)
        n = len(intake)
        if not n:
            for job in jobs:
                job.resolve()
            return []
        one_lane = len(lanes) == 1
        # One compiled pass: the columns, NaN/Inf, and each session's row on a single lane.
        found = scan(jobs, lanes[0].table.index if one_lane else None, spec.event_size)
        ids = found.session_ids
        codes = intake.codes
        rejected = found.bad and self._refuse_undecoded(jobs)
        if found.not_finite:
            rejected = True
            for i in found.not_finite:
                if not codes[i]:
                    intake.fail(i, int(found.job_of[i]), Code.INVALID_ARGUMENT, NOT_FINITE)
        job_of = found.job_of
        lane_of: np.ndarray | None = None  # None: every session is on lanes[0]
        slots = found.slots
        if not one_lane:
            lane_of, slots = _route(lanes, ids)
        held = _NONE  # events parked behind a move
        if model.moving:
            moving = model.moving
            held = np.flatnonzero([sid in moving for sid in ids] & (codes == 0))
        if found.asked:
            rejected |= self._refuse_other_versions(jobs, intake, job_of, lanes, lane_of, slots)
        cold: np.ndarray | None = None
        if found.unknown if one_lane else slots.min() < 0:
            unknown = np.flatnonzero(slots < 0)
            unknown = unknown[~np.isin(unknown, held)] if held.size else unknown
            if lanes[0].cache.persistent:
                rejected |= self._refuse_bad_ids(intake, job_of, ids, unknown)
                cold = unknown[codes[unknown] == 0]
            else:
                rejected |= self._create_sessions(
                    jobs, intake, job_of, ids, slots, unknown, lanes, lane_of
                )
            if cold is not None and not cold.size:
                cold = None
        waiting = held if cold is None else np.union1d(held, cold)
        accepted: np.ndarray | None = None  # None: every event goes to a pool now
        per_job = [job.n for job in jobs]
        if rejected or waiting.size:
            if rejected:
                self._count_refused(codes)
                known = slots >= 0
                intake.steps[known] = _steps(lanes, lane_of, slots, known)
            ok = codes == 0
            per_job = np.bincount(job_of[ok], minlength=len(jobs)).tolist()
            ok[waiting] = False
            accepted = np.flatnonzero(ok)
        for job, remaining in zip(jobs, per_job):
            job.remaining = remaining
            if not remaining:
                job.resolve()
        if not any(per_job):
            return []
        key = self.intakes.add(intake)
        columns = {
            "values": found.values,
            "seqs": found.seqs,
            "resets": found.resets,
            "t0": found.t0,
            "job": job_of,
        }
        if lane_of is None:
            self._place(lanes[0], key, slots, columns, accepted, n)
        else:
            for k, lane in enumerate(lanes):
                here = lane_of == k if accepted is None else lane_of[accepted] == k
                if here.any():
                    at = np.flatnonzero(here) if accepted is None else accepted[here]
                    self._place(lane, key, slots, columns, at, n)
        if not waiting.size:
            return []
        versions = [jobs[j].version for j in job_of[waiting].tolist()]
        return self.parking.park(
            waiting, [ids[i] for i in waiting.tolist()], versions, columns, key
        )

    @staticmethod
    def _refuse_undecoded(jobs: list[Job]) -> bool:
        """Refuse the events found bad while decoding (another number of values, a bad id)."""
        refused = False
        for job in jobs:
            bad = job.block.bad
            if bad:
                refused = True
                for i, message in bad.items():
                    job.fail(i, Code.INVALID_ARGUMENT, message)
        return refused

    def _place(
        self,
        lane: Lane,
        key: int,
        slots: np.ndarray,
        columns: dict[str, np.ndarray],
        at: np.ndarray | None,
        n: int,
    ) -> None:
        """Queue the events at ``at`` (None: all) in ``lane``'s pool."""
        if at is None:  # every event (the common case): the columns as they are
            if not slots.size:
                return
            intake = np.empty(n, np.int64)  # np.full, without its Python wrapper
            intake.fill(key)
            lane.pool.extend(
                slots=slots,
                values=columns["values"],
                seqs=columns["seqs"],
                resets=columns["resets"],
                t0=columns["t0"],
                intake=intake,
                row=np.arange(n),
                job=columns["job"],
            )
            lane.table.hold(slots)
            return
        acc_slots = slots[at]
        if not acc_slots.size:
            return
        lane.pool.extend(
            slots=acc_slots,
            values=columns["values"][at],
            seqs=columns["seqs"][at],
            resets=columns["resets"][at],
            t0=columns["t0"][at],
            intake=np.full(acc_slots.size, key, np.int64),
            row=at,
            job=columns["job"][at],
        )
        lane.table.hold(acc_slots)

    def _refuse_other_versions(
        self,
        jobs: list[Job],
        intake: Intake,
        job_of: np.ndarray,
        lanes: list[Lane],
        lane_of: np.ndarray | None,
        slots: np.ndarray,
    ) -> bool:
        """Refuse events of sessions pinned to another version than their request names."""
        refused = False
        for i in np.flatnonzero(slots >= 0).tolist():
            job = jobs[int(job_of[i])]
            lane = lanes[0 if lane_of is None else int(lane_of[i])]
            if job.version and job.version != lane.version and not intake.codes[i]:
                intake.fail(
                    i,
                    int(job_of[i]),
                    Code.FAILED_PRECONDITION,
                    f"the session runs on version {lane.version} of {self.model.name!r}, "
                    f"not {job.version} (MigrateSession moves it)",
                )
                refused = True
        return refused

    # -- new sessions ----------------------------------------------------------------

    def _refuse_bad_ids(
        self, intake: Intake, job_of: np.ndarray, ids: Sequence[str], unknown: np.ndarray
    ) -> bool:
        """Refuse the events of unknown ids that are empty or too long; whether any was."""
        refused: dict[str, Failure] = {}
        _, _, distinct = new_ids(ids, unknown, intake.codes)
        valid_ids(distinct, self.max_session_id_bytes, refused)
        if not refused:
            return False
        for i in unknown.tolist():
            if ids[i] in refused and not intake.codes[i]:
                intake.fail(i, int(job_of[i]), *refused[ids[i]])
        return True

    def _create_sessions(
        self,
        jobs: list[Job],
        intake: Intake,
        job_of: np.ndarray,
        ids: Sequence[str],
        slots: np.ndarray,
        unknown: np.ndarray,
        lanes: list[Lane],
        lane_of: np.ndarray | None,
    ) -> bool:
        """Create the sessions of new ids in bulk, on the version their request asks for (the
        newest by default); refuse bad ids and ids over the caps. Every event of a refused
        id gets the same answer as its first one. Returns whether any event was refused."""
        codes = intake.codes
        row_array, new, distinct = new_ids(ids, unknown, codes)
        refused: dict[str, Failure] = {}
        valid = valid_ids(distinct, self.max_session_id_bytes, refused)
        target: dict[str, Lane] = {}
        first_job = dict(zip(reversed(new), reversed(job_of[row_array].tolist())))
        for sid in valid:
            try:
                target[sid] = self.model.lane(jobs[first_job[sid]].version)
            except LookupError as exc:
                refused[sid] = (Code.NOT_FOUND, str(exc))
        valid = [sid for sid in valid if sid in target]
        distinct = within_caps(lanes[0].table, valid, refused)
        by_lane: dict[int, list[str]] = {}
        for sid in distinct:
            by_lane.setdefault(target[sid].version, []).append(sid)
        now = time.time()
        created = None
        for version, group in by_lane.items():
            created = self.model.lanes[version].table.create_many(group, now)
        single = len(by_lane) <= 1 and (lane_of is None or len(lanes) == 1)
        if not refused and single:
            if new:  # each new id once (the common case): the created rows are the rows' slots
                same = len(distinct) == len(new) and created is not None
                table = (
                    lanes[0].table if not by_lane else self.model.lanes[next(iter(by_lane))].table
                )
                slots[row_array] = created if same else table.lookup(new)
            return False
        index = {lane.version: k for k, lane in enumerate(lanes)}
        for i, sid in zip(row_array.tolist(), new):
            if sid in refused:
                intake.fail(i, int(job_of[i]), *refused[sid])
            elif sid in target:
                lane = target[sid]
                slots[i] = lane.table.index[sid]
                if lane_of is not None:
                    lane_of[i] = index[lane.version]
        return bool(refused)

    def _count_refused(self, codes: np.ndarray) -> None:
        values, counts = np.unique(codes[codes != 0], return_counts=True)
        for code, count in zip(values.tolist(), counts.tolist()):
            self.metrics.count_events(OUTCOME[Code(code)], count)


_NONE = np.zeros(0, np.int64)


def _route(lanes: list[Lane], ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Which lane holds each id (-1: none), and its row there."""
    n = len(ids)
    lane_of = np.full(n, -1, np.int64)
    slots = np.full(n, -1, np.int64)
    rest = np.arange(n)
    for k, lane in enumerate(lanes):
        found = lane.table.lookup([ids[i] for i in rest.tolist()])
        hit = found >= 0
        lane_of[rest[hit]] = k
        slots[rest[hit]] = found[hit]
        rest = rest[~hit]
        if not rest.size:
            break
    return lane_of, slots


def _steps(
    lanes: list[Lane], lane_of: np.ndarray | None, slots: np.ndarray, known: np.ndarray
) -> np.ndarray:
    """Each known event's session's step (for events refused at admission)."""
    if lane_of is None:
        return lanes[0].table.steps(slots[known])
    out = np.zeros(int(known.sum()), np.uint64)
    at = np.flatnonzero(known)
    for k, lane in enumerate(lanes):
        mine = lane_of[at] == k
        if mine.any():
            out[mine] = lane.table.steps(slots[at[mine]])
    return out
