"""Fixtures: a tiny random Llama with a tiny byte-level tokenizer (fast, offline), and the real
embedded model for the few tests marked ``real_model``."""

from __future__ import annotations

import os

from memory_plugin import testing
from memory_plugin.pytest_fixtures import real_model, tiny_memory, tiny_model, tiny_tokenizer  # noqa: F401

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


make_tiny_llama = testing.tiny_llama
