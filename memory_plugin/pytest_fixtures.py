"""pytest fixtures shared by the core's and the integrations' test suites (imported by their
conftest.py files; the package itself never imports pytest).

    from memory_plugin.pytest_fixtures import real_model, tiny_memory, tiny_model, tiny_tokenizer  # noqa: F401
"""

from __future__ import annotations

import functools

import pytest

from . import testing


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return testing.tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    return testing.tiny_llama(len(tiny_tokenizer))


@pytest.fixture
def tiny_memory(tiny_model, tiny_tokenizer):
    """An empty ContextMemory on the tiny model with a small geometry: blocks form within a few
    hundred tokens."""
    from . import ContextMemory

    return ContextMemory(tiny_model, tiny_tokenizer, testing.TINY_CONFIG)


@pytest.fixture(scope="session")
def real_model():
    """The embedded SmolLM2-135M-Instruct and its tokenizer, loaded once per process.

    Each suite's conftest.py imports this fixture, and pytest keeps a session fixture per conftest:
    without the cache below one ``make test`` loaded the GGUF three times (~57 s each on one
    thread, most of it transformers parsing the file's metadata, once for the config, once for
    the tokenizer and once for the weights)."""
    return _embedded_model()


@functools.cache
def _embedded_model():
    from . import load_model

    return load_model()
