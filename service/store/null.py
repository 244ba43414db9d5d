"""The null store: sessions live in memory only; every call succeeds and keeps nothing."""

from __future__ import annotations

from collections.abc import Sequence

from service.store.base import StateStore, StoredRows, StoreLayout


class NullStore(StateStore):
    """``--state-store memory``: what a restart loses. Never read from: ``persistent`` is False."""

    url = "memory"
    persistent = False

    def __init__(self) -> None:
        self.width = 0

    def open(self, layout: StoreLayout, start_over: bool) -> None:
        self.width = layout.width

    def load(self, session_ids: Sequence[str]) -> StoredRows:
        return StoredRows.empty(self.width)

    def save(self, rows: StoredRows) -> None:
        pass

    def delete(self, session_ids: Sequence[str]) -> None:
        pass

    def expire(self, older_than: float) -> int:
        return 0

    def probe(self) -> None:
        pass

    def close(self) -> None:
        pass
