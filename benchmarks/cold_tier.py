"""The cold tier against what a user could do instead (issue 25, item 2): facts whose blocks went
cold, answered with their KV kept, with the KV recomputed from token ids (``recompute``), recomputed
with memory vectors as context (``rehydrate``), the vectors attended (``gist``) or the block dropped.

Two histories per part, each asked completion-style (the embedded model's reliable style) with no
placed passages (``recall=0``: only the memory's attention can answer):

* ``facts``: the recall benchmark's facts (rare names and numbers) planted in documentation prose;
* ``needles``: named five-digit vault codes in the passkey filler.

Parts:

* ``default``: the default geometry (128-token blocks). Everything older than ``n_local`` tokens
  goes cold with ``recompute`` (no cramming), then the same memory is reopened with ``drop``.
* ``vectors``: 32-token blocks, one memory vector each (what this CPU can cram: section 7). Only
  the blocks holding the facts are crammed (the other blocks keep their KV); the archived memory is
  saved once and loaded with each mode (``archive_mode`` may differ at load).

Each answer's CPU seconds (``time.process_time``: the machine is shared) include recomputing the
cold blocks it selects. Bytes per token: what each form of a cold block needs (KV as stored, the
vectors, nothing beyond the token ids), and the saved directory's size before and after archiving.

    python benchmarks/cold_tier.py default --tokens 16384 --out benchmarks/results/cold_tier/default.json
    python benchmarks/cold_tier.py vectors --tokens 4096 --out benchmarks/results/cold_tier/vectors.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from recall import depths, make_facts, plant, prose  # noqa: E402

DOORS = ["Alder", "Birchwood", "Cedarholm", "Hazelmere", "Larchfield", "Rowanby", "Willowgate", "Yewbridge"]


def needles(n: int, seed: int) -> list[dict]:
    import random

    keys = random.Random(seed).sample(range(10000, 100000), n)
    return [{"fact": f"The vault code of the {d} door is {k}. Remember it.", "prompt": f"\nThe vault code of the {d} door is",
             "answer": str(k)} for d, k in zip(DOORS, keys)]  # fmt: skip


def history(tok, kind: str, tokens: int, n: int) -> tuple[list, list[dict]]:
    """The pieces to add in order (texts and fact dicts) and the facts."""
    from memory_plugin.tasks import FILLER, filler_repeats

    facts = make_facts(n, seed=0) if kind == "facts" else needles(n, seed=0)
    if kind == "facts":
        docs = prose(tok, tokens)
    else:
        per = max(1, filler_repeats(tok, tokens) // 16)
        docs = [FILLER * per + "\n\n" for _ in range(16)]
    return plant(tok, docs, facts, depths(n)), facts


def ingest(mem, pieces) -> list[tuple[int, int]]:
    """Add the pieces; each fact's token span."""
    spans = []
    for x in pieces:
        if isinstance(x, dict):
            a = len(mem)
            mem.add_text(x["fact"] + "\n\n")
            spans.append((a, len(mem)))
        else:
            mem.add_text(x)
    return spans


def ask(mem, facts: list[dict]) -> list[dict]:
    rows = []
    for f in facts:
        t = time.process_time()
        answer = mem.generate(f["prompt"], max_new_tokens=8, chat=False, recall=0)
        secs = time.process_time() - t
        answer = next((line for line in answer.split("\n") if line.strip()), "")
        rows.append({"answer": answer, "correct": f["answer"] in answer, "cpu_s": round(secs, 3)})
    return rows


def blocks_of(cfg, spans: list[tuple[int, int]], n_blocks: int) -> set[int]:
    """Blocks holding any token of the spans (block b covers n_init + b * block_size onwards)."""
    out = set()
    for a, e in spans:
        first, last = (a - cfg.n_init) // cfg.block_size, (e - 1 - cfg.n_init) // cfg.block_size
        out |= {b for b in range(max(first, 0), last + 1) if b < n_blocks}
    return out


def dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in Path(path).glob(pattern) if f.is_file())


def summary(name: str, rows: list[dict]) -> dict:
    cpu = [r["cpu_s"] for r in rows]
    return {"mode": name, "correct": sum(r["correct"] for r in rows), "n": len(rows),
            "cpu_s_mean": round(sum(cpu) / len(cpu), 3), "cpu_s_first": cpu[0], "rows": rows}  # fmt: skip


def run_kind(model, tok, part: str, kind: str, tokens: int, n: int, max_steps: int, work: Path) -> dict:
    from memory_plugin import ContextMemory, MemoryConfig

    if part == "default":
        cfg = MemoryConfig()
    else:
        cfg = MemoryConfig(block_size=32, n_init=32, n_local=256, topk=4, chunk_size=128,
                           archive_vectors=1, archive_max_steps=max_steps, archive_mode="rehydrate")  # fmt: skip
    pieces, facts = history(tok, kind, tokens, n)
    mem = ContextMemory(model, tok, cfg)
    t = time.process_time()
    spans = ingest(mem, pieces)
    res = {"kind": kind, "tokens": len(mem), "ingest_cpu_s": round(time.process_time() - t, 1),
           "facts": facts, "fact_spans": spans, "modes": []}  # fmt: skip
    print(f"[{time.strftime('%H:%M:%S')}] {part}/{kind}: {len(mem)} tokens", file=sys.stderr, flush=True)
    st = mem.stats()
    res["modes"].append(summary("kv", ask(mem, facts)))
    mem.save(work / "warm")
    res["disk_bytes_warm"] = dir_bytes(work / "warm")
    res["shard_bytes_warm"] = dir_bytes(work / "warm", "blocks-*")
    res["kv_bytes_per_token"] = round(res["shard_bytes_warm"] / (st.blocks * cfg.block_size))  # KV + reprs as stored

    if part == "default":
        mem = ContextMemory.load(work / "warm", model, tokenizer=tok, archive_mode="recompute")
        t = time.process_time()
        res["went_cold"] = mem.archive(older_than_tokens=cfg.n_local)
        res["archive_cpu_s"] = round(time.process_time() - t, 2)
    else:
        wanted = blocks_of(cfg, spans, st.blocks)
        t = time.process_time()
        # benchmark only: cram just the facts' blocks (archive() would cram every old block, hours here)
        res["went_cold"] = mem._engine.cold.archive(0, only=wanted)
        res["archive_cpu_s"] = round(time.process_time() - t, 1)
        res["fact_blocks"] = sorted(wanted)
    st = mem.stats()
    res["cold_blocks"] = st.blocks_by_tier["cold"]
    res["cold_bytes_per_token"] = round(st.bytes["cold"] / max(st.blocks_by_tier["cold"] * cfg.block_size, 1), 1)
    print(f"[{time.strftime('%H:%M:%S')}] {part}/{kind}: {res['went_cold']} cold in {res['archive_cpu_s']} CPU s",
          file=sys.stderr, flush=True)
    mem.save(work / "cold")
    res["disk_bytes_cold"] = dir_bytes(work / "cold")
    res["shard_bytes_cold"] = dir_bytes(work / "cold", "blocks-*")  # a cold block still has its place there
    modes = ("recompute", "drop") if part == "default" else ("rehydrate", "recompute", "gist", "drop")
    for mode in modes:
        back = ContextMemory.load(work / "cold", model, tokenizer=tok, archive_mode=mode)
        res["modes"].append(summary(mode, ask(back, facts)))
        m = res["modes"][-1]
        print(f"[{time.strftime('%H:%M:%S')}] {part}/{kind} {mode}: {m['correct']}/{m['n']}, "
              f"{m['cpu_s_mean']} CPU s/answer", file=sys.stderr, flush=True)  # fmt: skip
        back.close()
    shutil.rmtree(work / "warm")
    shutil.rmtree(work / "cold")
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["default", "vectors"])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--facts", type=int, default=8, help="facts (and needles) per history")
    p.add_argument("--kinds", nargs="+", default=["facts", "needles"], choices=["facts", "needles"])
    p.add_argument("--max-steps", type=int, default=400, help="cramming steps per block (vectors part)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    import torch

    from memory_plugin import load_model

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model, tok = load_model()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    out = {"part": a.part, "kinds": []}
    with tempfile.TemporaryDirectory() as work:
        for kind in a.kinds:
            out["kinds"].append(run_kind(model, tok, a.part, kind, a.tokens, a.facts, a.max_steps, Path(work)))
            a.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
