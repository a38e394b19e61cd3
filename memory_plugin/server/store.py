"""Response ids of the stateful ``/v1/responses`` form, kept in a small SQLite table under the
memory directory so that ``previous_response_id`` survives a restart.

A row holds no text: the thread's memory holds the conversation. It keeps where the response ended
(how many entries of its thread) and a digest of those entries, so continuing from it checks that
the thread still holds exactly that history; a thread edited since (forgotten entries, another
branch continued) is refused rather than continued from the wrong history.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

FILENAME = "responses.sqlite"


@dataclass(frozen=True)
class StoredResponse:
    id: str
    tenant: str
    thread: str
    entries: int  # the thread's entries once this response was added
    digest: str  # of those entries (:func:`digest`)


def digest(messages: list[dict]) -> str:
    """A digest of ``{"role", "content"}`` messages, order included."""
    data = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)
    return hashlib.sha256(data.encode()).hexdigest()


class ResponseStore:
    """``response id -> (tenant, thread, entries, digest)``; every lookup is within one tenant."""

    def __init__(self, root: str | os.PathLike):
        path = Path(root) / FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS responses (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, "
                "thread TEXT NOT NULL, entries INTEGER NOT NULL, digest TEXT NOT NULL, created REAL NOT NULL)"
            )
            self._db.execute("CREATE INDEX IF NOT EXISTS by_thread ON responses (tenant, thread)")

    def add(self, r: StoredResponse) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO responses VALUES (?, ?, ?, ?, ?, ?)",
                (r.id, r.tenant, r.thread, r.entries, r.digest, time.time()),
            )

    def get(self, tenant: str, response_id: str) -> StoredResponse | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, tenant, thread, entries, digest FROM responses WHERE id = ? AND tenant = ?",
                (response_id, tenant),
            ).fetchone()
        return StoredResponse(*row) if row else None

    def drop_thread(self, tenant: str, thread: str) -> None:
        """Forget the responses of a deleted thread."""
        with self._lock:
            self._db.execute("DELETE FROM responses WHERE tenant = ? AND thread = ?", (tenant, thread))

    def close(self) -> None:
        with self._lock:
            self._db.close()
