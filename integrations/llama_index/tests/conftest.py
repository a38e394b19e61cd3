"""Fixtures: the core's tiny random Llama (fast, offline) for most tests, the embedded SmolLM2-135M
(loaded once) for the tests that need real answers."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from memory_plugin import ContextMemory, testing  # noqa: E402
from memory_plugin.pytest_fixtures import real_model, tiny_memory, tiny_model, tiny_tokenizer  # noqa: E402, F401


@pytest.fixture
def new_tiny_memory(tiny_model, tiny_tokenizer):
    """A factory of further empty memories on the same tiny model."""
    return lambda: ContextMemory(tiny_model, tiny_tokenizer, testing.TINY_CONFIG)
