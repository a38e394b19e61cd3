"""The public ContextMemory API on a tiny random model."""

import pytest
import torch

from memory_plugin import ContextMemory, MemoryConfig, MemoryHit

from .test_context import _state

TEXT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def test_add_message_encodes_the_template_and_counts_tokens(tiny_memory, tiny_tokenizer):
    n1 = tiny_memory.add_message("system", "Be brief.")
    n2 = tiny_memory.add_messages([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    expected = tiny_tokenizer(tiny_tokenizer.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)
    assert tiny_memory.token_ids == expected["input_ids"]
    assert len(tiny_memory) == n1 + n2 == len(expected["input_ids"])
    assert tiny_memory.messages == msgs


def test_add_text_is_raw_and_listed_with_role_none(tiny_memory, tiny_tokenizer):
    n = tiny_memory.add_text(TEXT * 20)
    assert n == len(tiny_tokenizer(TEXT * 20, add_special_tokens=False)["input_ids"]) == len(tiny_memory)
    assert tiny_memory.messages == [{"role": None, "content": TEXT * 20}]
    st = tiny_memory.stats()
    assert st.tokens == n and st.blocks == (n - 8 - 64) // 16
    assert st.init_tokens == 8 and st.window_tokens == n - 8 - 16 * st.blocks
    assert st.bytes["host"] > 0 and st.total_bytes == sum(st.bytes.values())


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda m: m.add_message("user", ""), ValueError, "content is empty"),
        (lambda m: m.add_message("user", 42), TypeError, "content must be a str"),
        (lambda m: m.add_message("wizard", "hi"), ValueError, "unknown role"),
        (lambda m: m.add_messages([{"role": "user", "content": "ok"}, {"role": "user"}]), TypeError, r"messages\[1\]"),
        (lambda m: m.add_messages("hi"), TypeError, "list of"),
        (lambda m: m.add_text(""), ValueError, "text is empty"),
        (lambda m: m.add_text(b"bytes"), TypeError, "text must be a str"),
        (lambda m: m.generate("q", max_new_tokens=0), ValueError, "max_new_tokens"),
        (lambda m: m.generate("q", max_new_tokens=-3), ValueError, "max_new_tokens"),
        (lambda m: m.generate("q", temperature=-1), ValueError, "temperature"),
        (lambda m: m.generate(""), ValueError, "prompt is empty"),
        (lambda m: m.stream("q", max_new_tokens=0), ValueError, "max_new_tokens"),
        (lambda m: m.retrieve("q", k=-1), ValueError, "k must be"),
        (lambda m: m.retrieve(None), TypeError, "query must be a str"),
    ],
)
def test_bad_input_raises_a_clear_error_and_changes_nothing(tiny_memory, call, exc, match):
    tiny_memory.add_text(TEXT * 10)
    before = _state(tiny_memory._engine.ctx)
    msgs = tiny_memory.messages
    with pytest.raises(exc, match=match):
        call(tiny_memory)
    assert _state(tiny_memory._engine.ctx) == before and tiny_memory.messages == msgs


def test_generate_with_remember_false_leaves_the_memory_exactly_as_before(tiny_memory):
    tiny_memory.add_text(TEXT * 15)  # blocks are cut and the window compacts during generation too
    before = _state(tiny_memory._engine.ctx)
    first = tiny_memory.generate("What colour is the sky?", max_new_tokens=40, min_new_tokens=40)
    assert _state(tiny_memory._engine.ctx) == before
    assert tiny_memory.generate("What colour is the sky?", max_new_tokens=40, min_new_tokens=40) == first


def test_stream_yields_pieces_that_join_to_generate(tiny_memory):
    tiny_memory.add_text(TEXT * 5)
    full = tiny_memory.generate("Tell me", max_new_tokens=20, min_new_tokens=20)
    pieces = list(tiny_memory.stream("Tell me", max_new_tokens=20, min_new_tokens=20))
    assert len(pieces) > 1 and "".join(pieces) == full


def test_generate_matches_transformers_greedy_decoding(tiny_model, tiny_tokenizer):
    mem = ContextMemory(tiny_model, tiny_tokenizer, MemoryConfig(n_local=512, chunk_size=128))
    mem.add_message("user", "The sky is blue.")
    answer = mem.generate("What colour?", max_new_tokens=12, min_new_tokens=12)
    msgs = [{"role": "user", "content": "The sky is blue."}, {"role": "user", "content": "What colour?"}]
    prompt = tiny_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = tiny_tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    bad = [[i] for i in mem._engine.chat.stop_ids]
    out = tiny_model.generate(ids, max_new_tokens=12, do_sample=False, suppress_tokens=[b[0] for b in bad])
    assert answer == tiny_tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("ends_with_stop_token", [True, False])
def test_remember_true_stores_the_turn_as_the_template_would(tiny_memory, tiny_tokenizer, monkeypatch, ends_with_stop_token):
    tiny_memory.add_message("user", "Hello there")
    if ends_with_stop_token:  # script the model: two tokens, then end of turn
        import memory_plugin.turns as turns

        script = iter(tiny_memory._engine.chat.encode(" blue sky")[:2] + sorted(tiny_memory._engine.chat.stop_ids))
        monkeypatch.setattr(turns, "sample", lambda *a, **k: next(script))
    answer = tiny_memory.generate("And now?", max_new_tokens=6, remember=True)
    assert answer
    assert tiny_memory.messages[-2:] == [
        {"role": "user", "content": "And now?"},
        {"role": "assistant", "content": answer},
    ]
    expected = ContextMemory(tiny_memory.model, tiny_tokenizer, tiny_memory.config)
    expected.add_messages(tiny_memory.messages)
    decode = lambda ids: tiny_tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    assert decode(tiny_memory.token_ids) == decode(expected.token_ids)
    # the next turn starts from a complete, closed assistant turn
    assert tiny_memory.token_ids[-2:] == tiny_memory._engine.chat.encode(tiny_memory._engine.chat.assistant_suffix)


def test_stop_strings_end_the_answer_and_are_excluded(tiny_memory):
    tiny_memory.add_text(TEXT)
    free = tiny_memory.generate("Go", max_new_tokens=30, min_new_tokens=30)
    assert len(free) > 4
    stop = free[2:4]
    cut = tiny_memory.generate("Go", max_new_tokens=30, min_new_tokens=30, stop=[stop])
    assert cut == free[: free.index(stop)]


def test_sampling_is_reproducible_with_a_seed(tiny_memory):
    tiny_memory.add_text(TEXT)
    a = tiny_memory.generate("Go", max_new_tokens=15, temperature=1.5, seed=3, min_new_tokens=15)
    b = tiny_memory.generate("Go", max_new_tokens=15, temperature=1.5, seed=3, min_new_tokens=15)
    c = tiny_memory.generate("Go", max_new_tokens=15, temperature=1.5, seed=4, min_new_tokens=15)
    assert a == b and a != c


def test_retrieve_returns_spans_covering_the_history_without_changing_it(tiny_memory):
    tiny_memory.add_message("system", "You are terse.")
    tiny_memory.add_text(TEXT * 12)
    before = _state(tiny_memory._engine.ctx)
    hits = tiny_memory.retrieve("sky is blue", k=5)
    assert _state(tiny_memory._engine.ctx) == before
    assert len(hits) == 5 and all(isinstance(h, MemoryHit) for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    for h in hits:
        assert 0 <= h.start < h.end <= len(tiny_memory)
        # a passage's text is its part of the message content (no template tokens), cut at sentence ends
        assert h.text and h.text in tiny_memory.tokenizer.decode(tiny_memory.token_ids[h.start : h.end], skip_special_tokens=True)
        assert h.message_index in (0, 1) and h.role == ("system" if h.message_index == 0 else None)
    assert tiny_memory.retrieve("sky", k=0) == []
    all_hits = tiny_memory.retrieve("sky", k=10_000)
    covered = sorted((h.start, h.end) for h in all_hits)
    assert covered[0][0] == 0 and covered[-1][1] == len(tiny_memory)
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))  # spans tile the whole history


def test_retrieve_on_empty_memory_is_empty(tiny_memory):
    assert tiny_memory.retrieve("anything") == []


def test_checkpoint_and_rollback(tiny_memory):
    tiny_memory.add_text(TEXT * 3)
    cp = tiny_memory.checkpoint()
    before = _state(tiny_memory._engine.ctx)
    tiny_memory.add_message("user", "a what-if " * 30)
    inner = tiny_memory.checkpoint()
    tiny_memory.rollback(cp)
    assert _state(tiny_memory._engine.ctx) == before and len(tiny_memory.messages) == 1
    tiny_memory.add_text(TEXT * 9)  # longer than the dropped branch: its checkpoint must still be refused
    with pytest.raises(ValueError, match="no longer valid"):
        tiny_memory.rollback(inner)
    tiny_memory.rollback(cp)  # still valid: nothing went below it
    tiny_memory.reset()
    with pytest.raises(ValueError, match="no longer valid"):
        tiny_memory.rollback(cp)


def test_an_interrupted_encode_leaves_no_trace(tiny_memory, monkeypatch):
    tiny_memory.add_text(TEXT * 6)
    before = _state(tiny_memory._engine.ctx)
    calls = {"n": 0}
    real = tiny_memory._engine.ctx.attend

    def failing(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(tiny_memory._engine.ctx, "attend", failing)
    with pytest.raises(KeyboardInterrupt):
        tiny_memory.add_text(TEXT * 6)
    monkeypatch.undo()
    assert _state(tiny_memory._engine.ctx) == before and len(tiny_memory.messages) == 1


def test_reset_and_len(tiny_memory):
    tiny_memory.add_text(TEXT * 4)
    assert len(tiny_memory) > 0
    tiny_memory.reset()
    assert len(tiny_memory) == 0 and tiny_memory.messages == [] and tiny_memory.stats().blocks == 0


def test_completion_mode_continues_raw_text(tiny_memory):
    tiny_memory.add_text(TEXT)
    before = len(tiny_memory)
    tiny_memory.generate("The sky", max_new_tokens=5, min_new_tokens=5, chat=False, remember=True)
    assert tiny_memory.messages[-1]["role"] is None and tiny_memory.messages[-1]["content"].startswith("The sky")
    assert len(tiny_memory) > before


def test_unsupported_architecture_is_named(tiny_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    from memory_plugin import UnsupportedModelError

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tiny_tokenizer)))
    with pytest.raises(UnsupportedModelError, match="architecture 'gpt2' is not supported"):
        ContextMemory(gpt2, tiny_tokenizer)


def test_config_type_is_checked(tiny_model, tiny_tokenizer):
    with pytest.raises(TypeError, match="config must be a MemoryConfig"):
        ContextMemory(tiny_model, tiny_tokenizer, {"topk": 2})


def test_memory_works_on_bfloat16_models(tiny_tokenizer):
    from .conftest import make_tiny_llama

    model = make_tiny_llama(len(tiny_tokenizer)).to(torch.bfloat16)
    mem = ContextMemory(model, tiny_tokenizer, MemoryConfig(block_size=16, n_init=8, n_local=64, topk=2, chunk_size=32))
    mem.add_text(TEXT * 8)
    assert mem.stats().blocks > 0
    assert isinstance(mem.generate("sky", max_new_tokens=4), str)
