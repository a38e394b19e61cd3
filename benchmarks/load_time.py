"""Loading the embedded model: from its GGUF (transformers converts it) and from the kept float32
copy (``memory_plugin.loading.converted_dir``), in one process, on a fresh cache directory; and
whether the two give the same weights, tokenizer and greedy answer.

    python benchmarks/load_time.py --threads 1
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    os.environ["MEMORY_PLUGIN_CACHE"] = tempfile.mkdtemp(prefix="mp-cache-")

    import torch

    torch.set_num_threads(a.threads)
    from memory_plugin import ContextMemory, load_model
    from memory_plugin.loading import model_fingerprint

    t = time.perf_counter()
    m1, t1 = load_model()  # converts the GGUF, keeps the copy
    first = time.perf_counter() - t
    t = time.perf_counter()
    m2, t2 = load_model()  # reads the copy
    second = time.perf_counter() - t
    sd1, sd2 = m1.state_dict(), m2.state_dict()
    answers = []
    for m, tok in ((m1, t1), (m2, t2)):
        mem = ContextMemory(m, tok)
        mem.add_text("The pass key is 48213. Remember it. ")
        answers.append(mem.generate("What is the pass key? The pass key is", max_new_tokens=6, chat=False))
    print({"gguf_load_s": round(first, 1), "copy_load_s": round(second, 1), "ratio": round(first / second, 1),
           "same_weights": sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1),
           "same_fingerprint": model_fingerprint(m1, t1) == model_fingerprint(m2, t2),
           "same_template": t1.chat_template == t2.chat_template, "answers": answers})


if __name__ == "__main__":
    main()
