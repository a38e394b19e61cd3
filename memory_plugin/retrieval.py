"""Ranking passages of a memory's history against a query, for :meth:`ContextMemory.retrieve`.

Three channels; ``mode="hybrid"`` fuses the ``HYBRID`` ones:

* **lexical**: BM25 over the passages' words (:mod:`memory_plugin.lexical`), exact for the names,
  ids and numbers that are said once;
* **semantic**: a static embedding model's vectors (:mod:`memory_plugin.semantic`), for queries
  that share few words with their passage;
* **attention**: the model's own keys, not in the hybrid default: fused with the other two it
  changed no more than one answer in 94 on the retrieval benchmark (docs/BENCHMARKS.md, section 4)
  and it costs a forward pass of the query through the model (~1-2 s on CPU, against ~5 ms for the
  other two together). InfLLM's block relevance (mean query · representative keys)
  chooses blocks for attention well enough, but as a search it is close to chance: the
  representative keys are the tokens that drew attention, mostly punctuation and sinks (1-3 of 32
  topics first, docs/BENCHMARKS.md section 4). Two changes make it a usable search: every key of a
  passage is matched (late interaction: each query token's best key), and queries are centred on
  the history's mean query, which removes what all queries share. Only every third layer is scored:
  as accurate as all 30 on that benchmark, three times faster.

Past ``FULL_SCAN_TOKENS`` the attention channel scores only candidates, so a query's cost does not
grow with the history: passages in the ``PRESELECT_BLOCKS`` blocks that InfLLM's (z-scored) block
relevance ranks highest, the lexical channel's hits, and the initial tokens and local window.

The channels' scores are fused after standardising each over the passages either returned
(:func:`fuse`), so a channel weighs as much as its best hit stands out from the rest; reciprocal
rank fusion is the alternative measured against it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .attention import block_relevance, maxsim_relevance
from .lexical import Passage

LAYER_STRIDE = 3
N_SINK = 4  # attention-sink tokens at the start of a history (StreamingLLM keeps 4): no content
FULL_SCAN_TOKENS = 16384
PRESELECT_BLOCKS = 64
CHANNEL_DEPTH = 50  # hits of each channel that take part in the fusion
RRF_K = 60  # the constant of Cormack et al.; larger flattens the fusion toward a vote count
HYBRID = ("lexical", "semantic")  # the channels mode="hybrid" fuses; chosen on the retrieval benchmark, section 4
FUSION = "zscore"  # how channels are fused (see fuse); chosen on the retrieval benchmark, section 4
_PASSAGES_PER_BATCH = 64  # bounds the [passages, heads, query tokens, passage tokens] similarity tensor


def centred(ctx, queries: list[torch.Tensor], n_seen: int, layer: int) -> torch.Tensor:
    """The query's queries in ``layer`` ``[H, T, D]`` minus the history's mean query."""
    return queries[layer].float().cpu() - (ctx.layers[layer].q_sum.cpu() / max(1, n_seen))[:, None, :]


def preselect(ctx, queries: list[torch.Tensor], n_seen: int, m: int) -> list[int]:
    """The ``m`` blocks InfLLM's z-scored relevance ranks highest for the query, summed over the
    scored layers (reads only the representative keys, which stay in RAM)."""
    n = len(ctx.store)
    if n <= m:
        return list(range(n))
    score = torch.zeros(n)
    for layer in range(0, len(ctx.layers), LAYER_STRIDE):
        q = centred(ctx, queries, n_seen, layer).mean(dim=1)
        score += block_relevance(q, ctx.store.layers[layer].reprs.cpu(), normalize=True)
    return score.topk(m).indices.tolist()


def attention_scores(ctx, queries: list[torch.Tensor], n_seen: int, cands: Sequence[Passage]) -> torch.Tensor:
    """Relevance of each candidate passage: MaxSim per scored layer, standardised over the
    candidates, averaged over layers. ``queries[layer]`` is ``[H, T, D]`` (rotated at the far
    distance, as the attention uses them); ``n_seen`` the tokens whose queries ``q_sum`` holds."""
    score = torch.zeros(len(cands))
    layers = range(0, len(ctx.layers), LAYER_STRIDE)
    for layer in layers:
        q = centred(ctx, queries, n_seen, layer)
        s = torch.cat(
            [
                maxsim_relevance(q, *_keys(ctx, layer, cands[i : i + _PASSAGES_PER_BATCH]))
                for i in range(0, len(cands), _PASSAGES_PER_BATCH)
            ]
        )
        s = torch.nan_to_num(s, neginf=float(s[s.isfinite()].min()) if s.isfinite().any() else 0.0)
        score += (s - s.mean()) / (s.std() + 1e-6) if len(s) > 1 else s
    return score / len(layers)


def _keys(ctx, layer: int, group: Sequence[Passage]) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys of the passages, padded: ``[S, H, n, D]`` and the valid mask ``[S, n]``."""
    ks = []
    for p in group:
        k = ctx.keys(layer, max(p.start, N_SINK) if p.end > N_SINK else p.start, p.end)
        ks.append(k)
    n = max(1, max(k.shape[1] for k in ks))
    g = ctx.g
    keys = torch.zeros(len(group), g.n_heads, n, g.head_dim)
    valid = torch.zeros(len(group), n, dtype=torch.bool)
    for i, k in enumerate(ks):
        keys[i, :, : k.shape[1]] = k
        valid[i, : k.shape[1]] = True
    return keys, valid


def fuse(ranked: dict[str, Sequence[tuple[Passage, float]]], method: str | None = None) -> list[tuple[Passage, float, dict[str, int]]]:
    """Fuse best-first ``(passage, score)`` lists of several channels: ``(passage, fused score,
    {channel: rank})``, best first.

    ``"rrf"``: reciprocal-rank fusion (Cormack et al. 2009), ``sum 1 / (RRF_K + rank)``: needs no
    calibration, but treats an exact match of a rare name in one channel like the top of a channel
    that is guessing. ``"zscore"`` (distribution-based fusion): each channel's scores standardised
    over all fused passages (a passage a channel did not return gets that channel's lowest score,
    0 for BM25), then summed, so a channel counts as much as its top stands out (see ``FUSION``).

    >>> a, b, c = (Passage(0, i, i + 1, str(i)) for i in range(3))
    >>> [(p.text, r) for p, s, r in fuse({"lexical": [(a, 2.0), (b, 1.0)], "attention": [(b, 1.0), (c, 0.9)]}, "rrf")]
    [('1', {'lexical': 2, 'attention': 1}), ('0', {'lexical': 1}), ('2', {'attention': 2})]
    >>> [p.text for p, s, r in fuse({"lexical": [(a, 9.0), (b, 1.0)], "attention": [(b, 1.0), (c, 0.2), (a, 0.9)]}, "zscore")]
    ['0', '1', '2']
    """
    method = method or FUSION
    first: dict[tuple[int, int], Passage] = {}
    ranks: dict[tuple[int, int], dict[str, int]] = {}
    for channel, hits in ranked.items():
        for r, (p, _) in enumerate(hits, 1):
            first.setdefault((p.start, p.end), p)
            ranks.setdefault((p.start, p.end), {})[channel] = r
    keys = list(first)
    total = torch.zeros(len(keys), dtype=torch.float64)
    for channel, hits in ranked.items():
        if not hits:
            continue
        if method == "rrf":
            got = {(p.start, p.end): 1.0 / (RRF_K + r) for r, (p, _) in enumerate(hits, 1)}
            total += torch.tensor([got.get(key, 0.0) for key in keys], dtype=torch.float64)
            continue
        got = {(p.start, p.end): s for p, s in hits}
        floor = 0.0 if channel == "lexical" else min(got.values())
        x = torch.tensor([got.get(key, floor) for key in keys], dtype=torch.float64)
        total += (x - x.mean()) / (x.std(correction=0) + 1e-9) if len(x) > 1 else x
    order = sorted(range(len(keys)), key=lambda i: (-float(total[i]), keys[i]))
    return [(first[keys[i]], float(total[i]), ranks[keys[i]]) for i in order]
