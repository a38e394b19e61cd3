"""`make demo`: an agent loop whose history grows far past the model's 8k-token context.

Facts are planted early in tool outputs; after ~40 more tool calls the agent is asked about them,
as a user would ask (chat questions). ContextMemory answers from its whole history: its hybrid
search places the passages it recalls right before the question, and the table shows them, with
the spans the model attended most while answering. The truncation baseline (what an agent does
when it cuts old messages to fit) sees only the last few thousand tokens. Runs on the embedded
SmolLM2-135M-Instruct in a few minutes on 2 CPU cores.

    python examples/demo.py [--steps 40]
"""

from __future__ import annotations

import argparse
import random
import time

from tqdm import tqdm

from memory_plugin import ContextMemory
from memory_plugin.baselines import Truncation

# Facts the agent reads in its first tool calls.
FACTS = [
    ("database_port", "5433"),
    ("api_rate_limit", "750"),
    ("build_number", "20417"),
    ("vpn_pin", "8831"),
    ("invoice_total", "1290"),
]
SERVICES = ["billing", "search", "auth", "storage", "mailer", "scheduler", "gateway"]


def tool_output(step: int, rng: random.Random) -> str:
    """A deterministic, log-like tool result of ~270 tokens."""
    lines = [f"scan_logs(service='{SERVICES[step % len(SERVICES)]}') returned {12} lines:"]
    for i in range(12):
        lines.append(
            f"worker {rng.choice('abcdefg')} finished job {step}-{i}: {rng.choice(['ok', 'ok', 'retried', 'slow'])}, "
            f"queue {rng.choice(['low', 'normal', 'high'])}, cache {rng.choice(['warm', 'cold'])}."
        )
    return "\n".join(lines)


def run_agent(mem: ContextMemory, baseline: Truncation, steps: int) -> list[tuple[int, float]]:
    """Plant the facts, then run ``steps`` more tool calls; every 10 steps the agent writes a note."""
    rng = random.Random(0)
    notes = []
    for target in (mem, baseline):
        target.add_message("system", "You are an operations agent. Use tools and remember their results.")
    for i, (key, value) in enumerate(FACTS):
        service = SERVICES[i]
        for target in (mem, baseline):
            target.add_message("user", f"Step {i}: read the config of the {service} service.")
            target.add_message("assistant", f"Calling read_config(service='{service}').")
            target.add_message("tool", f"read_config result:\n{key} = {value}\nstatus = ok\n")
    for step in tqdm(range(steps), desc="agent steps", unit="step"):
        out = tool_output(step, rng)
        for target in (mem, baseline):
            target.add_message("user", f"Step {step + len(FACTS)}: check the logs of the next service.")
            target.add_message("tool", out)
        if (step + 1) % 10 == 0:
            t = time.perf_counter()
            mem.generate("Write a one-line status note.", max_new_tokens=16, remember=True)
            notes.append((len(mem), time.perf_counter() - t))
    return notes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40, help="tool calls after the facts (each ~300 tokens)")
    args = p.parse_args()

    t = time.perf_counter()
    mem = ContextMemory.from_pretrained()
    cfg = mem.config
    baseline = Truncation(mem.model, mem.tokenizer, window=cfg.span)
    print(f"Loaded {mem.model_name} in {time.perf_counter() - t:.0f}s; trained context 8192 tokens.")
    print(f"Memory: n_init={cfg.n_init}, n_local={cfg.n_local}, topk={cfg.topk} x block_size={cfg.block_size}")
    print(f"Truncation baseline keeps the last {cfg.span} tokens (the same attention span).\n")

    t = time.perf_counter()
    notes = run_agent(mem, baseline, args.steps)
    print(f"\nHistory: {len(mem)} tokens in {time.perf_counter() - t:.0f}s (incl. status notes).")
    for n, s in notes:
        print(f"  status note at {n:>6} tokens of history: {s:.2f}s")

    rows = []
    for i, (key, value) in enumerate(tqdm(FACTS, desc="questions", unit="q")):
        q = f"What is the {key} in the config of the {SERVICES[i]} service?"  # asked as a user would
        t = time.perf_counter()
        ans = mem.generate(q, max_new_tokens=24, explain=True)  # hybrid recall placement is on by default
        row = [key, value, _line(ans.text), value in ans.text, time.perf_counter() - t, ans]
        t = time.perf_counter()
        plain = baseline.generate(q, max_new_tokens=24)
        rows.append(row + [_line(plain), value in plain, time.perf_counter() - t])

    yes = {True: "yes", False: "no"}
    print(f"\n{'question':<16} {'truth':>6} | {'ContextMemory':<30} {'ok':<3} {'s':>5} | {'truncation':<22} {'ok':<3} {'s':>5}")
    print("-" * 100)
    for key, value, a1, ok1, s1, ans, a2, ok2, s2 in rows:
        print(f"{key:<16} {value:>6} | {a1[:30]:<30} {yes[ok1]:<3} {s1:>5.2f} | {a2[:22]:<22} {yes[ok2]:<3} {s2:>5.2f}")
        for h in ans.placed:
            print(f"{'':>25} placed   @{h.start:>6}: {_line(h.text)[:60]}")
        for h in ans.attended[:2]:
            print(f"{'':>25} attended @{h.start:>6} ({h.score:.1%}): {_line(h.text)[:50]}")
    st = mem.stats()
    cm_ok, tr_ok = sum(r[3] for r in rows), sum(r[7] for r in rows)
    print("-" * 100)
    print(f"correct: ContextMemory {cm_ok}/{len(rows)}, truncation {tr_ok}/{len(rows)}")
    print(
        f"memory held: {st.tokens} tokens = {st.init_tokens} init + {st.blocks} blocks x {cfg.block_size} + "
        f"{st.window_tokens} window; {st.total_bytes / 2**20:.0f} MiB of KV"
    )


def _line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    main()
