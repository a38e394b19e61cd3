"""Save, load, crash safety, corruption, the writer lock, bounded RAM and KV quantisation."""

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from memory_plugin import ContextMemory, MemoryConfig, testing
from memory_plugin import blocks
from memory_plugin.blocks import BlockCodec
from memory_plugin.persistence import MemoryFormatError, MemoryLockedError

from .test_context import _state

TEXT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
ROOT = Path(__file__).resolve().parents[1]


def message(i: int, seed: int) -> tuple[str, str]:
    """The i-th message the crash-test writer adds (deterministic, varied sizes)."""
    rng = random.Random(seed * 100_003 + i)
    return ("user" if i % 2 == 0 else "assistant"), f"message {i}: " + TEXT[: rng.randint(10, len(TEXT))] * rng.randint(1, 4)


def _build(model, tokenizer, config):
    mem = ContextMemory(model, tokenizer, config)
    mem.add_message("system", "Be brief.")
    mem.add_text(TEXT * 20)
    mem.add_message("user", "Note: the sky is blue.")
    return mem


@pytest.fixture
def built(tiny_model, tiny_tokenizer):
    return _build(tiny_model, tiny_tokenizer, testing.TINY_CONFIG)


def _ask(mem):
    return mem.generate("sky?", max_new_tokens=12, min_new_tokens=12)


def _hits(mem):
    return [(h.start, h.end, round(h.score, 5)) for h in mem.retrieve("the sky", k=4)]


def test_save_and_load_round_trip_exactly(built, tmp_path, tiny_model, tiny_tokenizer):
    answer, hits, state = _ask(built), _hits(built), _state(built._engine.ctx)
    built.save(tmp_path / "m")
    loaded = ContextMemory.load(tmp_path / "m", tiny_model, tokenizer=tiny_tokenizer)
    assert _state(loaded._engine.ctx) == state
    assert loaded.messages == built.messages and loaded.token_ids == built.token_ids
    assert _ask(loaded) == answer and _hits(loaded) == hits
    assert loaded.config == built.config
    files = sorted(p.name.split("-")[0] for p in (tmp_path / "m").iterdir())
    assert files == ["LOCK", "blocks", "log.sqlite", "manifest.json", "state"]


def test_keys_per_kv_head_are_saved_loaded_and_opened_as_they_were(tmp_path, tiny_model, tiny_tokenizer):
    cfg = testing.TINY_CONFIG.replace(repr_heads="kv")
    mem = _build(tiny_model, tiny_tokenizer, cfg)
    store = mem._engine.ctx.store
    assert store.layers[0].reprs.shape[1] == tiny_model.config.num_key_value_heads < tiny_model.config.num_attention_heads
    answer, hits, state = _ask(mem), _hits(mem), _state(mem._engine.ctx)
    mem.save(tmp_path / "m")
    loaded = ContextMemory.load(tmp_path / "m", tiny_model, tokenizer=tiny_tokenizer)
    assert loaded.config.repr_heads == "kv" and _state(loaded._engine.ctx) == state
    assert _ask(loaded) == answer and _hits(loaded) == hits
    with pytest.raises(ValueError, match="config differs .* in repr_heads"):
        ContextMemory.open(tmp_path / "m", tiny_model, tokenizer=tiny_tokenizer, config=cfg.replace(repr_heads="query"))
    budget = cfg.replace(max_resident_bytes=400_000)  # reprs held int8, as stored
    opened = ContextMemory.open(tmp_path / "m", tiny_model, tokenizer=tiny_tokenizer, config=budget)
    assert _ask(opened) == _ask(mem)
    opened.close()


def test_saving_again_replaces_the_old_copy(built, tmp_path, tiny_model, tiny_tokenizer):
    built.save(tmp_path / "m")
    built.add_text(TEXT * 5)
    built.save(tmp_path / "m")
    loaded = ContextMemory.load(tmp_path / "m", tiny_model, tokenizer=tiny_tokenizer)
    assert len(loaded) == len(built) and _ask(loaded) == _ask(built)
    assert len(list((tmp_path / "m").glob("state-*"))) == 1


def test_refuses_to_write_into_a_directory_that_is_not_a_memory(built, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("keep me")
    with pytest.raises(MemoryFormatError, match="not a saved memory"):
        built.save(tmp_path / "docs")
    assert (tmp_path / "docs" / "notes.txt").read_text() == "keep me"


def test_open_memory_persists_every_add_and_reopens_where_it_was(tmp_path, tiny_model, tiny_tokenizer):
    path = tmp_path / "agent"
    with ContextMemory.open(path, tiny_model, tokenizer=tiny_tokenizer, config=testing.TINY_CONFIG) as mem:
        mem.add_message("system", "Be brief.")
        mem.add_text(TEXT * 12)
        answer = _ask(mem)
        mem.generate("remember this", max_new_tokens=4, min_new_tokens=4, remember=True)
        msgs, state = mem.messages, _state(mem._engine.ctx)
    with ContextMemory.open(path, tiny_model, tokenizer=tiny_tokenizer) as again:
        assert again.messages == msgs and _state(again._engine.ctx) == state
        cp = again.checkpoint()
        again.add_text(TEXT * 3)
        again.rollback(cp)  # a rollback is durable too
        assert _ask(again) != "" and len(again.messages) == len(msgs)
    reopened = ContextMemory.open(path, tiny_model, tokenizer=tiny_tokenizer)
    assert reopened.messages == msgs
    reopened.reset()
    reopened.close()
    assert ContextMemory.load(path, tiny_model, tokenizer=tiny_tokenizer).messages == []
    assert answer


def test_open_recovers_entries_written_after_the_last_snapshot(tmp_path, tiny_model, tiny_tokenizer):
    path = tmp_path / "agent"
    mem = ContextMemory.open(path, tiny_model, tokenizer=tiny_tokenizer, config=testing.TINY_CONFIG, snapshot_every=10**9)
    for i in range(6):
        mem.add_message(*message(i, 0))
    # Simulate a crash: no close(), the lock is dropped as the OS would on process death.
    mem._engine.durable.lock.release()
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["n_entries"] == 0  # nothing but the log knew about those messages
    back = ContextMemory.open(path, tiny_model, tokenizer=tiny_tokenizer)
    assert [tuple(m.values()) for m in back.messages] == [message(i, 0) for i in range(6)]
    fresh = ContextMemory(tiny_model, tiny_tokenizer, testing.TINY_CONFIG)
    for i in range(6):  # one call per message, as the crashed writer did: the same chunks
        fresh.add_message(*message(i, 0))
    assert back.token_ids == fresh.token_ids and _state(back._engine.ctx) == _state(fresh._engine.ctx)
    back.close()


@pytest.mark.parametrize("seed", range(6))
def test_kill_9_at_a_random_moment_loses_nothing_acknowledged(tmp_path, seed, tiny_model, tiny_tokenizer):
    path = tmp_path / "m"
    rng = random.Random(seed)
    acked, start = -1, 0
    for round_ in range(2):  # kill, reopen in a new writer, kill again
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests._writer", str(path), str(seed)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        ready = proc.stdout.readline().split()
        assert ready[0] == "READY", ready
        start = int(ready[1])
        assert start >= acked + 1  # everything acknowledged before is there
        time.sleep(rng.uniform(0.2, 2.5))
        proc.send_signal(signal.SIGKILL)
        out = proc.communicate()[0].split("\n")
        # a last line the kill cut short ("ACK" without its number) acknowledges nothing
        acks = [int(m[1]) for line in out if (m := re.fullmatch(r"ACK (\d+)", line))]
        acked = max(acks, default=start - 1)
    mem = ContextMemory.open(path, tiny_model, tokenizer=tiny_tokenizer)
    got = [tuple(m.values()) for m in mem.messages]
    assert len(got) >= acked + 1
    assert got == [message(i, seed) for i in range(len(got))]
    fresh = ContextMemory(tiny_model, tiny_tokenizer, testing.TINY_CONFIG)
    fresh.add_messages([dict(zip(("role", "content"), m)) for m in got])
    assert mem.token_ids == fresh.token_ids
    mem.add_message("user", "still works")
    assert isinstance(_ask(mem), str)
    mem.close()
    assert not [p for p in path.iterdir() if ".tmp-" in p.name]  # interrupted writes were cleaned


def test_a_second_writer_is_refused_until_the_first_closes(tmp_path, tiny_model, tiny_tokenizer):
    path = tmp_path / "m"
    first = ContextMemory.open(path, tiny_model, tokenizer=tiny_tokenizer, config=testing.TINY_CONFIG)
    with pytest.raises(MemoryLockedError, match="already open for writing"):
        ContextMemory.open(path, tiny_model, tokenizer=tiny_tokenizer)
    first.add_text(TEXT)
    assert len(ContextMemory.load(path, tiny_model, tokenizer=tiny_tokenizer)) == len(first)  # readers are fine
    first.close()
    ContextMemory.open(path, tiny_model, tokenizer=tiny_tokenizer).close()


@pytest.mark.parametrize("archiving", [False, True])
def test_dropping_the_last_reference_releases_the_directory(tmp_path, tiny_model, tiny_tokenizer, archiving):
    """``del mem`` without close(): the same process reopens the directory at once (no garbage
    collection needed), with every acknowledged entry; also while the cold tier's worker runs."""
    import gc

    path = tmp_path / "m"
    cfg = testing.TINY_CONFIG.replace(archive_after_tokens=64, archive_mode="rehydrate") if archiving else testing.TINY_CONFIG
    mem = ContextMemory.open(path, tiny_model, tokenizer=tiny_tokenizer, config=cfg)
    mem.add_text(TEXT * 4)
    stream = mem.stream("Hi", max_new_tokens=2)  # a turn read to its end holds nothing either
    "".join(stream)
    msgs, ids = mem.messages, mem.token_ids
    gc.disable()  # the release must not depend on the collector breaking cycles
    try:
        del mem, stream
        again = ContextMemory.open(path, tiny_model, tokenizer=tiny_tokenizer, config=cfg)
    finally:
        gc.enable()
    assert again.messages == msgs and again.token_ids == ids
    again.close()


def _corrupt_shard(path):
    f = next(path.glob("blocks-*"))
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    return f.name


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda p: next(p.glob("blocks-*")).write_bytes(next(p.glob("blocks-*")).read_bytes()[:1000]), r"blocks-.*truncated"),
        (_corrupt_shard, r"blocks-.*checksum mismatch"),
        (lambda p: (p / "manifest.json").write_text('{"format_version": 1, "model_'), r"manifest.json: not valid JSON"),
        (lambda p: next(p.glob("state-*")).unlink(), r"state-.*missing"),
        (lambda p: (p / "log.sqlite").write_bytes(b"garbage" * 100), r"log.sqlite"),
        (
            lambda p: (p / "manifest.json").write_text(
                json.dumps({**json.loads((p / "manifest.json").read_text()), "format_version": 99})
            ),
            r"format version 99 is newer",
        ),
    ],
    ids=["truncated-shard", "flipped-byte", "torn-manifest", "missing-state", "garbage-log", "newer-format"],
)
def test_damaged_files_give_an_error_naming_the_file_and_change_nothing(built, tmp_path, tiny_model, tiny_tokenizer, damage, match):
    path = tmp_path / "m"
    built.save(path)
    damage(path)

    def contents():  # LOCK only names the last writer's pid; everything else must stay as it was
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in path.iterdir() if p.name != "LOCK"}

    before = contents()
    with pytest.raises(MemoryFormatError, match=match):
        ContextMemory.load(path, tiny_model, tokenizer=tiny_tokenizer)
    with pytest.raises(MemoryFormatError, match=match):
        ContextMemory.open(path, tiny_model, tokenizer=tiny_tokenizer)
    assert contents() == before


def test_another_model_is_refused(built, tmp_path, tiny_tokenizer):
    built.save(tmp_path / "m")
    other = testing.tiny_llama(len(tiny_tokenizer), seed=1)
    with pytest.raises(MemoryFormatError, match="fingerprint"):
        ContextMemory.load(tmp_path / "m", other, tokenizer=tiny_tokenizer)


def test_a_different_geometry_is_refused_on_open(tmp_path, tiny_model, tiny_tokenizer):
    ContextMemory.open(tmp_path / "m", tiny_model, tokenizer=tiny_tokenizer, config=testing.TINY_CONFIG).close()
    with pytest.raises(ValueError, match="config differs .* in block_size"):
        ContextMemory.open(tmp_path / "m", tiny_model, tokenizer=tiny_tokenizer, config=testing.TINY_CONFIG.replace(block_size=8))


def test_a_memory_saved_before_a_config_field_existed_keeps_its_old_behaviour(tmp_path, tiny_model, tiny_tokenizer):
    # Memories saved before `relevance` existed were built with InfLLM's dot-product rule, and
    # before `repr_heads` with a key per query head.
    dot = _build(tiny_model, tiny_tokenizer, testing.TINY_CONFIG.replace(relevance="dot", repr_heads="query"))
    dot.save(tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    del manifest["config"]["relevance"], manifest["config"]["repr_heads"]
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(manifest))
    loaded = ContextMemory.load(tmp_path / "m", tiny_model, tokenizer=tiny_tokenizer)
    assert loaded.config.relevance == "dot" and loaded.config.repr_heads == "query"
    assert _ask(loaded) == _ask(dot)


def test_resident_bytes_stay_under_the_budget_and_answers_do_not_change(tiny_model, tiny_tokenizer):
    budget = 450_000  # int8 blocks (the default): 40 messages hold ~520 KB unbounded
    cfg = testing.TINY_CONFIG
    bounded = ContextMemory(tiny_model, tiny_tokenizer, cfg.replace(max_resident_bytes=budget))
    unbounded = ContextMemory(tiny_model, tiny_tokenizer, cfg)
    peak = 0
    for i in range(40):
        for m in (bounded, unbounded):
            m.add_message(*message(i, 3))
        peak = max(peak, bounded.stats().bytes["host"])
        assert bounded.stats().bytes["host"] <= budget
    st = bounded.stats()
    assert st.bytes["disk"] > 0 and st.blocks > 30
    assert unbounded.stats().bytes["host"] > budget  # the budget really bounded something
    reprs = [m._engine.ctx.store.repr_nbytes() for m in (bounded, unbounded)]
    g, n = unbounded._engine.ctx.g, unbounded._engine.ctx.store.layers[0].table.n
    as_float32 = len(g.memory_layers) * n * g.n_heads * g.head_dim * 4
    assert reprs[0] == reprs[1] and reprs[1] * 2 < as_float32  # reprs stay int8 on the CPU, as on disk
    assert _ask(bounded) == _ask(unbounded) and _hits(bounded) == _hits(unbounded)


def test_more_shards_than_open_files_allowed(monkeypatch, tiny_model, tiny_tokenizer):
    monkeypatch.setattr(blocks, "MAX_OPEN_SHARDS", 2)
    cfg = testing.TINY_CONFIG
    bounded = ContextMemory(tiny_model, tiny_tokenizer, cfg.replace(max_resident_bytes=700_000))
    unbounded = ContextMemory(tiny_model, tiny_tokenizer, cfg)
    for i in range(40):
        for m in (bounded, unbounded):
            m.add_message(*message(i, 3))
    assert _ask(bounded) == _ask(unbounded) and _hits(bounded) == _hits(unbounded)
    disk = bounded._engine.ctx.store.disk
    assert len(disk.shards) > 2 and len(disk._fds) <= 2


_ALLOC_PROBE = """
import sys, torch
from memory_plugin.blocks import release_free_memory, return_freed_memory_to_os
tuned = sys.argv[1] == "tuned"
if tuned and not return_freed_memory_to_os():
    sys.exit(77)
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
n = 2 * 3 * 128 * 64  # one fp32 block of the embedded model: 196 KB
x = torch.ones(n); del x  # after one freed block glibc raises its threshold above a block
keep = [torch.ones(n) for _ in range(600)]
before = rss()
del keep[::2]  # evicting every other block: holes in a heap arena, kept by default
if tuned:
    release_free_memory(0)  # as the memory does after each write and turn
print((before - rss()) / 2**20)
"""


def test_freed_block_buffers_are_given_back_to_the_os():
    """Without this, a RAM budget bounded the memory's accounting but not the process (BENCHMARKS.md)."""
    if not Path("/proc/self/statm").exists():
        pytest.skip("needs /proc to read the resident set size")
    freed = {}
    for mode in ("default", "tuned"):
        run = subprocess.run([sys.executable, "-c", _ALLOC_PROBE, mode], capture_output=True, text=True)
        if run.returncode == 77:
            pytest.skip("not glibc: the allocator is not tunable with mallopt")
        assert run.returncode == 0, run.stderr
        freed[mode] = float(run.stdout)
    assert freed["tuned"] > 50  # 300 blocks of 196 KB went back
    assert freed["default"] < freed["tuned"] / 2  # the probe shows the retention it guards against


def test_budget_too_small_for_the_window_is_a_clear_error(tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="below what the local window"):
        ContextMemory(tiny_model, tiny_tokenizer, testing.TINY_CONFIG.replace(max_resident_bytes=1000))


@pytest.mark.parametrize("kind, ratio, tol", [("bf16", 0.5, 1e-2), ("int8", 0.25, 2e-2)])
def test_kv_quantisation_shrinks_blocks_and_stays_close(kind, ratio, tol, tiny_model, tiny_tokenizer, tmp_path):
    kv = torch.randn(2, 2, 16, 8)
    codec = BlockCodec(kind, torch.float32)
    back = codec.decode(codec.encode(kv))
    assert ((back - kv).abs().max() / kv.abs().max()) < tol
    mems = {}
    for k in ("none", kind):
        m = ContextMemory(tiny_model, tiny_tokenizer, testing.TINY_CONFIG.replace(kv_quantization=k))
        m.add_text(TEXT * 20)
        m.save(tmp_path / k)
        mems[k] = m
    size = {k: sum(p.stat().st_size for p in (tmp_path / k).glob("blocks-*")) for k in mems}
    assert size[kind] < (ratio + 0.15) * size["none"]
    loaded = ContextMemory.load(tmp_path / kind, tiny_model, tokenizer=tiny_tokenizer)
    assert _ask(loaded) == _ask(mems[kind])


def test_messages_list_what_the_memory_holds(tiny_memory):
    tiny_memory.add_message("user", "hi")
    tiny_memory.add_text("raw document")
    assert tiny_memory.messages == [{"role": "user", "content": "hi"}, {"role": None, "content": "raw document"}]


def test_bad_quantisation_and_budget_values(tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="kv_quantization"):
        MemoryConfig(kv_quantization="int4")
    with pytest.raises(ValueError, match="max_resident_bytes must be >= 1"):
        MemoryConfig(max_resident_bytes=0)


def test_a_budget_the_growing_reprs_outgrow_is_said_once_and_answers_stay_right(tiny_model, tiny_tokenizer):
    cfg = testing.TINY_CONFIG
    with pytest.raises(ValueError, match=r"need \((\d+) bytes\)") as e:
        ContextMemory(tiny_model, tiny_tokenizer, cfg.replace(max_resident_bytes=1000))
    fixed = int(re.search(r"need \((\d+) bytes\)", str(e.value)).group(1))
    bounded = ContextMemory(tiny_model, tiny_tokenizer, cfg.replace(max_resident_bytes=fixed + 2000))
    unbounded = ContextMemory(tiny_model, tiny_tokenizer, cfg)
    with pytest.warns(RuntimeWarning, match="leaves no RAM for blocks") as said:
        for i in range(30):
            for m in (bounded, unbounded):
                m.add_message(*message(i, 3))
        answer = _ask(bounded)
    assert len([w for w in said if "leaves no RAM for blocks" in str(w.message)]) == 1
    assert bounded.stats().blocks_by_tier["ram"] == 0 and answer == _ask(unbounded)
