"""One copy of each model's weights per process, shared by every chat model, history and test
that names it: the core's :func:`memory_plugin.loading.load_shared_model`, which the core's test
fixtures use too."""

from __future__ import annotations

from memory_plugin.loading import load_shared_model

__all__ = ["load_shared_model"]
