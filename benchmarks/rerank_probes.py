"""Does ``retrieve(mode="rerank")`` lose the rare names the hybrid finds exactly? (issue 17, item 4)

The rare-word probes of ``benchmarks/fusion.py`` (a capitalised word or an id said in exactly one
passage of the retrieval benchmark's history, asked as ``--forms``), ranked by the hybrid and by the
library's rerank: :func:`memory_plugin.rerank.query_likelihood` with the embedded model over the
hybrid's best ``RERANK_N``, fused by :func:`memory_plugin.rerank.rerank`, as ``retrieve`` does.
The history is built on a tiny random model with the embedded tokenizer (the hybrid's channels read
only text, so its passages and hybrid ranking are the real model's; ``fusion.py`` checks that).
Right: the top hit lies in the probe's entry.

    python benchmarks/rerank_probes.py --forms "{w}" --out benchmarks/results/retrieval
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import fusion  # noqa: E402
import retrieval as retrieval_bench  # noqa: E402


def asked(query: str, form: str) -> bool:
    """Whether ``query`` is ``form`` filled with one word (a probe word has no space)."""
    pre, suf = form.split("{w}")
    middle = query[len(pre) : len(query) - len(suf)]
    return query.startswith(pre) and query.endswith(suf) and bool(middle) and " " not in middle


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--forms", nargs="*", default=list(fusion.PROBE_TEMPLATES), help="probe templates asked")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/retrieval"))
    p.add_argument("--name", default="rerank-probes")
    a = p.parse_args()

    import torch

    torch.set_num_threads(1)
    from memory_plugin import load_model, rerank
    from memory_plugin.chat import ChatFormat
    from memory_plugin.lexical import Passage
    from memory_plugin.testing import tiny_llama

    model, tok = load_model()
    chat = ChatFormat(tok)
    items = retrieval_bench.quality_items("abc")
    mem = fusion.build(tiny_llama(len(tok)), tok, [(x["kind"], x["text"]) for x in items])
    for i, x in enumerate(items):
        x["entry"] = i
    probes = [x for x in fusion.quality_queries(items, fusion.History(mem, tok))
              if x["set"] == "probe" and any(asked(x["query"], f) for f in a.forms)]
    rows, t0 = [], time.perf_counter()
    for x in probes:
        hits = mem.retrieve(x["query"], k=rerank.RERANK_N)  # the hybrid, best first
        fused = [(Passage(h.message_index, h.start, h.end, h.text), h.score, {}) for h in hits]
        t = time.perf_counter()
        lik = rerank.query_likelihood(model, chat, x["query"], [h.text for h in hits])
        secs = time.perf_counter() - t
        top = rerank.rerank(fused, lik)[0][0]
        rows.append({"query": x["query"], "entry": x["entry"], "hybrid": hits[0].message_index == x["entry"],
                     "rerank": top.entry == x["entry"], "seconds": round(secs, 2)})
        print(json.dumps(rows[-1]), flush=True)
    res = {"forms": a.forms, "probes": len(rows), "hybrid_top1": sum(r["hybrid"] for r in rows),
           "rerank_top1": sum(r["rerank"] for r in rows), "median_s": sorted(r["seconds"] for r in rows)[len(rows) // 2],
           "seconds": round(time.perf_counter() - t0), "rows": rows}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{a.name}.json").write_text(json.dumps(res, indent=1))
    print({k: v for k, v in res.items() if k != "rows"})


if __name__ == "__main__":
    main()
