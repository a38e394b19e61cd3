"""What the embedded SmolLM2-135M itself can do, with full attention and short histories, so the
passkey benchmark measures the memory and not the model:

* question form: the same needle asked as a completion ("... The pass key is") or as a chat turn;
* several labelled needles in one history, each asked separately.

    python benchmarks/probes.py [--n 10]
"""

from __future__ import annotations

import argparse
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from memory_plugin import load_model
    from memory_plugin.baselines import FullAttention
    from memory_plugin.tasks import FILLER, QUESTION, passkey, passkey_history

    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=10, help="questions per probe")
    a = p.parse_args()
    model, tok = load_model()
    mem = FullAttention(model, tok)

    forms = {"completion": 0, "chat turn": 0}
    for i in range(a.n):
        key = passkey(300 + i)
        mem.rollback(0)
        mem.add_text(passkey_history(tok, 1000, (i + 0.5) / a.n, key))
        forms["completion"] += key in mem.generate(QUESTION, max_new_tokens=8, chat=False)
        forms["chat turn"] += key in mem.generate("What is the pass key?", max_new_tokens=16)
    print(f"| question form (1k tokens, full attention) | correct |\n|---|---|")
    for form, n in forms.items():
        print(f"| {form} | {n}/{a.n} |")

    labels = ["red", "blue", "green", "gold", "grey", "pink", "teal", "plum"]
    print("\n| labelled needles in one 2k-token history (full attention) | correct |\n|---|---|")
    for n_needles in (2, 4, 8):
        rng = random.Random(n_needles)
        keys = {c: passkey(rng.randrange(10**6)) for c in labels[:n_needles]}
        parts = [FILLER * 3]
        for c, k in keys.items():
            parts.append(f"The {c} pass key is {k}. Remember it. " + FILLER * (90 // n_needles))
        mem.rollback(0)
        mem.add_text("".join(parts))
        right = sum(
            k in mem.generate(f"\nWhat is the {c} pass key? The {c} pass key is", max_new_tokens=8, chat=False)
            for c, k in keys.items()
        )
        print(f"| {n_needles} needles, each asked | {right}/{n_needles} |")


if __name__ == "__main__":
    main()
