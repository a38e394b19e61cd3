"""Memory vectors on the embedded SmolLM2-135M: capacity (tokens per vector that decode exactly),
optimisation cost (the paper's recipe against ours), and bytes per token.

Natural text is the Python language reference (pydoc_data, shipped with every CPython); random-word
text is the same vocabulary shuffled. Success is exact greedy reconstruction, verified by decoding.

    python benchmarks/cramming.py capacity --vectors 1 2 4 8 --segments 20 --max-steps 2000
    python benchmarks/cramming.py cost --length 32 --segments 8
    python benchmarks/cramming.py compare --length 16 --segments 8 --budget-s 420 --paper-budget-s 300 --cpu-time
    python benchmarks/cramming.py steps      # seconds per optimisation step, float32 against bf16
    python benchmarks/cramming.py bytes

The cold tier (kept KV / recompute / rehydrate / gist / drop) is benchmarks/cold_tier.py.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
GRID = (16, 32, 48, 64, 96, 128, 192, 256)


def segments(tokenizer, kind: str, length: int, n: int, seed: int = 0) -> list[list[int]]:
    """``n`` segments of exactly ``length`` tokens of natural or random-word text."""
    from pydoc_data.topics import topics

    rng = random.Random(f"{kind}:{length}:{seed}")
    text = "\n\n".join(topics[k] for k in sorted(topics))
    if kind == "random":
        words = text.split()
        rng.shuffle(words)
        text = " ".join(words)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    starts = rng.sample(range(len(ids) - length), n)
    return [ids[s : s + length] for s in starts]


def capacity(model, tok, vectors: list[int], kinds: list[str], n: int, max_steps: int, grid, out: Path, lr=None,
             whole_grid: bool = False, bf16: bool | None = None) -> list[dict]:  # fmt: skip
    """Walk up the length grid per (kind, n_vectors) until fewer than 95% of segments decode exactly
    (``whole_grid``: every length regardless; our recipe, all ``n`` segments of a length in one batch).
    Each row also gives every segment's longest exact greedy prefix: the tokens one vector did hold
    where the whole segment did not fit."""
    from dataclasses import replace

    from memory_plugin.vectors import FAST_RECIPE, cram_many, fast_bf16

    recipe = replace(FAST_RECIPE, batch_size=n, bf16=bf16, **({} if lr is None else {"lr": lr}))

    rows = []
    for kind in kinds:
        for k in vectors:
            for length in grid:
                segs = segments(tok, kind, length, n)
                t, cpu = time.perf_counter(), time.process_time()
                res = cram_many(model, segs, n_vectors=k, max_steps=max_steps, recipe=recipe)
                row = {
                    "kind": kind,
                    "n_vectors": k,
                    "length": length,
                    "exact": sum(r.exact for r in res) / n,
                    "segments": n,
                    "median_steps": sorted(r.steps for r in res)[n // 2],
                    "seconds": time.perf_counter() - t,
                    "cpu_seconds": time.process_time() - cpu,
                    "steps_exact": sorted(r.steps for r in res if r.exact),
                    "max_steps": max_steps,
                    "lr": recipe.lr,
                    "bf16": fast_bf16(model.device) if recipe.bf16 is None else recipe.bf16,
                    "exact_prefix": [exact_prefix(model, r, sg) for r, sg in zip(res, segs)],
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
                out.write_text(json.dumps(rows, indent=1))
                if row["exact"] < 0.95 and not whole_grid:
                    break
    return rows


def cost(model, tok, length: int, n: int, max_steps: int) -> list[dict]:
    """Seconds and steps per exact segment: the paper's recipe, ours one at a time, ours batched."""
    from dataclasses import replace

    from memory_plugin.vectors import FAST_RECIPE, PAPER_RECIPE, cram_many

    segs = segments(tok, "natural", length, n, seed=1)
    rows = []
    for name, recipe in (
        ("paper (lr 1e-2, one at a time)", PAPER_RECIPE),
        ("ours, one at a time", replace(FAST_RECIPE, batch_size=1)),
        (f"ours, batched ({FAST_RECIPE.batch_size})", FAST_RECIPE),
    ):
        torch_seed(0)
        t = time.perf_counter()
        res = cram_many(model, segs, n_vectors=1, max_steps=max_steps, recipe=recipe)
        secs = time.perf_counter() - t
        exact = sum(r.exact for r in res)
        row = {
            "recipe": name,
            "length": length,
            "segments": n,
            "exact": exact,
            "seconds": secs,
            "seconds_per_exact": secs / exact if exact else None,
            "mean_steps": sum(r.steps for r in res) / n,
            "max_steps": max_steps,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def exact_prefix(model, vecs, ids: list[int]) -> int:
    """Tokens greedy decoding from ``vecs`` gets right before its first mistake: the first
    teacher-forced argmax miss (while decoding agrees, its inputs are the segment's tokens), float32."""
    import torch

    from memory_plugin.vectors import memory_prefix

    embed = model.get_input_embeddings()
    with torch.no_grad():
        prefix = memory_prefix(model, vecs)  # [anchor,] vectors
        x = torch.cat([prefix[None], embed(torch.tensor([ids[:-1]]))], dim=1)
        pred = model(inputs_embeds=x).logits[0, len(prefix) - 1 :].argmax(-1).tolist()
    return next((i for i, (p, t) in enumerate(zip(pred, ids)) if p != t), len(ids))


def compare(
    model, tok, length: int, n: int, max_steps: int, budget_s: float, paper_budget_s: float, lrs,
    paper_anchor_budget_s: float = 0, cpu_time: bool = False, also_float32: bool = False,
) -> dict:  # fmt: skip
    """Seconds per exact segment on the same ``n`` segments: ours (batched, greedy-decoding stop, lr
    schedule, anchor token), then the paper's recipe (float32, one at a time, lr 1e-2, teacher-forced
    stop, vectors first) and, given a budget, the paper's recipe with our anchor token (what the
    anchor alone is worth). Each has a budget (``cpu_time``: CPU seconds of this process, which a
    busy machine does not inflate; wall-clock otherwise); segments a one-at-a-time recipe did not
    reach are reported as not run."""
    from dataclasses import replace

    from memory_plugin.vectors import FAST_RECIPE, PAPER_RECIPE, cram_many, fast_bf16

    clock = time.process_time if cpu_time else time.perf_counter
    segs = segments(tok, "natural", length, n, seed=1)
    out = {"length": length, "segments": n, "max_steps": max_steps, "clock": clock.__name__, "runs": []}
    plans = [(f"ours lr {lr}", replace(FAST_RECIPE, lr=lr, batch_size=n), budget_s / len(lrs)) for lr in lrs]
    if also_float32:  # what bf16 autocast is worth, where it is on (fast_bf16)
        plans += [
            (f"ours lr {lr} float32", replace(FAST_RECIPE, lr=lr, batch_size=n, bf16=False), budget_s / len(lrs)) for lr in lrs
        ]
    plans.append(("paper", PAPER_RECIPE, paper_budget_s))
    if paper_anchor_budget_s:
        plans.append(("paper + anchor", replace(PAPER_RECIPE, anchor=True), paper_anchor_budget_s))
    for name, recipe, budget in plans:
        torch_seed(0)
        t, wall = clock(), time.perf_counter()
        deadline = t + budget
        res = cram_many(model, segs, n_vectors=1, max_steps=max_steps, recipe=recipe,
                        should_stop=lambda: clock() > deadline)  # fmt: skip
        secs = clock() - t
        exact = sum(r.exact for r in res)
        run = [r for r in res if r.steps > 0]
        row = {
            "recipe": name,
            "lr": recipe.lr,
            "batch_size": recipe.batch_size,
            "bf16": fast_bf16(model.device) if recipe.bf16 is None else recipe.bf16,
            "stop": recipe.stop,
            "budget_s": budget,
            "seconds": secs,
            "wall_seconds": time.perf_counter() - wall,
            "segments_run": len(run),
            "exact": exact,
            "seconds_per_exact": secs / exact if exact else None,
            "steps": [r.steps for r in res],
            "exact_each": [r.exact for r in res],
            "exact_prefix": [exact_prefix(model, r, sg) if r.steps else None for r, sg in zip(res, segs)],
            "seconds_per_step": secs / max(1, max(r.steps for r in res)) if recipe.batch_size > 1 else secs / max(1, sum(r.steps for r in res)),
        }
        out["runs"].append(row)
        print(json.dumps(row), flush=True)
    return out


def step_cost(model, shapes=((1, 16), (8, 16), (1, 32), (8, 32), (8, 64), (8, 128))) -> list[dict]:
    """Seconds per optimisation step (forward and backward to the vectors), float32 and bf16 autocast."""
    import torch
    import torch.nn.functional as F

    from memory_plugin.vectors import fast_bf16

    fast = fast_bf16(torch.device("cpu"))
    embed = model.get_input_embeddings()
    rows = []
    for b, n in shapes:
        ids = torch.randint(0, embed.weight.shape[0], (b, n), generator=torch.Generator().manual_seed(0))
        tok_emb = embed(ids).detach()
        row = {"batch": b, "tokens": n, "fast_bf16": fast}
        for name, bf16 in (("float32", False), ("bf16", True)):
            if bf16 and not fast and b * n > 256:
                continue  # several seconds a step on an AVX2 CPU; the small shapes say enough
            v = torch.randn(b, 1, embed.weight.shape[1], requires_grad=True)
            times = []
            for _ in range(3):
                t = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    logits = model(inputs_embeds=torch.cat([v, tok_emb[:, :-1]], 1)).logits
                loss = F.cross_entropy(logits.float().transpose(1, 2), ids)
                torch.autograd.grad(loss, v)
                times.append(time.perf_counter() - t)
            row[name] = min(times[1:])
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def torch_seed(s: int) -> None:
    import torch

    torch.manual_seed(s)


def bytes_per_token(model) -> dict:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim
    return {
        "kv_fp32": kv * 4,
        "kv_bf16": kv * 2,
        "kv_int8": kv,  # plus one scale per channel and block, under 1% at block_size 128
        "vector_fp32": c.hidden_size * 4,  # one memory vector; divide by the tokens it holds
        "token_id_int32": 4,
    }


def main() -> None:
    from memory_plugin import load_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    cap = sub.add_parser("capacity")
    cap.add_argument("--vectors", type=int, nargs="+", default=[1, 2, 4, 8])
    cap.add_argument("--kinds", nargs="+", default=["natural", "random"], choices=["natural", "random"])
    cap.add_argument("--segments", type=int, default=20)
    cap.add_argument("--max-steps", type=int, default=2000)
    cap.add_argument("--grid", type=int, nargs="+", default=list(GRID))
    cap.add_argument("--lr", type=float, default=None, help="default: our recipe's")
    cap.add_argument("--whole-grid", action="store_true", help="every length, not only up to the first below 95%%")
    cap.add_argument("--float32", action="store_true", help="no bf16 autocast, even where bf16 is fast")
    cap.add_argument("--out", type=Path, default=Path("benchmarks/results/cramming/capacity.json"))
    co = sub.add_parser("cost")
    co.add_argument("--length", type=int, default=32)
    co.add_argument("--segments", type=int, default=8)
    co.add_argument("--max-steps", type=int, default=2000)
    co.add_argument("--out", type=Path, default=Path("benchmarks/results/cramming/cost.json"))
    cm = sub.add_parser("compare")
    cm.add_argument("--length", type=int, default=16)
    cm.add_argument("--segments", type=int, default=8)
    cm.add_argument("--max-steps", type=int, default=2000)
    cm.add_argument("--lrs", type=float, nargs="+", default=[0.1])
    cm.add_argument("--budget-s", type=float, default=420, help="wall-clock for ours (split over --lrs)")
    cm.add_argument("--paper-budget-s", type=float, default=300)
    cm.add_argument("--paper-anchor-budget-s", type=float, default=0, help="also the paper's recipe with our anchor token")
    cm.add_argument("--cpu-time", action="store_true", help="budgets and seconds in CPU time of this process")
    cm.add_argument("--also-float32", action="store_true", help="also ours without bf16 autocast")
    cm.add_argument("--out", type=Path, default=Path("benchmarks/results/cramming/compare.json"))
    st = sub.add_parser("steps")
    st.add_argument("--out", type=Path, default=Path("benchmarks/results/cramming/steps.json"))
    sub.add_parser("bytes")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared 2-core machine two "
                   "OpenMP threads spin-wait on each other when preempted; a step took 14.7 s instead of ~0.3)")
    a = p.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    model, tok = load_model()
    torch_seed(0)
    if a.cmd == "capacity":
        a.out.parent.mkdir(parents=True, exist_ok=True)
        bf16 = False if a.float32 else None
        capacity(model, tok, a.vectors, a.kinds, a.segments, a.max_steps, a.grid, a.out, a.lr, a.whole_grid, bf16)
    elif a.cmd == "cost":
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(cost(model, tok, a.length, a.segments, a.max_steps), indent=1))
    elif a.cmd == "compare":
        a.out.parent.mkdir(parents=True, exist_ok=True)
        res = compare(model, tok, a.length, a.segments, a.max_steps, a.budget_s, a.paper_budget_s, a.lrs,
                      a.paper_anchor_budget_s, a.cpu_time, a.also_float32)  # fmt: skip
        a.out.write_text(json.dumps(res, indent=1))
    elif a.cmd == "steps":
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(step_cost(model), indent=1))
    else:
        print(json.dumps(bytes_per_token(model), indent=1))


if __name__ == "__main__":
    main()
