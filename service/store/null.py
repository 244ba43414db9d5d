"""The null store: sessions live in memory only; every call succeeds and keeps nothing."""

from __future__ import annotations

from collections.abc import Sequence

from service.store.base import StateStore, StoredRows, StoreLayout


class NullStore(StateStore):
    """``--state-store memory``: what a restart loses. Never read from: ``persistent`` is False."""

    url = "memory"
    persistent = False

    def __init__(self) -> None:
        self._layouts: dict[tuple[str, int], StoreLayout] = {}

    def open(self, start_over: bool, legacy_model: str) -> None:
        pass

    def register(self, model: str, version: int, layout: StoreLayout) -> None:
        self._layouts[(model, version)] = layout

    def layouts(self, model: str) -> dict[int, StoreLayout]:
        return {v: layout for (m, v), layout in self._layouts.items() if m == model}

    def versions(self, model: str) -> set[int]:
        return set()

    def load(self, model: str, session_ids: Sequence[str]) -> list[StoredRows]:
        return []

    def save(self, model: str, rows: StoredRows) -> None:
        pass

    def delete(self, model: str, session_ids: Sequence[str]) -> None:
        pass

    def expire(self, older_than: float) -> int:
        return 0

    def probe(self) -> None:
        pass

    def close(self) -> None:
        pass
