"""The session table: every session's state in preallocated numpy arrays, rows by slot.

Only this module touches the arrays' rows; the rest of the server asks for
them with ``gather``/``scatter``/``snapshot`` and the other verbs below.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat

import numpy as np

from service.counts import add_at
from service.state.kept import KeptEvents
from service.state.keys import tenant_of
from service.state.rows import advanced, put_counters, put_rows, take_rows
from service.store.base import StoredRows, StoreLayout


class SessionCapError(Exception):
    """The table holds ``max_sessions`` live sessions already (or the tenant its share)."""


@dataclass(frozen=True)
class SessionSnapshot:
    """A copy of one session's row, safe to hand outside the table."""

    session_id: str
    step: int
    last_seq: int
    states: tuple[np.ndarray, ...]
    output: np.ndarray
    created: float
    updated: float


def session_id_error(session_id: str, max_bytes: int) -> str | None:
    """Why a session id is refused, or None when it is acceptable."""
    if not session_id:
        return "session_id is empty"
    size = len(session_id.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        return f"session_id is {size} bytes long; the limit is {max_bytes}"
    return None


class Limits:
    """The caps every table of the server shares (one table per model version)."""

    def __init__(self, max_sessions: int, tenants: bool = False, max_per_tenant: int = 0):
        self.max_sessions = max_sessions
        self.tenants = tenants
        """Ids are tenants' keys (``state.keys``); live sessions are counted per tenant."""
        self.max_per_tenant = max_per_tenant if tenants else 0
        """With tenants, each holds at most this many live sessions (0 = no cap)."""
        self.live = 0
        self.tenant_live: Counter[str] = Counter()

    def room(self) -> int:
        """How many more sessions fit under the cap."""
        return self.max_sessions - self.live

    def tenant_room(self, tenant: str) -> int:
        """How many more sessions the tenant may hold (a large number without a cap)."""
        if not self.max_per_tenant:
            return self.max_sessions
        return self.max_per_tenant - self.tenant_live[tenant]


class SessionTable:
    """Rows ``[capacity, n]`` per state tensor plus counters; a dict maps id -> row.

    Rows are grown geometrically and reused through a free list, so serving an
    event allocates no per-session Python or numpy object. ``pending[row]``
    counts accepted events not yet applied: such a row is never evicted or
    reused, and a row deleted while it has pending events is freed when they
    are done.
    """

    def __init__(
        self,
        state_sizes: Sequence[int],
        output_size: int,
        max_sessions: int,
        initial_capacity: int = 1024,
        output_alias: int | None = None,
        tenants: bool = False,
        max_per_tenant: int = 0,
        limits: Limits | None = None,
        kept_events: int = 0,
        event_size: int = 0,
    ):
        self.state_sizes = tuple(state_sizes)
        self.output_size = output_size
        self.output_alias = output_alias
        """When the model's output *is* state ``k`` (plain LSTM: hidden), no copy is kept."""
        self.limits = (
            limits if limits is not None else Limits(max_sessions, tenants, max_per_tenant)
        )
        """Shared with the server's other tables: the caps hold across models and versions."""
        self.max_sessions = self.limits.max_sessions
        self.tenants = self.limits.tenants
        self.max_per_tenant = self.limits.max_per_tenant
        self.tenant_live: Counter[str] = Counter()
        """This table's live sessions per tenant (the caps count ``limits.tenant_live``)."""
        self.kept_events = kept_events
        """Each row keeps its last this-many events (to replay them on a new version)."""
        self.kept = KeptEvents(kept_events, event_size) if kept_events else None
        self.index: dict[str, int] = {}
        self.ids = np.empty(0, object)
        """Each row's session id (None for a free row)."""
        self.capacity = 0
        self.states: list[np.ndarray] = [np.zeros((0, n), np.float32) for n in self.state_sizes]
        self.output = np.zeros((0, output_size), np.float32)
        """Each row's last output; the state array itself when ``output_alias`` is set."""
        self.step = np.zeros(0, np.uint64)
        self.last_seq = np.zeros(0, np.uint64)
        self.created = np.zeros(0, np.float64)
        self.updated = np.zeros(0, np.float64)
        self.pending = np.zeros(0, np.int32)
        self.doomed = np.zeros(0, np.bool_)
        # A stack of free rows in a numpy array: no Python int per row.
        self._free = np.zeros(0, np.int64)
        self._n_free = 0
        self._n_doomed = 0
        """Rows deleted while events were pending: freed once those are done."""
        self._grow(min(initial_capacity, max_sessions))

    def __len__(self) -> int:
        return len(self.index)

    @property
    def n_doomed(self) -> int:
        """Rows deleted while events were pending, not yet freed."""
        return self._n_doomed

    def __contains__(self, session_id: str) -> bool:
        return session_id in self.index

    def lookup(self, session_ids: Sequence[str]) -> np.ndarray:
        """Rows of the given ids, -1 for ids not in the table."""
        return np.fromiter(map(self.index.get, session_ids, repeat(-1)), np.int64, len(session_ids))

    def create(self, session_id: str, now: float | None = None) -> int:
        """A zeroed row for a new session; raises SessionCapError at either cap."""
        if self.max_per_tenant and not self.tenant_room(tenant_of(session_id)):
            raise SessionCapError(
                f"this tenant holds its maximum of {self.max_per_tenant} sessions"
            )
        return int(self.create_many([session_id], time.time() if now is None else now)[0])

    def room(self) -> int:
        """How many more sessions fit under the cap (counting every table)."""
        return self.limits.room()

    def tenant_room(self, tenant: str) -> int:
        """How many more sessions the tenant may hold (a large number without a cap)."""
        return self.limits.tenant_room(tenant)

    def tenant_count(self, tenant: str) -> int:
        """Live sessions of one tenant ("" without tenants: all of them)."""
        return self.tenant_live[tenant] if self.tenants else len(self.index)

    def create_many(self, session_ids: Sequence[str], now: float) -> np.ndarray:
        """Zeroed rows for new, distinct ids, all at once; raises SessionCapError past the cap."""
        n = len(session_ids)
        if n > self.room():
            raise SessionCapError(f"the server holds its maximum of {self.max_sessions} sessions")
        if n > self._n_free:
            need = self.capacity + n - self._n_free
            self._grow(min(max(2 * self.capacity, need), self.max_sessions + self._n_doomed))
        top = self._n_free
        slots = self._free[top - n : top][::-1].copy()
        self._n_free = top - n
        for table in self.states:
            table[slots] = 0.0
        if self.output_alias is None:
            self.output[slots] = 0.0
        self.step[slots] = 0
        self.last_seq[slots] = 0
        self.created[slots] = now
        self.updated[slots] = now
        if self.kept is not None:
            self.kept.clear(slots)
        column = np.empty(n, object)
        column[:] = session_ids
        self.ids[slots] = column
        self.index.update(zip(session_ids, slots.tolist()))
        self.limits.live += n
        if self.tenants:
            tenants = list(map(tenant_of, session_ids))
            self.tenant_live.update(tenants)
            self.limits.tenant_live.update(tenants)
        return slots

    def restore(self, slots: np.ndarray, rows: StoredRows, layout: StoreLayout) -> int:
        """Fill rows from stored sessions (``slots[i]`` gets ``rows`` entry i; -1 skips it).

        Returns how many rows were filled.
        """
        keep = slots >= 0
        blob, step, last_seq = rows.blob, rows.step, rows.last_seq
        created, updated = rows.created, rows.updated
        if not keep.all():
            slots = slots[keep]
            blob, step, last_seq = blob[keep], step[keep], last_seq[keep]
            created, updated = created[keep], updated[keep]
        states, output = layout.split(blob)
        for table, value in zip(self.states, states):
            table[slots] = value
        if self.output_alias is None:
            self.output[slots] = output
        kept = layout.kept(blob)
        if self.kept is not None:
            if kept is not None and layout.replay_events == self.kept_events:
                self.kept.load(slots, kept)
            else:
                self.kept.clear(slots)
        self.step[slots] = step
        self.last_seq[slots] = last_seq
        self.created[slots] = created
        self.updated[slots] = updated
        return int(slots.size)

    def stored_rows(self, slots: np.ndarray, layout: StoreLayout, version: int = 1) -> StoredRows:
        """These rows as the store keeps them."""
        return StoredRows(
            self.ids[slots].tolist(),
            self.step[slots],
            self.last_seq[slots],
            layout.join([t[slots] for t in self.states], self.output[slots], self.kept_of(slots)),
            self.created[slots],
            self.updated[slots],
            version,
        )

    # -- the events each row keeps (for replay) --------------------------------------

    def record(self, slots: np.ndarray, values: np.ndarray, resets: np.ndarray | None) -> None:
        """Keep a run's events (distinct slots; see ``KeptEvents``)."""
        if self.kept is not None:
            self.kept.record(slots, values, resets)

    def kept_after(
        self, slots: np.ndarray, values: np.ndarray, resets: np.ndarray | None
    ) -> np.ndarray | None:
        """The rows' kept events as they will be once ``record`` keeps these (None: none)."""
        return None if self.kept is None else self.kept.after(slots, values, resets)

    def kept_of(self, slots: np.ndarray) -> np.ndarray | None:
        """The rows' kept events as the store keeps them (None without replay)."""
        return None if self.kept is None else self.kept.of(slots)

    def reset(self, slot: int, now: float | None = None) -> None:
        """Zero the state of a row (a new sequence: its kept events too); counters are kept."""
        self._zero(slot)
        if self.kept is not None:
            self.kept.clear(slot)
        if now is not None:
            self.updated[slot] = now

    def write(
        self, slot: int, step: int, last_seq: int, states: Sequence[np.ndarray | None], now: float
    ) -> None:
        """Overwrite a row (PutSession); a None state means zeros. Kept events start over."""
        for table, value in zip(self.states, states):
            table[slot] = 0.0 if value is None else value
        if self.output_alias is None:
            self.output[slot] = 0.0
        if self.kept is not None:
            self.kept.clear(slot)
        self.step[slot] = step
        self.last_seq[slot] = last_seq
        self.updated[slot] = now

    def snapshot(self, slot: int) -> SessionSnapshot:
        session_id = self.ids[slot]
        assert isinstance(session_id, str)
        return SessionSnapshot(
            session_id=session_id,
            step=int(self.step[slot]),
            last_seq=int(self.last_seq[slot]),
            states=tuple(table[slot].copy() for table in self.states),
            output=self.output[slot].copy(),
            created=float(self.created[slot]),
            updated=float(self.updated[slot]),
        )

    # -- a run's rows -------------------------------------------------------------

    def gather(self, slots: np.ndarray) -> list[np.ndarray]:
        """Copies of the rows' states (ONNX Runtime's inputs; the table may grow meanwhile)."""
        return [take_rows(t, slots) for t in self.states]

    def scatter(
        self,
        slots: np.ndarray,
        states: Sequence[np.ndarray],
        output: np.ndarray,
        step: np.ndarray,
        last_seq: np.ndarray,
        now: float,
    ) -> None:
        """Write a run's new rows (distinct slots)."""
        for t, s in zip(self.states, states):
            put_rows(t, slots, s)
        if self.output_alias is None:
            put_rows(self.output, slots, output)
        put_counters(self.step, self.last_seq, self.updated, slots, step, last_seq, now)

    def advanced(self, slots: np.ndarray, seqs: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The rows' ``step`` and ``last_seq`` once a run of these events (``seqs``: theirs,
        None when none has one) is applied."""
        return advanced(self.step, self.last_seq, slots, seqs)

    def steps(self, slots: np.ndarray) -> np.ndarray:
        return self.step[slots]

    def last_seqs(self, slots: np.ndarray) -> np.ndarray:
        return self.last_seq[slots]

    def outputs(self, slots: np.ndarray) -> np.ndarray:
        """Each row's last output (a copy)."""
        return take_rows(self.output, slots)

    def version_tags(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What each row was copied from in a shared store: its ``step`` and ``updated``."""
        return self.step[slots], self.updated[slots]

    def created_at(self, slots: np.ndarray) -> np.ndarray:
        return self.created[slots]

    def ids_of(self, slots: np.ndarray) -> list[str]:
        return self.ids[slots].tolist()  # type: ignore[no-any-return]

    def hold(self, slots: np.ndarray) -> None:
        """One more pending event for each of ``slots`` (a slot may repeat)."""
        add_at(self.pending, slots, 1)

    def busy(self, slots: np.ndarray) -> bool:
        """Whether any of these rows has events pending."""
        return bool(self.pending[slots].any())

    def doomed_mask(self, slots: np.ndarray) -> np.ndarray | None:
        """Which rows were deleted while their events were pending; None when none was."""
        return self.doomed[slots] if self._n_doomed else None

    def start_over(self, slot: int) -> None:
        """Zero state and counters: the session is gone from the shared store."""
        self._zero(slot)
        self.step[slot] = 0
        self.last_seq[slot] = 0

    def remove(self, session_id: str) -> SessionSnapshot:
        """Drop a session; its row is freed now, or when its pending events are done."""
        slot = self.index.pop(session_id)
        self.limits.live -= 1
        if self.tenants:
            tenant = tenant_of(session_id)
            self.tenant_live[tenant] -= 1
            self.limits.tenant_live[tenant] -= 1
        snap = self.snapshot(slot)
        if self.pending[slot]:
            self.doomed[slot] = True
            self._n_doomed += 1
        else:
            self._release(slot)
        return snap

    def finish(self, slots: np.ndarray) -> None:
        """Mark one pending event done for each of ``slots`` (distinct rows)."""
        add_at(self.pending, slots, -1)
        if not self._n_doomed:
            return
        doomed = slots[self.doomed[slots] & (self.pending[slots] == 0)]
        for slot in doomed.tolist():
            self.doomed[slot] = False
            self._n_doomed -= 1
            self._release(slot)

    def live_slots(self) -> np.ndarray:
        """The rows of live sessions (not free, not deleted)."""
        return np.fromiter(self.index.values(), np.int64, len(self.index))

    def idle_ids(self, older_than: float) -> list[str]:
        """Ids of live sessions not updated since ``older_than`` and with nothing pending."""
        rows = np.flatnonzero(
            (self.updated[: self.capacity] < older_than)
            & (self.pending[: self.capacity] == 0)
            & ~self.doomed[: self.capacity]
        )
        return [sid for sid in self.ids[rows].tolist() if sid is not None]

    def _zero(self, slot: int) -> None:
        for table in self.states:
            table[slot] = 0.0
        if self.output_alias is None:
            self.output[slot] = 0.0

    def _release(self, slot: int) -> None:
        self.ids[slot] = None
        self.updated[slot] = np.inf  # never "idle"
        self._free[self._n_free] = slot
        self._n_free += 1

    def _grow(self, capacity: int) -> None:
        old = self.capacity
        if capacity <= old:
            capacity = old + 1

        def grown(a: np.ndarray, fill: float | None = 0) -> np.ndarray:
            # np.zeros maps fresh zero pages: rows cost memory only once they are used.
            b = np.zeros((capacity, *a.shape[1:]), a.dtype)
            b[:old] = a[:old]
            if fill != 0:
                b[old:] = fill
            return b

        self.states = [grown(t) for t in self.states]
        if self.output_alias is None:
            self.output = grown(self.output)
        else:
            self.output = self.states[self.output_alias]
        self.step = grown(self.step)
        self.last_seq = grown(self.last_seq)
        self.created = grown(self.created)
        self.updated = grown(self.updated, np.inf)
        self.pending = grown(self.pending)
        self.doomed = grown(self.doomed)
        if self.kept is not None:
            self.kept.grow(capacity)
        self.ids = grown(self.ids, None)
        # Pop from the end: hand out low rows first so the live rows stay dense.
        # New rows go under the rows freed earlier; both pop lowest-first. The stack
        # has room for every row, so releasing never has to grow it.
        added = capacity - old
        free = np.empty(capacity, np.int64)
        free[:added] = np.arange(capacity - 1, old - 1, -1)
        free[added : added + self._n_free] = self._free[: self._n_free]
        self._free = free
        self._n_free += added
        self.capacity = capacity
