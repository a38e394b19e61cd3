"""API keys and the tenants they stand for.

A tenant is the unit of isolation: the pool keeps each tenant's threads under its own directory, and
the server only ever names threads inside the caller's tenant, so another tenant's thread id is
simply not found. Keys come from a file (one ``key tenant`` per line, ``#`` comments) and from the
environment variable :data:`KEYS_ENV` (``key:tenant`` pairs separated by commas).
"""

from __future__ import annotations

import os
from pathlib import Path

KEYS_ENV = "MEMORY_PLUGIN_API_KEYS"
DEFAULT_TENANT = "default"
"""The tenant of every request when no keys are configured (the server then listens on loopback only)."""


def load_keys(path: str | os.PathLike | None = None, env: dict | None = None) -> dict[str, str]:
    """``{key: tenant}`` from the keys file ``path`` and the environment; a key given twice for
    different tenants is an error (one of them would silently see the other's threads).

    >>> load_keys(env={KEYS_ENV: "k1:alice, k2:bob"})
    {'k1': 'alice', 'k2': 'bob'}
    """
    pairs: list[tuple[str, str, str]] = []
    if path is not None:
        for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"--api-keys {path}, line {n}: expected 'key tenant', got {line!r}")
            pairs.append((parts[0], parts[1], f"{path}:{n}"))
    raw = (os.environ if env is None else env).get(KEYS_ENV, "")
    for item in filter(None, (s.strip() for s in raw.split(","))):
        key, sep, tenant = item.partition(":")
        if not sep or not key.strip() or not tenant.strip():
            raise ValueError(f"{KEYS_ENV}: expected 'key:tenant' pairs separated by commas, got {item!r}")
        pairs.append((key.strip(), tenant.strip(), KEYS_ENV))
    keys: dict[str, str] = {}
    for key, tenant, where in pairs:
        if keys.get(key, tenant) != tenant:
            raise ValueError(f"{where}: a key is given for two tenants ({keys[key]!r} and {tenant!r})")
        keys[key] = tenant
    return keys


def tenant_of(authorization: str | None, keys: dict[str, str]) -> str | None:
    """The tenant of an ``Authorization: Bearer <key>`` header, :data:`DEFAULT_TENANT` when no keys
    are configured, None for a missing or unknown key."""
    if not keys:
        return DEFAULT_TENANT
    if not authorization:
        return None
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return keys.get(key.strip())
