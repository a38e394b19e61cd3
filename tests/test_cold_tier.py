"""The cold tier on a tiny model. A random tiny model can only be crammed a token or two per vector,
so blocks here are 2 tokens; the real-model test (test_real_model.py) archives a planted fact."""

import pytest
import torch

from memory_plugin import ContextMemory, MemoryConfig

from .test_context import _state

CFG = MemoryConfig(
    block_size=2, n_init=4, n_local=16, topk=2, repr_topk=1, chunk_size=8, max_cached_blocks=4,
    archive_vectors=2, archive_max_steps=300, archive_mode="rehydrate",
)  # fmt: skip
TEXT = "The grass is green. The sky is blue. "


@pytest.fixture
def mem(tiny_model, tiny_tokenizer):
    m = ContextMemory(tiny_model, tiny_tokenizer, CFG)
    m.add_text(TEXT * 3)
    return m


def test_archive_moves_exact_blocks_to_the_cold_tier_and_keeps_reprs(mem):
    before_blocks = mem.stats().blocks
    reprs = [layer.reprs.clone() for layer in mem._engine.ctx.store.layers]
    went_cold = mem.archive(older_than_tokens=0)
    st = mem.stats()
    assert went_cold > 0 and st.blocks_by_tier["cold"] == went_cold
    assert st.blocks == before_blocks and st.bytes["cold"] > 0
    for layer, r in zip(mem._engine.ctx.store.layers, reprs):  # retrieval still indexes them
        assert layer.reprs.equal(r)
    for b in mem._engine.ctx.store.cold:
        assert mem._engine.ctx.store.layers[0].kv[b] is None  # KV dropped
        assert mem._engine.ctx.store.cold[b].vectors.exact


def test_a_block_that_does_not_cram_exactly_keeps_its_kv(tiny_model, tiny_tokenizer):
    m = ContextMemory(tiny_model, tiny_tokenizer, CFG.replace(archive_max_steps=1))
    m.add_text(TEXT * 3)
    before = _state(m._engine.ctx)
    assert m.archive(older_than_tokens=0) == 0
    assert _state(m._engine.ctx) == before and m.stats().blocks_by_tier["cold"] == 0


@pytest.mark.parametrize("mode", ["rehydrate", "recompute", "gist", "drop"])
def test_selected_cold_blocks_are_rehydrated_gisted_or_dropped(tiny_model, tiny_tokenizer, mode):
    m = ContextMemory(tiny_model, tiny_tokenizer, CFG.replace(archive_mode=mode))
    m.add_text(TEXT * 3)
    assert m.archive(older_than_tokens=0) > 0
    answer = m.generate("sky?", max_new_tokens=6, min_new_tokens=6)
    assert isinstance(answer, str) and answer
    store = m._engine.ctx.store
    if mode in ("rehydrate", "recompute"):
        assert m._engine.cold.rehydrations > 0 and m._engine.cold.decode_mismatches == 0
        b = next(iter(store.cold.rehydrated))
        assert store.block(0, b).shape == (2, 2, CFG.block_size, 16)
    elif mode == "gist":
        cold = next(iter(store.cold.values()))
        assert cold.gist[0].shape == (2, 2, CFG.archive_vectors, 16) and m._engine.cold.rehydrations == 0
    else:
        assert m._engine.cold.rehydrations == 0


def test_background_worker_archives_old_blocks(tiny_model, tiny_tokenizer):
    m = ContextMemory(tiny_model, tiny_tokenizer, CFG.replace(archive_after_tokens=20))
    m.add_text(TEXT * 3)
    m._engine.cold.wait()
    cold = m.stats().blocks_by_tier["cold"]
    assert cold > 0
    horizon = len(m) - 20
    assert all(m._engine.ctx.block_span(b)[1] <= horizon for b in m._engine.ctx.store.cold)
    m.close()


def test_cold_tier_survives_save_and_load(mem, tmp_path, tiny_model, tiny_tokenizer):
    mem.archive(older_than_tokens=0)
    answer = mem.generate("sky?", max_new_tokens=6, min_new_tokens=6)
    mem.save(tmp_path / "m")
    back = ContextMemory.load(tmp_path / "m", tiny_model, tokenizer=tiny_tokenizer)
    assert set(back._engine.ctx.store.cold) == set(mem._engine.ctx.store.cold)
    anchors = {b: c.vectors.anchor for b, c in back._engine.ctx.store.cold.items()}
    assert anchors == {b: c.vectors.anchor for b, c in mem._engine.ctx.store.cold.items()} and None not in anchors.values()
    assert back.generate("sky?", max_new_tokens=6, min_new_tokens=6) == answer


def test_rollback_forgets_cold_blocks_it_drops(mem):
    cp = mem.checkpoint()
    mem.add_text(TEXT * 2)
    mem.archive(older_than_tokens=0)
    n = cp.state["n_blocks"]
    mem.rollback(cp)
    assert all(b < n for b in mem._engine.ctx.store.cold)


def test_bad_archive_settings():
    with pytest.raises(ValueError, match="archive_mode"):
        MemoryConfig(archive_mode="compress")
    with pytest.raises(ValueError, match="archive_vectors must be >= 1"):
        MemoryConfig(archive_vectors=0)


def test_gist_mode_survives_save_and_load(tiny_model, tiny_tokenizer, tmp_path):
    m = ContextMemory(tiny_model, tiny_tokenizer, CFG.replace(archive_mode="gist"))
    m.add_text(TEXT * 3)
    assert m.archive(older_than_tokens=0) > 0
    answer = m.generate("sky?", max_new_tokens=6, min_new_tokens=6)
    m.save(tmp_path / "m")
    back = ContextMemory.load(tmp_path / "m", tiny_model, tokenizer=tiny_tokenizer)
    assert back.generate("sky?", max_new_tokens=6, min_new_tokens=6) == answer


def test_recompute_mode_drops_kv_without_cramming_and_recomputes_it_from_token_ids(tiny_model, tiny_tokenizer):
    # one optimisation step crams nothing exactly: in the vector modes no block would go cold
    cfg = CFG.replace(archive_mode="recompute", archive_max_steps=1, kv_quantization="none")
    m = ContextMemory(tiny_model, tiny_tokenizer, cfg)
    m.add_text(TEXT * 3)
    store = m._engine.ctx.store
    before = {b: [store.block(i, b).clone() for i in range(len(store.layers))] for b in range(len(store))}
    went_cold = m.archive(older_than_tokens=0)
    st = m.stats()
    assert went_cold == len(store) and st.blocks_by_tier["cold"] == went_cold
    assert st.bytes["cold"] == 0  # nothing but the token ids, which the log keeps anyway
    assert all(c.vectors is None for c in store.cold.values())
    for b, layers in before.items():
        again = torch.stack(store.fetch(0, [b]))  # selected: recomputed from its token ids
        # the first layer's KV depends on each token alone: recomputed exactly (up to RoPE rounding)
        assert torch.allclose(again, layers[0], atol=1e-5)
    assert m._engine.cold.rehydrations >= len(before)
    assert m.generate("sky?", max_new_tokens=4, min_new_tokens=4)


def test_recompute_mode_survives_save_and_load_and_archives_in_the_background(tiny_model, tiny_tokenizer, tmp_path):
    m = ContextMemory(tiny_model, tiny_tokenizer, CFG.replace(archive_mode="recompute", archive_after_tokens=20))
    m.add_text(TEXT * 3)
    m._engine.cold.wait()
    cold = set(m._engine.ctx.store.cold)
    assert cold and all(m._engine.ctx.block_span(b)[1] <= len(m) - 20 for b in cold)
    answer = m.generate("sky?", max_new_tokens=6, min_new_tokens=6)
    m.save(tmp_path / "m")
    m.close()
    back = ContextMemory.load(tmp_path / "m", tiny_model, tokenizer=tiny_tokenizer)
    assert set(back._engine.ctx.store.cold) == cold
    assert all(c.vectors is None for c in back._engine.ctx.store.cold.values())
    assert back.generate("sky?", max_new_tokens=6, min_new_tokens=6) == answer
    back.close()


@pytest.mark.parametrize("saved_mode", ["rehydrate", "recompute"])
def test_a_saved_memory_opens_with_another_cold_mode(tiny_model, tiny_tokenizer, tmp_path, saved_mode):
    m = ContextMemory(tiny_model, tiny_tokenizer, CFG.replace(archive_mode=saved_mode))
    m.add_text(TEXT * 3)
    assert m.archive(older_than_tokens=0) > 0
    m.save(tmp_path / "m")
    for mode in ("rehydrate", "recompute", "gist", "drop"):
        back = ContextMemory.load(tmp_path / "m", tiny_model, tokenizer=tiny_tokenizer, archive_mode=mode)
        assert back.config.archive_mode == mode and set(back._engine.ctx.store.cold) == set(m._engine.ctx.store.cold)
        assert back.generate("sky?", max_new_tokens=4, min_new_tokens=4)
        cold = back._engine.cold
        has_vectors = saved_mode != "recompute"
        # what a selected cold block became: recomputed, unless gisted (vectors) or dropped
        recomputed = mode in ("rehydrate", "recompute") or (mode == "gist" and not has_vectors)
        assert (cold.rehydrations > 0) == recomputed, (saved_mode, mode)
        if mode == "gist" and has_vectors:
            assert all(c.gist is not None for c in back._engine.ctx.store.cold.values())
    with pytest.raises(ValueError, match="archive_mode"):
        ContextMemory.load(tmp_path / "m", tiny_model, tokenizer=tiny_tokenizer, archive_mode="compress")
    with ContextMemory.open(tmp_path / "m", tiny_model, tokenizer=tiny_tokenizer) as opened:  # no config: as saved
        assert opened.config.archive_mode == saved_mode
    with ContextMemory.open(tmp_path / "m", tiny_model, tokenizer=tiny_tokenizer, config=CFG.replace(archive_mode="drop")) as opened:
        assert opened.config.archive_mode == "drop" and len(opened._engine.ctx.store.cold) > 0


def _shard_bytes(path) -> int:
    return sum(f.stat().st_size for f in path.glob("blocks-*"))


@pytest.mark.parametrize("budget", [None, 80_000])  # 80 kB: the window and little else
def test_cold_blocks_take_no_kv_space_on_disk(tiny_model, tiny_tokenizer, tmp_path, budget):
    m = ContextMemory(tiny_model, tiny_tokenizer, CFG.replace(archive_mode="recompute"))
    m.add_text(TEXT * 6)
    m.save(tmp_path / "warm")
    went_cold = m.archive(older_than_tokens=len(m) // 2)
    n_blocks = m.stats().blocks
    assert 0 < went_cold < n_blocks  # some blocks keep their KV
    answer = m.generate("sky?", max_new_tokens=6, min_new_tokens=6)
    m.save(tmp_path / "cold")
    c = tiny_model.config
    int8_kv = c.num_hidden_layers * 2 * c.num_key_value_heads * CFG.block_size * 16  # one block, every layer
    assert _shard_bytes(tmp_path / "warm") - _shard_bytes(tmp_path / "cold") >= went_cold * int8_kv
    back = ContextMemory.load(tmp_path / "cold", tiny_model, tokenizer=tiny_tokenizer, max_resident_bytes=budget)
    assert set(back._engine.ctx.store.cold) == set(m._engine.ctx.store.cold)
    assert back.generate("sky?", max_new_tokens=6, min_new_tokens=6) == answer


def test_an_open_memory_rewrites_the_shards_of_blocks_gone_cold(tiny_model, tiny_tokenizer, tmp_path):
    path = tmp_path / "m"
    with ContextMemory.open(path, tiny_model, tokenizer=tiny_tokenizer, config=CFG.replace(archive_mode="recompute")) as m:
        m.add_text(TEXT * 6)
    before, files = _shard_bytes(path), {f.name for f in path.glob("blocks-*")}
    with ContextMemory.open(path, tiny_model, tokenizer=tiny_tokenizer) as m:
        went_cold = m.archive(older_than_tokens=len(m) // 2)
        assert 0 < went_cold < m.stats().blocks
        answer = m.generate("sky?", max_new_tokens=6, min_new_tokens=6)
        cold = set(m._engine.ctx.store.cold)
    # closing snapshots: the shards holding those blocks were replaced, the old files deleted
    after = {f.name for f in path.glob("blocks-*")}
    assert _shard_bytes(path) < before and files - after
    with ContextMemory.open(path, tiny_model, tokenizer=tiny_tokenizer) as m:
        assert set(m._engine.ctx.store.cold) == cold
        assert m.generate("sky?", max_new_tokens=6, min_new_tokens=6) == answer


def test_a_cold_block_is_recomputed_once_while_it_stays_selected(tiny_tokenizer):
    # every layer selects its own blocks and one recomputation serves all layers: the LRU of
    # recomputed blocks holds a whole step's selections (topk per layer), so none is recomputed
    # twice in a turn; with 6 layers and topk 3, a step may select 18 blocks
    from memory_plugin.testing import tiny_llama

    model = tiny_llama(len(tiny_tokenizer), num_hidden_layers=6)
    m = ContextMemory(model, tiny_tokenizer, CFG.replace(archive_mode="recompute", topk=3, kv_quantization="none"))
    m.add_text(TEXT * 6)
    went_cold = m.archive(older_than_tokens=0)
    assert went_cold > 18
    m.generate("sky?", max_new_tokens=8, min_new_tokens=8)
    assert 0 < m._engine.cold.rehydrations <= went_cold
