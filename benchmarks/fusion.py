"""How should ``retrieve(mode="hybrid")`` fuse its channels? A sweep of fusions and channel
variants on the retrieval benchmark's query sets, without the language model (issue 17, item 4).

The lexical (FTS5 BM25) and semantic (WordLlama) channels read only the passages' text, and the
passages depend only on the tokenizer and ``block_size``: a memory built on a 2-layer random
Llama with the embedded tokenizer (``memory_plugin.testing.tiny_llama``) has the same passages as
one built on the embedded model, in seconds instead of ~10 minutes. The script rebuilds the
channels from the memory's public entries and tokens (``lexical.entry_passages`` and a
``LexicalIndex``, as the memory does) and checks that the default fusion gives the same top-k as
``ContextMemory.retrieve``.

Sets: decide on (a) topics and (c) paraphrases of ``benchmarks/retrieval.py``; confirm on its
dev sets (a2), (c2), on (b) rare-name memos, and on:

* ``probe``: every capitalised word or word with a digit of the (b), (c), (c2) entries that occurs
  in exactly one passage (a name said once), asked three ways ("What do you know about {w}?",
  "Remind me what happened with {w}.", "{w}"); right when the top hit is its entry;
* ``facts``: the 20 facts of ``benchmarks/recall.py`` (``--facts 20``) in its 16k history, asked as
  its chat questions and completion prompts; right when the fact's number is in the hit;
* ``memo@N`` (``--scale``): the (b) memos among the scale corpus's look-alike memos of
  ``benchmarks/retrieval.py`` grown to N tokens.

Top-1 (and top-3) per set, as ``retrieve(k=3)`` counts them (a hit is a passage; right when it lies
in the query's entry).

    python benchmarks/fusion.py --out benchmarks/results/retrieval --name fusion
    python benchmarks/fusion.py --scale 10000 1000000 --out benchmarks/results/retrieval --name fusion-scale
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import sqlite3
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import recall as recall_bench  # noqa: E402
import retrieval as retrieval_bench  # noqa: E402

K = retrieval_bench.K
DEPTH = 50  # hits per channel that take part in a fusion, as retrieval.CHANNEL_DEPTH
PROBE_TEMPLATES = ("What do you know about {w}?", "Remind me what happened with {w}.", "{w}")


# ------------------------------------------------------------------------------------------ histories
class History:
    """A memory's passages and its two channels, rebuilt from its public entries and tokens."""

    def __init__(self, mem, tok):
        from memory_plugin.lexical import LexicalIndex, entry_passages
        from memory_plugin.semantic import default_embedder

        self.mem, self.embedder = mem, default_embedder()
        ids = mem.token_ids
        items = [(i, e.content, entry_passages(i, e, ids[e.start : e.end], tok, mem.config.block_size))
                 for i, e in enumerate(mem.entries)]
        self.index = LexicalIndex(embedder=self.embedder)
        self.index.add(items)
        self.passages = [p for _, _, ps in items for p in ps]
        self.key = {(p.start, p.end): i for i, p in enumerate(self.passages)}
        self.n = len(self.passages)
        # as the index stores them (float16), so plain cosine here ranks as search_semantic does
        self.vecs = self.embedder([p.text for p in self.passages]).astype(np.float16).astype(np.float32)
        self.entry = np.array([p.entry for p in self.passages])
        self._cache: dict = {}
        self._bm25 = None

    def lexical(self, q: str) -> dict[int, float]:
        """Passage -> BM25 (FTS5, higher is better), the channel's top ``DEPTH``."""
        if ("lex", q) not in self._cache:
            self._cache["lex", q] = {self.key[p.start, p.end]: s for p, s in self.index.search(q, DEPTH)}
        return self._cache["lex", q]

    def qvec(self, q: str) -> np.ndarray:
        if ("vec", q) not in self._cache:
            self._cache["vec", q] = self.embedder([q])[0]
        return self._cache["vec", q]

    def max_bm25(self, q: str, k1: float = 1.2) -> float:
        """The BM25 a passage would get if it held every query word (as FTS5's query keeps them)
        with saturated frequency: ``sum (k1 + 1) idf``; words absent from the history count."""
        from memory_plugin.lexical import fts_query

        fq = fts_query(q)
        if fq is None:
            return 1.0
        total = 0.0
        for w in re.findall(r'"([^"]+)"', fq):
            sql = "SELECT count(*) FROM passages_fts WHERE passages_fts MATCH ?"
            n = self.index.db.execute(sql, (f'"{w}"',)).fetchone()[0]
            total += (k1 + 1) * max(1e-6, math.log((self.n - n + 0.5) / (n + 0.5)))
        return total or 1.0

    def context_vecs(self, mix: float) -> np.ndarray:
        """Passage vectors with their entry's context: a piece of a longer entry is embedded after
        the entry's first line (a document's title), then mixed ``mix`` with the entry's mean."""
        if ("ctx", mix) not in self._cache:
            first = {}
            for p in self.passages:
                first.setdefault(p.entry, p.text.strip().split("\n")[0][:100])
            texts = [p.text if p.text.startswith(first[p.entry]) else first[p.entry] + "\n" + p.text
                     for p in self.passages]
            v = self.embedder(texts).astype(np.float32)
            mean = np.zeros_like(v)
            for e in np.unique(self.entry):
                m = v[self.entry == e].mean(0)
                mean[self.entry == e] = m / np.linalg.norm(m)
            v = (1 - mix) * v + mix * mean
            self._cache["ctx", mix] = v / np.linalg.norm(v, axis=1, keepdims=True)
        return self._cache["ctx", mix]

    def own_bm25(self, q: str, k1: float, b: float) -> np.ndarray:
        """BM25 with other parameters than FTS5's fixed k1=1.2, b=0.75, over the same stemmed terms."""
        if self._bm25 is None:
            db = self.index.db
            db.execute("CREATE VIRTUAL TABLE IF NOT EXISTS temp.fusion_vocab "
                       "USING fts5vocab(main, passages_fts, 'instance')")
            rows = db.execute("SELECT rowid FROM passages_fts ORDER BY rowid")
            rowid = {r: i for i, (r,) in enumerate(rows)}
            tf: dict = collections.defaultdict(collections.Counter)
            dl = collections.Counter()
            for term, doc in db.execute("SELECT term, doc FROM temp.fusion_vocab"):
                tf[term][rowid[doc]] += 1
                dl[rowid[doc]] += 1
            q_db = sqlite3.connect(":memory:")
            q_db.execute("CREATE VIRTUAL TABLE q USING fts5(text, tokenize='porter unicode61 remove_diacritics 2')")
            q_db.execute("CREATE VIRTUAL TABLE qv USING fts5vocab(q, 'row')")
            self._bm25 = (tf, dl, sum(dl.values()) / max(1, len(dl)), q_db)
        tf, dl, avg, q_db = self._bm25
        from memory_plugin.lexical import fts_query

        q_db.execute("DELETE FROM q")
        q_db.execute("INSERT INTO q VALUES (?)", (" ".join(re.findall(r'"([^"]+)"', fts_query(q) or "")),))
        s = np.full(self.n, -np.inf)
        for (term,) in q_db.execute("SELECT term FROM qv"):
            n = len(tf[term])
            if n == 0:
                continue
            idf = max(1e-6, math.log((self.n - n + 0.5) / (n + 0.5)))
            for d, c in tf[term].items():
                s[d] = max(s[d], 0.0) + idf * c * (k1 + 1) / (c + k1 * (1 - b + b * dl[d] / avg))
        return s


def build(model, tok, pieces) -> object:
    """A memory of the tiny model holding ``pieces`` (``(kind, text)``, kind "user" or "text")."""
    from memory_plugin import ContextMemory

    mem = ContextMemory(model, tok)
    for kind, text in pieces:
        mem.add_message("user", text) if kind == "user" else mem.add_text(text)
    return mem


def quality_queries(items: list[dict], h: History) -> list[dict]:
    """The (a)-(c2) queries of benchmarks/retrieval.py and the rare-word probes; ``entry`` is the
    right entry."""
    qs = [{"set": x["set"], "query": x["query"], "entry": x["entry"]} for x in items if x["asked"]]
    qs += [{"set": "a2", "query": retrieval_bench.TOPICS2[x["label"]], "entry": x["entry"]} for x in items
           if x["asked"] and x["set"] == "a"]
    df = collections.Counter(w for p in h.passages for w in set(re.findall(r"\w+", p.text.lower())))
    for x in items:
        if x["set"] == "a":
            continue
        for w in dict.fromkeys(re.findall(r"\b[A-Z][a-z]+\b|\b\w+-\d+\b", x["text"])):
            if all(df[part] == 1 for part in re.findall(r"\w+", w.lower())):
                qs += [{"set": "probe", "query": t.format(w=w), "entry": x["entry"]} for t in PROBE_TEMPLATES]
    return qs


# ------------------------------------------------------------------------------------------ variants
def zscore(h: History, q: str, sem: np.ndarray, w_lex: float = 1.0) -> np.ndarray:
    """retrieval.fuse's "zscore" on these channels (semantic scores ``sem`` over all passages),
    the lexical channel weighted ``w_lex``."""
    top = np.argsort(-sem, kind="stable")[:DEPTH]
    lex = h.lexical(q)
    keys = sorted(set(top.tolist()) | set(lex))
    floor, in_top = sem[top[-1]], set(top.tolist())
    xs = np.array([sem[k] if k in in_top else floor for k in keys])
    total = (xs - xs.mean()) / (xs.std() + 1e-9) if len(xs) > 1 else xs
    if lex:
        xl = np.array([lex.get(k, 0.0) for k in keys])
        total = total + w_lex * ((xl - xl.mean()) / (xl.std() + 1e-9) if len(xl) > 1 else xl)
    out = np.full(h.n, -np.inf)
    out[keys] = total
    return out


def rrf(h: History, q: str, sem: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros(h.n)
    lex = h.lexical(q)
    for r, i in enumerate(sorted(lex, key=lambda i: -lex[i]), 1):
        out[i] += 1 / (k + r)
    for r, i in enumerate(np.argsort(-sem, kind="stable")[:DEPTH], 1):
        out[i] += 1 / (k + r)
    out[out == 0] = -np.inf
    return out


def convex(h: History, q: str, sem: np.ndarray, alpha: float) -> np.ndarray:
    """``(1 - alpha) cosine + alpha BM25 / max_bm25(query)``: BM25 as the share of what a passage
    holding every query word would score, so a partial match of a common word counts little."""
    out = (1 - alpha) * sem
    mx = h.max_bm25(q)
    for i, s in h.lexical(q).items():
        out[i] += alpha * s / mx
    return out


def names_something(q: str) -> bool:
    """Whether a query names something: a word with a digit, or a capitalised word that does not
    start a sentence (not "I").

    >>> names_something("What did Ximena Abernethy replace?"), names_something("What kind of car do I own?")
    (True, False)
    """
    toks = q.split()
    for i, t in enumerate(toks):
        w = t.strip("\"'.,;:!?()[]")
        if not w or w == "I":
            continue
        if any(c.isdigit() for c in w) or (i and w[0].isupper() and not toks[i - 1].endswith((".", "?", "!"))):
            return True
    return False


def variants(h: History) -> dict:
    """name -> scores(query) over all passages."""
    cos = lambda q: h.vecs @ h.qvec(q)  # noqa: E731
    ctx = lambda q: h.context_vecs(0.4) @ h.qvec(q)  # noqa: E731

    def lexical(q):
        out = np.full(h.n, -np.inf)
        for i, s in h.lexical(q).items():
            out[i] = s
        return out

    def dims(d):
        v = h.vecs[:, :d] / np.linalg.norm(h.vecs[:, :d], axis=1, keepdims=True)
        return lambda q: v @ (h.qvec(q)[:d] / np.linalg.norm(h.qvec(q)[:d]))

    def feedback(q, m=10, beta=0.6):  # pseudo-relevance feedback (Rocchio): the query moved toward its top m
        v = h.qvec(q)
        top = np.argsort(-(h.vecs @ v))[:m]
        return h.vecs @ (v + beta * h.vecs[top].mean(0))

    return {
        "lexical (FTS5 BM25, k1=1.2 b=0.75)": lexical,
        "lexical, BM25 k1=1.2 b=0.3": lambda q: h.own_bm25(q, 1.2, 0.3),
        "lexical, BM25 k1=0.9 b=0.5": lambda q: h.own_bm25(q, 0.9, 0.5),
        "semantic (WordLlama 256)": cos,
        "semantic, first 128 dims": dims(128),
        "semantic, first 64 dims": dims(64),
        "semantic + entry context": ctx,
        "semantic, query + 0.6 x mean of its top 10": feedback,
        "hybrid z-score (default)": lambda q: zscore(h, q, cos(q)),
        "hybrid RRF k=60": lambda q: rrf(h, q, cos(q), 60),
        "hybrid RRF k=5": lambda q: rrf(h, q, cos(q), 5),
        "hybrid z-score, lexical x0.5": lambda q: zscore(h, q, cos(q), 0.5),
        "hybrid convex 0.2": lambda q: convex(h, q, cos(q), 0.2),
        "hybrid convex 0.4": lambda q: convex(h, q, cos(q), 0.4),
        "ctx: hybrid z-score": lambda q: zscore(h, q, ctx(q)),
        "ctx: hybrid z-score, lexical x0.5": lambda q: zscore(h, q, ctx(q), 0.5),
        "ctx: hybrid convex 0.2": lambda q: convex(h, q, ctx(q), 0.2),
        "ctx: z-score, lexical x1 if the query names something, else x0.2":
            lambda q: zscore(h, q, ctx(q), 1.0 if names_something(q) else 0.2),
        "ctx: z-score, lexical x1 if the query names something, else x0.3":
            lambda q: zscore(h, q, ctx(q), 1.0 if names_something(q) else 0.3),
    }


def score(h: History, fn, qs: list[dict]) -> dict:
    """set -> [top-1, top-3, n]."""
    out: dict = {}
    for x in qs:
        s = fn(x["query"])
        top = [i for i in np.argsort(-s, kind="stable")[:K] if np.isfinite(s[i])]
        if "answer" in x:
            ok1 = bool(top) and x["answer"] in h.passages[top[0]].text
            ok3 = any(x["answer"] in h.passages[i].text for i in top)
        else:
            ents = [int(h.entry[i]) for i in top]
            ok1, ok3 = bool(ents) and ents[0] == x["entry"], x["entry"] in ents
        r = out.setdefault(x["set"], [0, 0, 0])
        r[0], r[1], r[2] = r[0] + ok1, r[1] + ok3, r[2] + 1
    return out


def first_misses(h: History, qs: list[dict], names: list[str], fns: dict, label: dict) -> list[dict]:
    """Queries of (a) and (c) that none of ``names`` ranks first."""
    out = []
    for x in qs:
        if x["set"] not in ("a", "c"):
            continue
        tops = {n: int(h.entry[int(np.argmax(fns[n](x["query"])))]) for n in names}
        if all(t != x["entry"] for t in tops.values()):
            out.append({"set": x["set"], "expected": label[x["entry"]], "query": x["query"],
                        **{n: label.get(t) for n, t in tops.items()}})
    return out


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=int, nargs="*", default=[], help="also the memos among look-alikes at these lengths")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/retrieval"))
    p.add_argument("--name", default="fusion")
    a = p.parse_args()

    import torch

    torch.set_num_threads(1)
    from memory_plugin import load_model, retrieval
    from memory_plugin.testing import tiny_llama

    t0 = time.perf_counter()
    _, tok = load_model()
    model = tiny_llama(len(tok))
    res: dict = {"k": K, "depth": DEPTH, "sets": {}, "args": {"scale": a.scale}}

    # the quality history of benchmarks/retrieval.py
    items = retrieval_bench.quality_items("abc")
    mem = build(model, tok, [(x["kind"], x["text"]) for x in items])
    for i, x in enumerate(items):
        x["entry"] = i
    h = History(mem, tok)
    qs = quality_queries(items, h)
    fns = variants(h)
    # the rebuilt channels are the memory's: the default fusion's top-k equals retrieve()'s
    for x in qs[:: max(1, len(qs) // 40)]:
        got = [(hit.start, hit.end) for hit in mem.retrieve(x["query"], k=K)]
        s = fns["hybrid z-score (default)"](x["query"])
        mine = [(h.passages[i].start, h.passages[i].end) for i in np.argsort(-s, kind="stable")[:K]]
        assert got == mine or retrieval.FUSION != "zscore", (x["query"], got, mine)
    res["tokens"], res["passages"] = len(mem), h.n
    res["table"] = {n: score(h, fn, qs) for n, fn in fns.items()}
    label = {x["entry"]: x["label"] for x in items}
    res["no_channel_first"] = first_misses(h, qs, ["lexical (FTS5 BM25, k1=1.2 b=0.75)", "semantic (WordLlama 256)",
                                                   "semantic + entry context"], fns, label)
    by_query = {x["query"]: x for x in qs}
    for r in res["no_channel_first"]:  # does any variant rank them first?
        x = by_query[r["query"]]
        r["ranked_first_by"] = [n for n, fn in fns.items() if int(h.entry[int(np.argmax(fn(x["query"])))]) == x["entry"]]

    # the 20 facts of benchmarks/recall.py in its 16k history
    facts = recall_bench.make_facts(20, 0)
    length = 16384
    budget = length - sum(recall_bench.n_tokens(tok, f["fact"]) + 2 for f in facts)
    pieces = recall_bench.plant(tok, recall_bench.prose(tok, budget), facts, recall_bench.depths(len(facts)))
    mem2 = build(model, tok, [("text", x["fact"] + "\n\n" if isinstance(x, dict) else x) for x in pieces])
    h2 = History(mem2, tok)
    fq = [{"set": "facts", "query": q, "answer": f["answer"]} for f in facts for q in (f["question"], f["prompt"])]
    for n, fn in variants(h2).items():
        res["table"][n].update(score(h2, fn, fq))
    res["facts_tokens"] = len(mem2)

    for length in sorted(a.scale):
        memos = {f"memo-{i}": m["query"] for i, m in enumerate(retrieval_bench.memos())}
        mem3 = build(model, tok, [])
        stream, where = retrieval_bench.scale_stream(tok, min(a.scale)), {}
        while len(mem3) < length:
            lab, text = next(stream)
            mem3.add_text(text)
            if lab.startswith("memo-"):
                where[lab] = len(mem3.entries) - 1
        h3 = History(mem3, tok)
        mq = [{"set": f"memo@{length}", "query": q, "entry": where[lab]} for lab, q in memos.items() if lab in where]
        for n, fn in variants(h3).items():
            res["table"][n].update(score(h3, fn, mq))
        res.setdefault("scale_tokens", {})[length] = len(mem3)
        mem3.close()

    res["seconds"] = round(time.perf_counter() - t0)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{a.name}.json").write_text(json.dumps(res, indent=1))
    md = report(res)
    (a.out / f"{a.name}.md").write_text(md)
    print(md)


def report(res: dict) -> str:
    sets = [s for s in ("a", "c", "a2", "c2", "b", "probe", "facts") if any(s in v for v in res["table"].values())]
    sets += sorted({s for v in res["table"].values() for s in v if s.startswith("memo@")}, key=lambda s: int(s[5:]))
    first = next(iter(res["table"].values()))
    lines = [f"Fusion sweep: quality history {res['tokens']} tokens ({res['passages']} passages), facts history "
             f"{res['facts_tokens']} tokens; top-1 / top-3 of {K}.", "",
             "| variant | " + " | ".join(f"{s} (of {first[s][2]})" for s in sets) + " |", "|---|" + "---|" * len(sets)]
    for n, by in res["table"].items():
        lines.append(f"| {n} | " + " | ".join(f"{by[s][0]} / {by[s][1]}" for s in sets) + " |")
    lines += ["", "Queries of (a) and (c) that no channel ranks first:", ""]
    for r in res["no_channel_first"]:
        tops = ", ".join(f"{k.split(' (')[0]}: {v}" for k, v in r.items()
                         if k not in ("set", "expected", "query", "ranked_first_by"))
        lines.append(f"* ({r['set']}) {r['expected']}: {r['query']} -> {tops}; ranked first by "
                     + (", ".join(r["ranked_first_by"]) or "no variant"))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
