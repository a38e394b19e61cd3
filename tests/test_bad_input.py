"""Every public call of ContextMemory, fed a wrong type, an empty value and an out-of-range value:
the error names the argument, and the memory is exactly as before."""

from __future__ import annotations

import pytest

from memory_plugin import ContextMemory

TYPE = (TypeError, ValueError)


def _state(mem):
    return (len(mem), list(mem.token_ids), mem.messages)


# (call, argument named in the error, expected error types)
CASES = [
    (lambda m: m.add_message(5, "hi"), "role", TYPE),
    (lambda m: m.add_message("user", ""), "content", TYPE),
    (lambda m: m.add_message("user", None), "content", TYPE),
    (lambda m: m.add_messages("hi"), "messages", TYPE),
    (lambda m: m.add_messages([{"role": "user"}]), "content", TYPE),
    (lambda m: m.add_text(b"bytes"), "text", TYPE),
    (lambda m: m.add_text("   "), "text", TYPE),
    (lambda m: m.generate(7), "prompt", TYPE),
    (lambda m: m.generate(""), "prompt", TYPE),
    (lambda m: m.generate("q", max_new_tokens=0), "max_new_tokens", TYPE),
    (lambda m: m.generate("q", max_new_tokens="8"), "max_new_tokens", TYPE),
    (lambda m: m.generate("q", temperature=-1), "temperature", TYPE),
    (lambda m: m.generate("q", top_p=0), "top_p", TYPE),
    (lambda m: m.generate("q", stop=5), "stop", TYPE),
    (lambda m: m.generate("q", stop=[5]), "stop", TYPE),
    (lambda m: m.generate("q", min_new_tokens=-1), "min_new_tokens", TYPE),
    (lambda m: m.generate("q", recall=-1), "recall", TYPE),
    (lambda m: m.generate("q", recall="3"), "recall", TYPE),
    (lambda m: m.generate("q", recall_query=""), "recall_query", TYPE),
    (lambda m: m.stream("q", stop=5), "stop", TYPE),
    (lambda m: m.retrieve(3), "query", TYPE),
    (lambda m: m.retrieve(""), "query", TYPE),
    (lambda m: m.retrieve("q", k=-1), "k", TYPE),
    (lambda m: m.retrieve("q", mode="bm25"), "mode", TYPE),
    (lambda m: m.place(""), "query", TYPE),
    (lambda m: m.place("q", k=-2), "k", TYPE),
    (lambda m: m.uncram("text"), "vectors", TYPE),
    (lambda m: m.archive(-1), "older_than_tokens", TYPE),
    (lambda m: m.rollback("checkpoint"), "checkpoint", TYPE),
]


@pytest.mark.parametrize("call,argument,errors", CASES, ids=[f"{i}-{c[1]}" for i, c in enumerate(CASES)])
def test_bad_input_names_the_argument_and_changes_nothing(tiny_memory, call, argument, errors):
    tiny_memory.add_message("user", "The door code is 4417.")
    before = _state(tiny_memory)
    with pytest.raises(errors, match=argument):
        call(tiny_memory)
    assert _state(tiny_memory) == before
    assert tiny_memory.generate("door code?", max_new_tokens=2, recall=0) is not None  # still usable


def test_open_on_a_file_says_the_path_is_not_a_directory(tiny_model, tiny_tokenizer, tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    with pytest.raises(NotADirectoryError, match="path"):
        ContextMemory.open(file, tiny_model, tokenizer=tiny_tokenizer)
    assert file.read_text() == "keep me"
