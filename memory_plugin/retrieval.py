"""Ranking spans of a memory's history against a query, for :meth:`ContextMemory.retrieve`.

InfLLM's block relevance (mean query · representative keys) chooses blocks for attention well
enough (the needle's block is selected), but as a search over a history it is close to chance:
the representative keys are the tokens that drew attention, mostly punctuation and sinks. On 32
Python-reference topics it ranked the topic a verbatim sentence came from first 1-3 times in 32
(docs/BENCHMARKS.md, "Retrieval"). Two changes make it a usable search, measured there:

* every key of a span is matched (late interaction: each query token's best key), not four;
* queries are centred on the mean query of the history, which removes what all queries share
  (a query otherwise matches the spans that every query matches).

Only every third layer is scored: as accurate as all 30 on that benchmark, three times faster.
Cold blocks (no KV) are matched through their representative key.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import maxsim_relevance

LAYER_STRIDE = 3
N_SINK = 4  # attention-sink tokens at the start of a history (StreamingLLM keeps 4): no content
_SPANS_PER_BATCH = 64  # bounds the [spans, heads, query tokens, span tokens] similarity tensor


@dataclass(frozen=True)
class Span:
    """Part of the history that can be a hit: a memory block, or a block-sized piece of the
    initial tokens or of the local window (so the whole history is searchable)."""

    kind: str  # "block" | "init" | "window"
    start: int  # absolute token offsets [start, end)
    end: int
    index: int  # block id, or offset into the init / window buffers


def spans(ctx) -> list[Span]:
    bs, lay = ctx.cfg.block_size, ctx.layout
    out = [Span("block", *ctx.block_span(b), b) for b in range(len(ctx.store))]
    out += [Span("init", a, min(a + bs, lay.init_len), a) for a in range(0, lay.init_len, bs)]
    w0, w1 = ctx.window_range
    out += [Span("window", a, min(a + bs, w1), lay.win_start + a - w0) for a in range(w0, w1, bs)]
    return out


def _keys(ctx, layer: int, group: list[Span]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unrotated keys of the spans, per query head and padded: ``[S, H, block_size, D]`` and
    the valid mask ``[S, block_size]``."""
    st, store, g = ctx.layers[layer], ctx.store, ctx.g
    keys = torch.zeros(len(group), g.n_heads, ctx.cfg.block_size, g.head_dim)
    valid = torch.zeros(len(group), ctx.cfg.block_size, dtype=torch.bool)
    rep = g.n_heads // g.n_kv_heads
    for i, s in enumerate(group):
        if s.kind == "block" and s.index in store.cold and store.layers[layer].kv[s.index] is None:
            keys[i, :, 0] = store.layers[layer].reprs[s.index].float().cpu()
            valid[i, 0] = True
            continue
        if s.kind == "block":
            k = store.block(layer, s.index)[0]
        else:
            src = st.init_k if s.kind == "init" else st.win_k
            k = src[:, s.index : s.index + s.end - s.start]
        n = k.shape[1]
        keys[i, :, :n] = k.float().cpu().repeat_interleave(rep, dim=0)
        valid[i, :n] = True
        if s.start == 0 and n > N_SINK:  # sinks match every query; they must not make the opening a hit
            valid[i, :N_SINK] = False
    return keys, valid


def rank(ctx, queries: list[torch.Tensor], n_seen: int) -> tuple[list[Span], torch.Tensor]:
    """Every span and its relevance to the query: MaxSim per scored layer, standardised over the
    spans, averaged over layers. ``queries[layer]`` is ``[H, T, D]`` (rotated at the far
    distance, as the attention uses them); ``n_seen`` the tokens whose queries ``q_sum`` holds."""
    cands = spans(ctx)
    score = torch.zeros(len(cands))
    layers = range(0, len(ctx.layers), LAYER_STRIDE)
    for layer in layers:
        q = queries[layer].float().cpu() - (ctx.layers[layer].q_sum.cpu() / max(1, n_seen))[:, None, :]
        s = torch.cat(
            [
                maxsim_relevance(q, *_keys(ctx, layer, cands[i : i + _SPANS_PER_BATCH]))
                for i in range(0, len(cands), _SPANS_PER_BATCH)
            ]
        )
        score += (s - s.mean()) / (s.std() + 1e-6) if len(s) > 1 else s
    return cands, score / len(layers)
