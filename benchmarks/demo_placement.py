"""What recall would place for `make demo`'s five questions, and each hit's share of the best
hit's score (the rule of ``recall.PLACE_MIN_SHARE``), in seconds instead of the demo's minutes.

The lexical and semantic channels read only the passages' text (see ``benchmarks/fusion.py``), so
the demo's history is rebuilt on a 2-layer random Llama with the embedded tokenizer; the status
notes the demo's model writes are replaced by a fixed line (they are ~1% of the history).

    python benchmarks/demo_placement.py
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import demo  # noqa: E402


def main() -> None:
    import torch

    torch.set_num_threads(1)
    from memory_plugin import ContextMemory, load_model
    from memory_plugin import recall as R
    from memory_plugin.testing import tiny_llama

    _, tok = load_model()
    mem = ContextMemory(tiny_llama(len(tok)), tok)
    rng = random.Random(0)  # the demo's tool outputs, in its order
    mem.add_message("system", "You are an operations agent. Use tools and remember their results.")
    for i, (key, value) in enumerate(demo.FACTS):
        service = demo.SERVICES[i]
        mem.add_message("user", f"Step {i}: read the config of the {service} service.")
        mem.add_message("assistant", f"Calling read_config(service='{service}').")
        mem.add_message("tool", f"read_config result:\n{key} = {value}\nstatus = ok\n")
    for step in range(40):
        out = demo.tool_output(step, rng)
        mem.add_message("user", f"Step {step + len(demo.FACTS)}: check the logs of the next service.")
        mem.add_message("tool", out)
        if (step + 1) % 10 == 0:
            mem.add_message("user", "Write a one-line status note.")
            mem.add_message("assistant", "Status: all services checked, queues normal.")
    print(f"{len(mem)} tokens; placed now: share >= {R.PLACE_MIN_SHARE} of the best, at most {mem.config.recall_k}")
    for i, (key, value) in enumerate(demo.FACTS):
        q = f"What is the {key} in the config of the {demo.SERVICES[i]} service?"
        placed = {(h.start, h.end) for h in mem.place(q)}
        hits = mem.retrieve(q, k=5)
        print(q)
        for h in hits:
            mark = "placed" if (h.start, h.end) in placed else ""
            fact = "<- the value" if value in h.text else ""
            print(f"  {h.score:6.2f} share {h.score / hits[0].score:5.3f} {mark:6} {' '.join(h.text.split())[:58]} {fact}")


if __name__ == "__main__":
    main()
