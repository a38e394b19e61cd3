"""Where ContextMemory spends its time: cProfile of ingesting 2k more tokens and of one turn (add a
200-token message, generate 32 tokens) after a filler history of ``--length`` tokens.

    python benchmarks/profile_memory.py --length 12000 --threads 1
    python benchmarks/profile_memory.py --length 12000 --budget-mb 700     # blocks on disk (ContextMemory.open)
    python benchmarks/profile_memory.py --kernel --threads 1                # CPU flash kernel: masked or not, fp32 or bf16
    python benchmarks/profile_memory.py --gather                            # gathering 16 selected blocks vs copying 2
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from passkey import _turn_message  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=12000)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--budget-mb", type=int, help="open a durable memory with this RAM budget")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--kernel", action="store_true", help="only time the CPU flash kernel on one chunk's shapes")
    p.add_argument("--gather", action="store_true", help="only time gathering selected blocks (one layer, embedded model)")
    a = p.parse_args()

    import torch

    if a.kernel:
        return kernel(a.threads)
    if a.gather:
        return gather(a.threads)

    from memory_plugin import ContextMemory, MemoryConfig, load_model
    from memory_plugin.tasks import FILLER, filler_repeats

    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok = load_model()
    if a.budget_mb:
        cfg = MemoryConfig(max_resident_bytes=a.budget_mb * 2**20)
        mem = ContextMemory.open(tempfile.mkdtemp(prefix="mp-profile-"), model, tokenizer=tok, config=cfg)
    else:
        mem = ContextMemory(model, tok, MemoryConfig())
    mem.add_text(FILLER * filler_repeats(tok, a.length))

    def profiled(label, fn):
        pr = cProfile.Profile()
        t = time.perf_counter()
        pr.enable()
        fn()
        pr.disable()
        print(f"\n== {label}: {time.perf_counter() - t:.2f} s")
        pstats.Stats(pr).sort_stats("tottime").print_stats(a.top)

    cp = mem.checkpoint()
    extra = FILLER * filler_repeats(tok, 2048)
    profiled("ingest 2k tokens", lambda: mem.add_text(extra))
    mem.rollback(cp)
    msg = _turn_message(tok)

    def turn():
        mem.add_message("user", msg)
        mem.generate("What is the pass key?", max_new_tokens=32, min_new_tokens=32)
        mem.rollback(cp)

    turn()  # warm-up
    profiled("turn (200-token message + 32 generated tokens)", turn)
    print("blocks by tier:", mem.stats().blocks_by_tier)


def kernel(threads: int) -> None:
    """One layer's chunk on the embedded model: 512 queries (9 heads), 3,200 keys (3 KV heads)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    for dt in (torch.float32, torch.bfloat16):
        q, k, v = torch.randn(1, 9, 512, 64, dtype=dt), torch.randn(1, 3, 3200, 64, dtype=dt), torch.randn(1, 3, 3200, 64, dtype=dt)
        for mask in (None, torch.zeros(512, 3200, dtype=dt)):
            flash(q, k, v, attn_mask=mask, scale=0.125)
            t = time.perf_counter()
            for _ in range(5):
                flash(q, k, v, attn_mask=mask, scale=0.125)
            print(f"{str(dt):15s} mask={mask is not None!s:5s} {(time.perf_counter() - t) / 5 * 1000:.1f} ms")


def gather(threads: int, n_blocks: int = 6000, topk: int = 16, reps: int = 400) -> None:
    """What ``BlockStore.fetch`` does when a layer's selection changes: concatenate ``topk`` blocks
    drawn at random from a pool far larger than the CPU caches (6000 float32 blocks of 128 tokens,
    3 KV heads: 1.2 GB), against copying only two of them into a kept buffer."""
    import random

    import torch

    if threads:
        torch.set_num_threads(threads)
    pool = [torch.randn(2, 3, 128, 64) for _ in range(n_blocks)]
    buf = torch.empty(2, 3, topk * 128, 64)

    def copy_two(parts):
        for s, p in enumerate(parts[:2]):
            buf[:, :, s * 128 : (s + 1) * 128] = p

    for label, fn in (("torch.cat of 16 blocks", lambda ps: torch.cat(ps, dim=2)), ("copy 2 blocks into a buffer", copy_two)):
        rnd = random.Random(1)
        t = time.perf_counter()
        for _ in range(reps):
            fn([pool[i] for i in rnd.sample(range(n_blocks), topk)])
        print(f"{label:28s} {(time.perf_counter() - t) / reps * 1e6:.0f} us")


if __name__ == "__main__":
    main()
