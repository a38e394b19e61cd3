"""pytest fixtures shared by the core's and the integrations' test suites (imported by their
conftest.py files; the package itself never imports pytest).

    from memory_plugin.pytest_fixtures import real_model, tiny_memory, tiny_model, tiny_tokenizer  # noqa: F401
"""

from __future__ import annotations

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
    """The embedded SmolLM2-135M-Instruct and its tokenizer, loaded once per process
    (:func:`~memory_plugin.loading.load_shared_model`): each suite's conftest.py imports this
    fixture and pytest keeps a session fixture per conftest, so without the shared copy one
    ``make test`` loaded the GGUF once per suite (~57 s each on one thread)."""
    from .loading import load_shared_model

    return load_shared_model()
