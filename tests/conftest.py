"""Fixtures: a tiny random Llama with a tiny byte-level tokenizer (fast, offline), and the real
embedded model for the few tests marked ``real_model``."""

from __future__ import annotations

import os

import pytest

from memory_plugin import testing

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return testing.tiny_tokenizer()


make_tiny_llama = testing.tiny_llama


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    return make_tiny_llama(len(tiny_tokenizer))


@pytest.fixture
def tiny_memory(tiny_model, tiny_tokenizer):
    """A ContextMemory on the tiny model with a small geometry, so blocks form within ~hundreds of tokens."""
    from memory_plugin import ContextMemory

    return ContextMemory(tiny_model, tiny_tokenizer, testing.TINY_CONFIG)


@pytest.fixture(scope="session")
def real_model():
    from memory_plugin import load_model

    return load_model()
