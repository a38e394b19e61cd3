"""Can a zero-shot reranker with the embedded model lift the hybrid search to the (a) and (c)
targets of issue 17, item 4? (UPR: Sachan et al. 2022, "Improving Passage Retrieval with
Zero-Shot Question Generation".)

The hybrid's top N passages (``fusion.zscore`` over the rebuilt channels, the ranking that
``retrieve(mode="hybrid")`` returns) are reordered by the embedded model's (SmolLM2-135M-Instruct)
log-likelihood of the query given the passage, averaged over the query's tokens, in one of two
prompt forms:

* ``upr``: ``"Passage: {passage}\\nPlease write a question based on this passage.\\nQuestion:"``
  then `` {query}`` (the paper's prompt);
* ``chat``: the model's chat template, user ``"Passage: {passage}\\n\\nWrite a question that this
  passage answers."``, the assistant's reply ``{query}``.

Variants: the model's score alone on the top N, and ``z(hybrid) + w z(llm)`` with both scores
z-scored over the N candidates. Sets as ``benchmarks/fusion.py`` (its history on a tiny model with
the real tokenizer: the same passages): decide on (a), (c); confirm on (a2), (c2), (b) and
``facts`` (the 20 facts of section 9 in its 16k history, 40 queries).

Scores are cached per (form, query, passage) in ``<out>/<name>-scores.json``: each passage's prompt
is run once and its KV cache reused for every query that has the passage among its candidates.
Seconds per query are measured apart, from scratch (N prompts + query in one padded batch), as a
search would run it, on the first ``--timed`` queries of (a); the same run checks that the cached
path gives the same scores.

    python benchmarks/rerank.py --out benchmarks/results/retrieval --name rerank
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import fusion  # noqa: E402
import recall as recall_bench  # noqa: E402
import retrieval as retrieval_bench  # noqa: E402

NS = (5, 10)
WEIGHTS = (0.5, 1.0, 2.0)
FORMS = ("upr", "chat")
SETS = ("a", "c", "a2", "c2", "b", "facts")


def pkey(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:16]


class Scorer:
    """Mean log-probability of a query's tokens given a prompt built from a passage."""

    def __init__(self, model, tok, cache: dict):
        self.model, self.tok, self.cache = model, tok, cache

    def prefix(self, form: str, passage: str) -> list[int]:
        if form == "upr":
            return self.tok(f"Passage: {passage.strip()}\nPlease write a question based on this passage.\nQuestion:")["input_ids"]
        msgs = [{"role": "user", "content": f"Passage: {passage.strip()}\n\nWrite a question that this passage answers."}]
        text = self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def cont(self, form: str, query: str) -> list[int]:
        return self.tok((" " if form == "upr" else "") + query.strip(), add_special_tokens=False)["input_ids"]

    def fill(self, form: str, pairs: dict[str, set]) -> int:
        """Score every (passage text -> queries) pair not yet cached; returns how many were run."""
        import torch

        c = self.cache.setdefault(form, {})
        done = 0
        with torch.inference_mode():
            for passage, queries in pairs.items():
                pk = pkey(passage)
                todo = [q for q in sorted(queries) if pk not in c.get(q, {})]
                if not todo:
                    continue
                pre = self.prefix(form, passage)
                out = self.model(torch.tensor([pre]), use_cache=True, logits_to_keep=1)
                kv, last = out.past_key_values, out.logits[0, -1]
                for q in todo:
                    ids = self.cont(form, q)
                    o = self.model(torch.tensor([ids]), past_key_values=kv, use_cache=True)
                    logits = torch.cat([last[None], o.logits[0, :-1]]).float()
                    lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids)[:, None]).mean().item()
                    c.setdefault(q, {})[pk] = lp
                    kv.crop(-len(ids))  # transformers 5: a negative count drops that many tokens
                    done += 1
        return done

    def batch(self, form: str, query: str, passages: list[str]) -> list[float]:
        """From scratch: the N prompts + query in one right-padded batch (what a search would run)."""
        import torch

        ids = self.cont(form, query)
        seqs = [self.prefix(form, p) for p in passages]
        L = max(len(s) for s in seqs) + len(ids)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        x = torch.full((len(seqs), L), pad)
        m = torch.zeros((len(seqs), L), dtype=torch.long)
        for i, s in enumerate(seqs):
            x[i, : len(s) + len(ids)] = torch.tensor(s + ids)
            m[i, : len(s) + len(ids)] = 1
        with torch.inference_mode():
            logits = self.model(x, attention_mask=m).logits.float()
        out = []
        t = torch.tensor(ids)
        for i, s in enumerate(seqs):
            lg = logits[i, len(s) - 1 : len(s) - 1 + len(ids)]
            out.append(torch.log_softmax(lg, -1).gather(1, t[:, None]).mean().item())
        return out


def z(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std() + 1e-9) if len(x) > 1 else x * 0


def candidates(h, q: str, n: int) -> tuple[list[int], np.ndarray]:
    s = fusion.zscore(h, q, h.vecs @ h.qvec(q))
    top = [int(i) for i in np.argsort(-s, kind="stable")[:n] if np.isfinite(s[i])]
    return top, s[top]


def make_fn(h, scores: dict, form: str, n: int, w: float | None):
    """w None: the model's score alone on the top n; else z(hybrid) + w z(llm)."""
    def fn(q: str) -> np.ndarray:
        top, hs = candidates(h, q, n)
        ls = np.array([scores[form][q][pkey(h.passages[i].text)] for i in top])
        final = ls if w is None else z(hs) + w * z(ls)
        out = np.full(h.n, -np.inf)
        out[top] = final
        return out
    return fn


def ceiling_fn(h, n: int):
    """Is a right passage among the hybrid's top n (what any reranker of n can reach)."""
    def fn(q: str) -> np.ndarray:
        top, _ = candidates(h, q, n)
        out = np.full(h.n, -np.inf)
        out[top] = 0.0
        return out
    return fn


def ceiling(h, qs, n) -> dict:
    out: dict = {}
    for x in qs:
        top, _ = candidates(h, x["query"], n)
        if "answer" in x:
            ok = any(x["answer"] in h.passages[i].text for i in top)
        else:
            ok = any(int(h.entry[i]) == x["entry"] for i in top)
        r = out.setdefault(x["set"], [0, 0, 0])
        r[0], r[1], r[2] = r[0] + ok, r[1] + ok, r[2] + 1
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/retrieval"))
    p.add_argument("--name", default="rerank")
    p.add_argument("--forms", nargs="*", default=list(FORMS), choices=FORMS)
    p.add_argument("--no-facts", action="store_true", help="skip the 16k facts history")
    p.add_argument("--timed", type=int, default=8, help="(a) queries timed from scratch per N and form")
    a = p.parse_args()

    import torch

    torch.set_num_threads(1)
    from memory_plugin import load_model
    from memory_plugin.testing import tiny_llama

    t0 = time.perf_counter()
    model, tok = load_model()
    tiny = tiny_llama(len(tok))
    a.out.mkdir(parents=True, exist_ok=True)
    cache_path = a.out / f"{a.name}-scores.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    sc = Scorer(model, tok, cache)

    items = retrieval_bench.quality_items("abc")
    mem = fusion.build(tiny, tok, [(x["kind"], x["text"]) for x in items])
    for i, x in enumerate(items):
        x["entry"] = i
    h = fusion.History(mem, tok)
    qs = [x for x in fusion.quality_queries(items, h) if x["set"] != "probe"]
    for x in qs[:: max(1, len(qs) // 10)]:  # the rebuilt hybrid ranking is retrieve()'s
        got = [(hit.start, hit.end) for hit in mem.retrieve(x["query"], k=fusion.K)]
        top, _ = candidates(h, x["query"], fusion.K)
        assert got == [(h.passages[i].start, h.passages[i].end) for i in top], x["query"]
    groups = [(h, qs)]
    if not a.no_facts:
        facts = recall_bench.make_facts(20, 0)
        budget = 16384 - sum(recall_bench.n_tokens(tok, f["fact"]) + 2 for f in facts)
        pieces = recall_bench.plant(tok, recall_bench.prose(tok, budget), facts, recall_bench.depths(len(facts)))
        mem2 = fusion.build(tiny, tok, [("text", x["fact"] + "\n\n" if isinstance(x, dict) else x) for x in pieces])
        h2 = fusion.History(mem2, tok)
        groups.append((h2, [{"set": "facts", "query": q, "answer": f["answer"]}
                            for f in facts for q in (f["question"], f["prompt"])]))
    t_build = time.perf_counter() - t0
    res: dict = {"k": fusion.K, "ns": NS, "weights": WEIGHTS, "forms": a.forms, "tokens": len(mem),
                 "passages": h.n, "build_s": round(t_build), "table": {}, "timing": {}, "fill": {}}

    # every (passage, query) pair among the top max(NS), scored once per form
    for form in a.forms:
        t = time.perf_counter()
        n_run = 0
        for hh, qq in groups:
            pairs: dict = {}
            for x in qq:
                for i in candidates(hh, x["query"], max(NS))[0]:
                    pairs.setdefault(hh.passages[i].text, set()).add(x["query"])
            n_run += sc.fill(form, pairs)
        cache_path.write_text(json.dumps(cache))
        res["fill"][form] = {"pairs_run": n_run, "seconds": round(time.perf_counter() - t, 1)}
        print(form, res["fill"][form], flush=True)

    # seconds per query from scratch, and the cached path's agreement
    timed = [x for x in qs if x["set"] == "a"][: a.timed]
    for form in a.forms:
        for n in NS:
            secs, diff = [], 0.0
            for x in timed:
                top, _ = candidates(h, x["query"], n)
                texts = [h.passages[i].text for i in top]
                t = time.perf_counter()
                got = sc.batch(form, x["query"], texts)
                secs.append(time.perf_counter() - t)
                diff = max(diff, max(abs(g - cache[form][x["query"]][pkey(s)]) for g, s in zip(got, texts)))
            res["timing"][f"{form} N={n}"] = {"s_per_query": round(float(np.median(secs)), 3),
                                              "mean_s": round(float(np.mean(secs)), 3),
                                              "max_abs_diff_vs_cached": diff, "queries": len(timed)}
            print(form, n, res["timing"][f"{form} N={n}"], flush=True)

    def add_row(name, fns_by_group):
        row: dict = {}
        for (hh, qq), fn in zip(groups, fns_by_group):
            row.update(fusion.score(hh, fn, qq))
        res["table"][name] = row

    add_row("hybrid z-score (default)", [lambda q, hh=hh: fusion.zscore(hh, q, hh.vecs @ hh.qvec(q)) for hh, _ in groups])
    for n in NS:
        res["table"][f"ceiling: a right passage in the hybrid's top {n}"] = {
            k: v for hh, qq in groups for k, v in ceiling(hh, qq, n).items()}
    for form in a.forms:
        for n in NS:
            add_row(f"{form}, N={n}: model score alone", [make_fn(hh, cache, form, n, None) for hh, _ in groups])
            for w in WEIGHTS:
                add_row(f"{form}, N={n}: z(hybrid) + {w:g} z(model)", [make_fn(hh, cache, form, n, w) for hh, _ in groups])

    # which (a) and (c) queries the best rows fix or break
    label = {x["entry"]: x["label"] for x in items}
    changes = []
    for form in a.forms:
        for n in NS:
            fn = make_fn(h, cache, form, n, None)
            for x in qs:
                if x["set"] not in ("a", "c", "a2", "c2"):
                    continue
                base = int(h.entry[candidates(h, x["query"], 1)[0][0]])
                new = int(h.entry[int(np.argmax(fn(x["query"])))])
                if (base == x["entry"]) != (new == x["entry"]):
                    changes.append({"form": form, "n": n, "set": x["set"], "expected": label[x["entry"]],
                                    "hybrid": label[base], "reranked": label[new], "query": x["query"]})
    res["changes_model_alone"] = changes
    res["seconds"] = round(time.perf_counter() - t0)
    (a.out / f"{a.name}.json").write_text(json.dumps(res, indent=1))
    md = report(res)
    (a.out / f"{a.name}.md").write_text(md)
    print(md)


def report(res: dict) -> str:
    first = res["table"]["hybrid z-score (default)"]
    sets = [s for s in SETS if s in first]
    lines = [f"Rerank (UPR, SmolLM2-135M-Instruct) of the hybrid's top N: quality history {res['tokens']} tokens "
             f"({res['passages']} passages); top-1 / top-3 of {res['k']} (ceiling rows: right passage among the N).", "",
             "| variant | " + " | ".join(f"{s} (of {first[s][2]})" for s in sets) + " |", "|---|" + "---|" * len(sets)]
    for n, by in res["table"].items():
        lines.append(f"| {n} | " + " | ".join(f"{by[s][0]} / {by[s][1]}" if s in by else "-" for s in sets) + " |")
    lines += ["", "Seconds per query, from scratch (N prompts + query, one padded batch, one thread), median over "
              "the first (a) queries:", "", "| form, N | s/query (median) | mean | max |score - cached score| |",
              "|---|---|---|---|"]
    for k, v in res["timing"].items():
        lines.append(f"| {k} | {v['s_per_query']} | {v['mean_s']} | {v['max_abs_diff_vs_cached']:.2g} |")
    lines += ["", "Top-1 changes of the model score alone against the hybrid (sets a, c, a2, c2):", ""]
    for c in res["changes_model_alone"]:
        ok = "fixed" if c["reranked"] == c["expected"] else "broken"
        lines.append(f"* {c['form']} N={c['n']} ({c['set']}) {ok}: {c['expected']}: {c['query']} -> hybrid "
                     f"{c['hybrid']}, reranked {c['reranked']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
