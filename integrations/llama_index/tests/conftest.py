"""Fixtures: the core's tiny random Llama (fast, offline) for most tests, the embedded SmolLM2-135M
(loaded once) for the tests that need real answers."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from memory_plugin import ContextMemory, testing  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return testing.tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    return testing.tiny_llama(len(tiny_tokenizer))


@pytest.fixture
def tiny_memory(tiny_model, tiny_tokenizer):
    """An empty memory on the tiny model; blocks form within a few hundred tokens."""
    return ContextMemory(tiny_model, tiny_tokenizer, testing.TINY_CONFIG)


@pytest.fixture
def new_tiny_memory(tiny_model, tiny_tokenizer):
    """A factory of further empty memories on the same tiny model."""
    return lambda: ContextMemory(tiny_model, tiny_tokenizer, testing.TINY_CONFIG)


@pytest.fixture(scope="session")
def real_model():
    from memory_plugin import load_model

    return load_model()
