"""State stores by URL scheme: ``memory``, ``sqlite://``, ``redis://``/``rediss://``.

To add a store: subclass ``StateStore`` (``service.store.base``) in a module of
its own and give it a scheme in ``SCHEMES``; nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable

from service.store.base import (
    Conflicts,
    StateStore,
    StoredRows,
    StoreError,
    StoreLayout,
    StoreMismatchError,
)
from service.store.null import NullStore

__all__ = [
    "SCHEMES",
    "Conflicts",
    "NullStore",
    "StateStore",
    "StoreError",
    "StoreLayout",
    "StoreMismatchError",
    "StoredRows",
    "check_url",
    "open_store",
]

EXPECTED = "expected memory, sqlite:///path/to/state.db or redis://HOST:PORT/DB"


def _sqlite(url: str, sync: str, timeout: float, ttl: float) -> StateStore:
    from service.store.sqlite import SqliteStore

    path = url[len("sqlite://") :]
    if not path:
        raise ValueError("--state-store sqlite:// needs a file: sqlite:///var/lib/lstm/state.db")
    return SqliteStore(path, sync, timeout)


def _redis(url: str, sync: str, timeout: float, ttl: float) -> StateStore:
    from service.store.redis import RedisStore  # a server without Redis never imports it

    try:
        return RedisStore(url, timeout, ttl)
    except ValueError as exc:
        raise ValueError(f"--state-store {url!r}: {exc}") from exc


SCHEMES: dict[str, Callable[[str, str, float, float], StateStore]] = {
    "sqlite://": _sqlite,
    "redis://": _redis,
    "rediss://": _redis,
}
"""URL prefix -> the store's factory ``(url, sync, timeout, ttl)``."""


def open_store(
    url: str, sync: str = "normal", timeout: float = 1.0, ttl: float = 0.0
) -> StateStore:
    """The store a ``--state-store`` URL names (``memory``: the null store).

    Nothing is connected or opened yet (``StateStore.open`` does that).
    """
    if url in ("", "memory"):
        return NullStore()
    for prefix, factory in SCHEMES.items():
        if url.startswith(prefix):
            return factory(url, sync, timeout, ttl)
    raise ValueError(f"--state-store {url!r}: {EXPECTED}")


def check_url(url: str) -> str | None:
    """Why a ``--state-store`` URL is refused, or None."""
    try:
        open_store(url)
    except ValueError as exc:
        return str(exc)
    return None
