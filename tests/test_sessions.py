"""Prefix reuse across calls that resend the whole conversation."""

import threading

import pytest

from memory_plugin import ContextMemory
from memory_plugin.sessions import ConversationPool

from .test_context import _state

CONV = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "The sky is blue. " * 10},
    {"role": "assistant", "content": "Noted."},
    {"role": "user", "content": "What colour is the sky?"},
]


@pytest.fixture
def pool(tiny_memory):
    return ConversationPool(tiny_memory.model, tiny_memory.tokenizer, tiny_memory.config, max_conversations=2)


def _fresh_tokens(pool, msgs):
    m = ContextMemory(pool.model, pool.tokenizer, pool.config)
    m.add_messages(msgs)
    return m.token_ids


def test_a_growing_conversation_encodes_only_its_new_messages(pool):
    with pool.conversation(CONV[:2]) as c1:
        assert (c1.reused_tokens, c1.new_tokens) == (0, len(c1.memory))
        reply = c1.memory.generate(None, max_new_tokens=5)
        n_before = len(c1.memory)
    grown = CONV[:2] + [{"role": "assistant", "content": reply or "ok"}, CONV[3]]
    with pool.conversation(grown) as c2:
        assert c2.memory is c1.memory and c2.reused_tokens == n_before
        assert c2.reused_tokens + c2.new_tokens == len(c2.memory)
        assert c2.memory.token_ids == _fresh_tokens(pool, grown)
        assert c2.memory.messages == grown
    assert len(pool) == 1


def test_an_edited_last_message_reuses_everything_before_it(pool):
    with pool.conversation(CONV) as c1:
        pass
    edited = CONV[:3] + [{"role": "user", "content": "And the grass?"}]
    with pool.conversation(edited) as c2:
        assert c2.memory is c1.memory
        assert c2.reused_tokens == len(_fresh_tokens(pool, CONV[:3]))
        assert c2.memory.token_ids == _fresh_tokens(pool, edited)


def test_a_diverging_conversation_gets_its_own_correct_memory(pool):
    with pool.conversation(CONV) as c1:
        mem1, state1 = c1.memory, _state(c1.memory._engine.ctx)
    other = [{"role": "user", "content": "Unrelated question about grass."}]
    with pool.conversation(other) as c2:
        assert c2.memory is not mem1 and c2.reused_tokens == 0
        assert c2.memory.token_ids == _fresh_tokens(pool, other)
    assert _state(mem1._engine.ctx) == state1  # the first conversation was not touched
    with pool.conversation(CONV) as c3:
        assert c3.memory is mem1 and c3.new_tokens == 0


def test_thread_ids_isolate_conversations_and_lru_drops_the_oldest(pool):
    with pool.conversation(CONV[:2], thread_id="a") as a:
        pass
    with pool.conversation(CONV[:2], thread_id="b") as b:
        assert b.memory is not a.memory and b.reused_tokens == 0
    with pool.conversation(CONV[:1], thread_id="c"):
        pass
    assert len(pool) == 2
    with pool.conversation(CONV[:2], thread_id="a") as a2:  # "a" was evicted: encoded again
        assert a2.reused_tokens == 0


def test_thread_history_that_changes_is_re_encoded_not_reused_wrongly(pool):
    with pool.conversation(CONV, thread_id="t"):
        pass
    changed = [{"role": "user", "content": "Completely new start."}, CONV[3]]
    with pool.conversation(changed, thread_id="t") as c:
        assert c.reused_tokens == 0 and c.memory.token_ids == _fresh_tokens(pool, changed)


def test_a_conversation_diverging_mid_way_keeps_its_shared_messages_and_counts_them_honestly(pool):
    with pool.conversation(CONV, thread_id="t"):
        pass
    changed = CONV[:2] + [{"role": "assistant", "content": "Blue."}, CONV[3]]
    with pool.conversation(changed, thread_id="t") as c:
        assert c.memory.messages == changed and c.memory.token_ids == _fresh_tokens(pool, changed)
        # in RAM the shared messages are encoded again from their token ids: none counts as reused
        assert c.reused_tokens == 0 and c.new_tokens == len(c.memory)


def test_concurrent_threads_get_consistent_memories(pool):
    errors = []

    def worker(tid, text):
        try:
            for i in range(3):
                msgs = [{"role": "user", "content": f"{text} {j}"} for j in range(i + 1)]
                with pool.conversation(msgs, thread_id=tid) as c:
                    assert c.memory.messages == msgs
                    c.memory.generate(None, max_new_tokens=2)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t, t * 3)) for t in ("x", "y")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_bad_messages_are_rejected_before_anything_is_encoded(pool):
    with pytest.raises(ValueError, match="unknown role"):
        with pool.conversation([{"role": "bot", "content": "x"}]):
            pass
    with pytest.raises(ValueError, match="messages is empty"):
        with pool.conversation([]):
            pass
    assert len(pool) == 0


def test_prompt_none_answers_the_history_and_needs_one(tiny_memory):
    with pytest.raises(ValueError, match="memory is empty"):
        tiny_memory.generate(None)
    tiny_memory.add_message("user", "Hi")
    before = _state(tiny_memory._engine.ctx)
    tiny_memory.generate(None, max_new_tokens=3)
    assert _state(tiny_memory._engine.ctx) == before
