"""A durable memory in a directory whose name holds characters that mean something in a URI (the
pool percent-encodes thread ids into directory names: "t-ann%23model" for thread "ann#model")."""

import pytest

from memory_plugin import ContextMemory, testing


@pytest.mark.parametrize("name", ["t-ann%23model", "a#b", "what?", "two words", "100%"])
def test_a_memory_reopens_from_a_directory_named_with_uri_characters(tmp_path, tiny_model, tiny_tokenizer, name):
    path = tmp_path / name
    with ContextMemory.open(path, tiny_model, tokenizer=tiny_tokenizer, config=testing.TINY_CONFIG) as mem:
        mem.add_message("user", "The vault code is 4721.")
        msgs = mem.messages
    with ContextMemory.open(path, tiny_model, tokenizer=tiny_tokenizer) as again:
        assert again.messages == msgs
    assert ContextMemory.load(path, tiny_model, tokenizer=tiny_tokenizer).messages == msgs
