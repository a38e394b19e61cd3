"""Durable memories per (tenant, thread): reopening without re-encoding, LRU closing, isolation,
deletion and retention."""

import threading

import pytest

from memory_plugin import ContextMemory, testing
from memory_plugin.pool import MemoryPool, Retention

CONV = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "The locker code is 4721. " + "The sky is blue. " * 12},
    {"role": "assistant", "content": "Noted."},
]
ASK = {"role": "user", "content": "What is the locker code?"}


@pytest.fixture
def make_pool(tmp_path, tiny_model, tiny_tokenizer):
    pools = []

    def make(config=testing.TINY_CONFIG, **kw):
        pool = MemoryPool(tmp_path / "root", tiny_model, tiny_tokenizer, config, **kw)
        pools.append(pool)
        return pool

    yield make
    for p in pools:
        p.close()


def _fresh(pool, msgs):
    m = ContextMemory(pool.model, pool.tokenizer, testing.TINY_CONFIG)
    m.add_messages(msgs)
    return m


def test_a_thread_outlives_its_pool_and_continues_without_re_encoding(make_pool):
    pool = make_pool()
    with pool.conversation("acme", "t1", CONV) as c:
        assert c.reused_tokens == 0 and c.new_tokens == len(c.memory)
        n, answer = len(c.memory), c.memory.generate(None, max_new_tokens=4)
    pool.close()
    again = make_pool()
    with again.conversation("acme", "t1", CONV + [ASK]) as c:
        assert c.reused_tokens == n  # everything held was reused: only the question was encoded
        assert c.memory.token_ids == _fresh(again, CONV + [ASK]).token_ids
    with again.conversation("acme", "t1", CONV) as c:  # the question swapped back out, cheaply or not
        assert c.memory.messages == CONV and c.memory.generate(None, max_new_tokens=4) == answer


def test_beyond_max_open_the_least_recent_thread_is_closed_and_reopens_whole(make_pool):
    pool = make_pool(max_open=1)
    with pool.conversation("acme", "a", CONV) as c:
        tokens_a = c.memory.token_ids
    with pool.conversation("acme", "b", CONV[:2]):
        pass
    assert len(pool) == 1  # "a" was closed
    assert [t.open for t in pool.threads("acme")] == [True, False]
    with pool.conversation("acme", "a", CONV) as c:
        assert c.reused_tokens == len(tokens_a) and c.new_tokens == 0 and c.memory.token_ids == tokens_a


def test_a_diverging_conversation_is_never_mixed_into_the_thread(make_pool):
    pool = make_pool()
    with pool.conversation("acme", "t", CONV):
        pass
    other = [CONV[0], {"role": "user", "content": "A different story."}]
    with pool.conversation("acme", "t", other) as c:
        assert c.memory.messages == other and c.memory.token_ids == _fresh(pool, other).token_ids


def test_a_conversation_diverging_below_its_last_message_is_cropped_from_the_snapshot(make_pool):
    pool = make_pool()
    with pool.conversation("acme", "t", CONV):
        pass
    pool.close()  # a snapshot covering CONV (as after a restart)
    pool = make_pool(snapshot_every=10_000)
    tail = [ASK, {"role": "assistant", "content": "4721."}, {"role": "user", "content": "And the door?"}]
    with pool.conversation("acme", "t", CONV + tail):
        pass
    edited = CONV + [{"role": "user", "content": "What colour is the sky?"}]  # diverges two messages back
    with pool.conversation("acme", "t", edited) as c:
        assert c.reused_tokens == len(_fresh(pool, CONV))  # read from the snapshot, not encoded again
        assert c.memory.messages == edited and c.reused_tokens + c.new_tokens == len(c.memory)
        fresh = _fresh(pool, CONV)
        fresh.add_messages(edited[-1:])
        assert c.memory.token_ids == fresh.token_ids
        assert c.memory.generate(None, max_new_tokens=4) == fresh.generate(None, max_new_tokens=4)


def test_tenants_see_only_their_own_threads(make_pool):
    pool = make_pool()
    with pool.conversation("a", "same-id", CONV):
        pass
    with pool.conversation("b", "same-id", CONV[:1]) as c:
        assert c.reused_tokens == 0 and c.memory.messages == CONV[:1]  # not tenant a's memory
    assert [t.thread for t in pool.threads("a")] == ["same-id"]
    assert pool.threads("a")[0].entries == 3 and pool.threads("b")[0].entries == 1
    assert pool.threads("nobody") == []
    pool.delete("b", "same-id")
    assert [t.thread for t in pool.threads("a")] == ["same-id"]


def test_ids_cannot_leave_the_root(make_pool, tmp_path):
    pool = make_pool()
    with pool.thread("../../x", "../y/z") as mem:
        mem.add_message("user", "hi")
    inside = [p for p in (tmp_path / "root").rglob("manifest.json")]
    assert len(inside) == 1 and not (tmp_path / "x").exists()
    assert [t.thread for t in pool.threads("../../x")] == ["../y/z"]
    for bad in ("", 5, "x" * 201):
        with pytest.raises(ValueError, match="thread must be"):
            with pool.thread("acme", bad):
                pass


def test_delete_removes_the_thread_and_its_files(make_pool, tmp_path):
    pool = make_pool()
    with pool.conversation("acme", "t", CONV):
        pass
    assert pool.delete("acme", "t") is True
    assert pool.threads("acme") == [] and not list((tmp_path / "root").rglob("log.sqlite"))
    assert pool.delete("acme", "t") is False
    with pool.conversation("acme", "t", CONV[:1]) as c:  # a new thread of the same id starts empty
        assert c.reused_tokens == 0


def test_retention_sweep_deletes_idle_surplus_and_oversized_threads_but_not_busy_ones(make_pool):
    pool = make_pool()
    for name in ("old", "mid", "new"):
        with pool.conversation("acme", name, CONV):
            pass
    infos = {t.thread: t for t in pool.threads("acme")}
    assert [t.thread for t in pool.threads("acme")] == ["new", "mid", "old"]
    now = infos["new"].last_active
    assert pool.sweep(Retention(max_idle_seconds=3600), now=now) == []
    assert pool.sweep(Retention(max_threads=2), now=now) == [("acme", "old")]
    held = threading.Event()
    release = threading.Event()

    def busy():
        with pool.thread("acme", "mid"):
            held.set()
            release.wait(30)

    t = threading.Thread(target=busy)
    t.start()
    held.wait(30)
    try:
        assert pool.sweep(Retention(max_threads=0), now=now) == [("acme", "new")]  # "mid" is in use
    finally:
        release.set()
        t.join()
    assert pool.sweep(Retention(max_bytes=0), now=now) == [("acme", "mid")]
    assert pool.threads("acme") == []
    with pytest.raises(ValueError, match="max_threads"):
        Retention(max_threads=-1)


def test_a_ram_budget_closes_the_least_recent_idle_memories(make_pool):
    # float32 blocks: in int8 this short conversation holds less than a bounded memory reserves for
    # its working buffers, so a budget of 2.5 such memories would not open even one.
    cfg = testing.TINY_CONFIG.replace(kv_quantization="none")
    probe = make_pool(cfg)
    with probe.conversation("acme", "probe", CONV) as c:
        one = c.memory.stats().bytes["host"]
    probe.close()
    budget = int(2.5 * one)  # two such memories fit, three do not
    pool = make_pool(cfg, max_resident_bytes=budget)
    for name in ("a", "b", "c"):
        with pool.conversation("acme", name, CONV) as c:
            assert c.memory.config.max_resident_bytes == budget  # each memory is bounded by it too
    assert {t.thread: t.open for t in pool.threads("acme")} == {"a": False, "b": True, "c": True, "probe": False}
    with pool.conversation("acme", "a", CONV) as c:  # reopened whole
        assert c.new_tokens == 0 and c.memory.messages == CONV


def test_different_threads_run_concurrently_one_thread_is_serialised(make_pool):
    pool = make_pool()
    inside, peak, errors = [0], [0], []
    guard = threading.Lock()

    def turn(thread):
        try:
            with pool.conversation("acme", thread, CONV) as c:
                with guard:
                    inside[0] += 1
                    peak[0] = max(peak[0], inside[0])
                c.memory.generate(None, max_new_tokens=3)
                with guard:
                    inside[0] -= 1
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=turn, args=(name,)) for name in ("a", "a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert {t.thread for t in pool.threads("acme")} == {"a", "b"}
    with pool.conversation("acme", "a", CONV) as c:
        assert c.memory.messages == CONV  # two concurrent calls on "a" left it whole


def test_forget_and_find_thread(make_pool, tmp_path):
    pool = make_pool()
    with pool.conversation("acme", "t", CONV):
        pass
    assert pool.find_thread("acme", CONV + [ASK]) == "t" and pool.find_thread("acme", CONV[:1]) is None
    assert pool.find_thread("other", CONV + [ASK]) is None  # another tenant's thread is never found
    assert pool.forget("acme", "t", where=lambda e: "4721" in e.content) == 1
    assert b"4721" not in b"".join(f.read_bytes() for f in (tmp_path / "root").rglob("*") if f.is_file())
    kept = [CONV[0], CONV[2]]
    assert pool.find_thread("acme", kept) == "t"
    with pool.conversation("acme", "t", kept + [ASK]) as c:  # continues what is left, re-encoding nothing
        assert c.memory.messages == kept + [ASK] and c.reused_tokens > 0


def test_what_a_thread_block_writes_is_what_the_next_conversation_continues(make_pool):
    pool = make_pool()
    with pool.conversation("acme", "t", CONV):
        pass
    with pool.thread("acme", "t") as mem:  # a message written outside any conversation
        mem.add_message("user", "Also: the gate code is 9911.")
    held = CONV + [{"role": "user", "content": "Also: the gate code is 9911."}]
    with pool.conversation("acme", "t", held + [ASK]) as c:  # continues it, re-encoding nothing
        assert c.reused_tokens == len(_fresh(pool, held)) and c.memory.messages == held + [ASK]
    with pool.thread("acme", "t") as mem:
        mem.forget(where=lambda e: "9911" in e.content)
    with pool.conversation("acme", "t", CONV + [ASK]) as c:  # what is left is reused, not encoded again
        assert c.reused_tokens == len(c.memory) and c.memory.token_ids == _fresh(pool, CONV + [ASK]).token_ids
