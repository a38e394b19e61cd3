"""The store's pieces: policies resolved from config strings, the RAM tier under a budget, per-layer
objects after a rollback, and the cold tier's connection and rehydration LRU."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from memory_plugin import MemoryConfig
from memory_plugin.attention import apply_rope, block_relevance
from memory_plugin.blocks import BlockCodec, BlockStore, ColdBlock
from memory_plugin.policies import BLOCK_POSITIONS, COLD_MODES, KV_CODECS, RELEVANCE
from memory_plugin.tiers import RamTier

H, HKV, D, BS = 4, 2, 8, 4
REGISTRIES = {
    "relevance": RELEVANCE, "block_positions": BLOCK_POSITIONS, "kv_quantization": KV_CODECS, "archive_mode": COLD_MODES
}  # fmt: skip


@pytest.mark.parametrize("field", REGISTRIES)
def test_every_config_string_resolves_to_a_frozen_policy_and_nothing_else_is_accepted(field):
    registry = REGISTRIES[field]
    for name, policy in registry.items():
        assert getattr(MemoryConfig(**{field: name}), field) == name
        assert dataclasses.is_dataclass(policy) and policy.__dataclass_params__.frozen
    assert len({type(p) for p in registry.values()}) == len(registry)  # one class per variant
    with pytest.raises(ValueError, match=f"{field} must be .* or {list(registry)[-1]!r}, got 'other'"):
        MemoryConfig(**{field: "other"})
    assert getattr(MemoryConfig(), field) in registry


def test_relevance_policies_score_as_block_relevance():
    q, reprs = torch.randn(H, D), torch.randn(5, H, D)
    assert torch.equal(RELEVANCE["dot"].scores(q, reprs), block_relevance(q, reprs))
    assert torch.equal(RELEVANCE["zscore"].scores(q, reprs), block_relevance(q, reprs, normalize=True))


def test_block_positions():
    cos, sin = torch.randn(32, D), torch.randn(32, D)
    k = torch.randn(HKV, BS, D)
    fixed, ordered = BLOCK_POSITIONS["fixed"], BLOCK_POSITIONS["ordered"]
    assert fixed.query_position(20, BS) == 20 and ordered.query_position(20, BS) == 20 + BS - 1
    assert fixed.rotate_keys(k, 3, BS, cos, sin) is k
    # a block (offset 0) is rotated exactly as by its first block_size positions
    assert torch.equal(ordered.rotate_keys(k, 0, BS, cos, sin), apply_rope(k, cos[:BS], sin[:BS]))
    window = torch.randn(HKV, 6, D)  # starts 3 tokens into a block: offsets 3, 0, 1, 2, 3, 0
    expect = apply_rope(window, cos[[3, 0, 1, 2, 3, 0]], sin[[3, 0, 1, 2, 3, 0]])
    assert torch.equal(ordered.rotate_keys(window, 3 + 2 * BS, BS, cos, sin), expect)


N = 2 * HKV * BS * D  # values in a block


SCALES = 2 * 2 * HKV * D  # int8: one float16 scale per channel (format 3)


@pytest.mark.parametrize("kind, nbytes, atol", [("none", 4 * N, 0), ("bf16", 2 * N, 2e-2), ("int8", N + SCALES, 3e-2)])
def test_codecs_round_trip_in_their_size(kind, nbytes, atol):
    codec = BlockCodec(kind, torch.float32)
    kv = torch.randn(2, HKV, BS, D)
    enc = codec.encode(kv)
    assert sum(t.numel() * t.element_size() for t in enc.values()) == nbytes
    torch.testing.assert_close(codec.decode(enc), kv, atol=atol, rtol=0)
    many = codec.decode_many([enc, codec.encode(kv * 2)])
    assert many.shape == (2, 2, HKV, BS, D) and torch.equal(many[0], codec.decode(enc))
    with pytest.raises(ValueError, match="kv_quantization must be one of"):
        BlockCodec("fp4", torch.float32)


@pytest.mark.parametrize("kind, nbytes", [("none", 4 * H * D), ("bf16", 4 * H * D), ("int8", H * D + 2 * H)])
def test_reprs_are_stored_in_their_size_and_round_as_they_read_back(kind, nbytes):
    codec = BlockCodec(kind, torch.float32)
    reprs = torch.randn(5, H, D)
    reprs[2, 1] = 0  # a head whose keys are all zero keeps a usable (nonzero) scale
    enc = codec.encode_reprs(reprs)
    assert sum(t.numel() * t.element_size() for t in enc.values()) == 5 * nbytes
    back = codec.decode_reprs(enc)
    assert back.dtype == torch.float32 and torch.isfinite(back).all() and torch.equal(back[2, 1], reprs[2, 1])
    # within half a step of each head's own scale (int8), so a small head is not drowned by a large one
    step = reprs.abs().amax(dim=-1, keepdim=True) / 127
    assert ((back - reprs).abs() <= step * (0.5 + 1e-3)).all()
    # what selection scans in RAM is exactly what a memory read back from disk scans
    rounded = codec.round_reprs(reprs)
    assert torch.equal(codec.decode_reprs(codec.encode_reprs(rounded)), rounded) and torch.equal(rounded, back)


def test_int8_scales_stay_inside_float16():
    codec = BlockCodec("int8", torch.float32)
    kv = torch.zeros(2, HKV, BS, D)
    kv[0, 0, :, 0] = 1e8  # saturates float16's scale range: still finite, still the largest value
    kv[1, 0, :, 1] = 1e-9  # below float16's smallest scale: read back as (nearly) zero, not inf or nan
    enc = codec.encode(kv)
    assert enc["scale"].dtype == torch.float16 and torch.isfinite(enc["scale"]).all() and (enc["scale"] > 0).all()
    back = codec.decode(enc)
    assert torch.isfinite(back).all() and back[1, 0, :, 1].abs().max() < 1e-6 and back[0, 0, 0, 0] > 8e6


def test_cold_modes_say_what_a_cold_block_gives_attention():
    gist = [torch.ones(2, HKV, 2, D), torch.zeros(2, HKV, 2, D)]
    cold, kv = ColdBlock(vectors=None, gist=gist), torch.randn(2, HKV, BS, D)
    assert COLD_MODES["rehydrate"].attend(cold, 1, lambda: kv) is kv
    assert COLD_MODES["gist"].attend(cold, 1, lambda: kv) is gist[1]
    assert COLD_MODES["drop"].attend(cold, 1, lambda: kv) is None


def _store(**kw):
    return BlockStore(2, H, HKV, D, block_size=BS, dtype=torch.float32, **kw)


def _fill(store, n):
    for _ in range(n):
        for layer in range(len(store.layers)):
            store.append(layer, torch.randn(2, HKV, BS, D), torch.randn(H, D))


def _resident(store):
    encs = [enc for layer in store.layers for enc in layer.kv if enc is not None]
    return sum(t.numel() * t.element_size() for enc in encs for t in enc.values())


def test_ram_tier_evicts_only_clean_blocks_least_recently_used_first():
    ram, enc = RamTier(budget=lambda: 100), {"kv": torch.zeros(10)}  # 40 bytes each
    ram.hold((0, 0), enc)  # only in RAM
    ram.hold((0, 1), enc, clean=True)  # read back from disk
    ram.hold((0, 2), enc)
    ram.mark_clean((0, 2), enc)  # written to disk
    ram.touch((0, 1))
    assert ram.limit() == 100 and ram.nbytes() == 120
    assert ram.evict(0) == [(0, 2), (0, 1)] and ram.nbytes() == 40  # the block only in RAM stays
    ram.release((0, 0), enc)
    assert ram.nbytes() == 0


def test_a_store_under_a_budget_keeps_in_ram_every_block_not_on_disk(tmp_path):
    per_block = 2 * HKV * BS * D * 4
    store = _store(spill_dir=tmp_path, resident_budget=5 * per_block)
    _fill(store, 20)
    assert store.persisted > 0 and store.ram.nbytes() <= 5 * per_block
    for layer in store.layers:
        assert all(enc is not None for enc in layer.kv[store.persisted :])  # never evicted before written
    assert store.ram.nbytes() == _resident(store)
    assert store.tiers()["disk"] > 0
    blocks = [store.block(1, b) for b in range(20)]  # read back from disk, still under the budget
    assert store.ram.nbytes() <= 5 * per_block and store.ram.nbytes() == _resident(store)
    assert all(torch.equal(a, store.block(1, b)) for b, a in enumerate(blocks))


def test_per_layer_objects_stay_consistent_after_truncate(tmp_path):
    store = _store(cache_device="cpu", max_cached_blocks=6, spill_dir=tmp_path, resident_budget=10**6)
    _fill(store, 12)
    store.flush()
    for layer in range(2):
        store.fetch(layer, [2, 9, 11])
    store.fetch(0, [1, 3])
    assert store.truncate(10) == []  # the shard of blocks 8..11 stays, its tail ignored
    assert len(store) == 10 and store.persisted == 10
    for layer in store.layers:
        assert len(layer.kv) == 10 and layer.reprs.shape == (10, H, D)
        assert all(b < 10 for b in layer.cache.slot_of) and len(layer.cache.free) + len(layer.cache.slot_of) == 6
    assert store.layers[0].last[0] == (1, 3) and store.layers[1].last is None  # (2, 9, 11) lost block 11
    assert store.ram.nbytes() == _resident(store) and all(b < 10 for _, b in store.ram.clean)
    assert len(store.truncate(6)) == 1 and store.persisted == 6 and len(store.disk.shards) == 1
    assert store.ram.nbytes() == _resident(store) and store.tiers() == {"ram": 6, "disk": 0, "cold": 0}


def test_connect_cold_tier_and_its_rehydration_lru():
    store = _store(cache_device="cpu", max_cached_blocks=4)
    _fill(store, 4)
    calls = []

    def rehydrate(b):
        calls.append(b)
        return [torch.full((2, HKV, BS, D), float(b)) for _ in store.layers]

    store.connect_cold_tier("rehydrate", rehydrate, max_rehydrated=1)
    vectors = SimpleNamespace(tensor=torch.zeros(2, 16))
    for b in (0, 1):
        store.archive(b, ColdBlock(vectors))
    assert store.tiers() == {"ram": 2, "disk": 0, "cold": 2} and store.ram.nbytes() == _resident(store)
    k, _ = store.fetch(0, [0, 2])
    assert calls == [0] and torch.equal(k[:, :BS], torch.zeros(HKV, BS, D)) and not store.is_cold(0)
    store.fetch(1, [1, 2])  # rehydrating 1 sends 0 back to vectors only (one rehydrated block at most)
    assert calls == [0, 1] and store.is_cold(0) and not store.is_cold(1)
    assert list(store.cold.rehydrated) == [1] and store.layers[0].last is None  # its selection held block 0
    assert store.ram.nbytes() == _resident(store) and 0 not in store.layers[0].cache.slot_of
    assert store.nbytes()["cold"] == 2 * 2 * 16 * 4
    store.connect_cold_tier("drop", rehydrate, max_rehydrated=1)
    k, _ = store.fetch(0, [0, 2])
    assert k.shape == (HKV, BS, D) and calls == [0, 1]
