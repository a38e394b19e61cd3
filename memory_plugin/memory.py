"""``ContextMemory``: the one object users hold.

It is the API in front of an :class:`~memory_plugin.engine.Engine` (the memory's context, history,
index, cold tier and durable record): methods here check their arguments, take the memory's lock
and delegate: turns to :mod:`~memory_plugin.turns`, search to :mod:`~memory_plugin.recall`,
save/load/open to :mod:`~memory_plugin.persistence`, memory vectors to :mod:`~memory_plugin.vectors`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import persistence as _p
from . import recall as _recall
from . import turns as _turns
from . import vectors as _vectors
from .blocks import return_freed_memory_to_os
from .chat import check_message, check_text
from .config import MemoryConfig
from .engine import Engine
from .history import Entry  # noqa: F401  (re-exported: memory_plugin.Entry)
from .loading import DEFAULT_MODEL_NAME, load_model, resolve
from .persistence import INDEX  # noqa: F401
from .recall import EXPLAIN_K, RECENT_TOKENS, SEARCH_MODES, Answer, MemoryHit, SearchMode, Segment  # noqa: F401
from .turns import PLACED_HEADER, TurnStream  # noqa: F401
from .vectors import MemoryVectors


@dataclass(frozen=True)
class MemoryStats:
    tokens: int
    init_tokens: int
    window_tokens: int
    blocks: int
    bytes: dict[str, int]  # by tier: "device" (accelerator), "host" (RAM), "disk", "cold" (memory vectors)
    config: MemoryConfig
    blocks_by_tier: dict[str, int] = field(default_factory=dict)  # "ram", "disk", "cold"

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """Opaque handle from :meth:`ContextMemory.checkpoint`."""

    memory: ContextMemory
    context: object
    state: dict
    n_entries: int
    clock: int


class ContextMemory:
    """Long-term memory inside a local model's attention (InfLLM).

    The whole history is kept as key/value blocks; every question is answered by attention over
    it, at a cost per turn that does not grow with the history.

    Example:
        >>> mem = ContextMemory.from_pretrained()  # doctest: +SKIP
        >>> mem.add_message("user", "My locker code is 4721.")  # doctest: +SKIP
        >>> mem.generate("What is my locker code?")  # doctest: +SKIP
        'Your locker code is 4721.'
    """

    def __init__(
        self, model, tokenizer, config: MemoryConfig | None = None, *, model_name: str | None = None, _spill_dir=None
    ):
        self.config = config or MemoryConfig()
        if not isinstance(self.config, MemoryConfig):
            raise TypeError(f"config must be a MemoryConfig, got {type(self.config).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name or getattr(model.config, "_name_or_path", None) or model.config.model_type
        if self.config.max_resident_bytes is not None:
            # A RAM budget needs freed block buffers to leave the process (process-wide, set once here).
            return_freed_memory_to_os()
        if _spill_dir is None and self.config.max_resident_bytes is not None:
            # Blocks beyond the RAM budget need somewhere to go: a private temporary directory.
            _spill_dir = Path(tempfile.mkdtemp(prefix="memory_plugin-"))
            weakref.finalize(self, shutil.rmtree, _spill_dir, ignore_errors=True)
        self._engine = Engine(model, tokenizer, self.config, self.model_name, _spill_dir)
        self._lock = self._engine.lock
        # Dropped without close(): release an open directory at once (the engine never refers back here).
        weakref.finalize(self, self._engine.release)

    @classmethod
    def from_pretrained(
        cls,
        model: str | None = None,
        *,
        config: MemoryConfig | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> ContextMemory:
        """Load a model and wrap it in an empty memory.

        ``model``: None for the embedded SmolLM2-135M-Instruct, or a local directory, ``.gguf`` file
        or hub id in the local cache (nothing is downloaded). Llama, Mistral and Qwen2 are supported.
        """
        hf_model, tokenizer = load_model(model, device=device, dtype=dtype)
        return cls(hf_model, tokenizer, config, model_name=DEFAULT_MODEL_NAME if model is None else str(model))

    # ------------------------------------------------------------------------------------ writing
    def reset(self) -> None:
        """Forget everything (on disk too, for a memory opened with :meth:`open`)."""
        with self._lock:
            self._engine.reset()

    def add_message(self, role: str, content: str) -> int:
        """Append one chat message (formatted by the model's chat template); returns tokens added."""
        return self.add_messages([{"role": role, "content": content}])

    def add_messages(self, messages: Sequence[dict]) -> int:
        """Append chat messages in order; all are checked before any is stored. Returns tokens added."""
        if isinstance(messages, (str, dict)) or not isinstance(messages, Sequence):
            raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise TypeError(f"messages[{i}] must be a dict with 'role' and 'content'")
            check_message(m["role"], m["content"])
        with self._lock:
            return self._engine.append([(m["role"], m["content"]) for m in messages])

    def add_text(self, text: str) -> int:
        """Append raw text (a document, a log), without chat formatting; returns tokens added."""
        check_text(text)
        with self._lock:
            return self._engine.append([(None, text)])

    def forget(self, indices: Sequence[int] | None = None, *, where=None) -> int:
        """Remove entries so that nothing derived from them remains; returns how many.

        ``indices``: positions as in :attr:`entries`; ``where``: a predicate on an
        :class:`Entry` (either or both). The kept entries are re-encoded from their token ids,
        except that an open memory starts from its last snapshot when that precedes the first
        removed entry (then only the entries after the snapshot are);
        an open directory is replaced atomically (a crash leaves it as before or as after) and
        every file that held the removed entries is deleted. Checkpoints taken before are void.

        Example:
            >>> mem.forget(where=lambda e: "password" in e.content)  # doctest: +SKIP
            1
        """
        with self._lock:
            drop = self._dropped("forget", indices, where)
            if drop:
                self._engine.forget(drop, _p.snapshot_base(self._engine, min(drop)))
            return len(drop)

    def forget_cost(self, indices: Sequence[int] | None = None, *, where=None) -> int:
        """The tokens :meth:`forget` with the same arguments would encode again, for a confirmation
        before it: the kept entries after where it restarts (an open memory's last snapshot when
        that covers only entries before the first removed one, else the start: every kept entry);
        changes nothing. 0 when nothing matches."""
        with self._lock:
            drop = self._dropped("forget_cost", indices, where)
            if not drop:
                return 0
            history = self._engine.history
            first = _p.snapshot_entries(self._engine, min(drop))
            return sum(e.end - e.start for i, e in enumerate(history) if i >= first and i not in drop)

    def _dropped(self, name: str, indices, where) -> set[int]:
        """The entry positions ``indices`` and ``where`` name (checked; the caller holds the lock)."""
        if indices is None and where is None:
            raise ValueError(f"{name}() needs indices= or where=")
        if where is not None and not callable(where):
            raise TypeError(f"where must be a callable taking an Entry, got {type(where).__name__}")
        if indices is not None and (isinstance(indices, (str, bytes)) or not isinstance(indices, Sequence)):
            raise TypeError(f"indices must be a list of entry positions, got {type(indices).__name__}")
        history = self._engine.history
        drop = set()
        for i in indices or []:
            if isinstance(i, bool) or not isinstance(i, int) or not -len(history) <= i < len(history):
                raise IndexError(f"indices: {i!r} is not an entry position (the memory has {len(history)} entries)")
            drop.add(i % len(history))
        if where is not None:
            drop |= {i for i, e in enumerate(history) if where(e)}
        return drop

    def crop(self, n_entries: int) -> int:
        """Keep the first ``n_entries`` entries and drop the rest, as :meth:`forget` does (a
        conversation that diverged from this history at that entry). An open memory comes back from
        its last snapshot before the cut, so only the entries between it and the cut are encoded
        again; an in-RAM one encodes the kept entries again from their token ids. Returns the tokens
        encoded again (what a cut cost beyond reading the snapshot).

        Example:
            >>> mem.crop(len(mem.entries) - 2)  # doctest: +SKIP
            0
        """
        if isinstance(n_entries, bool) or not isinstance(n_entries, int):
            raise TypeError(f"n_entries must be an int, got {type(n_entries).__name__}")
        with self._lock:
            n = len(self._engine.history)
            if not 0 <= n_entries <= n:
                raise IndexError(f"n_entries: {n_entries} is not between 0 and the memory's {n} entries")
            if n_entries == n:
                return 0
            drop = set(range(n_entries, n))
            return self._engine.forget(drop, _p.snapshot_base(self._engine, n_entries))

    def checkpoint(self) -> Checkpoint:
        """A handle to the current state; :meth:`rollback` returns to it (branching, undo).

        Example:
            >>> cp = mem.checkpoint()  # doctest: +SKIP
            >>> mem.add_message("user", "a what-if")  # doctest: +SKIP
            >>> mem.rollback(cp)  # the what-if is forgotten  # doctest: +SKIP
        """
        with self._lock:
            return Checkpoint(self, *self._engine.checkpoint())

    def rollback(self, checkpoint: Checkpoint) -> None:
        """Forget everything added after ``checkpoint`` was taken."""
        if not isinstance(checkpoint, Checkpoint) or checkpoint.memory is not self:
            raise ValueError("rollback() needs a checkpoint taken from this memory")
        with self._lock:
            self._engine.rollback(checkpoint.context, checkpoint.state, checkpoint.n_entries, checkpoint.clock)

    @contextlib.contextmanager
    def atomic(self) -> Iterator[ContextMemory]:
        """A block whose writes are kept together or not at all: a turn's input and its reply.

        For a memory opened on a directory, the entries added inside reach its log together, in
        one transaction, when the block ends (a process killed inside leaves none of them: reopening
        finds the memory as before the block); an exception inside rolls the memory back to where
        the block began. The memory's lock is held throughout. Inside, a rollback or forget works
        as usual (a forget writes the whole memory, as always); one that cuts below the block's
        start leaves nothing to roll back to, and an exception then keeps what the memory holds.
        Blocks nest; the outermost one writes.

        Example:
            >>> with mem.atomic():  # doctest: +SKIP
            ...     mem.add_message("user", "What is my locker code?")
            ...     mem.add_message("assistant", mem.generate(None))
        """
        with self._lock:
            engine = self._engine
            start = self.checkpoint()
            engine.holding += 1
            try:
                yield self
            except BaseException:
                engine.holding -= 1
                try:
                    self.rollback(start)
                except ValueError:  # cut below the start inside the block: keep what it holds
                    pass
                if not engine.holding:
                    engine.write_held()
                raise
            engine.holding -= 1
            if not engine.holding:
                engine.write_held()

    # ------------------------------------------------------------------------------------ reading
    def generate(
        self,
        prompt: str | None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
        remember: bool = False,
        *,
        chat: bool = True,
        min_new_tokens: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        recall: int | None = None,
        recall_query: str | None = None,
        explain: bool = False,
    ) -> str | Answer:
        """Answer ``prompt`` with attention over the whole memory.

        ``chat=True`` appends the prompt as a user turn plus the template's generation prompt
        (``prompt=None``: only the generation prompt, i.e. the assistant's next turn after the history
        as it stands, e.g. after a tool result); ``chat=False`` appends it as raw text and continues
        it (completion, as for base models).
        ``remember=False`` leaves the memory exactly as before; ``remember=True`` stores the prompt
        and the answer as history. ``temperature=0`` is greedy; ``stop`` strings end the answer
        (they are not included); the end-of-turn token is suppressed until ``min_new_tokens`` tokens
        are out; ``seed`` makes sampling reproducible.

        ``recall``: how many passages :meth:`place` finds for the prompt (for ``prompt=None``, the
        last message; ``recall_query``: that text instead, e.g. the user's question inside a
        formatted prompt) are placed verbatim just before it, inside the turn (default:
        ``config.recall_k``; 0: none). They are never stored: ``remember=True`` keeps the prompt and
        the answer only. ``explain=True`` returns an :class:`Answer` with the passages the model
        attended most while writing the answer and the placed ones.
        """
        kw = dict(chat=chat, min_new_tokens=min_new_tokens, top_p=top_p, seed=seed, recall=recall, recall_query=recall_query)
        pieces = self.stream(prompt, max_new_tokens, temperature, stop, remember, explain=explain, **kw)
        text = "".join(pieces)
        return pieces.explanation if explain else text

    def stream(
        self,
        prompt: str | None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
        remember: bool = False,
        *,
        chat: bool = True,
        min_new_tokens: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        recall: int | None = None,
        recall_query: str | None = None,
        explain: bool = False,
    ) -> TurnStream:
        """Like :meth:`generate`, yielding text pieces as they are produced; with ``explain=True``
        the returned stream's ``explanation`` is the :class:`Answer` once every piece is read."""
        return _turns.start(
            self._engine,
            prompt,
            max_new_tokens,
            temperature,
            stop,
            remember,
            chat=chat,
            min_new_tokens=min_new_tokens,
            top_p=top_p,
            seed=seed,
            recall=recall,
            recall_query=recall_query,
            explain=explain,
            owner=self,
        )

    @torch.inference_mode()
    def retrieve(self, query: str, k: int = 4, *, mode: SearchMode = "hybrid") -> list[MemoryHit]:
        """The ``k`` passages of the history most relevant to ``query``, best first.

        A passage is a message, or a piece of at most ``block_size`` tokens of a longer entry.
        ``mode="hybrid"`` fuses two rankings (z-scored and summed, see
        :func:`memory_plugin.retrieval.fuse`): ``"lexical"`` (BM25 over the passages' words: exact
        for names, ids, numbers) and ``"semantic"`` (a small embedding model's vectors:
        paraphrases); ``"attention"`` (the model's own queries for ``query`` against each passage's
        keys) is a third channel asked on its own. ``"rerank"`` has the model reread the hybrid's
        best ``rerank.RERANK_N`` passages and score ``query`` as a question each one answers
        (:mod:`memory_plugin.rerank`): better on paraphrases and loosely worded topics, but a
        forward pass per passage (seconds on a CPU, against milliseconds). Each hit's
        ``channels`` says which ranked it in their top ``k``. The memory is not changed.

        Example:
            >>> [(h.role, h.channels, h.text[:40]) for h in mem.retrieve("database port", k=2)]  # doctest: +SKIP
        """
        check_text(query, "query")
        _check_k(k)
        if mode not in SEARCH_MODES:
            raise ValueError(f"mode must be one of {', '.join(SEARCH_MODES)}, got {mode!r}")
        with self._lock:
            if k == 0 or len(self) == 0:
                return []
            return _recall.search(self._engine, query, k, mode)

    def place(self, query: str, k: int | None = None) -> list[MemoryHit]:
        """The passages recall would place before ``query`` (what ``generate(..., recall=k)`` does
        for its prompt), best first: up to ``k`` (default ``config.recall_k``) hybrid hits scored
        above the average and at least ``recall.PLACE_MIN_SHARE`` of the best hit's score, not
        among the last ``RECENT_TOKENS`` tokens (the model reads those well already), within
        ``config.recall_max_tokens`` together. Their channel is "placed"."""
        check_text(query, "query")
        k = self.config.recall_k if k is None else k
        _check_k(k)
        with self._lock:
            return _recall.place(self._engine, query, k)

    # ------------------------------------------------------------------------------------ memory vectors
    def cram(self, text_or_token_ids: str | Sequence[int], n_vectors: int = 1, **kw) -> MemoryVectors:
        """Memory vectors from which this model reproduces the text exactly (``.exact`` says
        whether that was achieved and verified). Keyword arguments as :func:`memory_plugin.vectors.cram_many`.

        Example:
            >>> vecs = mem.cram("The meeting moved to Thursday at 3pm.", n_vectors=1)  # doctest: +SKIP
            >>> vecs.exact, mem.uncram(vecs)  # doctest: +SKIP
            (True, 'The meeting moved to Thursday at 3pm.')
        """
        return self.cram_many([text_or_token_ids], n_vectors, **kw)[0]

    def cram_many(self, segments: Sequence[str | Sequence[int]], n_vectors: int = 1, **kw) -> list[MemoryVectors]:
        """:meth:`cram` for several segments, optimised together in batches (converged ones frozen)."""
        segs = []
        for i, s in enumerate(segments):
            if isinstance(s, str):
                check_text(s, f"segments[{i}]")
                s = self._engine.chat.encode(s)
            segs.append(list(s))
        return _vectors.cram_many(self.model, segs, n_vectors, **kw)

    def uncram(self, vectors: MemoryVectors) -> str:
        """The text greedy decoding reproduces from ``vectors`` alone (refuses another model's vectors)."""
        if not isinstance(vectors, MemoryVectors):
            raise TypeError(f"vectors must be MemoryVectors (from cram), got {type(vectors).__name__}")
        return self.tokenizer.decode(_vectors.decode(self.model, vectors), skip_special_tokens=False)

    def archive(self, older_than_tokens: int | None = None) -> int:
        """Cram now every block older than ``older_than_tokens`` (default: the config's
        ``archive_after_tokens``, else 0) into the cold tier (``archive_mode="recompute"``: drop
        their KV, nothing to cram); returns how many blocks went cold."""
        older = older_than_tokens if older_than_tokens is not None else (self.config.archive_after_tokens or 0)
        if isinstance(older, bool) or not isinstance(older, int) or older < 0:
            raise ValueError(f"older_than_tokens must be a non-negative int, got {older_than_tokens!r}")
        return self._engine.cold.archive(older)

    # ------------------------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the whole memory to the directory ``path`` (created; format in
        :mod:`memory_plugin.persistence`). Load it back with :meth:`load` or :meth:`open`.

        Example:
            >>> mem.save("agent-memory")  # doctest: +SKIP
            >>> same = ContextMemory.load("agent-memory")  # doctest: +SKIP
        """
        with self._lock:
            durable = self._engine.durable
            if durable is not None and Path(path).resolve() == durable.dir.resolve():
                self._engine.write_held()  # inside atomic(): a snapshot names only logged entries
                durable.snapshot(self._engine.ctx, self._engine.history)
            else:
                e = self._engine
                _p.write_copy(Path(path), e.ctx, e.history, self.config, e.fingerprint, self.model_name)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        model=None,
        *,
        tokenizer=None,
        device=None,
        dtype=None,
        max_resident_bytes: int | None = None,
        verify: bool = True,
        archive_mode: str | None = None,
    ) -> ContextMemory:
        """A memory read from a directory written by :meth:`save` or :meth:`open`; the directory is
        not changed or locked. ``model``: None for the model it was saved with (embedded default or
        its recorded path/id), a path/id, or a loaded transformers model (then pass ``tokenizer``).
        ``archive_mode``: what a selected cold block gives attention (default: as saved; see
        :class:`~memory_plugin.MemoryConfig`).
        A different model, a newer format, or a truncated or corrupted file raises
        :class:`~memory_plugin.persistence.MemoryFormatError` naming the file."""
        path = Path(path)
        manifest = _p.Manifest.read(path)
        hf, tok, name = resolve(model, tokenizer, manifest.model_name, device, dtype)
        cfg = MemoryConfig(**manifest.config, max_resident_bytes=max_resident_bytes)
        if archive_mode is not None:
            cfg = cfg.replace(archive_mode=archive_mode)  # validated: a bad mode is refused by name
        # Under a RAM budget blocks stay on disk: in links to the (immutable) shards, set aside.
        spill = _p.spill_copy(path, manifest) if max_resident_bytes is not None else None
        mem = cls(hf, tok, cfg, model_name=name, _spill_dir=spill or path)
        if spill is not None:
            weakref.finalize(mem, shutil.rmtree, spill, ignore_errors=True)
        _p.load_into(mem._engine, path, manifest, verify=verify, keep_disk=spill is not None)
        return mem

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        model=None,
        *,
        tokenizer=None,
        config: MemoryConfig | None = None,
        device=None,
        dtype=None,
        verify: bool = True,
        snapshot_every: int = _p.SNAPSHOT_EVERY_TOKENS,
    ) -> ContextMemory:
        """A persistent memory in directory ``path`` (created if new). Every ``add_*`` that returned
        is durable: a process killed at any moment loses nothing it acknowledged, and reopening
        reuses the blocks written and re-encodes only what came after the last snapshot (taken every
        ``snapshot_every`` tokens, and on :meth:`close`). One writer
        at a time: a second ``open`` of the same directory raises
        :class:`~memory_plugin.persistence.MemoryLockedError`. Close with :meth:`close` or ``with``."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"path {path} is a file: a durable memory is a directory")
        path.mkdir(parents=True, exist_ok=True)
        lock = _p.DirLock(path)
        try:
            manifest = _p.Manifest.read(path) if (path / _p.MANIFEST).exists() else None
            hf, tok, name = resolve(model, tokenizer, manifest and manifest.model_name, device, dtype)
            mem = cls(hf, tok, _p.open_config(path, manifest, config), model_name=name, _spill_dir=path)
            _p.open_into(mem._engine, path, lock, manifest, verify=verify, every=snapshot_every)
            return mem
        except BaseException:
            lock.release()
            raise

    def close(self) -> None:
        """Stop background archiving; for an open memory, write a final snapshot and release the directory."""
        self._engine.close()

    def __enter__(self) -> ContextMemory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------ inspection
    @property
    def messages(self) -> list[dict]:
        """Stored entries in order as ``{"role", "content"}`` (``role`` None for :meth:`add_text`)."""
        return self._engine.history.messages()

    @property
    def entries(self) -> list[Entry]:
        """Stored entries with their token spans (to map :class:`MemoryHit` offsets back to sources)."""
        return list(self._engine.history)

    @property
    def token_ids(self) -> list[int]:
        return list(self._engine.ctx.tokens)

    def segments(self) -> list[Segment]:
        """The history along its tokens as the memory holds it: init, each block (with its tier),
        the window in ``block_size`` pieces (see :class:`Segment`); where blocks begin, for a
        timeline. An answer's :attr:`Answer.timeline` is the same with attention shares."""
        with self._lock:
            return _recall.segments(self._engine)

    def stats(self) -> MemoryStats:
        ctx = self._engine.ctx
        lay = ctx.layout
        w0, w1 = ctx.window_range
        return MemoryStats(
            tokens=len(self),
            init_tokens=lay.init_len,
            window_tokens=w1 - w0,
            blocks=len(ctx.store),
            bytes=ctx.nbytes(),
            config=self.config,
            blocks_by_tier=ctx.store.tiers(),
        )

    def __len__(self) -> int:
        return len(self._engine)

    def __repr__(self) -> str:
        return f"ContextMemory(model={self.model_name!r}, tokens={len(self)}, config={self.config})"


def _check_k(k) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be a non-negative int, got {k!r}")
