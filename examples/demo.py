"""`make demo`: an agent loop whose history grows far past the model's 8k-token context.

Facts are planted early in tool outputs; after ~40 more tool calls the agent is asked about them.
ContextMemory answers from its whole history; the truncation baseline (what an agent does when it
cuts old messages to fit) sees only the last few thousand tokens. Runs on the embedded
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

# Facts the agent reads in its first tool calls. A 135M model copies numbers well; the questions are
# completion-style ("<key> =") because it answers those far more reliably than chat questions.
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
    for key, value in tqdm(FACTS, desc="questions", unit="q"):
        q = f"\n{key} ="
        row = [key, value]
        for target in (mem, baseline):
            t = time.perf_counter()
            ans = target.generate(q, max_new_tokens=8, chat=False).strip().split("\n")[0]
            first_word = ans.split()[0].strip(".,;") if ans.split() else ""
            row += [ans, first_word == value, time.perf_counter() - t]
        rows.append(row)

    print(f"\n{'question':<16} {'truth':>6} | {'ContextMemory':<14} {'ok':<3} {'s':>5} | {'truncation':<14} {'ok':<3} {'s':>5}")
    print("-" * 80)
    for key, value, a1, ok1, s1, a2, ok2, s2 in rows:
        yes = {True: "yes", False: "no"}
        print(f"{key:<16} {value:>6} | {a1[:14]:<14} {yes[ok1]:<3} {s1:>5.2f} | {a2[:14]:<14} {yes[ok2]:<3} {s2:>5.2f}")
    st = mem.stats()
    cm_ok, tr_ok = sum(r[3] for r in rows), sum(r[6] for r in rows)
    print("-" * 80)
    print(f"correct: ContextMemory {cm_ok}/{len(rows)}, truncation {tr_ok}/{len(rows)}")
    print(
        f"memory held: {st.tokens} tokens = {st.init_tokens} init + {st.blocks} blocks x {cfg.block_size} + "
        f"{st.window_tokens} window; {st.total_bytes / 2**20:.0f} MiB of KV"
    )


if __name__ == "__main__":
    main()
