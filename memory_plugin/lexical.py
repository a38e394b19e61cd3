"""The lexical side of :meth:`ContextMemory.retrieve`: passages of the history in a SQLite FTS5 index.

Attention keys are a weak index for words said once (names, ids, error codes, numbers): a query's
best-matching keys are mostly the tokens every text shares. An inverted index finds such words
exactly and in time that does not grow with the history (a posting-list lookup, BM25-ranked), so
the history's text is kept in one, cut into **passages**:

* a message of at most ``block_size`` tokens (the unit attention retrieves) is one passage, its span the whole message (template
  tokens included): hits follow message boundaries;
* a longer entry (a document given to ``add_text``, a long tool result) is cut at sentence or line
  ends into passages of at most ``block_size`` tokens, each with its own token span.

SQLite's FTS5 is used rather than a hand-written BM25 because it is in Python's standard library,
persists in a file, and updates incrementally (deleting the passages of rolled-back entries).
An in-RAM memory keeps its index in ``:memory:``; a durable one in ``index.sqlite`` beside its log,
which is derived data: :meth:`LexicalIndex.sync` repairs it from the entries on open.

The same rows carry each passage's vector from an :class:`~memory_plugin.semantic.Embedder` (the
semantic channel, :meth:`LexicalIndex.search_semantic`), so passages, words and vectors have one
owner and follow rollbacks and reopening together. The vectors are also held in RAM as one
matrix (1M tokens: ~8k passages, 8 MB), which a query multiplies: a scan, but of 256 numbers per
passage, not of the history.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .semantic import Embedder

# Words too common to say what a query is about: left out of the FTS5 query, so a chat question
# ("What is the ...?") does not turn into a scan of every passage holding "the".
_STOPWORDS = frozenset(
    "a an and are as at be been but by can could did do does for from had has have how i if in into is it its "
    "me my no not of on or our so than that the their them then there these they this to was we were what when "
    "where which who whom why will with would you your about after before said says tell told".split()
)
_WORD = re.compile(r"\w+", re.UNICODE)
_BREAK = re.compile(r"(?<=[.!?:;])\s+|\n+")


@dataclass(frozen=True)
class Passage:
    """A searchable piece of the history: part (or all) of entry ``entry``, tokens ``[start, end)``."""

    entry: int
    start: int
    end: int
    text: str


def fts_query(text: str) -> str | None:
    """The FTS5 query for free text: its distinct non-stopword words, quoted, OR-ed (BM25 ranks
    passages by how many and how rare). None when nothing is left.

    >>> fts_query("What did Henrietta Vosk fix in building Q-7?")
    '"henrietta" OR "vosk" OR "fix" OR "building" OR "q" OR "7"'
    >>> fts_query("what is it?") is None
    True
    """
    words = dict.fromkeys(w.lower() for w in _WORD.findall(text))
    kept = [w for w in words if w not in _STOPWORDS]
    return " OR ".join(f'"{w}"' for w in kept) or None


def cut(text: str, offsets: Sequence[tuple[int, int]], max_tokens: int) -> list[tuple[int, int, str]]:
    """Cut ``text`` into pieces of at most ``max_tokens`` tokens, at sentence or line ends where
    there is one: ``(first token, end token, piece text)``. ``offsets``: each token's
    ``(char_start, char_end)`` in ``text``.

    >>> cut("One. Two. Three", [(0, 4), (4, 9), (9, 15)], max_tokens=2)
    [(0, 2, 'One. Two.'), (2, 3, 'Three')]
    """
    n = len(offsets)
    ends = {x for m in _BREAK.finditer(text) for x in (m.start(), m.end())}  # tokens may carry their space
    # a piece may begin at a token that starts after a sentence or line end (or at its whitespace);
    # failing that, at a word's start
    breaks = [i for i in range(1, n) if offsets[i][0] in ends or offsets[i - 1][1] in ends]
    words = [i for i in range(1, n) if text[offsets[i][0] : offsets[i][0] + 1].isspace() or text[offsets[i - 1][1] - 1 : offsets[i - 1][1]].isspace()]
    cuts, i = [0], 0
    while n - i > max_tokens:
        fits = [b for b in breaks if i < b <= i + max_tokens] or [b for b in words if i < b <= i + max_tokens]
        i = max(fits, default=i + max_tokens)
        cuts.append(i)
    cuts.append(n)
    out = []
    for a, b in zip(cuts, cuts[1:]):
        piece = text[offsets[a][0] : offsets[b - 1][1]].strip()
        if piece:
            out.append((a, b, piece))
    return out


def entry_passages(i: int, entry, ids: Sequence[int], tokenizer, max_tokens: int) -> list[Passage]:
    """Entry number ``i`` (a :class:`~memory_plugin.history.Entry` whose tokens are ``ids``) as
    passages of at most ``max_tokens`` tokens: a short entry is one passage, its whole span."""
    n = entry.end - entry.start
    if n <= max_tokens:
        return [Passage(i, entry.start, entry.end, entry.content.strip())]
    enc = tokenizer(entry.content, add_special_tokens=False, return_offsets_mapping=True)
    cids, offsets = enc["input_ids"], enc["offset_mapping"]
    # Where the content's tokens sit among the entry's (after a BOS or template header). If the
    # template tokenised them differently, positions are mapped proportionally.
    lead, scale = locate(ids, cids), 1.0
    if lead < 0:
        lead, scale = 0, n / max(1, len(cids))
    pieces = cut(entry.content, offsets, max_tokens)
    out = []
    for j, (a, b, text) in enumerate(pieces):
        t0 = entry.start if j == 0 else entry.start + lead + round(a * scale)
        t1 = entry.end if j == len(pieces) - 1 else entry.start + lead + round(b * scale)
        out.append(Passage(i, t0, t1, text))
    return out


def locate(ids: Sequence[int], sub: Sequence[int]) -> int:
    """Where ``sub`` (a text's tokens) starts in ``ids`` (an entry's tokens), allowing its first
    token or two to have merged with what precedes it; -1 when it is not there.

    >>> locate([1, 2, 3, 4, 5], [9, 3, 4])  # 9 merged with what came before it
    1
    """
    sub, ids = list(sub), list(ids)
    for skip in range(min(3, len(sub))):
        probe = sub[skip : skip + 8]
        for at in range(skip, len(ids) - len(sub) + skip + 1):
            if ids[at : at + len(probe)] == probe:
                return at - skip
    return -1


class LexicalIndex:
    """Passages of a memory's entries in an FTS5 table (porter-stemmed words, BM25 ranking).

    Entries are indexed in order; :meth:`truncate` forgets entries from an index on (rollback,
    reset); :meth:`sync` makes a persisted index agree with the entries it is opened beside.

    Example:
        >>> ix = LexicalIndex()
        >>> ix.add([(0, "The pump in hall B was fixed by Ines Okafor.", [Passage(0, 0, 12, "The pump in hall B was fixed by Ines Okafor.")])])
        >>> [p.entry for p, s in ix.search("Who is Okafor?", 3)]
        [0]
    """

    def __init__(self, path: str | Path | None = None, embedder: Embedder | None = None):
        self.path = None if path is None else Path(path)
        self.embedder = embedder
        self.db = sqlite3.connect(":memory:" if path is None else str(path), check_same_thread=False, isolation_level=None)
        if path is not None:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # derived data: repaired by sync() after a crash
        made_by = "" if embedder is None else embedder.name
        if self._tables() and self._meta("embedder") != made_by:
            # an index of an older layout, or with another embedder's vectors: derived data, rebuilt
            self.db.executescript("DROP TABLE IF EXISTS entries; DROP TABLE IF EXISTS passages; "
                                  "DROP TABLE IF EXISTS passages_fts; DROP TABLE IF EXISTS meta;")
        self.db.executescript(
            """
            CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS entries (entry INTEGER PRIMARY KEY, digest TEXT NOT NULL, first INTEGER NOT NULL);
            CREATE TABLE IF NOT EXISTS passages (id INTEGER PRIMARY KEY, entry INTEGER NOT NULL, start INTEGER NOT NULL,
                                                 end INTEGER NOT NULL, vec BLOB);
            CREATE INDEX IF NOT EXISTS passages_end ON passages (end);
            CREATE VIRTUAL TABLE IF NOT EXISTS passages_fts USING fts5(text, tokenize='porter unicode61 remove_diacritics 2');
            """
        )
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('embedder', ?)", (made_by,))
        # the vectors of passages 0..n-1 (passage ids are dense: add appends, truncate cuts a tail)
        dim = 0 if embedder is None else embedder.dim
        rows = self.db.execute("SELECT vec FROM passages ORDER BY id").fetchall() if embedder else []
        self._vecs = np.zeros((max(64, 2 * len(rows)), dim), dtype=np.float32)
        for i, (blob,) in enumerate(rows):
            self._vecs[i] = np.frombuffer(blob, dtype=np.float16)
        self._n = len(rows)

    def __len__(self) -> int:
        """Entries indexed."""
        return self.db.execute("SELECT count(*) FROM entries").fetchone()[0]

    def add(self, items: Sequence[tuple[int, str, Sequence[Passage]]]) -> None:
        """Index entries ``(entry index, content, passages)``, in order, in one transaction."""
        if not items:
            return
        texts = [p.text for _, _, passages in items for p in passages]
        vecs = self.embedder(texts) if self.embedder is not None else [None] * len(texts)
        with self._tx():
            first = nxt = self.db.execute("SELECT coalesce(max(id) + 1, 0) FROM passages").fetchone()[0]
            for entry, content, passages in items:
                self.db.execute("INSERT OR REPLACE INTO entries VALUES (?, ?, ?)", (entry, _digest(content), nxt))
                for p in passages:
                    v = vecs[nxt - first]
                    blob = None if v is None else v.astype(np.float16).tobytes()  # half the bytes; ranks the same
                    self.db.execute("INSERT INTO passages VALUES (?, ?, ?, ?, ?)", (nxt, p.entry, p.start, p.end, blob))
                    self.db.execute("INSERT INTO passages_fts (rowid, text) VALUES (?, ?)", (nxt, p.text))
                    nxt += 1
        if self.embedder is not None and texts:
            if nxt > len(self._vecs):
                self._vecs = np.concatenate([self._vecs[: self._n], np.zeros((nxt, self.embedder.dim), np.float32)])
            self._vecs[first:nxt] = np.asarray(vecs, dtype=np.float16)  # as stored, so a reopened index ranks alike
            self._n = nxt

    def truncate(self, n_entries: int) -> None:
        """Forget entries ``n_entries`` and later."""
        with self._tx():
            row = self.db.execute("SELECT min(first) FROM entries WHERE entry >= ?", (n_entries,)).fetchone()
            if row[0] is None:
                return
            self.db.execute("DELETE FROM passages_fts WHERE rowid >= ?", (row[0],))
            self.db.execute("DELETE FROM passages WHERE id >= ?", (row[0],))
            self.db.execute("DELETE FROM entries WHERE entry >= ?", (n_entries,))
        self._n = min(self._n, row[0])

    def sync(self, contents: Sequence[str]) -> int:
        """Keep only the indexed entries that match ``contents`` (the memory's entries, in order);
        returns how many are kept, so the caller indexes the rest."""
        digests = self.db.execute("SELECT entry, digest FROM entries ORDER BY entry").fetchall()
        keep = 0
        for (entry, digest), content in zip(digests, contents):
            if entry != keep or digest != _digest(content):
                break
            keep += 1
        self.truncate(keep)
        return keep

    def search(self, query: str, limit: int) -> list[tuple[Passage, float]]:
        """Passages matching ``query``'s words, best first, with their BM25 score (higher is better)."""
        q = fts_query(query)
        if q is None or limit <= 0:
            return []
        rows = self.db.execute(
            "SELECT p.entry, p.start, p.end, f.text, -bm25(passages_fts) AS s FROM passages_fts f "
            "JOIN passages p ON p.id = f.rowid WHERE passages_fts MATCH ? ORDER BY s DESC LIMIT ?",
            (q, limit),
        ).fetchall()
        return [(Passage(e, a, b, t), s) for e, a, b, t, s in rows]

    def search_semantic(self, query: str, limit: int) -> list[tuple[Passage, float]]:
        """Passages whose vectors are closest to ``query``'s (cosine), best first; empty without an
        embedder."""
        if self.embedder is None or self._n == 0 or limit <= 0:
            return []
        score = self._vecs[: self._n] @ self.embedder([query])[0]
        top = np.argsort(-score, kind="stable")[:limit]  # ties (repeated text) to the earliest, as the words do
        rows = {r[0]: r[1:] for r in self.db.execute(
            f"SELECT p.id, p.entry, p.start, p.end, f.text FROM passages p JOIN passages_fts f ON f.rowid = p.id "
            f"WHERE p.id IN ({','.join('?' * len(top))})", [int(i) for i in top]).fetchall()}
        return [(Passage(*rows[int(i)]), float(score[i])) for i in top]

    def passages(self, lo: int = 0, hi: int | None = None) -> list[Passage]:
        """Passages overlapping tokens ``[lo, hi)``, in history order."""
        hi = (1 << 62) if hi is None else hi
        # Passages tile the history in id order, so the overlap is an id range found by two lookups
        # on the ``end`` index: bounded only by ``end > lo``, SQLite read every later passage.
        first = self.db.execute("SELECT id FROM passages WHERE end > ? ORDER BY end, id LIMIT 1", (lo,)).fetchone()
        if first is None:
            return []
        last = self.db.execute("SELECT id FROM passages WHERE end >= ? ORDER BY end, id LIMIT 1", (hi,)).fetchone()
        rows = self.db.execute(
            "SELECT p.entry, p.start, p.end, f.text FROM passages p JOIN passages_fts f ON f.rowid = p.id "
            "WHERE p.id BETWEEN ? AND ? AND p.end > ? AND p.start < ? ORDER BY p.id",
            (first[0], last[0] if last else 1 << 62, lo, hi),
        ).fetchall()
        return [Passage(*r) for r in rows]

    def close(self) -> None:
        self.db.close()

    def _tables(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def _meta(self, key: str) -> str | None:
        if "meta" not in self._tables():
            return None
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    @contextlib.contextmanager
    def _tx(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")


def _digest(content: str) -> str:
    return hashlib.blake2b(content.encode(), digest_size=12).hexdigest()
