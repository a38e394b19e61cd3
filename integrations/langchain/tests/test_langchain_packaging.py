"""Packaging as the ecosystem expects: py.typed in the installed package (PEP 561) and a core
version range that admits the core installed."""

from __future__ import annotations

import importlib.metadata
import importlib.resources
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import memory_plugin

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


@pytest.mark.parametrize("package", ["memory_plugin", "langchain_memory_plugin"])
def test_the_package_says_it_is_typed(package):
    assert importlib.resources.files(package).joinpath("py.typed").is_file()


def test_py_typed_is_shipped_as_package_data():
    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["tool"]["setuptools"]
    assert "py.typed" in setuptools["package-data"]["langchain_memory_plugin"]


def test_the_adapter_depends_on_a_range_of_the_core_that_admits_the_installed_one():
    requires = [Requirement(r) for r in importlib.metadata.requires("langchain-memory-plugin") or []]
    core = [r for r in requires if r.name == "memory-plugin" and r.marker is None]
    assert len(core) == 1
    spec = core[0].specifier
    assert any(s.operator == "<" for s in spec) and any(s.operator == ">=" for s in spec)  # a range, not open-ended
    assert spec.contains(memory_plugin.__version__, prereleases=True)
