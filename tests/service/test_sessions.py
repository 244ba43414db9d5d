"""The session table on its own: rows, growth, reuse, caps, deferred frees, idleness."""

from __future__ import annotations

import numpy as np
import pytest

from service.state.table import SessionCapError, SessionTable, session_id_error


def table(**kw: int) -> SessionTable:
    args = {"max_sessions": 100, "initial_capacity": 2, **kw}
    return SessionTable((3, 2), output_size=3, **args)


def test_rows_grow_geometrically_and_keep_state() -> None:
    t = table()
    slots = [t.create(f"s{i}", now=1.0) for i in range(5)]
    assert len(set(slots)) == 5 and t.capacity == 8
    t.states[0][slots[0]] = [1, 2, 3]
    t.create("s5", now=1.0)
    t.create("s6", now=1.0)
    t.create("s7", now=1.0)
    t.create("s8", now=1.0)  # 9 rows: grown to 16
    assert t.capacity == 16
    assert t.states[0][slots[0]].tolist() == [1, 2, 3]
    assert t.lookup(["s0", "nope", "s4"]).tolist() == [slots[0], -1, slots[4]]


def test_cap_and_reuse() -> None:
    t = table(max_sessions=2)
    a = t.create("a")
    t.create("b")
    with pytest.raises(SessionCapError, match="maximum of 2 sessions"):
        t.create("c")
    t.states[1][a] = [5, 5]
    snap = t.remove("a")
    assert snap.states[1].tolist() == [5, 5]
    c = t.create("c")
    assert c == a and not t.states[1][c].any()  # a reused row starts from zeros
    assert t.capacity == 2


def test_row_with_pending_events_is_freed_only_when_done() -> None:
    t = table(max_sessions=1, initial_capacity=1)
    a = t.create("a")
    t.pending[a] = 2
    t.remove("a")
    assert "a" not in t and t.doomed[a]
    b = t.create("b")  # the doomed row is not reused: the table grows past it
    assert b != a
    t.finish(np.array([a]))
    assert t.doomed[a]
    t.finish(np.array([a]))
    assert not t.doomed[a] and t.ids[a] is None


def test_idle_ids_skip_busy_rows() -> None:
    t = table()
    t.create("old", now=10.0)
    busy = t.create("busy", now=10.0)
    t.create("new", now=100.0)
    t.pending[busy] = 1
    assert t.idle_ids(older_than=50.0) == ["old"]


@pytest.mark.parametrize(
    ("sid", "problem"),
    [
        ("", "session_id is empty"),
        ("a" * 9, "session_id is 9 bytes long; the limit is 8"),
        ("ok", None),
    ],
)
def test_session_id_rules(sid: str, problem: str | None) -> None:
    assert session_id_error(sid, 8) == problem


def test_rows_freed_after_growth_are_reused() -> None:
    t = table(initial_capacity=2)
    for i in range(2):
        t.create(f"a{i}")
    t.remove("a0")
    for i in range(5):  # grows twice while one freed row waits in the stack
        t.create(f"b{i}")
    assert t.capacity == 8 and len(t) == 6
    for sid in [f"b{i}" for i in range(5)] + ["a1"]:
        t.remove(sid)
    assert len(t) == 0
    slots = {t.create(f"c{i}") for i in range(8)}
    assert slots == set(range(8)) and t.capacity == 8  # every row came back, none twice
