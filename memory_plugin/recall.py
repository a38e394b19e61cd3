"""Finding passages of a memory's history: hybrid search (:func:`search`), what recall places
before a question (:func:`place`), what an answer attended (:func:`attended`), and how the history
is held along its tokens with the share of an answer's attention each stretch got (:func:`segments`).

Each works on an :class:`~memory_plugin.engine.Engine` (its context, history and lexical index) and
leaves it unchanged; the ranking maths is :mod:`~memory_plugin.retrieval`, the index
:mod:`~memory_plugin.lexical`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Literal, get_args

import torch

from . import rerank, retrieval
from .lexical import Passage

SearchMode = Literal["hybrid", "lexical", "semantic", "attention", "rerank"]
SEARCH_MODES: tuple[str, ...] = get_args(SearchMode)
RECENT_TOKENS = 1024
"""Recall placement skips passages among the last this many tokens: the embedded model already
answers 7 of 8 questions about a fact ~1k tokens back (docs/BENCHMARKS.md, section 9), and a copy
of what sits right before the question only lengthens the turn."""
PLACE_MIN_SHARE = 0.4
"""Recall placement places a passage only if its fused score is at least this share of the search's
best hit's. With 20 look-alike facts in prose (docs/BENCHMARKS.md, section 9) the asked fact was
rank 1 for all 80 questions at 16k and 64k, and rank 2 scored at most 0.287 of it; a placed
look-alike is what a small model copies instead (three passages placed: chat 12/20 at 16k, 10/20 at
64k; one: 13/20 and 15/20). Where a fact is spread over short messages (the demo's request, call
and result), the one holding the value can rank third: 0.489 of the best for the demo's
``build_number``, a question lost at 0.5. 0.4 lies between the two measured bounds."""
EXPLAIN_K = 4  # attended spans an explained answer reports


@dataclass(frozen=True)
class MemoryHit:
    """A passage of the history: a message, or a piece of at most ``block_size`` tokens of a
    longer entry (cut at sentence or line ends).

    ``channels`` says what found it: ``"lexical"``, ``"semantic"``, ``"attention"`` or
    ``"rerank"`` (the model's query likelihood) when it is among that channel's top ``k`` for
    :meth:`ContextMemory.retrieve`; ``"placed"`` / ``"attended"`` in an
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
class Segment:
    """A stretch ``[start, end)`` of the history's tokens as the memory holds it (the timeline a
    viewer draws, :meth:`ContextMemory.segments`). ``kind``: ``"init"`` (the first tokens, always
    attended: the attention sinks), ``"block"`` (evicted from the window into block ``block``, held
    in ``tier`` ``"ram"``, ``"disk"`` or ``"cold"``), ``"dropped"`` (evicted with ``topk=0``: not
    kept), ``"window"`` (the recent tokens every query attends, in ``block_size`` pieces aligned
    with the blocks they will become). ``attention``: in :attr:`Answer.timeline`, the share of the
    answer's attention that went to these tokens (all layers, heads and answer tokens; a placed copy
    of a passage counts for its original)."""

    kind: str
    start: int
    end: int
    block: int | None = None
    tier: str | None = None
    attention: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Answer:
    """An answer with what it came from (``generate(..., explain=True)``): the passages the
    model attended most while writing it (``attended``, score = share of its attention), the
    passages placed before the question (``placed``, see ``MemoryConfig.recall_k``), and the
    history's :class:`Segment` s with the share of attention each got (``timeline``)."""

    text: str
    attended: list[MemoryHit]
    placed: list[MemoryHit]
    timeline: list[Segment] = field(default_factory=list)

    def __str__(self) -> str:
        return self.text

    def sources(self) -> dict:
        """``{"attended": [...], "placed": [...]}``: the passages as plain data (``MemoryHit.to_dict``)."""
        return {"attended": [h.to_dict() for h in self.attended], "placed": [h.to_dict() for h in self.placed]}


@torch.inference_mode()
def search(engine, query: str, k: int, mode: SearchMode) -> list[MemoryHit]:
    """The ``k`` passages best for ``query``: each channel ranks, :func:`retrieval.fuse` fuses;
    ``mode="rerank"``: the hybrid's best :data:`rerank.RERANK_N` reordered by the model
    (:func:`rerank.rerank`)."""
    rankings: dict[str, list[tuple[Passage, float]]] = {}
    depth = max(k, retrieval.CHANNEL_DEPTH)
    channels = retrieval.HYBRID if mode in ("hybrid", "rerank") else (mode,)
    lexical = engine.index.search(query, depth)
    if "lexical" in channels:
        rankings["lexical"] = lexical
    if "semantic" in channels:
        rankings["semantic"] = engine.index.search_semantic(query, depth)
    if "attention" in channels:
        queries, n_seen = _query_states(engine, query)
        cands = _candidates(engine, queries, n_seen, [p for p, _ in lexical])
        if cands:
            score = retrieval.attention_scores(engine.ctx, queries, n_seen, cands)
            order = score.argsort(descending=True, stable=True).tolist()
            rankings["attention"] = [(cands[i], float(score[i])) for i in order]
    fused = retrieval.fuse(rankings)
    if mode == "rerank":
        fused = fused[: max(k, rerank.RERANK_N)]
        likelihood = rerank.query_likelihood(engine.model, engine.chat, query, [p.text for p, _, _ in fused])
        fused = rerank.rerank(fused, likelihood)
    fused = fused[:k]
    return [_hit(engine, p, s, tuple(c for c, r in ranks.items() if r <= k)) for p, s, ranks in fused]


def place(engine, query: str, k: int) -> list[MemoryHit]:
    """Up to ``k`` hybrid hits scored above the average and at least ``PLACE_MIN_SHARE`` of the
    best hit's score, not among the last ``RECENT_TOKENS`` tokens, within
    ``config.recall_max_tokens`` together; channel ``"placed"``."""
    limit, budget, out = len(engine) - RECENT_TOKENS, engine.config.recall_max_tokens, []
    if limit <= 0 or k == 0:
        return []
    hits = search(engine, query, k + 8, "hybrid")  # best first
    for h in hits:
        # Measured against the search's best hit even when that one is not placed (it sits right
        # before the question already): what scores far below it is a look-alike, not the answer.
        if len(out) == k or h.score < PLACE_MIN_SHARE * hits[0].score:
            break
        # above the average fused score: a passage no channel singles out is not worth the tokens
        if h.score > 0 and h.end <= limit and h.end - h.start <= budget:
            budget -= h.end - h.start
            out.append(MemoryHit(h.text, h.start, h.end, h.score, h.message_index, h.role, ("placed",)))
    return out


def attended(engine, trace: torch.Tensor, n_history: int, steps: int, placed, placed_at) -> list[MemoryHit]:
    """The ``EXPLAIN_K`` passages of the history that received most of the traced attention, in
    the memory or as a placed copy in the turn (``placed`` hits at ``placed_at`` spans of the turn's
    input); score: their share of it (all layers, heads and traced tokens; the rest went to the
    turn's own text, to other passages and to the attention sinks)."""
    ctx, cfg = engine.ctx, engine.config
    mass = trace[:n_history].clone()
    # Attention sinks draw mass whatever is asked: the first few tokens, and once the history
    # is past the window, the whole init part (every query attends to it, InfLLM's sinks).
    long = n_history > cfg.n_init + cfg.n_local
    mass[: ctx.layout.init_len if long else retrieval.N_SINK] = 0
    cum = torch.cat([torch.zeros(1), mass.cumsum(0)])
    total = steps * len(ctx.layers) * ctx.g.n_heads
    scores = {(p.start, p.end): [float(cum[p.end] - cum[p.start]), p] for p in engine.index.passages(0, n_history)}
    for h, (a, b) in zip(placed, placed_at):  # a placed copy counts for its original
        if (h.start, h.end) in scores:
            scores[h.start, h.end][0] += float(trace[n_history + a : n_history + b].sum())
    scored = sorted(scores.values(), key=lambda x: -x[0])
    return [_hit(engine, p, s / total, ("attended",)) for s, p in scored[:EXPLAIN_K] if s > 0]


def segments(engine, n_history: int | None = None) -> list[Segment]:
    """The history's first ``n_history`` tokens (default: all) as :class:`Segment` s, in order."""
    ctx, cfg = engine.ctx, engine.config
    n = len(engine) if n_history is None else n_history
    bs, init = cfg.block_size, min(ctx.layout.init_len, n)
    out = [Segment("init", 0, init)] if init else []
    w0, w1 = ctx.window_range
    w0, w1 = max(min(w0, n), init), min(w1, n)
    at = init
    for b in range(len(ctx.store)):
        a, e = ctx.block_span(b)
        if a >= w0:
            break
        out.append(Segment("block", a, min(e, w0), b, ctx.store.tier(b)))
        at = min(e, w0)
    if at < w0:
        out.append(Segment("dropped", at, w0))
    a = w0
    while a < w1:  # pieces end where blocks will: n_init + k * block_size
        e = min(w1, cfg.n_init + ((a - cfg.n_init) // bs + 1) * bs if a >= cfg.n_init else cfg.n_init)
        out.append(Segment("window", a, e))
        a = e
    return out


def timeline(engine, held: list[Segment], trace: torch.Tensor, n_history: int, steps: int, placed, placed_at) -> list[Segment]:
    """``held`` (:func:`segments` of the history before a turn) each with its share of the turn's
    traced attention (see :func:`attended` for ``trace``, ``placed`` and ``placed_at``)."""
    mass = trace[:n_history].clone()
    for h, (a, b) in zip(placed, placed_at):  # a placed copy counts for its original, spread evenly
        if b > a and h.end > h.start:
            mass[h.start : h.end] += float(trace[n_history + a : n_history + b].sum()) / (h.end - h.start)
    total = steps * len(engine.ctx.layers) * engine.ctx.g.n_heads
    cum = torch.cat([torch.zeros(1), mass.double().cumsum(0)])
    return [replace(s, attention=float(cum[s.end] - cum[s.start]) / total) for s in held]


@torch.inference_mode()
def _query_states(engine, query: str) -> tuple[list[torch.Tensor], int]:
    """The query's queries per layer ``[H, T, D]`` (rotated at the far distance), as if it were
    appended to the history (it is not), and how many history tokens there are."""
    ctx = engine.ctx
    capture: list[torch.Tensor] = []
    n_seen = len(engine)
    cp = ctx.checkpoint()
    try:
        engine.forward(torch.tensor(engine.chat.encode(query)), ctx, logits="none", capture=capture)
    finally:
        ctx.rollback(cp)
    n_layers = len(ctx.layers)
    return [torch.cat(capture[layer::n_layers], dim=1) for layer in range(n_layers)], n_seen


def _candidates(engine, queries: list[torch.Tensor], n_seen: int, lexical: list[Passage]) -> list[Passage]:
    """Passages the attention channel scores: all of a short history; of a long one, those in the
    blocks InfLLM's relevance preselects, the lexical hits, init and the local window."""
    ctx, index = engine.ctx, engine.index
    if n_seen <= retrieval.FULL_SCAN_TOKENS:
        return index.passages()
    chosen = retrieval.preselect(ctx, queries, n_seen, retrieval.PRESELECT_BLOCKS)
    ranges = [ctx.block_span(b) for b in chosen] + [(0, ctx.layout.init_len), ctx.window_range]
    found = {(p.start, p.end): p for a, b in ranges for p in index.passages(a, b)}
    found.update({(p.start, p.end): p for p in lexical})
    return [found[key] for key in sorted(found)]


def _hit(engine, p: Passage, score: float, channels: tuple[str, ...]) -> MemoryHit:
    return MemoryHit(p.text, p.start, p.end, score, p.entry, engine.history[p.entry].role, channels)
