"""The state of one memory and every change to it, in one place.

An :class:`Engine` owns what a :class:`~memory_plugin.ContextMemory` holds: the InfLLM context
(KV of every layer, token ids), the history (entries), the lexical index, the cold tier, and, for a
memory opened on a directory, the durable record. Each write goes through here so the four stay in
step: tokens are encoded into the context, then their entries are recorded (durably first), indexed
and, when due, snapshotted. Retrieval (:mod:`~memory_plugin.recall`), turns
(:mod:`~memory_plugin.turns`) and persistence (:mod:`~memory_plugin.persistence`) work through its
public attributes and methods; ``ContextMemory`` is the API in front of it.

Nothing here refers back to the ``ContextMemory``: dropping the last reference to a memory runs its
finalizer (which releases a durable directory) without waiting for the garbage collector.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from .archive import ColdTier
from .blocks import release_free_memory
from .chat import ChatFormat
from .config import MemoryConfig
from .history import Entry, History
from .lexical import LexicalIndex, entry_passages
from .loading import model_fingerprint
from .model import MemoryForward
from .semantic import default_embedder


class Engine:
    """Context, history, index, cold tier and durable record of one memory (see the module doc).

    All methods expect the caller to hold ``lock`` (the memory's public methods take it)."""

    def __init__(self, model, tokenizer, config: MemoryConfig, model_name: str, spill_dir=None):
        self.model, self.tokenizer, self.config, self.model_name = model, tokenizer, config, model_name
        self.forward = MemoryForward(model)
        self.chat = ChatFormat(tokenizer)
        self.lock = threading.RLock()
        self.spill_dir = spill_dir  # where block shards go: a durable directory, a temp dir, or None
        self.durable = None  # a persistence.Durable while open on a directory
        self.holding = 0  # depth of ContextMemory.atomic blocks: their entries reach the log at the outermost end
        self.cold = ColdTier(self)
        self.embedder = default_embedder()  # the semantic channel's model (None: not installed)
        self.index = self.new_index()  # a durable memory swaps in its index.sqlite (reindex)
        self.ctx = None
        self._fingerprint: str | None = None
        self.reset()

    @property
    def fingerprint(self) -> str:
        """The model's (:func:`~memory_plugin.loading.model_fingerprint`), computed once."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model, self.tokenizer)
        return self._fingerprint

    def __len__(self) -> int:
        return self.ctx.layout.n_tokens

    # ---------------------------------------------------------------------------- writing
    def reset(self) -> None:
        if self.ctx is not None:
            self.ctx.store.close()
        self.ctx = self.forward.new_context(self.config, spill_dir=self.spill_dir)
        self.cold.attach(self.ctx)
        self.history = History()
        self.clock = 0
        self.rollbacks: list[tuple[int, int]] = []  # (clock, tokens kept) for checkpoint validity
        self.index.truncate(0)
        if self.durable is not None:
            self.durable.truncate_log(0)
            self.durable.snapshot(self.ctx, self.history)

    def append(self, items: Sequence[tuple[str | None, str]]) -> int:
        """Encode and record ``(role, content)`` items (role None: raw text); returns tokens added."""
        entries, ids = [], []
        start = len(self)
        for role, content in items:
            first = start + len(ids) == 0
            new = self.chat.encode(content) if role is None else self.chat.message_ids(role, content, first=first)
            if first:
                new = self.first_ids(new)
            entries.append(Entry(role, content, start + len(ids), start + len(ids) + len(new)))
            ids += new
        cp = self.ctx.checkpoint() if self.durable is not None else None
        self.encode(ids, logits="none")
        self.record(entries, cp)
        del cp  # a snapshot must not find the checkpoint's window buffers still held (RAM budget)
        self.settle()
        return len(ids)

    def record(self, entries: list[Entry], cp: dict | None) -> None:
        """Entries whose tokens are encoded become history (durably, for an open memory). If the
        log refuses them, the context is rolled back to ``cp`` and must not hold them either. Inside
        an atomic block they wait for its end (:meth:`write_held`)."""
        if self.durable is not None and not self.holding:
            try:
                self.durable.record([(e.role, e.content, self.ctx.tokens[e.start : e.end]) for e in entries])
            except BaseException:
                if cp is not None:
                    self.ctx.rollback(cp)
                raise
        first = len(self.history)
        self.history.extend(entries)
        self.index.add([(first + j, e.content, self.passages(first + j, e)) for j, e in enumerate(entries)])

    def passages(self, i: int, e: Entry):
        return entry_passages(i, e, self.ctx.tokens[e.start : e.end], self.tokenizer, self.config.block_size)

    def settle(self) -> None:
        """After new history: snapshot an open memory when due (not inside an atomic block: a
        snapshot names only logged entries), wake the cold-tier worker, hand freed heap pages back."""
        if self.durable is not None and not self.holding:
            self.durable.maybe_snapshot(self.ctx, self.history)
        self.cold.notify()
        release_free_memory()

    def first_ids(self, ids: list[int]) -> list[int]:
        """Prefix BOS when the history is empty and the tokenizer uses one."""
        bos = self.chat.bos
        return bos + ids if len(self) == 0 and ids[: len(bos)] != bos else ids

    @torch.inference_mode()
    def encode(self, ids: list[int], *, atomic: bool = True, **kw) -> torch.Tensor | None:
        """Run ``ids`` through the model into the context. ``atomic``: roll back if interrupted
        (callers that already hold a checkpoint, like a generation turn, skip the cost)."""
        if not atomic:
            return self.forward(torch.tensor(ids, dtype=torch.long), self.ctx, **kw)
        with self.ctx.transaction():
            return self.forward(torch.tensor(ids, dtype=torch.long), self.ctx, **kw)

    def replay(self, rows: Sequence[tuple]) -> None:
        """Re-encode log rows that came after the last snapshot (loading)."""
        for role, content, ids in rows:
            start = len(self)
            self.encode(ids, logits="none")
            self.history.extend([Entry(role, content, start, len(self))])

    # ---------------------------------------------------------------------------- forgetting
    def forget(self, drop: set[int], base=None) -> int:
        """Remove entries ``drop`` so that nothing derived from them remains: the kept entries are
        re-encoded from their token ids into a new context (on top of ``base``, a restored
        ``(context, entries)`` covering only entries before the first dropped one), the index is
        rebuilt, and an open directory is replaced atomically (:meth:`Durable.replace`). Returns
        the tokens encoded again."""
        rows = [r for i, r in enumerate(self.history.rows(self.ctx.tokens)) if i not in drop]
        ctx, entries = base if base is not None else (self.forward.new_context(self.config, spill_dir=self.spill_dir), [])
        history = History(entries)
        restored = ctx.layout.n_tokens
        for role, content, ids in rows[len(entries) :]:
            start = ctx.layout.n_tokens
            if start == 0 and ids[: len(self.chat.bos)] != self.chat.bos:
                ids = self.chat.bos + ids  # the first entry was dropped: the new first one needs BOS
            with ctx.transaction():
                self.forward(torch.tensor(ids, dtype=torch.long), ctx, logits="none")
            history.extend([Entry(role, content, start, ctx.layout.n_tokens)])
        index_path = self.index.path
        self.index.close()  # derived data holding the dropped text: gone before the commit
        if index_path is not None:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{index_path}{suffix}").unlink(missing_ok=True)
        if self.durable is not None:
            try:
                self.durable.replace(ctx, history)
            except BaseException:  # nothing was committed: keep the memory as it was
                ctx.store.close()
                self.index = self.new_index(index_path)
                self.reindex()
                raise
        old, self.ctx, self.history = self.ctx, ctx, history
        self.cold.attach(ctx)
        self.clock += 1
        self.rollbacks.append((self.clock, 0))  # no checkpoint from before survives a forget
        if self.durable is None and old.store.disk is not None:  # a private spill directory
            for s in old.store.disk.shards:
                (old.store.disk.dir / s.file).unlink(missing_ok=True)
        old.store.close()
        self.index = self.new_index(index_path)
        self.reindex()
        return ctx.layout.n_tokens - restored

    # ---------------------------------------------------------------------------- checkpoints
    def checkpoint(self) -> tuple[object, dict, int, int]:
        """``(context, its state, entries, clock)``: what a rollback returns to."""
        self.clock += 1
        return self.ctx, self.ctx.checkpoint(), len(self.history), self.clock

    def rollback(self, context: object, state: dict, n_entries: int, clock: int) -> None:
        n = state["n_tokens"]
        # Valid only while the history still extends the checkpoint's: no reset, no rollback below it.
        cut = any(c > clock and kept < n for c, kept in self.rollbacks)
        if context is not self.ctx or cut:
            raise ValueError("this checkpoint is no longer valid: the memory was reset or rolled back past it")
        self.ctx.rollback(state)
        self.history.truncate(n_entries)
        self.index.truncate(n_entries)
        self.clock += 1
        self.rollbacks.append((self.clock, n))
        if self.durable is not None:
            self.durable.truncate_log(n_entries)
            if not self.holding:
                self.durable.maybe_snapshot(self.ctx, self.history)

    def write_held(self) -> None:
        """Write to an open memory's log, in one transaction, the entries an atomic block held back
        (the log always holds a prefix of the history: rollbacks truncate both, a forget rewrites
        both), then snapshot when due."""
        if self.durable is None:
            return
        logged = self.durable.log.count()
        if logged < len(self.history):
            self.durable.record(self.history.rows(self.ctx.tokens, logged))
        self.durable.maybe_snapshot(self.ctx, self.history)

    # ---------------------------------------------------------------------------- lifecycle
    def new_index(self, path: Path | None = None) -> LexicalIndex:
        """An index of passages (words and vectors) in RAM, or in the file ``path``."""
        return LexicalIndex(path, self.embedder)

    def reindex(self, index: LexicalIndex | None = None) -> None:
        """Make the lexical index (or ``index``, a durable memory's file, which then replaces it)
        hold exactly the history's entries, indexing what it lacks."""
        if index is not None:
            self.index.close()
            self.index = index
        kept = self.index.sync([e.content for e in self.history])
        self.index.add([(i, e.content, self.passages(i, e)) for i, e in enumerate(self.history) if i >= kept])

    def close(self) -> None:
        """Stop the cold-tier worker; for an open memory, a final snapshot and the directory released."""
        self.cold.close()
        with self.lock:
            if self.durable is not None:
                self.holding = 0  # closed inside an atomic block: what it added is kept
                self.write_held()
                self.durable.snapshot(self.ctx, self.history)
                self.durable.close()
                self.durable = None
                self.index.close()
            self.ctx.store.close()

    def release(self) -> None:
        """The memory was dropped without :meth:`close`: stop the worker and release an open
        directory now (every acknowledged entry is in its log already; reopening re-encodes the
        tail after the last snapshot). Runs as the memory's finalizer, so it takes no lock."""
        self.cold.stop()
        if self.durable is not None:
            self.durable.close()
            self.durable = None
            self.index.close()
