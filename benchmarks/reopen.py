"""Reopening a durable thread against re-encoding its history, on the embedded model (issue 19).

A thread that a pool (or a restarted server) closed comes back with ``ContextMemory.open``: its
blocks and window state are read from the last snapshot and only the log after it is re-encoded. The
alternative, what an in-RAM pool does after eviction or a restart, is encoding the whole history
again. Both are timed in one process, for each length, and the reopened memory is checked to answer
a passkey question as the original did.

    python benchmarks/reopen.py --lengths 16384 65536 --out benchmarks/results/reopen.json
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
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memory_plugin import ContextMemory, load_model, tasks  # noqa: E402


def run(length: int, model, tok) -> dict:
    history = tasks.passkey_history(tok, length, 0.5, tasks.passkey(7))
    question = "\nThe pass key is"
    root = Path(tempfile.mkdtemp(prefix="reopen-"))
    try:
        t0 = time.perf_counter()
        with ContextMemory.open(root / "thread", model, tokenizer=tok) as mem:
            mem.add_text(history)
            n_tokens = len(mem)
            answer = mem.generate(question, max_new_tokens=8, chat=False)
        encode_s = time.perf_counter() - t0  # encoding the whole history (and the final snapshot)
        t0 = time.perf_counter()
        again = ContextMemory.open(root / "thread", model, tokenizer=tok)
        reopen_s = time.perf_counter() - t0
        same = again.generate(question, max_new_tokens=8, chat=False) == answer and len(again) == n_tokens
        again.close()
        disk = sum(f.stat().st_size for f in (root / "thread").rglob("*") if f.is_file())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "tokens": n_tokens,
        "encode_s": round(encode_s, 2),
        "reopen_s": round(reopen_s, 2),
        "speedup": round(encode_s / reopen_s, 1),
        "same_answer": same,
        "answer": answer,
        "disk_mb": round(disk / 2**20, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/reopen.json"))
    args = ap.parse_args()
    model, tok = load_model()
    rows = []
    for length in args.lengths:
        rows.append(run(length, model, tok))
        print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
