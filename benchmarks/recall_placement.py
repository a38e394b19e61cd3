"""What recall placed before each question of ``benchmarks/recall.py`` (issue 17), and what a
placement rule other than "top ``recall_k``" would have placed, on a memory saved by its
``--memory-dir``. Does not edit memory_plugin: it calls ``memory_plugin.recall.search`` / ``place``
on the saved memory and reads the answers of a recall.py run.

    # the passages and their fused scores, for every question (one hybrid search each)
    python benchmarks/recall_placement.py scores --memory /tmp/h17/mem/65536-20-0 --out benchmarks/results/recall-20-64k-top3
    # per question: placed facts, right or wrong, where a wrong number came from; rules simulated
    python benchmarks/recall_placement.py analyse --out benchmarks/results/recall-20-64k-top3 \
        --ceiling benchmarks/results/recall-20-64k/recall.json

A rule that places a prefix of the ranking (a score cut) is simulated without generating: greedy
decoding is deterministic, so placing the top j gives the answer of the ``hybrid@j`` cell.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recall import make_facts  # noqa: E402

DEPTH = 11  # hits ranked per question (place() searches k + 8 = 11 for k = 3)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def which(text: str, facts: list[dict]) -> int | None:
    """Index of the planted fact a passage holds (its number), None for prose."""
    return next((i for i, f in enumerate(facts) if f["answer"] in text), None)


def scores(a) -> None:
    import torch

    torch.set_num_threads(1)
    from memory_plugin import ContextMemory, load_model
    from memory_plugin import recall as R

    model, tok = load_model()
    mem = ContextMemory.load(a.memory, model, tokenizer=tok)
    eng = mem._engine
    facts = make_facts(a.facts, a.seed)
    out = {"memory": str(a.memory), "tokens": len(mem), "facts": facts, "rows": []}
    for i, f in enumerate(facts):
        for style, q in (("chat", f["question"]), ("completion", f["prompt"])):
            t = time.perf_counter()
            hits = R.search(eng, q, DEPTH, "hybrid")
            placed = R.place(eng, q, 3)
            out["rows"].append({
                "fact": i, "answer": f["answer"], "style": style, "search_s": round(time.perf_counter() - t, 2),
                "hits": [{"fact": which(h.text, facts), "score": round(h.score, 3), "start": h.start, "end": h.end,
                          "channels": list(h.channels), "text": h.text[:160]} for h in hits],
                "placed": [{"fact": which(h.text, facts), "score": round(h.score, 3), "start": h.start} for h in placed],
            })
            log(f"fact {i} {style}: " + ", ".join(f"{h['fact']}:{h['score']}" for h in out["rows"][-1]["hits"][:4]))
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "placement.json").write_text(json.dumps(out, indent=1))
    if not a.recall:
        return
    # hybrid@k cells as recall.py writes them (its ask() without the extra top-3 search per row:
    # placement.json holds each question's ranking), on the same memory
    from recall import STYLES, cell, save

    res = {"seed": a.seed, "facts": facts, "lengths": [a.length], "methods": [f"hybrid@{k}" for k in a.recall],
           "cells": [], "memory": str(a.memory), "by": "benchmarks/recall_placement.py scores --recall"}
    where = json.loads((a.memory / "where.json").read_text())[0]
    for k in a.recall:
        rows = []
        for f, d in zip(facts, where):
            for style in STYLES:
                t = time.perf_counter()
                ans = mem.generate(f["question"] if style == "chat" else f["prompt"], recall=k, **STYLES[style])
                secs = time.perf_counter() - t
                if style == "completion":
                    ans = next((line for line in ans.split("\n") if line.strip()), "")
                rows.append({"fact": f["answer"], "depth": round(d, 3), "style": style, "answer": ans,
                             "correct": f["answer"] in ans, "seconds": round(secs, 3)})
                log(f"hybrid@{k} fact {f['answer']} {style}: {rows[-1]['correct']} {ans[:70]!r}")
            # saved after each fact: a run cut short keeps a partial cell (its n says how many)
            res["cells"] = [c for c in res["cells"] if c["method"] != f"hybrid@{k}"] + [cell(f"hybrid@{k}", a.length, len(mem), 0.0, rows)]
            save(res, a.out)


def analyse(a) -> None:
    res = json.loads((a.out / "recall.json").read_text())
    pl = json.loads((a.out / "placement.json").read_text()) if (a.out / "placement.json").exists() else None
    facts = res["facts"]
    num = {f["answer"]: i for i, f in enumerate(facts)}
    cells = {c["method"]: c for c in res["cells"]}
    if a.ceiling:
        for c in json.loads(Path(a.ceiling).read_text())["cells"]:
            cells.setdefault(c["method"], c)
    ks = sorted(int(m.split("@")[1]) for m in cells if m.startswith("hybrid@"))
    rows = {}
    if a.ceiling:  # an earlier run's rows, overlaid by this run's (a cell cut short keeps the rest)
        rows = {(c["method"], r["fact"], r["style"]): r for c in json.loads(Path(a.ceiling).read_text())["cells"] for r in c["rows"]}
    rows.update({(m, r["fact"], r["style"]): r for m, c in cells.items() for r in c["rows"]})
    prow = {(facts[r["fact"]]["answer"], r["style"]): r for r in pl["rows"]} if pl else {}
    report, table = [], []
    for style in ("chat", "completion"):
        report += [f"### {style}", "",
                   "| fact | ceiling | " + " | ".join(f"@{k}" for k in ks) + " | top-3 (fact index, * = asked) | fused scores | wrong answer's number from |",
                   "|---|---|" + "---|" * len(ks) + "---|---|---|"]
        for i, f in enumerate(facts):
            n = f["answer"]
            ceil = rows.get(("ceiling", n, style))
            per = {k: rows.get((f"hybrid@{k}", n, style)) for k in ks}
            any_row = next((r for r in per.values() if r and "top3" in r), None)
            p = prow.get((n, style))
            top3 = [h["fact"] for h in p["hits"][:3]] if p else [which(t, facts) for t in any_row["top3"]] if any_row else []
            sc = [h["score"] for h in p["hits"][:3]] if p else []
            src = []
            for k, r in per.items():
                if r is None or r["correct"]:
                    continue
                got = [x for x in re.findall(r"\d{5}", r["answer"]) if x in num and x != n]
                if not got:
                    src.append(f"@{k}: no planted number")
                    continue
                j = num[got[0]]
                if p:  # what place() returns (a prefix: its search ranks the same for any k)
                    placed = [h["fact"] for h in p["placed"][:k]]
                elif "top3" in r:
                    placed = [which(t, facts) for t in r["top3"][:k]]
                else:
                    src.append(f"@{k}: fact {j} (placed: unknown)")
                    continue
                src.append(f"@{k}: fact {j} ({'placed' if j in placed else 'NOT placed: memory'})")
            mark = lambda b: "-" if b is None else ("✓" if b["correct"] else "✗")  # noqa: E731
            fmt = ["*" if x == i else ("p" if x is None else str(x)) for x in top3]
            report.append(f"| {i} | {mark(ceil)} | " + " | ".join(mark(per[k]) for k in ks) +
                          f" | {' '.join(fmt)} | {' '.join(f'{s:.2f}' for s in sc)} | {'; '.join(src)} |")
            table.append({"fact": i, "style": style, "ceiling": ceil and ceil["correct"],
                          **{f"hybrid@{k}": per[k] and per[k]["correct"] for k in ks},
                          "top3": top3, "scores": sc, "wrong_from": src,
                          "answers": {f"hybrid@{k}": per[k] and per[k]["answer"] for k in ks}})
        report.append("")
    # prefix rules, simulated from the hybrid@j answers: place j = how many of the top 3 pass the rule
    if pl:
        report += ["### Placement rules simulated (answer of hybrid@j where the rule places j)", "",
                   "| rule | chat | completion | placed (mean) | undecided (hybrid@j not run) |", "|---|---|---|---|---|"]
        rules = {f"top {k}": (lambda s, k=k: k) for k in ks}
        for ratio in (0.5, 0.6, 0.7, 0.8, 0.9):
            rules[f"score >= {ratio} x best"] = lambda s, r=ratio: max(1, sum(1 for x in s[:3] if x >= r * s[0]))
        for gap in (0.5, 1.0, 1.5):
            rules[f"drop after a gap > {gap}"] = lambda s, g=gap: next((j for j in range(1, len(s[:3])) if s[j - 1] - s[j] > g), len(s[:3]))
        rules["rank 1, then only hits the lexical channel also found (prefix)"] = "lexical"
        for name, rule in rules.items():
            got, n_placed, undecided = {"chat": 0, "completion": 0}, [], 0
            for style in ("chat", "completion"):
                for f in facts:
                    p = prow.get((f["answer"], style))
                    placed = [h["score"] for h in p["placed"]] if p else []
                    if rule == "lexical":  # a non-prefix choice is counted as undecided
                        lex = ["lexical" in h["channels"] for h in p["hits"][1:3]]
                        j = 1 + (lex[0] + (lex[0] and lex[1]))
                        if lex[1] and not lex[0]:
                            j = None
                    else:
                        j = min(rule(placed), len(placed)) if placed else 0
                    r = None if j is None else rows.get((f"hybrid@{j}", f["answer"], style)) if j else rows.get(("contextmemory", f["answer"], style))
                    n_placed.append(j or 0)
                    if r is None:
                        undecided += 1
                    else:
                        got[style] += r["correct"]
            report.append(f"| {name} | {got['chat']}/{len(facts)} | {got['completion']}/{len(facts)} | "
                          f"{sum(n_placed) / len(n_placed):.2f} | {undecided} |")
    (a.out / "placement.md").write_text("\n".join(report) + "\n")
    (a.out / "placement-rows.json").write_text(json.dumps(table, indent=1))
    print("\n".join(report))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("scores", "analyse"))
    p.add_argument("--memory", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--ceiling", help="a recall.json with the ceiling (and contextmemory) cells")
    p.add_argument("--facts", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--length", type=int, default=65536)
    p.add_argument("--recall", type=int, nargs="*", default=[], help="scores: then answer every question with recall=k")
    a = p.parse_args()
    scores(a) if a.what == "scores" else analyse(a)


if __name__ == "__main__":
    main()
