"""One copy of each model's weights per process, shared by every chat model, history and test
that names it (the weights are only read; each conversation has its own memory)."""

from __future__ import annotations

import threading
from pathlib import Path

from memory_plugin import load_model
from memory_plugin.model import default_model_path

_MODELS: dict[tuple[str, str], tuple] = {}
_LOCK = threading.Lock()


def load_shared_model(model: str | None = None, *, device: str | None = None) -> tuple:
    """``(hf_model, tokenizer)`` for ``model`` (None: the embedded SmolLM2-135M-Instruct), loaded once
    per process and device; see :func:`memory_plugin.load_model`."""
    # The embedded model named by its GGUF path is the same weights: one copy.
    path = default_model_path() if model is None else Path(model)
    key = (str(path.resolve()) if path.is_file() else str(model), str(device or "cpu"))
    with _LOCK:
        if key not in _MODELS:
            _MODELS[key] = load_model(model, device=device)
        return _MODELS[key]
