"""The history of a memory as entries: each message (or ``add_text`` document) with its token span.

The KV of those tokens lives in the :class:`~memory_plugin.context.Context`, their ids in
``Context.tokens``; this is the one list that says which entry each span came from. The memory
appends to it, rollbacks truncate it, persistence writes it to the log and rebuilds it from the log
(:func:`spans`), retrieval maps passages back to it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

Row = tuple  # (role, content, token ids): one entry as the durable log stores it


@dataclass(frozen=True)
class Entry:
    """One stored message (or ``add_text`` document) and its token span ``[start, end)`` in the history."""

    role: str | None
    content: str
    start: int
    end: int


class History(Sequence[Entry]):
    """The entries of a memory, in order.

    Example:
        >>> h = History()
        >>> h.extend([Entry("user", "hi", 0, 3), Entry("assistant", "hello", 3, 7)])
        >>> len(h), h[-1].role, h.rows(list(range(7)))[0]
        (2, 'assistant', ('user', 'hi', [0, 1, 2]))
        >>> h.truncate(1); [e.content for e in h]
        ['hi']
    """

    def __init__(self, entries: Sequence[Entry] = ()):
        self._entries = list(entries)

    def __getitem__(self, i):
        return self._entries[i]

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries)

    def extend(self, entries: Sequence[Entry]) -> None:
        self._entries += entries

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` entries (a rollback)."""
        del self._entries[n:]

    def messages(self) -> list[dict]:
        return [{"role": e.role, "content": e.content} for e in self._entries]

    def rows(self, tokens: Sequence[int], first: int = 0) -> list[Row]:
        """Entries ``first..`` as log rows, their ids taken from the history's ``tokens``."""
        return [(e.role, e.content, list(tokens[e.start : e.end])) for e in self._entries[first:]]


def spans(rows: Sequence[Row], start: int = 0) -> tuple[list[Entry], list[int]]:
    """Entries for log ``rows`` laid end to end from token ``start``, and their token ids.

    >>> entries, ids = spans([("user", "hi", [5, 6]), (None, "doc", [7])])
    >>> [(e.start, e.end) for e in entries], ids
    ([(0, 2), (2, 3)], [5, 6, 7])
    """
    entries, ids = [], []
    for role, content, row_ids in rows:
        entries.append(Entry(role, content, start + len(ids), start + len(ids) + len(row_ids)))
        ids += row_ids
    return entries, ids
