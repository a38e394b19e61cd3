"""How much of the exact block selection a coarse-to-fine one keeps, on a saved history grown by
replicated blocks (issue 24, target 1: a sublinear selection is kept only if it still finds the
blocks exact selection finds, needles first).

    python benchmarks/selection_recall.py --load /tmp/mem24/h8k --grow 1048576 --out benchmarks/results/selection_recall.json
    python benchmarks/selection_recall.py --load /tmp/h19/needle16k --needle 48213 --grow 1048576 --out ...

(``/tmp/h19/needle16k``: the saved 8.7k filler history loaded, ``add_text(needle("48213"))``, then
``add_text(FILLER * filler_repeats(tok, 16384 - len(mem)))``, saved: 16,029 tokens, the needle in block 66.)

Coarse-to-fine: consecutive blocks form super-blocks of ``G`` blocks whose key is the mean of
their representative keys; the ``S`` super-blocks scoring highest (with the same re-weighted query
as exact selection) are opened and their blocks scored exactly; the top-k of those is the
selection. It reads ``n / G + S * G`` keys instead of ``n``. ``ivf:C:P`` instead clusters each
layer's keys by k-means into ``C`` clusters and scores the members of the ``P`` clusters whose
centroid scores highest (an inverted-file index, as faiss's IVF; built once, in the script only).

Queries are the model's own: each layer's far query while the ~200-token turn message is decoded
one token at a time (what a decode step selects with), and the passkey question as one chunk.
Recall is |approx top-k ∩ exact top-k| / k per (layer, query); as ties and copies make ids a
poor measure (filler blocks nearly repeat each other, replicated copies differ by noise), also by
score (a pick within 1e-5 of the score spread of the k-th best counts) and by source block. With ``--needle KEY`` the history
holds one needle (built as ``passkey_history``), only the other blocks are replicated, and the
table says at which layers exact and approximate selection pick the needle's block for the question.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def coarse_topk(flat, q, k: int, group: int, open_groups: int):
    """Top-``k`` block ids by ``flat [n, F] @ q [F]``, scoring only the blocks of the
    ``open_groups`` super-blocks (``group`` consecutive blocks, keyed by their mean) that score highest."""
    import torch

    n = flat.shape[0]
    n_groups = -(-n // group)
    pad = n_groups * group - n
    padded = torch.cat([flat, flat.new_zeros(pad, flat.shape[1])]) if pad else flat
    counts = torch.full((n_groups,), float(group))
    counts[-1] = group - pad
    means = padded.view(n_groups, group, -1).sum(dim=1) / counts[:, None]  # kept incrementally if adopted
    top = (means @ q).topk(min(open_groups, n_groups)).indices
    cand = (top[:, None] * group + torch.arange(group)).flatten()
    cand = cand[cand < n]
    return set(cand[(flat[cand] @ q).topk(min(k, len(cand))).indices].tolist())


def kmeans(flat, n_clusters: int, iters: int = 8, seed: int = 0):
    """Lloyd's k-means of the rows of ``flat [n, F]``: ``(centroids [C, F], assignment [n])``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    n_clusters = min(n_clusters, len(flat))
    cent = flat[torch.randperm(len(flat), generator=gen)[:n_clusters]].clone()
    for _ in range(iters):
        assign = (flat @ cent.T - 0.5 * (cent * cent).sum(dim=1)).argmax(dim=1)  # nearest in L2
        sums = torch.zeros_like(cent).index_add_(0, assign, flat)
        counts = torch.bincount(assign, minlength=n_clusters)
        cent = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], cent)
    return cent, (flat @ cent.T - 0.5 * (cent * cent).sum(dim=1)).argmax(dim=1)


def ivf_topk(flat, q, k: int, index, probe: int):
    """Top-``k`` ids scoring only the members of the ``probe`` clusters whose centroid scores highest
    (an inverted-file index, as faiss's IVF): returns the ids and the keys read."""
    import torch

    cent, assign = index
    top = (cent @ q).topk(min(probe, len(cent))).indices
    cand = torch.isin(assign, top).nonzero()[:, 0]
    return set(cand[(flat[cand] @ q).topk(min(k, len(cand))).indices].tolist()), len(cent) + len(cand)


def _recalls(scores, exact: set, approx: set, source) -> tuple[float, float, float]:
    """Recall of ``approx`` against ``exact`` (top-k ids): by id; by score, counting a pick whose
    exact score is within 1e-5 of the score spread of the k-th best as found (near-identical filler
    blocks tie); and by source block (a replicated copy stands for the block it copies)."""
    k = len(exact)
    kth = min(float(scores[b]) for b in exact) - 1e-5 * float(scores.std())
    by_source = {source(b) for b in exact}
    return (
        len(exact & approx) / k,
        sum(float(scores[b]) >= kth for b in approx) / k,
        len({source(b) for b in approx} & by_source) / len(by_source),
    )


def _captured(engine, ids) -> list:
    """Far queries [H, c, D] per (step, layer) of forwarding ``ids`` as one chunk; the memory is restored."""
    import torch

    ctx, capture = engine.ctx, []
    cp = ctx.checkpoint()
    try:
        with torch.inference_mode():
            engine.forward(torch.tensor(ids), ctx, logits="none", capture=capture)
    finally:
        ctx.rollback(cp)
    return capture


def _decode_queries(engine, ids) -> list:
    """Per decoded token, per layer, the far query [H, 1, D] (tokens forwarded one at a time)."""
    import torch

    ctx, capture = engine.ctx, []
    cp = ctx.checkpoint()
    try:
        with torch.inference_mode():
            for t in ids:
                engine.forward(torch.tensor([t]), ctx, logits="none", capture=capture)
    finally:
        ctx.rollback(cp)
    return capture


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", type=Path, required=True)
    p.add_argument("--grow", type=int, nargs="*", default=[1048576])
    p.add_argument("--needle", help="the key of the saved history's one needle")
    p.add_argument("--needle-block", type=int, help="the needle's block, when known (else found from --needle)")
    p.add_argument("--decode-tokens", type=int, default=48, help="tokens of the turn message decoded one at a time")
    p.add_argument("--grid", nargs="*", default=["16:32", "16:64", "8:64", "8:128", "32:32"], help="G:S (coarse-to-fine) or ivf:C:P (k-means, C clusters, P probed)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from decode_cost import replicate_blocks
    from passkey import _turn_message

    from memory_plugin import ContextMemory
    from memory_plugin.tasks import QUESTION, needle

    mem = ContextMemory.load(a.load)
    engine, tok = mem._engine, mem.tokenizer  # benchmark only
    ctx, cfg = engine.ctx, mem.config
    k = cfg.topk
    relevance = ctx.relevance
    needle_block = None
    if a.needle_block is not None:
        needle_block = a.needle_block
        print(json.dumps({"needle_block": needle_block, "blocks": len(ctx.store)}), flush=True)
    elif a.needle:  # the block holding most of the needle's tokens
        text_ids = engine.history.rows(ctx.tokens)
        all_ids = [t for _, _, ids in text_ids for t in ids]
        nd = tok(needle(a.needle), add_special_tokens=False)["input_ids"]
        at = next(i for i in range(len(all_ids)) if all_ids[i : i + len(nd)] == nd)
        mid = at + len(nd) // 2
        needle_block = (mid - cfg.n_init) // cfg.block_size
        print(json.dumps({"needle_tokens": [at, at + len(nd)], "needle_block": needle_block, "blocks": len(ctx.store)}), flush=True)
    out = {"config": cfg.to_dict(), "load": str(a.load), "needle_block": needle_block, "points": []}
    msg_ids = tok(_turn_message(tok), add_special_tokens=False)["input_ids"][: a.decode_tokens]
    q_ids = tok(QUESTION, add_special_tokens=False)["input_ids"]
    n_layers = len(ctx.layers)
    have = len(ctx.store)
    exclude = {needle_block} if needle_block is not None else set()
    sources = [b for b in range(have) if b not in exclude]  # as replicate_blocks copies them

    def source(b: int) -> int:
        return b if b < have else sources[b % len(sources)]

    for length in [len(mem), *a.grow]:
        if length > len(mem):
            replicate_blocks(mem, length, exclude=exclude)
        store = ctx.store
        n = len(store)
        queries = {"question": _captured(engine, q_ids), "decode": _decode_queries(engine, msg_ids)}
        point = {"length": length, "blocks": n, "grid": {}}
        indexes = {}
        needle_layers = {}
        for kind, caps in queries.items():
            for gs in a.grid:
                ivf = gs.startswith("ivf:")
                g, s = map(int, gs.removeprefix("ivf:").split(":"))
                reads = []
                recalls, hits = [], {"exact": [], "approx": []}
                tied, by_source = [], []
                for i, qf in enumerate(caps):
                    layer = i % n_layers
                    q_mean = qf.mean(dim=1)
                    blocks = store.layers[layer]
                    q = relevance.query(q_mean, lambda: blocks.score_std(q_mean)).reshape(-1)
                    flat = blocks.reprs.reshape(n, -1).float()
                    exact = set(store.select(layer, q_mean, k, relevance))
                    if ivf:  # one index per layer and length, built on first use
                        if (layer, g) not in indexes:
                            indexes[layer, g] = kmeans(flat, g)
                        approx, read = ivf_topk(flat, q, k, indexes[layer, g], s)
                    else:
                        approx, read = coarse_topk(flat, q, k, g, s), -(-n // g) + s * g
                    reads.append(read)
                    r_id, r_tied, r_source = _recalls(flat @ q, exact, approx, source)
                    recalls.append(r_id)
                    tied.append(r_tied)
                    by_source.append(r_source)
                    if needle_block is not None and kind == "question":
                        if needle_block in exact:
                            hits["exact"].append(layer)
                        if needle_block in approx:
                            hits["approx"].append(layer)
                row = {"queries": len(recalls), "recall_mean": statistics.mean(recalls), "recall_min": min(recalls),
                       "full_recall_share": sum(r == 1 for r in recalls) / len(recalls), "keys_read": statistics.mean(reads),
                       "tied_recall_mean": statistics.mean(tied), "tied_recall_min": min(tied),
                       "source_recall_mean": statistics.mean(by_source), "source_recall_min": min(by_source)}
                if needle_block is not None and kind == "question":
                    row["needle_layers_exact"], row["needle_layers_approx"] = hits["exact"], hits["approx"]
                    row["needle_missed"] = sorted(set(hits["exact"]) - set(hits["approx"]))
                name = f"{kind} IVF C={g} P={s}" if ivf else f"{kind} G={g} S={s}"
                point["grid"][name] = row
                print(json.dumps({"length": length, "blocks": n, "set": name, **row}), flush=True)
        out["points"].append(point)
    text = json.dumps(out, indent=1)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)


if __name__ == "__main__":
    main()
