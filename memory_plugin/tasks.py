"""Passkey retrieval (Mohtashami & Jaggi 2023, as used by InfLLM): a five-digit key hidden in a long
stretch of repetitive filler, asked for at the end. Shared by the tests, benchmarks and demo.

One needle per history: SmolLM2-135M cannot tell several labelled keys in one history apart even
with full attention at 2k tokens (8 needles: 12-25% correct; measured while designing the benchmark,
see docs/BENCHMARKS.md), so several needles per history would measure the model, not the memory.

Example:
    >>> text = passkey_history(tokenizer, n_tokens=12_000, depth=0.3, key="48213")  # doctest: +SKIP
    >>> mem.add_text(text); "48213" in mem.generate(QUESTION, chat=False)  # doctest: +SKIP
    True
"""

from __future__ import annotations

import random

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\nWhat is the pass key? The pass key is"
"""Completion-style question: SmolLM2-135M answers it 100% at 1k tokens, but 0% when asked as a chat turn."""


def needle(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key. "


def passkey(seed: int) -> str:
    return str(random.Random(seed).randint(10000, 99999))


def filler_repeats(tokenizer, n_tokens: int) -> int:
    """How many FILLER sentences make about ``n_tokens`` tokens (with one needle)."""
    per = len(tokenizer(FILLER, add_special_tokens=False)["input_ids"])
    nd = len(tokenizer(needle("00000"), add_special_tokens=False)["input_ids"])
    return max(1, (n_tokens - nd) // per)


def passkey_history(tokenizer, n_tokens: int, depth: float, key: str) -> str:
    """About ``n_tokens`` tokens of filler with the needle for ``key`` at relative ``depth`` (0..1)."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    n = filler_repeats(tokenizer, n_tokens)
    at = round(depth * n)
    return FILLER * at + needle(key) + FILLER * (n - at)
