"""Packaging as the LlamaIndex ecosystem expects: the classes under ``llama_index.<type>.memory_plugin``
(namespace packages beside llama-index-core, which still imports from its own place), the old
import path, py.typed everywhere, the [tool.llamahub] metadata, and a core version range that
admits the core installed."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.resources
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import llama_index_memory_plugin
import memory_plugin

LAYOUT = {
    "llama_index.llms.memory_plugin": ["ContextMemoryLLM", "MEMORY_CONTEXT_WINDOW"],
    "llama_index.retrievers.memory_plugin": ["ContextMemoryRetriever", "memory_tokenizer"],
    "llama_index.memory.memory_plugin": ["ContextMemoryBlock"],
}
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


@pytest.mark.parametrize("path", sorted(LAYOUT))
def test_the_llamahub_layout_exports_the_same_classes_as_the_package(path):
    module = importlib.import_module(path)
    for name in LAYOUT[path]:
        assert getattr(module, name) is getattr(llama_index_memory_plugin, name)
    assert sorted(module.__all__) == sorted(LAYOUT[path])


def test_llama_index_stays_a_namespace_and_core_imports_from_its_own_place():
    import llama_index
    import llama_index.core
    import llama_index.llms

    assert getattr(llama_index, "__file__", None) is None  # no __init__.py of ours shadows it
    assert getattr(llama_index.llms, "__file__", None) is None
    core = Path(llama_index.core.__file__).resolve()
    assert PYPROJECT.parent not in core.parents
    assert not list(PYPROJECT.parent.joinpath("llama_index").glob("*.py"))
    assert not list(PYPROJECT.parent.joinpath("llama_index").glob("*/__init__.py"))


@pytest.mark.parametrize("package", ["memory_plugin", "llama_index_memory_plugin", *sorted(LAYOUT)])
def test_every_package_says_it_is_typed(package):
    assert importlib.resources.files(package).joinpath("py.typed").is_file()


def test_llamahub_metadata_names_an_importable_path_and_existing_classes():
    tomllib = pytest.importorskip("tomllib")
    hub = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["tool"]["llamahub"]
    assert hub["import_path"] in LAYOUT
    importlib.import_module(hub["import_path"])
    assert hub["class_authors"] and all(hasattr(llama_index_memory_plugin, c) for c in hub["class_authors"])


def test_the_adapter_depends_on_a_core_range_that_admits_the_installed_core():
    requires = [Requirement(r) for r in importlib.metadata.requires("llama-index-memory-plugin") or []]
    [core] = [r for r in requires if r.name == "memory-plugin"]
    assert core.specifier and memory_plugin.__version__ in core.specifier
    assert importlib.metadata.version("memory-plugin") in core.specifier
    assert "0.2.0" not in core.specifier  # an upper bound: a 0.x minor release may break the API
