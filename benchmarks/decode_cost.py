"""What one decoded token and a short prefill cost as the history grows: ContextMemory on the
embedded model, grown with filler to each length in turn.

    python benchmarks/decode_cost.py --lengths 2048 16384 65536 --out benchmarks/results/decode_cost.json

Per length: seconds to prefill the question and produce one token (``generate`` with 1 new
token), ms per further decoded token ((generate N+1) - (generate 1)) / N, both the median of
``--repeats``, and their ratio to the first length. Timings only: run it on a quiet machine.

(At commit c1b340f this script also compared copying only the changed blocks into the gathered
selection against gathering all of them: 1.3% at 66k tokens, so that path was taken out again;
``benchmarks/results/decode_cost_swap.json``.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
QUESTION = "Summarise the history in one sentence."


def _generate_seconds(mem, n: int) -> float:
    cp = mem.checkpoint()
    t = time.perf_counter()
    mem.generate(QUESTION, max_new_tokens=n, min_new_tokens=n)
    dt = time.perf_counter() - t
    mem.rollback(cp)
    return dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 16384, 65536])
    p.add_argument("--tokens", type=int, default=32, help="decoded tokens timed per turn")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path)
    a = p.parse_args()

    from memory_plugin import ContextMemory
    from memory_plugin.tasks import FILLER

    mem = ContextMemory.from_pretrained()
    points = []
    for length in sorted(a.lengths):
        while len(mem) < length:
            mem.add_text(FILLER * 20)
        point = {"length": len(mem), "blocks": mem.stats().blocks}
        prefill, decode = [], []
        for _ in range(a.repeats):
            full = _generate_seconds(mem, a.tokens + 1)
            first = _generate_seconds(mem, 1)
            prefill.append(first)
            decode.append((full - first) / a.tokens * 1000)
        point.update(prefill_s=statistics.median(prefill), ms_per_token=statistics.median(decode))
        print(json.dumps(point), flush=True)
        points.append(point)
    base = points[0]
    for pt in points:
        pt["prefill_vs_first_length"] = pt["prefill_s"] / base["prefill_s"]
        pt["ms_per_token_vs_first_length"] = pt["ms_per_token"] / base["ms_per_token"]
    out = {"config": mem.config.to_dict(), "tokens": a.tokens, "repeats": a.repeats, "points": points}
    text = json.dumps(out, indent=1)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
