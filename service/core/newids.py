"""New sessions: which ids are acceptable, and which fit under the caps."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.core.types import Code, Failure
from service.state.keys import tenant_of
from service.state.table import SessionTable, session_id_error


def within_caps(table: SessionTable, distinct: list[str], refused: dict[str, Failure]) -> list[str]:
    """``distinct`` without the new ids over their tenant's cap or the server's."""
    if table.max_per_tenant and distinct:
        distinct = _tenant_room(table, distinct, refused)
    room = table.room()
    if len(distinct) > room:  # the earliest new sessions fit; the rest are refused
        full = (
            Code.RESOURCE_EXHAUSTED,
            f"the server holds its maximum of {table.max_sessions} sessions",
        )
        for sid in distinct[room:]:
            refused[sid] = full
        distinct = distinct[:room]
    return distinct


def _tenant_room(
    table: SessionTable, distinct: list[str], refused: dict[str, Failure]
) -> list[str]:
    """``distinct`` without the new ids over their tenant's cap (added to ``refused``)."""
    full = (
        Code.RESOURCE_EXHAUSTED,
        f"this tenant holds its maximum of {table.max_per_tenant} sessions",
    )
    room: dict[str, int] = {}
    kept = []
    for sid in distinct:
        tenant = tenant_of(sid)
        left = room.get(tenant)
        if left is None:
            left = table.tenant_room(tenant)
        if left > 0:
            kept.append(sid)
        else:
            refused[sid] = full
        room[tenant] = left - 1
    return kept


def new_ids(
    ids: Sequence[str], unknown: np.ndarray, codes: np.ndarray
) -> tuple[np.ndarray, list[str], list[str]]:
    """Rows of unknown ids not yet refused, their ids, and those ids once each."""
    row_array = unknown[codes[unknown] == 0]
    new = [ids[i] for i in row_array.tolist()]
    return row_array, new, list(dict.fromkeys(new))  # first appearance order, at C speed


def valid_ids(distinct: list[str], limit: int, refused: dict[str, Failure]) -> list[str]:
    """``distinct`` without the ids that are empty or too long (added to ``refused``)."""
    lengths = list(map(len, distinct))
    if lengths and min(lengths) > 0 and 4 * max(lengths) <= limit:
        return distinct  # UTF-8 has at most 4 bytes a character: every id fits
    for sid in distinct:
        problem = session_id_error(sid, limit)
        if problem is not None:
            refused[sid] = (Code.INVALID_ARGUMENT, problem)
    return [sid for sid in distinct if sid not in refused]
