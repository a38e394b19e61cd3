"""Does ``ContextMemory.retrieve`` find the right passage, whichever channel the query favours, and
what does a query cost as the history grows? (issue 17, item 4)

Quality: one history on the embedded model (~27k tokens), query sets that no single channel wins
by construction; every query is asked of each channel: ``lexical`` (FTS5 BM25), ``semantic``
(WordLlama vectors, memory_plugin.semantic), ``attention`` (MaxSim over the passages' keys), and of
the fusions of :func:`memory_plugin.retrieval.fuse`: ``hybrid`` (the default: ``retrieval.HYBRID``
channels, z-score fusion), ``hybrid-rrf`` (the same channels, reciprocal-rank fusion) and
``hybrid+attention`` (all three channels, z-score). A hit is right when its entry is the query's
entry; top-1, top-3 and seconds per query are reported.

* (a) **topics**: the 32 Python reference topics of docs/BENCHMARKS.md section 4 (``pydoc_data``,
  shipped with CPython), one ``add_text`` entry each; one query per topic written by hand from what
  the topic is about, as a user would ask, not a sentence of it (some share its keywords, some are
  conceptual). ``id-classes`` is a verbatim copy of the last section of ``identifiers``, so a hit in
  either is recorded (top-1 is scored strictly).
* (b) **memos**: 10 maintenance memos of one template (technician, device, annex, ticket, floor)
  with rare names and ids, mixed among the topics; each query names one memo's rare name(s) or id.
* (c) **facts**: 10 personal facts in prose, each a user message; each query paraphrases its fact
  and shares at most one content word with it.

(a2) and (c2) are a second wording of every topic and ten more facts with paraphrases, written
after (a) and (c) had been measured and before any fusion was tried on them: the sets the hybrid
default was chosen on, so that (a) and (c) are not tuned to.

Scale: seconds per query of each mode at the history lengths asked for, built incrementally on
one corpus: every pydoc topic (sorted, repeated as needed), each followed by a memo of the (b)
template with generated names, and the 10 memos of (b) planted at depths 0.05..0.95 of the
smallest length (their top-1 is reported as a check; the rest are distractors of the same form).
Timed queries: the first ``--timing-queries`` of each set.

* ``real``: the embedded model, at ``--real-scale`` lengths (ingest ~250 tokens/s on 2 CPU cores,
  so 100k tokens is ~7 minutes).
* ``tiny``: a 2-layer random Llama of the tests' geometry (hidden 64, memory_plugin.testing) with
  the embedded tokenizer and the default MemoryConfig, at ``--scale`` lengths: the history-dependent
  part of the cost (block preselection, FTS5 lookup, candidate MaxSim) without the 135M model's
  fixed per-query forward pass. Its attention channel ranks nothing meaningful.

The lexical channel must not scan the history per query: its time at each length against the
smallest is reported (a scan would grow ~linearly).

    python benchmarks/retrieval.py --sets abc --real-scale 10000 --scale 10000 100000 1000000 --out benchmarks/results/retrieval
    python benchmarks/retrieval.py --sets abc --real-scale 10000 100000      # + the real model at 100k
    python benchmarks/retrieval.py --sets none --scale 10000 100000           # tiny-model timings only
    python benchmarks/retrieval.py --real-scale --scale --modes hybrid rerank --name rerank-library  # the rerank mode
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SEED = 0
MODES = ("lexical", "semantic", "attention", "hybrid", "hybrid-rrf", "hybrid+attention")
ALL_MODES = (*MODES, "rerank")  # rerank: ~10-20 s per query on one thread, asked for by --modes
SCALE_MODES = ("lexical", "semantic", "attention", "hybrid")  # hybrid: the default channels and fusion
K = 3

# (a) The 32 topics of section 4 (random.Random(0).sample of the 35 topics of 1000-8000 characters
# in CPython 3.11's pydoc_data), each with a query written from what it is about.
TOPICS = {
    "raise": "How do I chain a new error to the original one so the traceback shows it was the direct cause?",
    "sequence-types": "Which special methods should my own container class define so that len(), indexing and iteration work like a list?",
    "atom-identifiers": "Why does an attribute whose name starts with two underscores get renamed with the class name in front of it?",
    "identifiers": "Which Unicode characters may a variable name contain, and which words are reserved and cannot be used as names?",
    "try": "How can I catch several errors bundled in one group, and run cleanup code whether or not something failed?",
    "typesmethods": "What is a bound method object, and why can't I set an attribute on a method through an instance?",
    "id-classes": "What do leading and trailing underscores in a name signal, like a lone underscore or the double-underscore dunder names?",
    "for": "When does the else block after a loop over a list run, and what happens if I break out early?",
    "return": "What value does a function give back when it exits without an expression, and what happens when a generator finishes with one?",
    "dict": "How do curly-brace literals with key: value pairs behave when the same key appears twice?",
    "specialattrs": "How can I find the base classes, method resolution order and subclasses of a class at runtime?",
    "exprlists": "Why does writing values separated by commas create a tuple, and when do I need a trailing comma for a single item?",
    "integers": "How do I write numbers in hexadecimal, octal or binary in source code, and can I group digits with underscores?",
    "calls": "How are keyword arguments matched to parameter slots when calling a function, and what happens with extra positional arguments?",
    "subscriptions": "How does indexing a list with square brackets work, including negative positions counting from the end?",
    "binary": "What do division, floor division and modulo return, and what sign does the remainder take?",
    "typesseq-mutable": "What operations change a list in place, like appending, inserting, removing items or reversing it?",
    "naming": "How does Python decide which scope a variable name refers to, and why would I get an UnboundLocalError?",
    "augassign": "Is x += 1 the same as x = x + 1, and does it modify the object in place?",
    "context-managers": "Which two methods must my object implement to be usable in a with block, and how can it swallow an exception on exit?",
    "global": "How can a function assign to a variable defined at module level instead of creating a local one?",
    "with": "What steps does Python go through when it executes a with statement, and what try/finally code is that equivalent to?",
    "power": "Which binds tighter, a minus sign or exponentiation, and what type do I get when raising an int to a negative exponent?",
    "operator-summary": "Which operators bind more tightly than others? I need the full precedence order from highest to lowest.",
    "typesmodules": "What can I do with an imported module object, and can I change its namespace by editing its attribute dictionary?",
    "in": "How do I check whether an item is contained in a list, a string or a dictionary, and how does my own class support that check?",
    "async": "How do I write a coroutine with async def, and loop over an asynchronous iterator?",
    "function": "How do decorators and default parameter values work when I define a function with def?",
    "objects": "What is the difference between an object's identity, type and value, and when does Python free objects nobody references?",
    "booleans": "Which values count as false in an if condition, and what do 'and' and 'or' actually return?",
    "exceptions": "In general, what happens when a runtime error occurs: how does control reach a handler, and what if nothing handles it?",
    "numeric-types": "Which special methods make my own number class support +, - and * , including when my object is on the right-hand side?",
}
SAME_TEXT = {"id-classes": "identifiers"}  # id-classes' text is the last section of identifiers, verbatim

# (b) One template; each memo differs in its rare name, place, ticket, device and floor.
MEMO = "Maintenance memo: technician {name} replaced the {device} in the {place} annex, ticket {ticket}, on the {floor} floor."
MEMO_NAMES = ["Oyelaran Fitzwilliam", "Thaddeus Quarrington", "Ximena Abernethy", "Benedetta Vorontsova",
              "Kwabena Hollingshead", "Ingrid Szczepanska", "Mireille Dunkeld", "Radomir Achterberg",
              "Sunniva Pettigrew", "Lazarus Okonkwo"]
MEMO_PLACES = ["Quillfeather", "Brackenholt", "Wyvernmoor", "Sallowmere", "Corvensby", "Thistlewick",
               "Marrowgate", "Fenwright", "Dunlarrow", "Kestrelcombe"]
DEVICES = ["humidity sensor", "smoke detector", "thermostat", "backup battery", "door controller"]
FLOORS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth"]
MEMO_QUERIES = [  # cycled: the query names the person and place, the ticket, the person, or the place
    "What did {name} do in the {place} annex?",
    "Which device was replaced under ticket {ticket}?",
    "What did technician {name} replace, and where?",
    "What was replaced in the {place} annex, and on which floor?",
]

# (c) A fact and a paraphrase sharing at most one content word (shared word noted).
FACTS = [
    ("My sister Anna moved to Lisbon last spring for a job at a bakery.", "Which city did my sister relocate to for work?"),  # sister
    ("I'm allergic to peanuts, so please never suggest recipes with them.", "What food causes me a bad reaction?"),
    ("Our team's weekly sync was moved from Monday mornings to Thursday afternoons.", "When does the team's regular meeting happen now?"),  # team
    ("The staging server's password gets rotated every ninety days by the ops crew.", "How often do the credentials for the test environment change?"),
    ("I drive a dark green 2014 Subaru Outback that I bought second-hand.", "What kind of car do I own?"),
    ("My daughter's piano recital is on the twelfth of June at the community hall.", "When is my daughter's music performance?"),  # daughter
    ("I prefer replies in short bullet points rather than long paragraphs.", "How should answers be formatted for me?"),
    ("The quarterly budget report must be emailed to Priya before each quarter closes.", "Who should receive the financial summary every three months?"),
    ("I quit smoking in 2019 after my doctor warned me about my lungs.", "Do I still use tobacco?"),
    ("We adopted a rescue greyhound called Biscuit from the shelter in March.", "What's the name of our pet dog?"),
]


# (a2) A second wording per topic; (c2) ten more facts, each with a paraphrase sharing at most one content word.
TOPICS2 = {
    "raise": "What does the from clause do when I re-throw an exception inside an except block?",
    "sequence-types": "How do I make my own class behave like a sequence or a mapping?",
    "atom-identifiers": "What is private name mangling and when does it apply to a name used inside a class?",
    "identifiers": "What are the rules for a valid identifier, and which keywords are soft keywords?",
    "try": "How do except star clauses differ from plain except, and when does a finally clause run?",
    "typesmethods": "What attributes does a method object carry, such as the instance it is bound to and the underlying function?",
    "id-classes": "Which classes of identifiers are reserved, such as names beginning with an underscore?",
    "for": "How does a for loop iterate over an iterable, and is it safe to modify the sequence while looping over it?",
    "return": "Can a return statement appear outside a function, and how does it interact with a finally clause?",
    "dict": "What does a dictionary display produce, and how does a dict comprehension differ from it?",
    "specialattrs": "Which special read-only attributes do objects and types carry, like their dictionary and class?",
    "exprlists": "What does a list of expressions separated by commas evaluate to, and how does an asterisk unpack an iterable in it?",
    "integers": "What is the syntax of integer literals, and is there a limit on how large an integer can be?",
    "calls": "What happens when a callable is invoked with star args and double-star kwargs, and how are values assigned to formal parameters?",
    "subscriptions": "What does obj[key] do for a mapping compared with a sequence, and which special method does it call?",
    "binary": "How do the arithmetic operators like multiplication, matrix multiplication and division convert their operands?",
    "typesseq-mutable": "How do slice assignment and deleting a slice change a mutable sequence?",
    "naming": "How are names bound in code blocks, and what is the difference between local, global and free variables?",
    "augassign": "What is an augmented assignment statement, and how many times is its target evaluated?",
    "context-managers": "What are the enter and exit methods of a context manager used for?",
    "global": "What does the global statement declare, and can it name a variable already used earlier in the same block?",
    "with": "How does a with statement with several items nest its context managers?",
    "power": "How does the power operator associate, and what is the result of zero raised to a negative power?",
    "operator-summary": "Show me the table that orders Python's operators from lowest to highest priority, from lambda to parentheses.",
    "typesmodules": "What is the only special operation a module supports, and what is a module's namespace dictionary?",
    "in": "How do the membership test operators work with the contains method and with iteration?",
    "async": "What are the async for and async with statements, and where can await be used?",
    "function": "What does executing a function definition do, and when are annotations and default values evaluated?",
    "objects": "What does garbage collection do with objects that are unreachable, and can an object's type change?",
    "booleans": "How does truth value testing work, and how do the Boolean operations not, and, or evaluate?",
    "exceptions": "How are exceptions raised and handled in Python's execution model, and what is meant by the termination model?",
    "numeric-types": "What are the reflected and in-place methods for emulating numeric types?",
}
FACTS2 = [
    ("My brother Tomasz works as a paramedic in Gdansk.", "What is my sibling's job?"),
    ("I keep my spare house key under the blue flowerpot by the back door.", "Where is the extra key to my home hidden?"),  # key
    ("Our office wifi password is pelican-harbour-42.", "What are the network credentials at work?"),
    ("I'm training for the Berlin marathon in September.", "Which race am I preparing to run?"),
    ("The invoice for the roof repair came to 4,300 euros.", "How much did fixing the top of the house cost?"),
    ("My grandmother turns ninety on the third of August.", "When is my nan's birthday?"),
    ("I'm vegetarian but I still eat eggs and cheese.", "Do I consume meat?"),
    ("The backups of the customer database run every night at two.", "When is client data copied for safety?"),
    ("Our landlord, Mr. Okafor, raised the rent by eight percent this year.", "How much more do we pay for the flat now?"),
    ("I learned to sail on Lake Geneva as a teenager.", "Where did I pick up boating when I was young?"),
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def depths(n: int) -> list[float]:
    return [round(0.05 + 0.9 * i / (n - 1), 3) for i in range(n)] if n > 1 else [0.5]


# ------------------------------------------------------------------------------------------ data
def memos(seed: int = SEED) -> list[dict]:
    """The 10 memos of (b), each with its query."""
    rng = random.Random(seed)
    devices, floors = DEVICES * 2, FLOORS[:]
    rng.shuffle(devices)
    rng.shuffle(floors)
    out = []
    for i, (name, place) in enumerate(zip(MEMO_NAMES, MEMO_PLACES)):
        f = dict(name=name, place=place, device=devices[i], floor=floors[i],
                 ticket=f"{rng.choice('BCDFGHJKLMNPQRSTVWXZ')}{rng.choice('BCDFGHJKLMNPQRSTVWXZ')}-{rng.randrange(1000, 10000)}")
        out.append({"text": MEMO.format(**f), "query": MEMO_QUERIES[i % len(MEMO_QUERIES)].format(**f), **f})
    return out


def filler_memo(rng: random.Random) -> str:
    """A memo of the (b) template with generated names (distractors for the scale corpus)."""
    syl = ["ka", "lo", "ver", "mi", "dra", "son", "tel", "bri", "gan", "os", "ul", "fen", "ro", "wick", "ath", "mar"]
    word = lambda n: "".join(rng.choice(syl) for _ in range(n)).capitalize()  # noqa: E731
    name, place = f"{word(2)} {word(3)}", word(3) + rng.choice(["holt", "mere", "by", "combe", "gate"])
    assert name not in MEMO_NAMES and place not in MEMO_PLACES
    ticket = f"{rng.choice('BCDFGHJKLMNPQRSTVWXZ')}{rng.choice('BCDFGHJKLMNPQRSTVWXZ')}-{rng.randrange(1000, 10000)}"
    return MEMO.format(name=name, place=place, device=rng.choice(DEVICES), floor=rng.choice(FLOORS), ticket=ticket)


def quality_items(sets: str, seed: int = SEED) -> list[dict]:
    """The entries of the quality history, in order: topics with the memos and facts mixed in at
    random positions; each item is {set, label, kind, text, query}."""
    from pydoc_data.topics import topics

    items = [{"set": "a", "label": name, "kind": "text", "text": topics[name] + "\n\n", "query": q}
             for name, q in TOPICS.items()]
    rng = random.Random(seed)
    extra = [{"set": "b", "label": f"memo-{i}", "kind": "text", "text": m["text"] + "\n\n", "query": m["query"]}
             for i, m in enumerate(memos(seed))]
    extra += [{"set": "c", "label": f"fact-{i}", "kind": "user", "text": f, "query": q} for i, (f, q) in enumerate(FACTS)]
    for x in extra:
        items.insert(rng.randrange(len(items) + 1), x)
    rng = random.Random(seed + 1)  # (c2) placed after, so the history of (a)-(c) keeps its order
    for i, (f, q) in enumerate(FACTS2):
        items.insert(rng.randrange(len(items) + 1), {"set": "c2", "label": f"fact2-{i}", "kind": "user", "text": f, "query": q})
    for x in items:  # entries of sets not asked stay in the history (as distractors) but get no query
        x["asked"] = x["set"].rstrip("2") in sets
    return items


def add(mem, item: dict) -> int:
    """Add an item as its own entry; returns the entry index."""
    if item["kind"] == "user":
        mem.add_message("user", item["text"])
    else:
        mem.add_text(item["text"])
    return len(mem.entries) - 1


# ------------------------------------------------------------------------------------------ retrieval
def search(mem, query: str, mode: str) -> tuple[list, float]:
    """retrieve() in one of MODES (hybrid-rrf sets the fusion, hybrid+attention the channels, for
    the call); hits and seconds."""
    from memory_plugin import retrieval

    fusion, channels = retrieval.FUSION, retrieval.HYBRID
    if mode == "hybrid-rrf":
        retrieval.FUSION = "rrf"  # search() and fuse() read the module attributes at call time
    if mode == "hybrid+attention":
        retrieval.HYBRID = ("lexical", "semantic", "attention")
    try:
        t = time.perf_counter()
        hits = mem.retrieve(query, k=K, mode=mode.split("-")[0].split("+")[0])
        return hits, time.perf_counter() - t
    finally:
        retrieval.FUSION, retrieval.HYBRID = fusion, channels


def quality(model, tok, sets: str, modes=MODES) -> dict:
    from tqdm import tqdm

    from memory_plugin import ContextMemory

    items = quality_items(sets)
    mem = ContextMemory(model, tok)
    t = time.perf_counter()
    for x in tqdm(items, desc="quality ingest", file=sys.stderr):
        x["entry"] = add(mem, x)
    ingest_s = time.perf_counter() - t
    label = {x["entry"]: x["label"] for x in items}
    entry = {x["label"]: x["entry"] for x in items}
    log(f"quality: {len(items)} entries, {len(mem)} tokens, {mem.stats().blocks} blocks, "
        f"ingest {ingest_s:.0f}s ({len(mem) / ingest_s:.0f} tok/s)")
    for mode in modes:  # warm-up, untimed
        search(mem, "warm up", mode)
    rows = []
    asked = [x for x in items if x["asked"]]
    asked += [{**x, "set": "a2", "query": TOPICS2[x["label"]]} for x in items if x["asked"] and x["set"] == "a"]
    for x in tqdm(sorted(asked, key=lambda x: (x["set"], x["entry"])), desc="quality queries", file=sys.stderr):
        row = {"set": x["set"], "label": x["label"], "query": x["query"], "modes": {}}
        ok = {x["entry"]} | ({entry[SAME_TEXT[x["label"]]]} if x["label"] in SAME_TEXT else set())
        for mode in modes:
            hits, secs = search(mem, x["query"], mode)
            got = [h.message_index for h in hits]
            row["modes"][mode] = {
                "top1": bool(got) and got[0] == x["entry"],
                "top3": x["entry"] in got,
                "top1_same_text": bool(got) and got[0] in ok,
                "seconds": round(secs, 4),
                "hits": [{"label": label.get(h.message_index), "score": round(h.score, 3), "channels": list(h.channels),
                          "text": h.text[:80]} for h in hits],
            }
        rows.append(row)
    res = {"tokens": len(mem), "blocks": mem.stats().blocks, "entries": len(items), "ingest_s": round(ingest_s, 1),
           "summary": {}, "rows": rows}
    for s in sorted({r["set"] for r in rows}):
        rs = [r for r in rows if r["set"] == s]
        res["summary"][s] = {m: {"n": len(rs), "top1": sum(r["modes"][m]["top1"] for r in rs),
                                 "top3": sum(r["modes"][m]["top3"] for r in rs),
                                 "top1_same_text": sum(r["modes"][m]["top1_same_text"] for r in rs),
                                 "s_per_query": round(sum(r["modes"][m]["seconds"] for r in rs) / len(rs), 4)}
                             for m in modes}
    res["modes"] = list(modes)
    mem.close()
    return res


# ------------------------------------------------------------------------------------------ scale
def scale_stream(tok, first: int, seed: int = SEED):
    """The scale corpus, endlessly: ``(label, text)`` pieces, each its own add_text entry; the
    memos of (b) sit at depths 0.05..0.95 of the first ``first`` tokens."""
    from pydoc_data.topics import topics

    rng = random.Random(seed + 1)
    planted = list(zip((round(d * first) for d in depths(len(MEMO_NAMES))), memos(seed)))
    pos, i = 0, 0

    def n(text):
        return len(tok(text, add_special_tokens=False)["input_ids"])

    for name in itertools.cycle(sorted(topics)):
        for text, lab in ((topics[name] + "\n\n", "pad"), (filler_memo(rng) + "\n\n", "pad")):
            while i < len(planted) and pos >= planted[i][0]:
                yield f"memo-{i}", planted[i][1]["text"] + "\n\n"
                pos, i = pos + n(planted[i][1]["text"]), i + 1
            yield lab, text
            pos += n(text)


def timing_queries(n: int) -> list[tuple[str, str]]:
    """(label, query): the first ``n`` of each set."""
    qs = [(name, q) for name, q in list(TOPICS.items())[:n]]
    qs += [(f"memo-{i}", m["query"]) for i, m in enumerate(memos()[:n])]
    qs += [(f"fact-{i}", q) for i, (_, q) in enumerate(FACTS[:n])]
    return qs


def scale(kind: str, model, tok, lengths: list[int], n_queries: int) -> list[dict]:
    """Seconds per query of each mode at each history length, one memory grown incrementally."""
    from tqdm import tqdm

    from memory_plugin import ContextMemory

    mem = ContextMemory(model, tok)
    stream, label, out = scale_stream(tok, min(lengths)), {}, []
    queries = timing_queries(n_queries)
    t_ingest = 0.0
    for length in sorted(lengths):
        bar = tqdm(total=length, initial=len(mem), desc=f"{kind} ingest to {length}", unit="tok", file=sys.stderr)
        t = time.perf_counter()
        while len(mem) < length:
            lab, text = next(stream)
            before = len(mem)
            mem.add_text(text)
            label[len(mem.entries) - 1] = lab
            bar.update(len(mem) - before)
        bar.close()
        t_ingest += time.perf_counter() - t
        for mode in SCALE_MODES:  # warm-up, untimed
            mem.retrieve("warm up", k=K, mode=mode)
        secs = {m: [] for m in SCALE_MODES}
        memo_top1 = {m: 0 for m in SCALE_MODES}
        n_memos = sum(lab.startswith("memo-") for lab in label.values())
        for lab, q in tqdm(queries, desc=f"{kind} {len(mem)} queries", file=sys.stderr):
            for mode in SCALE_MODES:
                t = time.perf_counter()
                hits = mem.retrieve(q, k=K, mode=mode)
                secs[mode].append(time.perf_counter() - t)
                if lab.startswith("memo-"):
                    memo_top1[mode] += bool(hits) and label.get(hits[0].message_index) == lab
        row = {"model": kind, "length": length, "tokens": len(mem), "blocks": mem.stats().blocks,
               "entries": len(mem.entries), "ingest_s": round(t_ingest, 1), "ingest_tok_s": round(len(mem) / t_ingest),
               "n_queries": len(queries), "memo_queries": min(n_queries, len(MEMO_NAMES)), "memos_present": n_memos,
               "memo_top1": memo_top1, "load_avg": load_avg(),
               "s_per_query": {m: round(sum(v) / len(v), 4) for m, v in secs.items()},
               "s_per_query_by_set": {m: {s: round(sum(v[j] for j, (lab, _) in enumerate(queries) if _set(lab) == s)
                                                 / sum(_set(lab) == s for lab, _ in queries), 4) for s in "abc"}
                                      for m, v in secs.items()}}
        out.append(row)
        log(f"{kind} {len(mem)} tokens: " + ", ".join(f"{m} {v:.4f}s" for m, v in row["s_per_query"].items())
            + f"; memo top-1 {memo_top1}")
    mem.close()
    del mem
    gc.collect()
    return out


def _set(label: str) -> str:
    return "b" if label.startswith("memo-") else "c" if label.startswith("fact-") else "a"


def ratios(rows: list[dict]) -> dict:
    """Per model and mode: s/query at each length over s/query at the smallest length."""
    out = {}
    for kind in sorted({r["model"] for r in rows}):
        rs = sorted((r for r in rows if r["model"] == kind), key=lambda r: r["length"])
        base = rs[0]
        out[kind] = {m: {f"{r['length']}/{base['length']}": round(r["s_per_query"][m] / base["s_per_query"][m], 2)
                         for r in rs[1:]} for m in SCALE_MODES}
        out[kind]["tokens"] = {f"{r['length']}/{base['length']}": round(r["tokens"] / base["tokens"], 2) for r in rs[1:]}
    return out


# ------------------------------------------------------------------------------------------ report
SET_NAMES = {"a": "(a) topics", "a2": "(a2) topics, second wording", "b": "(b) memos", "c": "(c) paraphrased facts",
             "c2": "(c2) more paraphrased facts"}


def report(res: dict) -> str:
    lines = []
    q = res.get("quality")
    if q:
        modes = q.get("modes", MODES)
        lines += [f"Quality: one history of {q['entries']} entries, {q['tokens']} tokens, {q['blocks']} blocks "
                  f"(embedded model; ingest {q['ingest_s']:.0f}s). Top-k of retrieve(k={K}).", "",
                  "| set | channel | top-1 | top-3 | s/query |", "|---|---|---|---|---|"]
        for s, by in q["summary"].items():
            for m in modes:
                v = by[m]
                extra = f" ({v['top1_same_text']} counting the identical text)" if v["top1_same_text"] != v["top1"] else ""
                lines.append(f"| {SET_NAMES[s]} | {m} | {v['top1']}/{v['n']}{extra} | {v['top3']}/{v['n']} | {v['s_per_query']:.3f} |")
        fails = [r for r in q["rows"] if not all(r["modes"][m]["top1"] for m in modes)]
        if fails:
            lines += ["", "Queries some channel missed at top-1 (the top-1 entry each channel returned; * = right):", "",
                      "| set | expected | query | " + " | ".join(modes) + " |", "|---|---|---|" + "---|" * len(modes)]
            for r in fails:
                cells = [("*" if r["modes"][m]["top1"] else "") + str((r["modes"][m]["hits"] or [{}])[0].get("label"))
                         for m in modes]
                lines.append(f"| {r['set']} | {r['label']} | {r['query']} | " + " | ".join(cells) + " |")
    if res.get("scale"):
        lines += ["", "Scale: seconds per query (mean over the timed queries; hybrid = default fusion). "
                  "Memo top-1: the memos of (b) among the scale corpus's template memos.", "",
                  "| model | tokens | blocks | ingest tok/s | " + " | ".join(SCALE_MODES) + " | memo top-1 "
                  + "/".join(m[:3] for m in SCALE_MODES) + " |", "|---|---|---|---|" + "---|" * (len(SCALE_MODES) + 1)]
        for r in res["scale"]:
            s, t = r["s_per_query"], r["memo_top1"]
            lines.append(f"| {r['model']} | {r['tokens']} | {r['blocks']} | {r['ingest_tok_s']} | "
                         + " | ".join(f"{s[m]:.4f}" for m in SCALE_MODES) + " | "
                         + "/".join(str(t[m]) for m in SCALE_MODES) + f" of {r['memo_queries']} |")
        lines += ["", "Lexical s/query by query set (a topics: common words / b memos: rare names / c paraphrases):", "",
                  "| model | tokens | a | b | c |", "|---|---|---|---|---|"]
        for r in res["scale"]:
            by = r["s_per_query_by_set"]["lexical"]
            lines.append(f"| {r['model']} | {r['tokens']} | {by['a']:.4f} | {by['b']:.4f} | {by['c']:.4f} |")
        lines += ["", "Growth of s/query against the smallest length (tokens grow by the last column):", "",
                  "| model | mode | " + " | ".join(sorted({k for v in res["ratios"].values() for k in v["tokens"]},
                                                         key=lambda k: int(k.split("/")[0]))) + " |"]
        cols = sorted({k for v in res["ratios"].values() for k in v["tokens"]}, key=lambda k: int(k.split("/")[0]))
        lines.append("|---|---|" + "---|" * len(cols))
        for kind, by in res["ratios"].items():
            for m in (*SCALE_MODES, "tokens"):
                lines.append(f"| {kind} | {m} | " + " | ".join(f"{by[m][c]:.2f}" if c in by[m] else "-" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", default="abc", help="quality sets to ask, any of 'abc'; 'none' skips the quality run")
    p.add_argument("--real-scale", type=int, nargs="*", default=[10000], help="history lengths for the embedded model")
    p.add_argument("--scale", type=int, nargs="*", default=[10000, 100000], help="history lengths for the tiny model")
    p.add_argument("--timing-queries", type=int, default=8, help="queries per set timed at each length")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/retrieval"))
    p.add_argument("--name", default="channels", help="output files: NAME.json and NAME.md in --out")
    p.add_argument("--modes", nargs="*", default=list(MODES), choices=ALL_MODES, help="quality modes (default: all but rerank)")
    p.add_argument("--threads", type=int, help="torch threads (on a shared machine 1 avoids oversubscription)")
    a = p.parse_args()
    sets = "" if a.sets == "none" else a.sets

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)

    from memory_plugin import load_model
    from memory_plugin.testing import tiny_llama

    t0 = time.perf_counter()
    res = {"seed": SEED, "k": K, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
           "torch_threads": torch.get_num_threads(), "load_avg_start": load_avg(), "scale": []}
    model, tok = load_model()
    if sets:
        res["quality"] = quality(model, tok, sets, a.modes)
    if a.real_scale:
        res["scale"] += scale("real", model, tok, a.real_scale, a.timing_queries)
    del model
    gc.collect()
    if a.scale:
        res["scale"] += scale("tiny", tiny_llama(len(tok)), tok, a.scale, a.timing_queries)
    res["ratios"] = ratios(res["scale"]) if res["scale"] else {}
    res["load_avg_end"], res["total_seconds"] = load_avg(), round(time.perf_counter() - t0)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{a.name}.json").write_text(json.dumps(res, indent=1))
    table = report(res)
    (a.out / f"{a.name}.md").write_text(table)
    print(table)
    log(f"done in {res['total_seconds']}s; wrote {a.out}/{a.name}.json and .md")


if __name__ == "__main__":
    main()
