"""What block selection costs per scan, and how many blocks the int8 scan scores twice (issue 24,
target 1: the scan of every block's representative keys is what grows with the history).

    python benchmarks/scan_cost.py tables --blocks 50 494 1024 2030 4096 8174 --out benchmarks/results/scan_cost/tables.json
    python benchmarks/scan_cost.py tables --repr-heads 3 --blocks 494 2030 8174 --out benchmarks/results/scan_cost/tables-kv.json
    python benchmarks/scan_cost.py turn --load DIR --grow 262144 1048576 --out benchmarks/results/scan_cost/turn-DIR.json

``tables``: 30 layers' tables of random keys (9 heads of 64, SmolLM2's), each scanned in turn for
one query as a decode step does (so a table is not in cache when scanned again), ms of CPU per
scan (``BlockStore.select``, z-scored, top 16) for: a float32 table (one matrix-vector product),
the int8 table through the bf16 kernel (``Int8ReprTable``, its threshold lowered to 1), and the
int8 table decoded a chunk at a time (the kernel off). Every path must select the same blocks.
``--repr-heads 3``: one key per KV head (``MemoryConfig.repr_heads="kv"``), still 9 query heads.

``turn``: a memory saved with ``ContextMemory.save`` loaded, at its own length and grown by
replicated blocks (``decode_cost.replicate_blocks``), one turn as ``passkey.py perf`` (a ~200-token
message, 32 tokens decoded) with the kernel scan on from the first block: per scan, how many
blocks were candidates (scored again in float32), and the CPU seconds the turn spent in
``BlockStore.select`` (of it, the kernel's approximation and the rescoring) and ``fetch``.
One torch thread, process CPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def tables(sizes: list[int], layers: int = 30, repeats: int = 20, repr_heads: int = 9) -> list[dict]:
    import torch

    from memory_plugin import tiers
    from memory_plugin.blocks import BlockStore
    from memory_plugin.policies import RELEVANCE

    heads, dim = 9, 64
    rel = RELEVANCE["zscore"]
    rows = []
    for n in sizes:
        data = [torch.randn(n, repr_heads, dim) * torch.rand(1, repr_heads, 1) * 3 for _ in range(layers)]
        stores = {}
        for name in ("float32", "int8 kernel", "int8 chunks"):
            store = BlockStore(
                layers, heads, 3, dim, block_size=128, dtype=torch.float32, kv_quantization="int8", compact_reprs=name != "float32",
                repr_heads=repr_heads,
            )  # fmt: skip
            for i in range(layers):
                if name == "int8 chunks":
                    store.layers[i].table.fast = False
                store.layers[i].set_reprs(data[i])
                store.layers[i].kv = [None] * n
            stores[name] = store
        q = torch.randn(heads, dim)
        row = {"blocks": n, "repr_heads": repr_heads}
        picks = {}
        old, tiers.FAST_SCAN_MIN_BLOCKS = tiers.FAST_SCAN_MIN_BLOCKS, 1
        try:
            for name, store in stores.items():
                scan = lambda: [store.select(i, q, 16, rel) for i in range(layers)]  # noqa: E731
                picks[name] = scan()
                t = time.process_time()
                for _ in range(repeats):
                    scan()
                row[name] = (time.process_time() - t) / repeats / layers * 1e3
        finally:
            tiers.FAST_SCAN_MIN_BLOCKS = old
        row["same_selection"] = len({json.dumps(p) for p in picks.values()}) == 1
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def turn(path: Path, grow: list[int]) -> list[dict]:
    import torch

    from decode_cost import replicate_blocks
    from passkey import TURN_NEW_TOKENS, _turn_message

    from memory_plugin import ContextMemory, load_model, tiers
    from memory_plugin.blocks import BlockStore

    seconds = dict.fromkeys(("select", "approximate", "rescore", "fetch"), 0.0)
    candidates: list[int] = []

    def timed(cls, name, key, record=None):
        f = getattr(cls, name)

        def wrapper(*a, **kw):
            if record is not None:
                record(a)
            t = time.process_time()
            out = f(*a, **kw)
            seconds[key] += time.process_time() - t
            return out

        setattr(cls, name, wrapper)

    timed(BlockStore, "select", "select")
    timed(BlockStore, "fetch", "fetch")
    timed(tiers.Int8ReprTable, "approximate", "approximate")
    timed(tiers.Int8ReprTable, "_rescore", "rescore", record=lambda a: candidates.append(len(a[1])))
    tiers.FAST_SCAN_MIN_BLOCKS = 1
    model, tok = load_model()
    msg = _turn_message(tok)
    mem = ContextMemory.load(path, model, tokenizer=tok)
    rows = []
    for target in [0, *grow]:
        if target:
            replicate_blocks(mem, target)
        for _ in range(2):  # the first turn warms up; the second is reported
            candidates.clear()
            for k in seconds:
                seconds[k] = 0.0
            cp = mem.checkpoint()
            t = time.process_time()
            mem.add_message("user", msg)
            mem.generate("Summarise the tool output.", max_new_tokens=TURN_NEW_TOKENS, min_new_tokens=TURN_NEW_TOKENS)
            total = time.process_time() - t
            mem.rollback(cp)
        c = sorted(candidates)
        row = {"tokens": target or len(mem), "blocks": mem.stats().blocks, "scans": len(c), "turn_cpu_s": total,
               "candidates_median": statistics.median(c), "candidates_p90": c[int(0.9 * len(c))], "candidates_max": c[-1],
               "candidates_mean": sum(c) / len(c), **{f"{k}_cpu_s": v for k, v in seconds.items()}}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("tables")
    t.add_argument("--blocks", type=int, nargs="+", default=[50, 494, 1024, 2030, 4096, 8174])
    t.add_argument("--repr-heads", type=int, default=9, help="representative keys per block (3: one per KV head)")
    u = sub.add_parser("turn")
    u.add_argument("--load", type=Path, required=True)
    u.add_argument("--grow", type=int, nargs="*", default=[262144, 1048576])
    for s in (t, u):
        s.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    rows = tables(a.blocks, repr_heads=a.repr_heads) if a.what == "tables" else turn(a.load, a.grow)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"what": a.what, "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
