"""Ingest throughput of the attention code paths on the embedded model, as ratios in one run.

    python benchmarks/attention_paths.py [--tokens 6144]

explicit: logits materialised, every query adds to the attention mass (InfLLM's torch path);
flash: fused CPU flash kernel per key set merged by log-sum-exp, mass from every query;
flash + stride 8: the default, mass from queries at positions divisible by 8.
Also plain transformers (sdpa, full attention) over the same tokens, for scale.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import torch

    from memory_plugin import ContextMemory, MemoryConfig, load_model
    from memory_plugin import attention as attn
    from memory_plugin.tasks import FILLER

    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=6144)
    a = p.parse_args()
    model, tok = load_model()
    ids = tok(FILLER * (a.tokens // 20), add_special_tokens=False)["input_ids"][: a.tokens]
    flash = attn._FLASH_CPU
    results = {}
    for name, use_flash, stride in (("explicit, stride 1", False, 1), ("flash, stride 1", True, 1), ("flash, stride 8", True, 8)):
        attn._FLASH_CPU = flash if use_flash else None
        mem = ContextMemory(model, tok, MemoryConfig().replace(mass_stride=stride))
        t = time.perf_counter()
        mem._encode(ids, logits="none")
        results[name] = a.tokens / (time.perf_counter() - t)
    attn._FLASH_CPU = flash
    with torch.inference_mode():
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        t = time.perf_counter()
        for s in range(0, len(ids), 512):
            model(input_ids=torch.tensor([ids[s : s + 512]]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        results["transformers full attention (sdpa)"] = a.tokens / (time.perf_counter() - t)
    base = results["explicit, stride 1"]
    print(f"| path ({a.tokens} tokens) | tokens/s | vs explicit |\n|---|---|---|")
    for name, v in results.items():
        print(f"| {name} | {v:.0f} | {v / base:.2f}x |")


if __name__ == "__main__":
    main()
