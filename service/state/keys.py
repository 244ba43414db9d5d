"""How a tenant's session id becomes a key: the one place that knows the encoding.

With auth on, every session id is namespaced by its tenant, ``TENANT + SEP + id``,
so tenants are apart in the session table and the state store alike. Tenant
names never contain ``SEP``; with auth off the key is the id itself.
"""

from __future__ import annotations

from collections.abc import Sequence

SEP = "\x00"


def key(tenant: str, session_id: str) -> str:
    """The key of a tenant's session ("" tenant: the id itself)."""
    return tenant + SEP + session_id if tenant else session_id


def keys(tenant: str, session_ids: Sequence[str]) -> Sequence[str]:
    """``key`` of each id (the same sequence when there is no tenant)."""
    if not tenant:
        return session_ids
    prefix = tenant + SEP
    return [prefix + sid for sid in session_ids]


def overhead(tenant: str) -> int:
    """UTF-8 bytes a key adds to its id."""
    return len(tenant.encode()) + 1 if tenant else 0


def tenant_of(session_key: str) -> str:
    """The tenant part of a key ("" without one)."""
    tenant, sep, _ = session_key.partition(SEP)
    return tenant if sep else ""


def session_id_of(session_key: str) -> str:
    """The id as its client sent it."""
    _, sep, rest = session_key.partition(SEP)
    return rest if sep else session_key
