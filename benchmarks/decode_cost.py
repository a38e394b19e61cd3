"""What one decoded token costs as the history grows, and what gathering the selected blocks
costs in it: ContextMemory on the embedded model, the block swap path (``BlockStore.fetch(...,
any_order=True)``: only blocks whose selection changed are copied) against gathering every
selected block afresh, alternated in one process so both see the same machine.

    python benchmarks/decode_cost.py --lengths 2048 16384 65536 --out benchmarks/results/decode_cost.json

Per length and variant: seconds to prefill the question (generate 1 token) and ms per further
decoded token ((generate N+1) - (generate 1)) / N, the median of ``--repeats``; and how the
fetches of one turn went (memo hit: same blocks as last time; swap; gather). Timings only: run
it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import Counter
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
    from memory_plugin.blocks import BlockStore
    from memory_plugin.tasks import FILLER

    swap_in = BlockStore._swap_in
    fetch = BlockStore.fetch
    counts: Counter = Counter()
    swapping = {"on": True}

    def counted_fetch(self, layer, ids, **kw):
        memo = self._last[layer] is not None and sorted(self._last[layer][0]) == sorted(ids)
        counts["memo hit" if memo else "other"] += 1
        return fetch(self, layer, ids, **kw)

    def switchable_swap(self, layer, ids):
        ok = swapping["on"] and swap_in(self, layer, ids)
        counts["swap"] += ok
        return ok

    BlockStore.fetch, BlockStore._swap_in = counted_fetch, switchable_swap
    mem = ContextMemory.from_pretrained()
    points = []
    for length in sorted(a.lengths):
        while len(mem) < length:
            mem.add_text(FILLER * 20)
        point = {"length": len(mem), "blocks": mem.stats().blocks}
        runs: dict[str, dict[str, list[float]]] = {v: {"prefill": [], "decode": []} for v in ("swap", "gather")}
        for _ in range(a.repeats):
            for variant in ("swap", "gather"):
                swapping["on"] = variant == "swap"
                counts.clear()
                full = _generate_seconds(mem, a.tokens + 1)
                if variant == "swap":
                    point["fetches_per_turn"] = {
                        "memo hit": counts["memo hit"],
                        "swap": counts["swap"],
                        "gather": counts["other"] - counts["swap"],
                    }
                first = _generate_seconds(mem, 1)
                runs[variant]["prefill"].append(first)
                runs[variant]["decode"].append((full - first) / a.tokens * 1000)
        for variant, r in runs.items():
            point[variant] = {"prefill_s": statistics.median(r["prefill"]), "ms_per_token": statistics.median(r["decode"])}
        point["gather_over_swap"] = point["gather"]["ms_per_token"] / point["swap"]["ms_per_token"]
        print(json.dumps(point), flush=True)
        points.append(point)
    base = points[0]
    for pt in points:
        for v in ("swap", "gather"):
            pt[v]["ms_per_token_vs_first_length"] = pt[v]["ms_per_token"] / base[v]["ms_per_token"]
    out = {"config": mem.config.to_dict(), "tokens": a.tokens, "repeats": a.repeats, "points": points}
    text = json.dumps(out, indent=1)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
