"""Recall of facts with rare names and numbers planted in natural text (the Python documentation
topics of pydoc_data, shipped with CPython), on the embedded model: full attention,
ContextMemory as it is (recall=0) and ContextMemory with hybrid search + placement (recall=k for
each ``--recall`` k: the passages placed before the question),
asked as a chat question and as a completion prompt, against the model's own ceiling (each fact
alone in ~1k tokens of the same prose, full attention).

One history per length holds all the facts, at depths 0.05..0.95; contextmemory and hybrid share
its memory (only ``recall`` differs). A question is correct when its expected number is in the
answer.

    python benchmarks/recall.py --lengths 4096 16384 65536 --recall 1 3 --out benchmarks/results/recall
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
METHODS = ("ceiling", "full", "contextmemory", "hybrid")
FULL_MAX_LENGTH = 8192
CEILING_TOKENS = 1000
# The prose is hard-wrapped, so a completion often puts the number on the next line ("is\n73691."):
# no stop string, the answer is the first non-empty line. A chat answer restates the question first.
STYLES = {"chat": dict(chat=True, max_new_tokens=32), "completion": dict(chat=False, max_new_tokens=12)}

# (fact with {n}, chat question, completion prompt); names invented, numbers drawn per seed
TEMPLATES = [
    ("The backup generator in the Quillfeather annex was last serviced by technician Oriana Vesk; its asset tag is {n}.",
     "What is the asset tag of the backup generator in the Quillfeather annex?",
     "\nThe asset tag of the backup generator in the Quillfeather annex is"),
    ("Captain Idris Falloway registered the research vessel Moth of Varrow under permit number {n}.",
     "What is the permit number of the research vessel Moth of Varrow?",
     "\nThe permit number of the research vessel Moth of Varrow is"),
    ("The seed bank at Hollinsgrave Priory stores its rarest orchid samples in freezer {n}, kept by botanist Elspeth Carrow.",
     "Which freezer holds the rarest orchid samples of the seed bank at Hollinsgrave Priory?",
     "\nThe seed bank at Hollinsgrave Priory stores its rarest orchid samples in freezer"),
    ("Archivist Benedikt Sorrelby catalogued the Thornmere manuscripts as collection {n} of the Dunwhistle library.",
     "Under which collection number are the Thornmere manuscripts catalogued in the Dunwhistle library?",
     "\nThe Thornmere manuscripts are catalogued in the Dunwhistle library as collection"),
    ("The telescope at Mount Keswold Station is controlled from console {n}, which only engineer Priya Ostrand may reboot.",
     "Which console controls the telescope at Mount Keswold Station?",
     "\nThe telescope at Mount Keswold Station is controlled from console"),
    ("The water pump of the Grellingford mill was replaced in spring by Hamish Tolliver; the new pump has serial number {n}.",
     "What is the serial number of the new water pump of the Grellingford mill?",
     "\nThe serial number of the new water pump of the Grellingford mill is"),
    ("Locksmith Fenwick Aldane set the combination of the strongroom in the Ashcombe Exchange to {n}.",
     "What is the combination of the strongroom in the Ashcombe Exchange?",
     "\nThe combination of the strongroom in the Ashcombe Exchange is"),
    ("The orbital relay Zephyrine transmits its telemetry on channel {n}, as configured by Odalys Penhallow.",
     "On which channel does the orbital relay Zephyrine transmit its telemetry?",
     "\nThe orbital relay Zephyrine transmits its telemetry on channel"),
    ("The Marrowdale county clinic issued nurse Corentin Vayle the staff badge number {n}.",
     "What is the staff badge number of nurse Corentin Vayle?",
     "\nThe staff badge number of nurse Corentin Vayle is"),
    ("The glasshouse of the Istrelle botanical garden is heated by boiler {n}, inspected every year by Magnus Threlkeld.",
     "Which boiler heats the glasshouse of the Istrelle botanical garden?",
     "\nThe glasshouse of the Istrelle botanical garden is heated by boiler"),
]
# Ten more, written after the first ten had been used to choose defaults: a held-out half
# (``--facts 20``). make_facts keeps the first ten (and their numbers) as they were.
HELD_OUT = [
    ("Brewmaster Ottilie Fanshaw labelled the oldest cask in the Corrowdale cellar with lot number {n}.",
     "What lot number is on the oldest cask in the Corrowdale cellar?",
     "\nThe oldest cask in the Corrowdale cellar is labelled with lot number"),
    ("The lighthouse on Skerrigan Point keeps its spare lens in locker {n}, which keeper Aldous Renwick checks monthly.",
     "In which locker does the lighthouse on Skerrigan Point keep its spare lens?",
     "\nThe lighthouse on Skerrigan Point keeps its spare lens in locker"),
    ("Surveyor Ingrid Malvaney marked the northern boundary stone of Felbridge Common as stone {n}.",
     "Which number did the surveyor give the northern boundary stone of Felbridge Common?",
     "\nThe northern boundary stone of Felbridge Common was marked as stone"),
    ("The ferry Wren of Dallowmere sails under harbour licence {n}, renewed each spring by Captain Tobias Quarrie.",
     "What is the harbour licence of the ferry Wren of Dallowmere?",
     "\nThe ferry Wren of Dallowmere sails under harbour licence"),
    ("In the Ravensholt observatory, the star catalogue written by Cassia Windermere is shelved as volume {n}.",
     "As which volume is Cassia Windermere's star catalogue shelved in the Ravensholt observatory?",
     "\nIn the Ravensholt observatory, Cassia Windermere's star catalogue is shelved as volume"),
    ("The Pellucid Dam spillway gate opens with override code {n}, known only to engineer Rurik Haldane.",
     "What is the override code of the Pellucid Dam spillway gate?",
     "\nThe Pellucid Dam spillway gate opens with override code"),
    ("Beekeeper Mirela Oakhurst numbered the queen's hive at the Tansley apiary as hive {n}.",
     "Which number does the queen's hive at the Tansley apiary have?",
     "\nThe queen's hive at the Tansley apiary is numbered as hive"),
    ("The signal box at Gorsemoor Junction is reached by the telephone extension {n}, staffed by Wilfred Ambry.",
     "What telephone extension reaches the signal box at Gorsemoor Junction?",
     "\nThe signal box at Gorsemoor Junction is reached by the telephone extension"),
    ("Curator Anouk Belloway registered the bronze falcon of the Vesterhall museum under inventory number {n}.",
     "Under which inventory number is the bronze falcon of the Vesterhall museum registered?",
     "\nThe bronze falcon of the Vesterhall museum is registered under inventory number"),
    ("The cold store of the Brackwater fishery runs on compressor {n}, serviced by mechanic Jory Pendleby.",
     "Which compressor does the cold store of the Brackwater fishery run on?",
     "\nThe cold store of the Brackwater fishery runs on compressor"),
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_facts(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    templates = rng.sample(TEMPLATES, min(n, len(TEMPLATES))) + HELD_OUT[: max(0, n - len(TEMPLATES))]
    numbers = rng.sample(range(10000, 100000), n)  # the first ten draws do not depend on n
    return [{"fact": f.format(n=k), "question": q, "prompt": p, "answer": str(k)}
            for (f, q, p), k in zip(templates, numbers)]


def depths(n: int) -> list[float]:
    return [round(0.05 + 0.9 * i / (n - 1), 3) for i in range(n)] if n > 1 else [0.5]


def n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def prose(tok, budget: int) -> list[str]:
    """pydoc_data topics in sorted order, one text per topic, cut to ``budget`` tokens in all."""
    from pydoc_data.topics import topics

    docs, total = [], 0
    for name in sorted(topics):
        text = topics[name].strip() + "\n\n"
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if total + len(ids) >= budget:
            docs.append(tok.decode(ids[: budget - total]).rstrip() + "\n\n")
            return docs
        docs.append(text)
        total += len(ids)
    raise SystemExit(f"pydoc_data has only {total} tokens of prose, asked for {budget}")


def plant(tok, docs: list[str], facts: list[dict], at: list[float]) -> list[str | dict]:
    """The texts to add in order: documents, split at the paragraph break nearest each fact's depth,
    with the fact (a dict) in between."""
    sizes = [n_tokens(tok, d) for d in docs]
    total, done, out = sum(sizes), 0, []
    pending = sorted(zip((d * total for d in at), range(len(facts))))
    for doc, size in zip(docs, sizes):
        pos = 0
        while pending and pending[0][0] < done + size:
            target, i = pending.pop(0)
            c = round((target - done) / size * len(doc))
            breaks = [m.end() for m in re.finditer(r"\n\n", doc) if m.end() >= pos] + [pos]
            c = min(breaks, key=lambda b: abs(b - c))
            out += [doc[pos:c], facts[i]] if c > pos else [facts[i]]
            pos = c
        out.append(doc[pos:])
        done += size
    return [x for x in out if x]


def build(method: str, model, tok, overrides: list[str] = ()):
    from passkey import _config

    from memory_plugin import ContextMemory
    from memory_plugin.baselines import FullAttention

    return FullAttention(model, tok) if method == "full" else ContextMemory(model, tok, _config(list(overrides)))


def ingest(mem, pieces) -> tuple[list[float], float]:
    """Add each piece with its own add_text; the facts' token positions and the seconds taken."""
    t, where = time.perf_counter(), []
    for x in pieces:
        if isinstance(x, dict):
            where.append(len(mem))
            mem.add_text(x["fact"] + "\n\n")
        else:
            mem.add_text(x)
    return [w / len(mem) for w in where], time.perf_counter() - t


def recall_of(method: str) -> int:
    """Passages placed for a method: "hybrid@3" places 3, "contextmemory" none."""
    return int(method.split("@")[1]) if method.startswith("hybrid@") else 0


def ask(mem, method: str, fact: dict, style: str) -> dict:
    kw = dict(STYLES[style])
    if method != "full":  # FullAttention has no recall
        kw["recall"] = recall_of(method)
    t = time.perf_counter()
    answer = mem.generate(fact["question"] if style == "chat" else fact["prompt"], **kw)
    secs = time.perf_counter() - t
    if style == "completion":
        answer = next((line for line in answer.split("\n") if line.strip()), "")
    row = {"style": style, "answer": answer, "correct": fact["answer"] in answer, "seconds": round(secs, 3)}
    if method.startswith("hybrid"):  # untimed: is the fact among the top-3 hybrid passages for this query?
        hits = mem.retrieve(fact["question"] if style == "chat" else fact["prompt"], k=3)
        row["fact_in_top3"] = any(fact["answer"] in h.text for h in hits)
        # What the search ranked (placement takes its top `recall` of these): tells a wrong answer
        # copied from a placed look-alike from one copied out of the memory's own attention.
        row["top3"] = [h.text for h in hits]
    return row


def cell(method: str, length: int, tokens: int, ingest_s: float, rows: list[dict]) -> dict:
    out = {"method": method, "length": length, "tokens": tokens, "ingest_s": round(ingest_s, 1), "rows": rows}
    for style in STYLES:
        rs = [r for r in rows if r["style"] == style]
        out[style] = {"correct": sum(r["correct"] for r in rs), "n": len(rs),
                      "s_per_turn": round(sum(r["seconds"] for r in rs) / max(1, len(rs)), 3)}
    out["s_per_turn"] = round(sum(r["seconds"] for r in rows) / max(1, len(rows)), 3)
    return out


def save(res: dict, out: Path) -> None:
    """Write what has been measured so far (a long run cut short keeps its finished cells)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "recall.json").write_text(json.dumps(res, indent=1))
    (out / "recall.md").write_text(report(res))


def run(a) -> dict:
    from memory_plugin import load_model

    model, tok = load_model()
    facts = make_facts(a.facts, a.seed)
    methods = [m for m in a.methods if m != "hybrid"] + ([f"hybrid@{k}" for k in a.recall] if "hybrid" in a.methods else [])
    res = {"seed": a.seed, "facts": facts, "lengths": a.lengths, "methods": methods, "config": a.set, "cells": []}
    if "ceiling" in a.methods:
        docs, rows, t_ing = prose(tok, CEILING_TOKENS - 40), [], 0.0
        for f in facts:
            mem = build("contextmemory", model, tok, a.set)
            (d,), t = ingest(mem, plant(tok, docs, [f], [0.5]))
            t_ing += t
            for style in STYLES:
                rows.append({"fact": f["answer"], "depth": round(d, 3), **ask(mem, "contextmemory", f, style)})
        res["cells"].append(cell("ceiling", CEILING_TOKENS, len(mem), t_ing / len(facts), rows))
        save(res, a.out)
        log(f"ceiling: chat {res['cells'][-1]['chat']['correct']}/{len(facts)}, "
            f"completion {res['cells'][-1]['completion']['correct']}/{len(facts)}")
    for length in a.lengths:
        pieces = plant(tok, prose(tok, length - sum(n_tokens(tok, f["fact"]) + 2 for f in facts)), facts, depths(len(facts)))
        groups = [["full"]] if "full" in a.methods and length <= FULL_MAX_LENGTH else []
        groups += [[m for m in methods if m == "contextmemory" or m.startswith("hybrid")]]
        for group in filter(None, groups):
            saved = a.memory_dir / "-".join([str(length), str(a.facts), str(a.seed), *a.set]) if a.memory_dir and group[0] != "full" else None
            if saved is not None and (saved / "where.json").exists():  # ingested by an earlier run
                from memory_plugin import ContextMemory

                mem = ContextMemory.load(saved, model, tokenizer=tok)
                where, t_ing = json.loads((saved / "where.json").read_text())
            else:
                mem = build(group[0], model, tok, a.set)
                where, t_ing = ingest(mem, pieces)
                if saved is not None:
                    mem.save(saved)
                    (saved / "where.json").write_text(json.dumps([where, t_ing]))
            log(f"{'+'.join(group)} {length}: ingested {len(mem)} tokens in {t_ing:.0f}s ({len(mem) / t_ing:.0f} tok/s)")
            for m in group:
                rows = []
                for f, d in zip(facts, where):
                    for style in STYLES:
                        rows.append({"fact": f["answer"], "depth": round(d, 3), **ask(mem, m, f, style)})
                c = cell(m, length, len(mem), t_ing, rows)
                res["cells"].append(c)
                save(res, a.out)
                log(f"{m} {length}: chat {c['chat']['correct']}/{len(facts)}, completion "
                    f"{c['completion']['correct']}/{len(facts)}, {c['s_per_turn']:.2f} s/turn")
            del mem
    return res


def report(res: dict) -> str:
    cells = res["cells"]
    ceil = next((c for c in cells if c["method"] == "ceiling"), None)
    n = len(res["facts"])

    def pct(c, style):
        return f"{100 * c[style]['correct'] / ceil[style]['correct']:.0f}%" if ceil and ceil[style]["correct"] else "-"

    lines = [f"Recall of {n} facts planted in pydoc_data prose (seed {res['seed']}); ceiling: each fact alone in "
             f"~{CEILING_TOKENS} tokens, full attention (its ingest s: per history).", "",
             "| method | tokens | chat | % ceiling | completion | % ceiling | s/turn | ingest s | fact in hybrid top-3 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        top3 = sum(r.get("fact_in_top3", False) for r in c["rows"])
        lines.append(f"| {c['method']} | {c['tokens']} | {c['chat']['correct']}/{n} | {pct(c, 'chat')} | "
                     f"{c['completion']['correct']}/{n} | {pct(c, 'completion')} | {c['s_per_turn']:.2f} | "
                     f"{c['ingest_s']:.0f} | {f'{top3}/{2 * n}' if c['method'].startswith('hybrid') else '-'} |")
    by = {(c["method"], c["length"]): c for c in cells}
    cost = [f"{m} at {length}: {by[(m, length)]['s_per_turn'] / by[('contextmemory', length)]['s_per_turn']:.2f}x"
            for length in res["lengths"] for m in res["methods"]
            if m.startswith("hybrid") and (m, length) in by and ("contextmemory", length) in by]
    if cost:
        lines += ["", "Turn time of placement (s/turn against contextmemory's): " + ", ".join(cost)]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--facts", type=int, default=10, choices=range(1, len(TEMPLATES) + len(HELD_OUT) + 1), metavar="N",
                   help="facts planted: the first 10 chose the defaults, 11-20 are held out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recall", type=int, nargs="+", default=[1, 3], help="passages placed, one hybrid run per value")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/recall"))
    p.add_argument("--memory-dir", type=Path, help="save each ingested history here, and load it instead of "
                   "ingesting again when a later run asks for the same length, facts and seed (its ingest_s is the first run's)")
    p.add_argument("--set", action="append", default=[], help="MemoryConfig override, e.g. repr_heads=kv")
    a = p.parse_args()
    t = time.perf_counter()
    res = run(a)
    res["total_seconds"] = round(time.perf_counter() - t)
    save(res, a.out)
    print(report(res))
    log(f"done in {res['total_seconds']}s; wrote {a.out}/recall.json and recall.md")


if __name__ == "__main__":
    main()
