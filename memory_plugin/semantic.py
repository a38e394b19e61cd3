"""The semantic side of :meth:`ContextMemory.retrieve`: passages embedded by a small static model.

BM25 needs the query's words in the passage; the model's attention keys rank paraphrases close to
chance (docs/BENCHMARKS.md, section 4). A static embedding model bridges the two: a passage's
vector is the pooled embedding of its tokens, so "my sibling's job" finds "my brother works as a
paramedic". WordLlama (MIT; its 256-dimension ``l2_supercat`` weights, 16 MB, ship inside the
wheel) needs no download, which a memory that runs offline requires, and embeds ~1,000 passages
of ~150 tokens a second on a shared CPU core (scratch timing): ~0.2% of what encoding the same
tokens into the memory costs. A transformer embedder would cost a forward pass per passage, as
much as encoding the history again.

Only the package's files are read: ``WordLlama.load()`` looks for its tokenizer under a folder
name the wheel does not use and then tries the network, so the two files are opened directly.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

WORDLLAMA_CONFIG = "l2_supercat"
WORDLLAMA_DIM = 256


class Embedder:
    """Unit-length float32 vectors ``[n, dim]`` for texts; ``name`` identifies the model (an index
    built by another is rebuilt)."""

    def __init__(self, name: str, dim: int, model):
        self.name, self.dim, self._model = name, dim, model

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.asarray(self._model.embed(list(texts), norm=True), dtype=np.float32)


@functools.cache
def default_embedder() -> Embedder | None:
    """WordLlama's bundled model, loaded once per process; None when wordllama is not installed
    (the semantic channel is then absent and hybrid search fuses the other channels)."""
    try:
        import wordllama
        from safetensors import safe_open
        from wordllama import WordLlama
        from wordllama.inference import WordLlamaInference
    except ImportError:
        return None
    root = Path(wordllama.__file__).parent
    tokenizer = WordLlama.load_tokenizer(root / "tokenizers" / f"{WORDLLAMA_CONFIG}_tokenizer_config.json")
    with safe_open(root / "weights" / f"{WORDLLAMA_CONFIG}_{WORDLLAMA_DIM}.safetensors", framework="np") as f:
        weights = f.get_tensor("embedding.weight")
    return Embedder(f"wordllama-{WORDLLAMA_CONFIG}-{WORDLLAMA_DIM}", WORDLLAMA_DIM, WordLlamaInference(weights, tokenizer))
