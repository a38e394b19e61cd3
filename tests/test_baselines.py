"""The baselines agree with ContextMemory where they should, and see what they should."""

import pytest
import torch

from memory_plugin import ContextMemory, MemoryConfig
from memory_plugin.baselines import FullAttention, Truncation

TEXT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def test_full_attention_answers_like_context_memory_while_the_history_fits(tiny_model, tiny_tokenizer):
    cfg = MemoryConfig(n_init=64, n_local=512, chunk_size=128)
    mem, full = ContextMemory(tiny_model, tiny_tokenizer, cfg), FullAttention(tiny_model, tiny_tokenizer)
    for m in (mem, full):
        m.add_message("user", "Hello")
        m.add_text(TEXT * 4)
    assert mem.token_ids == full.tokens
    kw = dict(max_new_tokens=15, min_new_tokens=15)
    assert full.generate("The sky", chat=False, **kw) == mem.generate("The sky", chat=False, **kw)
    assert full.generate("Colour?", **kw) == mem.generate("Colour?", **kw)
    assert len(full) == len(mem)  # generation left both histories as they were


def test_full_attention_rollback(tiny_model, tiny_tokenizer):
    full = FullAttention(tiny_model, tiny_tokenizer)
    full.add_text(TEXT)
    cp = full.checkpoint()
    a = full.generate("sky", max_new_tokens=5, min_new_tokens=5)
    full.add_text(TEXT * 3)
    full.rollback(cp)
    assert full.cache.get_seq_length() == len(full) == cp
    assert full.generate("sky", max_new_tokens=5, min_new_tokens=5) == a


def test_truncation_sees_only_its_window(tiny_model, tiny_tokenizer):
    trunc = Truncation(tiny_model, tiny_tokenizer, window=100)
    trunc.add_text("The pass key is 12345. " + TEXT * 10)
    seen = []
    real = trunc._forward

    def spy(ids, cache):
        seen.append(list(ids))
        return real(ids, cache)

    trunc._forward = spy
    trunc.generate("What is the pass key?", max_new_tokens=1)
    assert len(seen[0]) == 100
    assert seen[0][-len(trunc._prompt_ids("What is the pass key?", True)) :] == trunc._prompt_ids(
        "What is the pass key?", True
    )


def test_streaming_llm_baseline_is_context_memory_without_retrieval(tiny_model, tiny_tokenizer):
    cfg = MemoryConfig(block_size=16, n_init=8, n_local=64, topk=0, chunk_size=32)
    stream = ContextMemory(tiny_model, tiny_tokenizer, cfg)
    stream.add_text(TEXT * 10)
    assert stream.stats().blocks == 0 and len(stream) > cfg.span


def test_baselines_reject_bad_input_like_the_memory(tiny_model, tiny_tokenizer):
    for b in (FullAttention(tiny_model, tiny_tokenizer), Truncation(tiny_model, tiny_tokenizer, 64)):
        with pytest.raises(ValueError, match="unknown role"):
            b.add_message("robot", "hi")
        with pytest.raises(ValueError, match="text is empty"):
            b.add_text("")
        assert len(b) == 0
