"""``ContextMemory``: the one object users hold.

It composes a loaded model (:mod:`memory_plugin.model`), the InfLLM memory
(:mod:`memory_plugin.context`) and the chat format (:mod:`memory_plugin.chat`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .archive import ColdTier
from .blocks import return_freed_memory_to_os
from .chat import ChatFormat, StreamDecoder, check_message, check_text
from .config import MemoryConfig
from .lexical import LexicalIndex, Passage, cut
from .model import DEFAULT_MODEL_NAME, MemoryForward, load_model
from . import persistence as _p
from . import retrieval as _retrieval
from . import vectors as _vectors
from .vectors import MemoryVectors


SEARCH_MODES = ("hybrid", "lexical", "attention")
RECENT_TOKENS = 1024
"""Recall placement skips passages among the last this many tokens: the embedded model already
answers 7 of 8 questions about a fact ~1k tokens back (docs/BENCHMARKS.md, section 9), and a copy
of what sits right before the question only lengthens the turn."""
EXPLAIN_K = 4  # attended spans an explained answer reports
PLACED_HEADER = "Earlier in this conversation:"
INDEX = "index.sqlite"  # a durable memory's lexical index (derived from the log; rebuilt if stale)


@dataclass(frozen=True)
class MemoryHit:
    """A passage of the history: a message, or a piece of at most ``block_size`` tokens of a
    longer entry (cut at sentence or line ends).

    ``channels`` says what found it: ``"lexical"`` / ``"attention"`` when it is among that
    channel's top ``k`` for :meth:`ContextMemory.retrieve`; ``"placed"`` / ``"attended"`` in an
    explained answer (:class:`Answer`)."""

    text: str
    start: int  # token offsets in the history, [start, end)
    end: int
    score: float
    message_index: int | None = None  # index in ``ContextMemory.messages`` of the entry holding ``start``
    role: str | None = None  # that entry's role (None for add_text)
    channels: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """Plain JSON-able data (``channels`` as a list), e.g. for a framework's metadata."""
        return {**asdict(self), "channels": list(self.channels)}


@dataclass(frozen=True)
class Answer:
    """An answer with what it came from (``generate(..., explain=True)``): the passages the
    model attended most while writing it (``attended``, score = share of its attention) and the
    passages placed before the question (``placed``, see ``MemoryConfig.recall_k``)."""

    text: str
    attended: list[MemoryHit]
    placed: list[MemoryHit]

    def __str__(self) -> str:
        return self.text

    def sources(self) -> dict:
        """``{"attended": [...], "placed": [...]}``: the passages as plain data (``MemoryHit.to_dict``)."""
        return {"attended": [h.to_dict() for h in self.attended], "placed": [h.to_dict() for h in self.placed]}


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


@dataclass(frozen=True)
class Entry:
    """One stored message (or ``add_text`` document) and its token span ``[start, end)`` in the history."""

    role: str | None
    content: str
    start: int
    end: int




@dataclass
class _Turn:
    """State of one generation, for ``remember``."""

    prompt: str | None
    chat: bool = True
    prompt_tokens: int = 0
    answer: str = ""
    ended_by_stop_token: bool = False
    query: str | None = None  # what recall searches for (None: the prompt, else the last message)
    checkpoint: dict = field(default_factory=dict)
    placed: list = field(default_factory=list)  # MemoryHits placed before the prompt (recall)
    placed_at: list = field(default_factory=list)  # their token spans in the turn's input, (0, 0) if not found
    explanation: Answer | None = None


class TurnStream(Iterator[str]):
    """What :meth:`ContextMemory.stream` returns: the answer's text pieces; once they are read,
    ``explanation`` holds the :class:`Answer` (with ``explain=True``)."""

    def __init__(self, pieces: Iterator[str], turn: _Turn):
        self._pieces, self._turn = pieces, turn

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()

    @property
    def explanation(self) -> Answer | None:
        return self._turn.explanation

    @property
    def placed(self) -> list[MemoryHit]:
        """The passages recall placed before the prompt (known once the first piece is read)."""
        return list(self._turn.placed)


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
        self._forward = MemoryForward(model)
        self._chat = ChatFormat(tokenizer)
        self._lock = threading.RLock()
        self._durable: _p.Durable | None = None
        self._spill_dir = _spill_dir
        if self.config.max_resident_bytes is not None:
            # A RAM budget needs freed block buffers to leave the process (process-wide, set once here).
            return_freed_memory_to_os()
        if _spill_dir is None and self.config.max_resident_bytes is not None:
            # Blocks beyond the RAM budget need somewhere to go: a private temporary directory.
            self._spill_dir = Path(tempfile.mkdtemp(prefix="memory_plugin-"))
            weakref.finalize(self, shutil.rmtree, self._spill_dir, ignore_errors=True)
        self._fingerprint_cache: str | None = None
        self._cold = ColdTier(self)
        self._index = LexicalIndex()  # durable memories swap in their index.sqlite (open)
        self.reset()

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
            if getattr(self, "_ctx", None) is not None:
                self._ctx.store.close()
            self._ctx = self._forward.new_context(self.config, spill_dir=self._spill_dir)
            self._cold.attach(self._ctx)
            self._entries: list[Entry] = []
            self._clock = 0
            self._rollbacks: list[tuple[int, int]] = []  # (clock, tokens kept) for checkpoint validity
            self._index.truncate(0)
            if self._durable is not None:
                self._durable.truncate_log(0)
                self._durable.snapshot(self)

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
            return self._append([(m["role"], m["content"]) for m in messages])

    def add_text(self, text: str) -> int:
        """Append raw text (a document, a log), without chat formatting; returns tokens added."""
        check_text(text)
        with self._lock:
            return self._append([(None, text)])

    def _append(self, items: list[tuple[str | None, str]]) -> int:
        entries, ids = [], []
        start = len(self)
        for role, content in items:
            first = start + len(ids) == 0
            new = self._chat.encode(content) if role is None else self._chat.message_ids(role, content, first=first)
            if first:
                new = self._first_ids(new)
            entries.append(Entry(role, content, start + len(ids), start + len(ids) + len(new)))
            ids += new
        cp = self._ctx.checkpoint() if self._durable is not None else None
        self._encode(ids, logits="none")
        self._record(entries, cp)
        del cp  # a snapshot must not find the checkpoint's window buffers still held (RAM budget)
        self._settle()
        return len(ids)

    def _record(self, entries: list[Entry], cp: dict | None) -> None:
        """Entries whose tokens are encoded become history (durably, for an open memory). If the
        log refuses them, the memory is rolled back to ``cp`` and must not hold them either."""
        if self._durable is not None:
            try:
                self._durable.record([(e.role, e.content, self._ctx.tokens[e.start : e.end]) for e in entries])
            except BaseException:
                if cp is not None:
                    self._ctx.rollback(cp)
                raise
        first = len(self._entries)
        self._entries += entries
        self._index.add([(first + j, e.content, self._passages(first + j, e)) for j, e in enumerate(entries)])

    def _passages(self, i: int, e: Entry) -> list[Passage]:
        """Entry ``i`` cut into passages of at most ``block_size`` tokens (a short message is one)."""
        n, bs = e.end - e.start, self.config.block_size
        if n <= bs:
            return [Passage(i, e.start, e.end, e.content.strip())]
        enc = self.tokenizer(e.content, add_special_tokens=False, return_offsets_mapping=True)
        cids, offsets = enc["input_ids"], enc["offset_mapping"]
        # Where the content's tokens sit among the entry's (after a BOS or template header). If the
        # template tokenised them differently, positions are mapped proportionally.
        lead, scale = _locate(self._ctx.tokens[e.start : e.end], cids), 1.0
        if lead < 0:
            lead, scale = 0, n / max(1, len(cids))
        pieces = cut(e.content, offsets, bs)
        out = []
        for j, (a, b, text) in enumerate(pieces):
            t0 = e.start if j == 0 else e.start + lead + round(a * scale)
            t1 = e.end if j == len(pieces) - 1 else e.start + lead + round(b * scale)
            out.append(Passage(i, t0, t1, text))
        return out

    def _reindex(self) -> None:
        """Make the lexical index hold exactly the entries (after load/open)."""
        kept = self._index.sync([e.content for e in self._entries])
        self._index.add([(i, e.content, self._passages(i, e)) for i, e in enumerate(self._entries) if i >= kept])

    def _settle(self) -> None:
        """After new history: snapshot an open memory when due, wake the cold-tier worker."""
        if self._durable is not None:
            self._durable.maybe_snapshot(self)
        self._cold.notify()

    def _first_ids(self, ids: list[int]) -> list[int]:
        """Prefix BOS when the history is empty and the tokenizer uses one."""
        bos = self._chat.bos
        return bos + ids if len(self) == 0 and ids[: len(bos)] != bos else ids

    @torch.inference_mode()
    def _encode(self, ids: list[int], *, atomic: bool = True, **kw) -> torch.Tensor | None:
        """Run ``ids`` through the model into the memory. ``atomic``: roll back if interrupted (callers
        that already hold a checkpoint, like a generation turn, skip the cost)."""
        if not atomic:
            return self._forward(torch.tensor(ids, dtype=torch.long), self._ctx, **kw)
        with self._ctx.transaction():
            return self._forward(torch.tensor(ids, dtype=torch.long), self._ctx, **kw)

    def checkpoint(self) -> Checkpoint:
        """A handle to the current state; :meth:`rollback` returns to it (branching, undo).

        Example:
            >>> cp = mem.checkpoint()  # doctest: +SKIP
            >>> mem.add_message("user", "a what-if")  # doctest: +SKIP
            >>> mem.rollback(cp)  # the what-if is forgotten  # doctest: +SKIP
        """
        with self._lock:
            self._clock += 1
            return Checkpoint(self, self._ctx, self._ctx.checkpoint(), len(self._entries), self._clock)

    def rollback(self, checkpoint: Checkpoint) -> None:
        """Forget everything added after ``checkpoint`` was taken."""
        if not isinstance(checkpoint, Checkpoint) or checkpoint.memory is not self:
            raise ValueError("rollback() needs a checkpoint taken from this memory")
        with self._lock:
            n = checkpoint.state["n_tokens"]
            # Valid only while the history still extends the checkpoint's: no reset, no rollback below it.
            cut = any(c > checkpoint.clock and kept < n for c, kept in self._rollbacks)
            if checkpoint.context is not self._ctx or cut:
                raise ValueError("this checkpoint is no longer valid: the memory was reset or rolled back past it")
            self._ctx.rollback(checkpoint.state)
            del self._entries[checkpoint.n_entries :]
            self._index.truncate(checkpoint.n_entries)
            self._clock += 1
            self._rollbacks.append((self._clock, n))
            if self._durable is not None:
                self._durable.truncate_log(checkpoint.n_entries)
                self._durable.maybe_snapshot(self)

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
        pieces = self.stream(
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
        )
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
        if prompt is not None or not chat:
            check_text(prompt, "prompt")
        elif len(self) == 0:
            raise ValueError("prompt=None answers the history, but the memory is empty")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if not isinstance(temperature, (int, float)) or temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and (not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop)):
            raise TypeError(f"stop must be a str or a list of str, got {stop!r}")
        if isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, int) or min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be a non-negative int, got {min_new_tokens!r}")
        recall = self.config.recall_k if recall is None else recall
        if isinstance(recall, bool) or not isinstance(recall, int) or recall < 0:
            raise ValueError(f"recall must be a non-negative int, got {recall!r}")
        if recall_query is not None:
            check_text(recall_query, "recall_query")
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        turn = _Turn(prompt, chat=bool(chat), query=recall_query)
        sampling = dict(temperature=float(temperature), top_p=top_p, gen=gen, min_new_tokens=min_new_tokens)
        return TurnStream(self._stream(turn, max_new_tokens, list(stop or []), remember, sampling, recall, explain), turn)

    def _turn_ids(self, turn: _Turn, recall: int) -> list[int]:
        """Token ids of the turn's input: placed passages (recall), the prompt, the generation prompt."""
        query = turn.query if turn.query is not None else turn.prompt
        if query is None:
            query = self._entries[-1].content if self._entries else ""
        turn.placed = self.place(query, recall) if recall and query.strip() else []
        placed = "\n".join(h.text for h in reversed(turn.placed))  # the best one nearest the question
        if not turn.chat:
            text = turn.prompt if not placed else f"\n{placed}\n{turn.prompt.lstrip(chr(10))}"
            ids = self._first_ids(self._chat.encode(text))
            turn.prompt_tokens = len(ids)
            turn.placed_at = self._placed_at(ids, turn.placed)
            return ids
        first = len(self) == 0
        if turn.prompt is None:
            try:
                ids = self._chat.message_ids("system", f"{PLACED_HEADER}\n{placed}", first=first) if placed else []
            except ValueError:  # a template that refuses a system message here: nothing is placed
                ids, turn.placed = [], []
        else:
            content = f"{PLACED_HEADER}\n{placed}\n\n{turn.prompt}" if placed else turn.prompt
            ids = self._chat.message_ids("user", content, first=first)
        turn.prompt_tokens = len(ids)
        turn.placed_at = self._placed_at(ids, turn.placed)
        return ids + self._chat.encode(self._chat.generation_prompt)

    def _placed_at(self, ids: list[int], placed: list[MemoryHit]) -> list[tuple[int, int]]:
        """Where each placed passage's tokens lie in the turn's input ids."""
        out = []
        for h in placed:
            sub = self._chat.encode(h.text)
            at = _locate(ids, sub)
            out.append((at, at + len(sub)) if at >= 0 else (0, 0))
        return out

    def place(self, query: str, k: int | None = None) -> list[MemoryHit]:
        """The passages recall would place before ``query`` (what ``generate(..., recall=k)`` does
        for its prompt), best first: up to ``k`` (default ``config.recall_k``) hybrid hits scored
        above the average, not among the last ``RECENT_TOKENS`` tokens (the model reads those
        well already), within ``config.recall_max_tokens`` together. Their channel is "placed"."""
        check_text(query, "query")
        k = self.config.recall_k if k is None else k
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be a non-negative int, got {k!r}")
        with self._lock:
            limit, budget, out = len(self) - RECENT_TOKENS, self.config.recall_max_tokens, []
            if limit <= 0 or k == 0:
                return []
            for h in self._search(query, k + 8, "hybrid"):
                # above the average fused score: a passage no channel singles out is not worth the tokens
                if h.score > 0 and h.end <= limit and h.end - h.start <= budget and len(out) < k:
                    budget -= h.end - h.start
                    out.append(MemoryHit(h.text, h.start, h.end, h.score, h.message_index, h.role, ("placed",)))
            return out

    def _stream(self, turn: _Turn, max_new_tokens: int, stop: list[str], remember: bool, sampling: dict, recall: int, explain: bool):
        with self._lock:
            turn.checkpoint = self._ctx.checkpoint()
            n_history = len(self)
            trace = None
            try:
                ids = self._turn_ids(turn, recall)
                if explain:  # trace the answer's tokens: the last input token predicts the first one
                    trace = torch.zeros(n_history + len(ids) + max_new_tokens + 1)
                    if len(ids) > 1:
                        self._encode(ids[:-1], atomic=False, logits="none")
                    logits = self._encode(ids[-1:], atomic=False, trace=trace)
                else:
                    logits = self._encode(ids, atomic=False)
                traced = 1
                dec = StreamDecoder(self.tokenizer, stop)
                min_new = sampling.pop("min_new_tokens")
                for i in range(max_new_tokens):
                    if i < min_new:
                        logits = self._chat.suppress_stop(logits)
                    token = _sample(logits, **sampling)
                    if token in self._chat.stop_ids:
                        turn.ended_by_stop_token = True
                        break
                    piece = dec.push(token)
                    if piece:
                        turn.answer += piece
                        yield piece
                    if dec.stopped:
                        break
                    if i + 1 < max_new_tokens:
                        logits = self._encode([token], atomic=False, trace=trace)
                        traced += 1
                tail = dec.flush()
                if tail:
                    turn.answer += tail
                    yield tail
                if explain:
                    turn.explanation = Answer(turn.answer, self._attended(trace, n_history, traced, turn), turn.placed)
            except GeneratorExit:  # the caller stopped reading: the turn ends here
                if explain:
                    turn.explanation = Answer(turn.answer, self._attended(trace, n_history, traced, turn), turn.placed)
                self._finish(turn, remember)
                raise
            except BaseException:
                self._ctx.rollback(turn.checkpoint)
                raise
            else:
                self._finish(turn, remember)

    def _attended(self, trace: torch.Tensor, n_history: int, steps: int, turn: _Turn) -> list[MemoryHit]:
        """The ``EXPLAIN_K`` passages of the history that received most of the traced attention,
        in the memory or as a placed copy in the turn; score: their share of it (all layers, heads
        and traced tokens; the rest went to the turn's own text, to other passages and to the
        attention sinks)."""
        mass = trace[:n_history].clone()
        # Attention sinks draw mass whatever is asked: the first few tokens, and once the history
        # is past the window, the whole init part (every query attends to it, InfLLM's sinks).
        long = n_history > self.config.n_init + self.config.n_local
        mass[: self._ctx.layout.init_len if long else _retrieval.N_SINK] = 0
        cum = torch.cat([torch.zeros(1), mass.cumsum(0)])
        total = steps * len(self._ctx.layers) * self._ctx.g.n_heads
        scores = {(p.start, p.end): [float(cum[p.end] - cum[p.start]), p] for p in self._index.passages(0, n_history)}
        for h, (a, b) in zip(turn.placed, turn.placed_at):  # a placed copy counts for its original
            if (h.start, h.end) in scores:
                scores[h.start, h.end][0] += float(trace[n_history + a : n_history + b].sum())
        scored = sorted(scores.values(), key=lambda x: -x[0])
        return [self._hit(p, s / total, ("attended",)) for s, p in scored[:EXPLAIN_K] if s > 0]

    def _finish(self, turn: _Turn, remember: bool) -> None:
        """Restore the memory after a turn, or store the turn as history."""
        if remember and turn.chat and turn.ended_by_stop_token and turn.answer and not turn.placed:
            # The model's own tokens are kept; only the template's end-of-turn text is added.
            start = turn.checkpoint["n_tokens"]
            self._encode(self._chat.encode(self._chat.assistant_suffix), logits="none")
            mid = start + turn.prompt_tokens
            user = [Entry("user", turn.prompt, start, mid)] if turn.prompt is not None else []
            self._record(user + [Entry("assistant", turn.answer, mid, len(self))], turn.checkpoint)
            turn.checkpoint = None
            self._settle()
            return
        self._ctx.rollback(turn.checkpoint)
        if remember and turn.chat:
            user = [] if turn.prompt is None else [("user", turn.prompt)]
            self._append(user + ([("assistant", turn.answer)] if turn.answer else []))
        elif remember:
            self._append([(None, turn.prompt + turn.answer)])

    @torch.inference_mode()
    def retrieve(self, query: str, k: int = 4, *, mode: str = "hybrid") -> list[MemoryHit]:
        """The ``k`` passages of the history most relevant to ``query``, best first.

        A passage is a message, or a piece of at most ``block_size`` tokens of a longer entry.
        ``mode="hybrid"`` fuses two rankings (z-scored and summed, see
        :func:`memory_plugin.retrieval.fuse`): ``"lexical"`` (BM25 over the passages' words: exact
        for names, ids, numbers) and ``"attention"`` (the model's own queries for ``query`` against
        each passage's keys); each hit's ``channels`` says which ranked it in their top ``k``. The
        memory is not changed.

        Example:
            >>> [(h.role, h.channels, h.text[:40]) for h in mem.retrieve("database port", k=2)]  # doctest: +SKIP
        """
        check_text(query, "query")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be a non-negative int, got {k!r}")
        if mode not in SEARCH_MODES:
            raise ValueError(f"mode must be one of {', '.join(SEARCH_MODES)}, got {mode!r}")
        with self._lock:
            if k == 0 or len(self) == 0:
                return []
            return self._search(query, k, mode)

    def _search(self, query: str, k: int, mode: str) -> list[MemoryHit]:
        rankings: dict[str, list[tuple[Passage, float]]] = {}
        lexical = self._index.search(query, max(k, _retrieval.CHANNEL_DEPTH))
        if mode != "attention":
            rankings["lexical"] = lexical
        if mode != "lexical":
            queries, n_seen = self._query_states(query)
            cands = self._candidates(queries, n_seen, [p for p, _ in lexical])
            if cands:
                score = _retrieval.attention_scores(self._ctx, queries, n_seen, cands)
                order = score.argsort(descending=True, stable=True).tolist()
                rankings["attention"] = [(cands[i], float(score[i])) for i in order]
        fused = _retrieval.fuse(rankings)[:k]
        return [self._hit(p, s, tuple(c for c, r in ranks.items() if r <= k)) for p, s, ranks in fused]

    @torch.inference_mode()
    def _query_states(self, query: str) -> tuple[list[torch.Tensor], int]:
        """The query's queries per layer ``[H, T, D]`` (rotated at the far distance), as if it
        were appended to the history (it is not), and how many history tokens there are."""
        capture: list[torch.Tensor] = []
        n_seen = len(self)
        cp = self._ctx.checkpoint()
        try:
            self._forward(torch.tensor(self._chat.encode(query)), self._ctx, logits="none", capture=capture)
        finally:
            self._ctx.rollback(cp)
        n_layers = len(self._ctx.layers)
        return [torch.cat(capture[layer::n_layers], dim=1) for layer in range(n_layers)], n_seen

    def _candidates(self, queries: list[torch.Tensor], n_seen: int, lexical: list[Passage]) -> list[Passage]:
        """Passages the attention channel scores: all of a short history; of a long one, those in
        the blocks InfLLM's relevance preselects, the lexical hits, init and the local window."""
        if n_seen <= _retrieval.FULL_SCAN_TOKENS:
            return self._index.passages()
        lay = self._ctx.layout
        ranges = [self._ctx.block_span(b) for b in _retrieval.preselect(self._ctx, queries, n_seen, _retrieval.PRESELECT_BLOCKS)]
        ranges += [(0, lay.init_len), self._ctx.window_range]
        found = {(p.start, p.end): p for a, b in ranges for p in self._index.passages(a, b)}
        found.update({(p.start, p.end): p for p in lexical})
        return [found[key] for key in sorted(found)]

    def _hit(self, p: Passage, score: float, channels: tuple[str, ...]) -> MemoryHit:
        return MemoryHit(p.text, p.start, p.end, score, p.entry, self._entries[p.entry].role, channels)

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
                s = self._chat.encode(s)
            segs.append(list(s))
        return _vectors.cram_many(self.model, segs, n_vectors, **kw)

    def uncram(self, vectors: MemoryVectors) -> str:
        """The text greedy decoding reproduces from ``vectors`` alone (refuses another model's vectors)."""
        if not isinstance(vectors, MemoryVectors):
            raise TypeError(f"vectors must be MemoryVectors (from cram), got {type(vectors).__name__}")
        return self.tokenizer.decode(_vectors.decode(self.model, vectors), skip_special_tokens=False)

    def archive(self, older_than_tokens: int | None = None) -> int:
        """Cram now every block older than ``older_than_tokens`` (default: the config's
        ``archive_after_tokens``, else 0) into the cold tier; returns how many blocks went cold."""
        older = older_than_tokens if older_than_tokens is not None else (self.config.archive_after_tokens or 0)
        if isinstance(older, bool) or not isinstance(older, int) or older < 0:
            raise ValueError(f"older_than_tokens must be a non-negative int, got {older_than_tokens!r}")
        return self._cold.archive(older)

    # ------------------------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the whole memory to the directory ``path`` (created; format in
        :mod:`memory_plugin.persistence`). Load it back with :meth:`load` or :meth:`open`.

        Example:
            >>> mem.save("agent-memory")  # doctest: +SKIP
            >>> same = ContextMemory.load("agent-memory")  # doctest: +SKIP
        """
        with self._lock:
            if self._durable is not None and Path(path).resolve() == self._durable.dir.resolve():
                self._durable.snapshot(self)
            else:
                _p.write_copy(self, Path(path), self._fingerprint(), self.model_name)

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
    ) -> ContextMemory:
        """A memory read from a directory written by :meth:`save` or :meth:`open`; the directory is
        not changed or locked. ``model``: None for the model it was saved with (embedded default or
        its recorded path/id), a path/id, or a loaded transformers model (then pass ``tokenizer``).
        A different model, a newer format, or a truncated or corrupted file raises
        :class:`~memory_plugin.persistence.MemoryFormatError` naming the file."""
        path = Path(path)
        manifest = _p.Manifest.read(path)
        hf, tok, name = _resolve(model, tokenizer, manifest.model_name, device, dtype)
        cfg = MemoryConfig(**manifest.config, max_resident_bytes=max_resident_bytes)
        spill = None
        if max_resident_bytes is not None:  # blocks stay on disk: link the (immutable) shards aside
            spill = Path(tempfile.mkdtemp(prefix="memory_plugin-"))
            for s in manifest.shards:
                _link_or_copy(path / s.file, spill / s.file)
        mem = cls(hf, tok, cfg, model_name=name, _spill_dir=spill or path)
        if spill is not None:
            weakref.finalize(mem, shutil.rmtree, spill, ignore_errors=True)
        _p.read_manifest_for(path, mem._fingerprint(), name)
        tail = _p.restore(mem, path, manifest, verify=verify)
        if spill is None:
            mem._ctx.store.detach_disk()
            mem._spill_dir = None
        mem._replay(tail)
        mem._reindex()
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
            exists = (path / _p.MANIFEST).exists()
            manifest = _p.Manifest.read(path) if exists else None
            hf, tok, name = _resolve(model, tokenizer, manifest.model_name if exists else None, device, dtype)
            if exists:
                saved = MemoryConfig(**manifest.config)
                # Fields that choose how the memory is used, not what it holds, may differ.
                runtime = {k: getattr(config or MemoryConfig(), k) for k in MemoryConfig.RUNTIME_FIELDS}
                runtime["max_resident_bytes"] = config.max_resident_bytes if config is not None else None
                if config is not None and config.replace(**{k: getattr(saved, k) for k in runtime}) != saved:
                    diff = [k for k, v in saved.to_dict().items() if getattr(config, k) != v and k not in runtime]
                    raise ValueError(f"{path}: config differs from the saved memory's in {', '.join(diff)}")
                cfg = saved.replace(**runtime)
            else:
                cfg = config or MemoryConfig()
            mem = cls(hf, tok, cfg, model_name=name, _spill_dir=path)
            tail = []
            if exists:  # validate everything before writing anything
                _p.read_manifest_for(path, mem._fingerprint(), name)
                tail = _p.restore(mem, path, manifest, verify=verify)
            durable = _p.Durable(path, lock, mem._fingerprint(), name, snapshot_every)
            durable.manifest = manifest
            mem._replay(tail)
            mem._index.close()
            mem._index = LexicalIndex(path / INDEX)
            mem._reindex()
            mem._durable = durable
            if exists:
                durable.maybe_snapshot(mem)
            else:
                durable.snapshot(mem)
            return mem
        except BaseException:
            lock.release()
            raise

    def _replay(self, rows: list[tuple]) -> None:
        """Re-encode log entries that came after the last snapshot."""
        for role, content, ids in rows:
            start = len(self)
            self._encode(ids, logits="none")
            self._entries.append(Entry(role, content, start, len(self)))

    def close(self) -> None:
        """Stop background archiving; for an open memory, write a final snapshot and release the directory."""
        self._cold.close()
        with self._lock:
            if self._durable is not None:
                self._durable.snapshot(self)
                self._durable.close()
                self._durable = None
                self._index.close()
            self._ctx.store.close()

    def __enter__(self) -> ContextMemory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _fingerprint(self) -> str:
        if self._fingerprint_cache is None:
            self._fingerprint_cache = _p.model_fingerprint(self.model, self.tokenizer)
        return self._fingerprint_cache

    # ------------------------------------------------------------------------------------ inspection
    @property
    def messages(self) -> list[dict]:
        """Stored entries in order as ``{"role", "content"}`` (``role`` None for :meth:`add_text`)."""
        return [{"role": e.role, "content": e.content} for e in self._entries]

    @property
    def entries(self) -> list[Entry]:
        """Stored entries with their token spans (to map :class:`MemoryHit` offsets back to sources)."""
        return list(self._entries)

    @property
    def token_ids(self) -> list[int]:
        return list(self._ctx.tokens)

    def stats(self) -> MemoryStats:
        lay = self._ctx.layout
        w0, w1 = self._ctx.window_range
        return MemoryStats(
            tokens=len(self),
            init_tokens=lay.init_len,
            window_tokens=w1 - w0,
            blocks=len(self._ctx.store),
            bytes=self._ctx.nbytes(),
            config=self.config,
            blocks_by_tier=self._ctx.store.tiers(),
        )

    def __len__(self) -> int:
        return self._ctx.layout.n_tokens

    def __repr__(self) -> str:
        return f"ContextMemory(model={self.model_name!r}, tokens={len(self)}, config={self.config})"


def _resolve(model, tokenizer, saved_name: str | None, device, dtype):
    """``(hf_model, tokenizer, name)`` for load/open: a loaded model, a path/id, or the saved one."""
    if model is not None and not isinstance(model, (str, os.PathLike)):
        if tokenizer is None:
            raise ValueError("pass tokenizer= together with a loaded model")
        return model, tokenizer, getattr(model.config, "_name_or_path", None) or model.config.model_type
    name = str(model) if model is not None else saved_name
    default = name in (None, DEFAULT_MODEL_NAME)
    hf, tok = load_model(None if default else name, device=device, dtype=dtype)
    return hf, tok, DEFAULT_MODEL_NAME if default else name


def _locate(ids: list[int], sub: list[int]) -> int:
    """Where ``sub`` (a text's tokens) starts in ``ids`` (an entry's tokens), allowing its first
    token or two to have merged with what precedes it; -1 when it is not there."""
    for skip in range(min(3, len(sub))):
        probe = sub[skip : skip + 8]
        for at in range(skip, len(ids) - len(sub) + skip + 1):
            if ids[at : at + len(probe)] == probe:
                return at - skip
    return -1


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1).cpu()
    if top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))
