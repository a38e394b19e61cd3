"""Durable memory with bounded RAM on the embedded model: a long history ingested into
``ContextMemory.open(dir)`` with ``max_resident_bytes``, against the same history all in RAM.

Each mode runs in its own process (its own RSS). Reported per mode: peak RSS beyond the model
(sampled every 20 ms while the history is ingested and questions are answered), the passkey answer,
whether greedy answers to a few prompts equal the all-in-RAM ones, per-turn latency, bytes on disk
per token, save and load time.

    python benchmarks/persistence.py --tokens 262144 --budget-mb 1024      # the issue's setting
    python benchmarks/persistence.py --tokens 32768 --budget-mb 700        # quick: most blocks on disk

The budget must exceed the fixed part (local window and init tokens of every layer, a second window
set for compaction, one gathered selection, one shard being written: about 600 MB with the default
geometry on the embedded model); the rest holds representative keys and an LRU of blocks.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from passkey import _rss_mb, _turn_latency, _turn_message  # noqa: E402

MODES = ("ram", "budget", "budget_int8")
PROMPTS = ("\nThe first thing the history says is", "\nSummary of the history so far:", "\nThe grass is")


class PeakRSS:
    """Highest resident set size seen by a sampling thread (ru_maxrss would include the model load's
    transient peak, which is not the history's)."""

    def __init__(self, every: float = 0.02):
        self.peak, self._stop = _rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self.peak = max(self.peak, _rss_mb())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _rss_mb())


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_mode(mode: str, tokens: int, budget_mb: int, depth: float, workdir: Path, tune_allocator: bool = False) -> dict:
    from memory_plugin import ContextMemory, MemoryConfig, load_model
    from memory_plugin.blocks import return_freed_memory_to_os
    from memory_plugin.tasks import FILLER, QUESTION, filler_repeats, needle, passkey

    model, tok = load_model()
    if tune_allocator:  # what a RAM budget does to the allocator, here without a budget
        return_freed_memory_to_os()
    rss_model = _rss_mb()
    cfg = MemoryConfig()
    if mode != "ram":
        cfg = cfg.replace(max_resident_bytes=budget_mb * 2**20)
    if mode == "budget_int8":
        cfg = cfg.replace(kv_quantization="int8")
    store = workdir / mode
    peak = PeakRSS()
    mem = ContextMemory(model, tok, cfg) if mode == "ram" else ContextMemory.open(store, model, tokenizer=tok, config=cfg)
    n_rep, key = filler_repeats(tok, tokens), passkey(4242)
    at, step = round(depth * n_rep), 100  # ~2k tokens per add, as an agent's tool outputs would come
    t = time.perf_counter()
    for i in range(0, n_rep, step):
        if i <= at < i + step:
            mem.add_text(FILLER * (at - i) + needle(key) + FILLER * (min(n_rep, i + step) - at))
        else:
            mem.add_text(FILLER * (min(n_rep, i + step) - i))
    ingest_s = time.perf_counter() - t
    answer = mem.generate(QUESTION, max_new_tokens=8, chat=False)
    answers = [mem.generate(p, max_new_tokens=12, chat=False) for p in PROMPTS]
    turn = _turn_latency(mem, _turn_message(tok))
    out = {
        "mode": mode,
        "tokens": len(mem),
        "budget_mb": budget_mb if mode != "ram" else None,
        "kv_quantization": cfg.kv_quantization,
        "ingest_tok_s": len(mem) / ingest_s,
        "turn_seconds": turn,
        "key": key,
        "answer": answer,
        "correct": key in answer,
        "answers": answers,
        "stats_bytes": mem.stats().bytes,
        "blocks_by_tier": mem.stats().blocks_by_tier,
    }
    out["peak_rss_beyond_model_mb"] = peak.stop() - rss_model
    if mode != "ram":
        mem.close()
        out["disk_bytes_per_token"] = _dir_bytes(store) / out["tokens"]
        t = time.perf_counter()
        loaded = ContextMemory.load(store, model, tokenizer=tok, max_resident_bytes=cfg.max_resident_bytes)
        out["load_seconds"] = time.perf_counter() - t
        out["answer_after_load"] = loaded.generate(QUESTION, max_new_tokens=8, chat=False)
        t = time.perf_counter()
        loaded.save(workdir / f"{mode}-copy")
        out["save_seconds"] = time.perf_counter() - t
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=262144)
    p.add_argument("--budget-mb", type=int, default=1024)
    p.add_argument("--depth", type=float, default=0.3, help="where the passkey sits in the history")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/persistence"))
    p.add_argument("--tune-allocator", action="store_true", help="set the allocator as a RAM budget does, in every mode")
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.mode:
        res = run_mode(a.mode, a.tokens, a.budget_mb, a.depth, a.workdir, a.tune_allocator)
        (a.out / f"{a.mode}-{a.tokens}.json").write_text(json.dumps(res, indent=1))
        return
    a.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mp-persist-"))
    try:
        for m in a.modes:
            cmd = [sys.executable, __file__, "--mode", m, "--workdir", str(work), "--out", str(a.out)]
            cmd += ["--tokens", str(a.tokens), "--budget-mb", str(a.budget_mb), "--depth", str(a.depth)]
            cmd += ["--tune-allocator"] if a.tune_allocator else []
            subprocess.run(cmd, check=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(report(a.out, a.tokens))


def report(out: Path, tokens: int) -> str:
    runs = {m: json.loads((out / f"{m}-{tokens}.json").read_text()) for m in MODES if (out / f"{m}-{tokens}.json").exists()}
    ram = runs.get("ram")
    lines = [
        "| mode | tokens | budget | peak RSS beyond model | passkey | answers = all-in-RAM | turn s (ratio) | ingest tok/s | disk B/token | save s | load s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in runs.items():
        same = "—" if m == "ram" or ram is None else ("yes" if r["answers"] == ram["answers"] and r["answer"] == ram["answer"] else "no")
        ratio = f" ({r['turn_seconds'] / ram['turn_seconds']:.2f}x)" if ram else ""
        budget = f"{r['budget_mb']} MiB" if r["budget_mb"] else "—"
        disk = f"{r['disk_bytes_per_token']:.0f}" if "disk_bytes_per_token" in r else "—"
        lines.append(
            f"| {m} | {r['tokens']} | {budget} | {r['peak_rss_beyond_model_mb']:.0f} MiB | {'✓' if r['correct'] else '✗'} {r['answer'].strip()!r} "
            f"| {same} | {r['turn_seconds']:.2f}{ratio} | {r['ingest_tok_s']:.0f} | {disk} "
            f"| {r.get('save_seconds', float('nan')):.1f} | {r.get('load_seconds', float('nan')):.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
