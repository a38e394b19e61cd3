"""Fixtures: the tiny random model of memory_plugin.testing for fast offline tests, and the embedded
SmolLM2-135M (loaded once per session, shared with every chat model) for the standard suites."""

from __future__ import annotations

import inspect
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from memory_plugin import ContextMemory, testing  # noqa: E402
from memory_plugin.pytest_fixtures import tiny_memory, tiny_model, tiny_tokenizer  # noqa: E402, F401


def pytest_configure(config):
    config.addinivalue_line("markers", "real_model: loads the embedded SmolLM2-135M (a few seconds to minutes on CPU)")


@pytest.hookimpl(hookwrapper=True, trylast=True)
def pytest_pycollect_makeitem(collector, name, obj):
    """Mark async tests (ours and the standard suites') for pytest-asyncio, whichever asyncio_mode
    the configuration in use sets: the repository root's is strict."""
    outcome = yield
    if not inspect.iscoroutinefunction(obj):
        return
    items = outcome.get_result()
    for item in items if isinstance(items, list) else [items]:
        if isinstance(item, pytest.Function) and item.get_closest_marker("asyncio") is None:
            item.add_marker(pytest.mark.asyncio)


@pytest.fixture
def fresh_tokens(tiny_model, tiny_tokenizer):
    """Token ids of a new tiny memory holding exactly the given core messages."""

    def tokens(messages: list[dict]) -> list[int]:
        mem = ContextMemory(tiny_model, tiny_tokenizer, testing.TINY_CONFIG)
        mem.add_messages(messages)
        return mem.token_ids

    return tokens
