"""Does retrieve() find the right part of a long history? Python reference topics (pydoc_data,
shipped with every CPython; the query is one sentence of a topic) and passkey needles, on the
embedded model: ContextMemory.retrieve against InfLLM's own block relevance (mean query ·
representative keys, z-scored per layer and averaged), the rule that picks blocks for attention.

    python benchmarks/retrieval.py [--topics 32] [--passkey-tokens 8192]
"""

from __future__ import annotations

import argparse
import os
import random
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def infllm_ranking(mem, query: str) -> list[tuple[int, int]]:
    """Memory blocks ranked by InfLLM's block relevance to the query (the baseline)."""
    from memory_plugin.attention import block_relevance

    ctx, capture = mem._ctx, []
    cp = ctx.checkpoint()
    with torch.inference_mode():
        mem._forward(torch.tensor(mem._chat.encode(query)), ctx, logits="none", capture=capture)
    ctx.rollback(cp)
    n_layers, n_blocks = len(ctx.layers), len(ctx.store)
    score = torch.zeros(n_blocks)
    for layer in range(n_layers):
        q = torch.cat(capture[layer::n_layers], dim=1).mean(dim=1)
        s = block_relevance(q, ctx.store.layers[layer].reprs[:n_blocks])
        score += (s - s.mean()) / (s.std() + 1e-6)
    return [ctx.block_span(b) for b in score.argsort(descending=True).tolist()]


def ranked(mem, method: str, query: str) -> list[tuple[int, int]]:
    if method == "infllm":
        return infllm_ranking(mem, query)[:3]
    return [(h.start, h.end) for h in mem.retrieve(query, k=3)]


METHODS = ("infllm", "retrieve")


def topic_queries(n_topics: int, seed: int = 0):
    """Topics of the Python language reference and, per topic, a query made of one of its sentences."""
    from pydoc_data.topics import topics

    rng = random.Random(seed)
    names = sorted(k for k, v in topics.items() if 1000 < len(v) < 8000)
    chosen = rng.sample(names, n_topics)
    out = []
    for name in chosen:
        sentences = [s.strip() for s in topics[name].replace("\n", " ").split(". ") if 60 < len(s.strip()) < 200]
        out.append((name, topics[name], rng.choice(sentences)))
    return out


def main() -> None:
    from memory_plugin import ContextMemory, load_model
    from memory_plugin.tasks import FILLER, filler_repeats, needle, passkey

    p = argparse.ArgumentParser()
    p.add_argument("--topics", type=int, default=32)
    p.add_argument("--passkey-tokens", type=int, default=8192)
    a = p.parse_args()
    model, tok = load_model()

    mem = ContextMemory(model, tok)
    data = topic_queries(a.topics)
    for _, text, _ in data:
        mem.add_text(text + "\n\n")
    entry = {}
    for j, e in enumerate(mem.entries):
        entry.update({t: j for t in range(e.start, e.end)})
    print(f"topics: {len(data)} entries, {len(mem)} tokens, {mem.stats().blocks} blocks")
    rows = {m: [0, 0, 0.0] for m in METHODS}
    for i, (_, _, query) in enumerate(data):
        for m in METHODS:
            t = time.perf_counter()
            found = [entry.get(s) for s, _ in ranked(mem, m, query)]
            rows[m][2] += time.perf_counter() - t
            rows[m][0] += found[0] == i
            rows[m][1] += i in found
    print("| ranking | topic top-1 | topic top-3 | seconds / query |\n|---|---|---|---|")
    for m, (t1, t3, secs) in rows.items():
        print(f"| {m} | {t1}/{len(data)} | {t3}/{len(data)} | {secs / len(data):.2f} |")

    depths = (0.1, 0.3, 0.5, 0.7)
    n = filler_repeats(tok, a.passkey_tokens)
    found = {m: [0, 0] for m in METHODS}
    for j, d in enumerate(depths):
        mem = ContextMemory(model, tok)
        at = round(d * n)
        key = passkey(900 + j)
        mem.add_text(FILLER * at + needle(key) + FILLER * (n - at))
        for m in METHODS:
            texts = [tok.decode(mem.token_ids[s:e]) for s, e in ranked(mem, m, "What is the pass key?")]
            found[m][0] += key in texts[0]
            found[m][1] += any(key in x for x in texts)
    print(f"\n| ranking | passkey top-1 ({a.passkey_tokens} tokens) | passkey top-3 |\n|---|---|---|")
    for m, (t1, t3) in found.items():
        print(f"| {m} | {t1}/{len(depths)} | {t3}/{len(depths)} |")


if __name__ == "__main__":
    main()
