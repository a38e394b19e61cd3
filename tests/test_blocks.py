import pytest
import torch

from memory_plugin import tiers
from memory_plugin.attention import block_relevance
from memory_plugin.blocks import CODECS, BlockStore
from memory_plugin.policies import RELEVANCE

H, HKV, D, BS = 4, 2, 8, 4


def _store(n_heads=H, head_dim=D, **kw):
    return BlockStore(2, n_heads, HKV, head_dim, block_size=BS, dtype=torch.float32, **kw)


def _fill(store, n, layer=0):
    blocks = []
    for b in range(n):
        kv = torch.full((2, HKV, BS, D), float(b))
        store.append(layer, kv, torch.randn(H, D))
        blocks.append(kv)
    return blocks


def test_select_returns_all_blocks_when_fewer_than_topk():
    store = _store()
    _fill(store, 3)
    assert store.select(0, torch.randn(H, D), topk=5) == [0, 1, 2]


def test_select_picks_the_most_relevant_blocks_in_ascending_order():
    store = _store()
    _fill(store, 6)
    q = torch.randn(H, D)
    scores = torch.einsum("hd,bhd->b", q, store.layers[0].reprs)
    expected = sorted(scores.topk(2).indices.tolist())
    assert store.select(0, q, topk=2) == expected


def test_fetch_concatenates_block_kv_along_tokens():
    store = _store()
    blocks = _fill(store, 4)
    k, v = store.fetch(0, [1, 3])
    assert k.shape == (HKV, 2 * BS, D)
    torch.testing.assert_close(k[:, :BS], blocks[1][0])
    torch.testing.assert_close(v[:, BS:], blocks[3][1])


def test_reprs_grow_past_initial_capacity_and_truncate_forgets():
    store = _store()
    _fill(store, 40)
    _fill(store, 40, layer=1)
    assert len(store) == 40 and store.layers[0].reprs.shape == (40, H, D)
    store.fetch(0, [38, 39])
    store.truncate(10)
    assert len(store) == 10
    assert store.select(0, torch.randn(H, D), topk=20) == list(range(10))
    assert store.layers[0].last is None  # a memoised selection of dropped blocks is forgotten


def test_device_lru_cache_hits_misses_and_evicts_least_recent_unselected():
    store = _store(cache_device="cpu", max_cached_blocks=3)
    blocks = _fill(store, 6)
    cache = store.layers[0].cache
    k, _ = store.fetch(0, [0, 1])
    assert (cache.hits, cache.misses) == (0, 2)
    store.fetch(0, [1, 2])  # 1 hits, 2 misses; cache now {0, 1, 2} with 0 least recent
    assert (cache.hits, cache.misses) == (1, 3)
    k, _ = store.fetch(0, [2, 3])  # needs a slot: evicts 0 (least recent, not selected)
    assert set(cache.slot_of) == {1, 2, 3}
    torch.testing.assert_close(k[:, BS:], blocks[3][0])
    k, _ = store.fetch(0, [0, 3])  # 0 is re-loaded from host and evicts 1
    assert set(cache.slot_of) == {0, 2, 3}
    torch.testing.assert_close(k[:, :BS], blocks[0][0])
    store.truncate(3)
    assert set(cache.slot_of) == {0, 2}


def test_nbytes_counts_host_blocks_and_reprs():
    store = _store()
    _fill(store, 3)
    nb = store.nbytes()
    assert nb["host"] == 3 * 2 * HKV * BS * D * 4
    assert nb["repr"] == 3 * H * D * 4
    assert nb["device"] == 0 and nb["disk"] == 0


def test_streamed_safetensors_read_back_by_safetensors(tmp_path):
    import hashlib

    from safetensors.torch import load_file

    from memory_plugin.blocks import write_safetensors

    parts = [torch.randn(2, 3, 4) for _ in range(3)]
    tensors = {
        "stacked": parts,
        "bf16": torch.randn(5, 7).to(torch.bfloat16),
        "int8": torch.randint(-127, 127, (4, 6), dtype=torch.int8),
        "sliced": torch.randn(3, 10, 4)[:, 2:7],  # not contiguous
        "empty": torch.zeros(3, 0, 4),
    }
    sha, size = write_safetensors(tmp_path / "x.safetensors", tensors, {"k": "v"})
    data = (tmp_path / "x.safetensors").read_bytes()
    assert size == len(data) and sha == hashlib.sha256(data).hexdigest()
    back = load_file(tmp_path / "x.safetensors")
    assert torch.equal(back["stacked"], torch.stack(parts))
    for name in ("bf16", "int8", "sliced", "empty"):
        assert back[name].dtype == tensors[name].dtype and torch.equal(back[name], tensors[name])


def _reference_topk(store, layer, q, k, relevance):
    scores = block_relevance(q, store.layers[layer].reprs, normalize=relevance == "zscore")
    return sorted(scores.topk(k).indices.tolist())


def _assert_selects_as_block_relevance(store, queries, k=5, layer=0):
    for relevance in ("dot", "zscore"):
        for q in queries:
            assert store.select(layer, q, k, RELEVANCE[relevance]) == _reference_topk(store, layer, q, k, relevance)


@pytest.mark.parametrize("offset", [0.0, 30.0])  # keys far from 0 (a shared component): no cancellation
def test_select_ranks_exactly_as_block_relevance_through_appends_truncates_and_replaced_reprs(offset):
    torch.manual_seed(0)
    store = _store()
    queries = torch.randn(20, H, D)

    def fill(n):
        for _ in range(n):
            store.append(0, torch.zeros(2, HKV, BS, D), torch.randn(H, D) * torch.rand(H, 1) * 3 + offset)

    fill(60)
    _assert_selects_as_block_relevance(store, queries)
    store.truncate(25)  # a rollback: the forgotten keys leave the moments too
    _assert_selects_as_block_relevance(store, queries)
    fill(40)
    store.layers[0].drop(3)  # KV gone, representative key kept: still ranked
    _assert_selects_as_block_relevance(store, queries)
    store.layers[0].set_reprs(torch.randn(65, H, D) - offset)  # replaced wholesale (a load)
    _assert_selects_as_block_relevance(store, queries)
    store.truncate(30)
    fill(5)
    _assert_selects_as_block_relevance(store, queries)


def test_keys_per_kv_head_are_scored_by_each_query_head_of_their_group():
    """With one representative key per KV head, selection ranks as ``block_relevance`` with each
    query head scoring its group's key (z-scored per query head), through a rollback and a load."""
    torch.manual_seed(3)
    store = _store(repr_heads=HKV)
    for _ in range(70):
        store.append(0, torch.zeros(2, HKV, BS, D), torch.randn(HKV, D) * torch.tensor([[6.0], [1.0]]) + 2.0)
    assert store.layers[0].reprs.shape == (70, HKV, D)
    queries = torch.randn(20, H, D) * torch.tensor([1.0, 8.0, 1.0, 0.2])[:, None]  # heads of unequal weight
    _assert_selects_as_block_relevance(store, queries)
    store.truncate(40)
    _assert_selects_as_block_relevance(store, queries)
    store.layers[0].set_reprs(torch.randn(40, HKV, D))  # replaced wholesale (a load)
    _assert_selects_as_block_relevance(store, queries)
    with pytest.raises(ValueError, match="repr_heads \\(3\\) must divide n_heads \\(4\\)"):
        _store(repr_heads=3)


def test_the_zscore_query_is_what_makes_selection_exact():
    """The z-scored ranking differs from the plain dot product's: the re-weighting is not a no-op."""
    torch.manual_seed(1)
    store = _store()
    for _ in range(80):  # head 0's scores vary far more than the others'
        store.append(0, torch.zeros(2, HKV, BS, D), torch.randn(H, D) * torch.tensor([[20.0], [1.0], [1.0], [1.0]]))
    q = torch.randn(H, D)
    assert store.select(0, q, 5, RELEVANCE["zscore"]) != store.select(0, q, 5, RELEVANCE["dot"])
    _assert_selects_as_block_relevance(store, [q])


@pytest.mark.parametrize("kind", ["none", "int8"])
def test_a_store_read_back_from_disk_selects_as_the_one_written(tmp_path, kind):
    torch.manual_seed(2)
    store = _store(spill_dir=tmp_path, kv_quantization=kind)
    for layer in range(2):
        for _ in range(30):
            store.append(layer, torch.randn(2, HKV, BS, D), torch.randn(H, D) + 2)
    store.flush()
    back = _store(spill_dir=tmp_path, kv_quantization=kind)
    back.attach(store.disk.shards, resident=False)
    queries = torch.randn(20, H, D)
    for layer in range(2):
        assert torch.equal(back.layers[layer].reprs, store.layers[layer].reprs)  # stored as rounded (int8)
        _assert_selects_as_block_relevance(back, queries, layer=layer)
        for relevance in RELEVANCE.values():
            assert [back.select(layer, q, 5, relevance) for q in queries] == [store.select(layer, q, 5, relevance) for q in queries]


@pytest.mark.parametrize("kind", ["int8", "none"])
def test_compact_reprs_hold_less_and_select_read_and_write_as_decoded_ones(tmp_path, monkeypatch, kind):
    """Representative keys held encoded as on disk (on the CPU, and under a RAM budget; int8: a
    quarter of the bytes), scanned a chunk at a time: the same keys, the same selection, the same
    shards."""

    monkeypatch.setattr(tiers, "REPR_CHUNK", 7)  # many chunks, the last one short
    torch.manual_seed(3)
    (tmp_path / "c").mkdir()
    (tmp_path / "p").mkdir()
    compact = _store(kv_quantization=kind, compact_reprs=True, spill_dir=tmp_path / "c")
    plain = _store(kv_quantization=kind, spill_dir=tmp_path / "p")
    for layer in range(2):
        for _ in range(40):
            kv, r = torch.randn(2, HKV, BS, D), torch.randn(H, D) * torch.rand(H, 1) * 3 + 1
            compact.append(layer, kv, r)
            plain.append(layer, kv, r)
    compact.truncate(33)  # a rollback inside a chunk, then growth past it again
    plain.truncate(33)
    for layer in range(2):
        for _ in range(4):
            r = torch.randn(H, D)
            compact.append(layer, torch.zeros(2, HKV, BS, D), r)
            plain.append(layer, torch.zeros(2, HKV, BS, D), r)
    # held before any scan (a scan adds its chunk buffer): int8 and a float16 scale per head of
    # D=8 keys, against float32
    if kind == "int8":
        assert compact.repr_nbytes() * 3 < plain.repr_nbytes()
    else:
        assert compact.repr_nbytes() == plain.repr_nbytes()
    queries = torch.randn(20, H, D)
    for layer in range(2):
        assert torch.equal(compact.layers[layer].reprs, plain.layers[layer].reprs)
        for relevance in RELEVANCE.values():
            assert [compact.select(layer, q, 5, relevance) for q in queries] == [plain.select(layer, q, 5, relevance) for q in queries]
        _assert_selects_as_block_relevance(compact, queries, layer=layer)
    compact.flush()
    plain.flush()
    for layer in range(2):  # the shards hold the same keys either way
        a, b = compact.stored_reprs(layer, 0, 37), plain.stored_reprs(layer, 0, 37)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for mode in (True, False):  # and read back either way, they select as the writer did
        back = _store(kv_quantization=kind, compact_reprs=mode, spill_dir=tmp_path / "c")
        back.attach(compact.disk.shards, resident=False)
        for layer in range(2):
            assert torch.equal(back.layers[layer].reprs, plain.layers[layer].reprs)
            assert [back.select(layer, q, 5) for q in queries] == [plain.select(layer, q, 5) for q in queries]


_SCAN_PROBE = """
import resource, sys, torch
from memory_plugin import blocks
from memory_plugin.blocks import BlockStore, return_freed_memory_to_os
blocks.ALLOC_MMAP_THRESHOLD = 64 * 1024  # below the chunk's size: a fresh chunk per step would be its own mapping
if not return_freed_memory_to_os():
    sys.exit(77)
store = BlockStore(1, 9, 3, 64, block_size=128, dtype=torch.float32, kv_quantization="int8", compact_reprs=True)
store.layers[0].set_reprs(torch.randn(4096, 9, 64))  # 16 chunks of 256 blocks, 590 KB decoded each
store.layers[0].kv = [None] * 4096
q = torch.randn(9, 64)
store.select(0, q, 16)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    store.select(0, q, 16)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def test_a_compact_scan_reuses_its_chunk_buffer_under_the_budgets_allocator_setting():
    """When every buffer over 64 KB was its own mapping under a budget, a fresh decoded chunk per
    step page-faulted ~2,300 times per scan of 4,096 blocks, most of a 1M turn (BENCHMARKS.md);
    the chunk is reused, so no threshold below its size costs faults."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _SCAN_PROBE], capture_output=True, text=True)
    if run.returncode == 77:
        pytest.skip("not glibc: the allocator is not tunable with mallopt")
    assert run.returncode == 0, run.stderr
    assert float(run.stdout) < 50  # page faults per scan


_TRIM_PROBE = """
import ctypes.util, sys, torch
from memory_plugin.blocks import release_free_memory
if "glibc" not in " ".join(__import__("platform").libc_ver()) or not ctypes.util.find_library("c"):
    sys.exit(77)
def anon():
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1]) * 1024
kept, freed = [], []
for i in range(4000):  # 64 KB buffers, from the heap, every other one freed: holes a top trim cannot return
    (kept if i % 2 else freed).append(torch.ones(16 * 1024))
del freed
before = anon()
ran = release_free_memory(0)
released = before - anon()
print(ran, release_free_memory(), released)  # the second within the interval: skipped
"""


def test_release_free_memory_returns_the_holes_freed_buffers_leave_in_the_heap():
    """What a load or a turn frees stays resident without it (BENCHMARKS.md section 6: 1.40x the
    accounted bytes after loading 16k tokens, 1.10x after a trim)."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _TRIM_PROBE], capture_output=True, text=True)
    if run.returncode == 77:
        pytest.skip("not glibc: no malloc_trim")
    assert run.returncode == 0, run.stderr
    ran, again, released = run.stdout.split()
    assert (ran, again) == ("True", "False")
    assert int(released) > 100 * 2**20  # of the 125 MiB freed in 64 KB holes


def test_the_memory_releases_freed_memory_after_writes_turns_and_loads(
    tiny_memory, tiny_model, tiny_tokenizer, tmp_path, monkeypatch
):
    from memory_plugin import ContextMemory, engine, persistence, turns

    calls = []
    for mod in (engine, turns, persistence):
        name = mod.__name__.rsplit(".")[-1]
        monkeypatch.setattr(mod, "release_free_memory", lambda *a, name=name: calls.append((name, a)))
    tiny_memory.add_text("hello world " * 40)
    assert calls == [("engine", ())]
    tiny_memory.generate("hi", max_new_tokens=2)  # not remembered: the turn itself releases
    assert calls[-1] == ("turns", ())
    tiny_memory.generate("hi", max_new_tokens=2, remember=True)  # remembered: stored, then settled
    assert calls[-1] == ("engine", ())
    tiny_memory.save(tmp_path / "m")
    calls.clear()
    ContextMemory.load(tmp_path / "m", tiny_model, tokenizer=tiny_tokenizer)
    assert ("persistence", (0,)) in calls  # at once, whatever the interval
    calls.clear()
    with ContextMemory.open(tmp_path / "o", tiny_model, tokenizer=tiny_tokenizer, config=tiny_memory.config):
        assert calls[-1] == ("persistence", (0,))


@pytest.mark.parametrize("kind", CODECS)
@pytest.mark.parametrize("budget", [None, 1])
def test_a_selection_is_decoded_straight_into_one_buffer_with_the_values_of_each_block(kind, budget, tmp_path):
    store = _store(kv_quantization=kind, spill_dir=tmp_path, resident_budget=budget)
    for b in range(6):
        for layer in range(2):
            store.append(layer, torch.randn(2, HKV, BS, D) * (b + 1), torch.randn(H, D))
    if budget is not None:  # old blocks are on disk only, read back by the fetch
        assert store.layers[0].kv[0] is None and store.layers[0].kv[2] is None
    ids = [0, 2, 5]
    k, v = store.fetch(0, ids)
    each = torch.cat([store.block(0, b) for b in ids], dim=2)  # decoded one by one
    assert torch.equal(k, each[0]) and torch.equal(v, each[1])


needs_int8_kernel = pytest.mark.skipif(not tiers._int8_kernel(64), reason="this torch has no CPU int8 x bf16 product")


@needs_int8_kernel
def test_the_bf16_scores_of_int8_keys_stay_within_their_bound():
    """The kernel's scores differ from the float32 ones by less than the margin that makes
    selection exact (Int8ReprTable.approximate): keys and queries of very different sizes per head."""
    torch.manual_seed(4)
    table = _store(n_heads=9, head_dim=64, kv_quantization="int8", compact_reprs=True).layers[0].table
    table.append(table.encode(torch.randn(3000, 9, 64) * torch.logspace(-2, 2, 9)[:, None] + torch.randn(9, 64)))
    assert table.fast
    worst = 0.0
    for q in torch.randn(40, 9 * 64) * torch.logspace(-1, 3, 40)[:, None]:
        approx, margin = table.approximate(q)
        exact = table.scores(q)
        assert ((approx - exact).abs() <= margin).all()
        worst = max(worst, ((approx - exact).abs() / margin).max().item())
    assert worst > 1e-4  # the kernel really rounds (this is not the float32 product)


@needs_int8_kernel
@pytest.mark.parametrize("repr_heads", [9, 3])  # a key per query head, or per KV head of a group of 3
def test_int8_keys_scanned_by_the_kernel_select_as_the_float32_table(monkeypatch, repr_heads):
    """Selection on the bf16 kernel's scores plus an exact rescoring of the candidates picks the
    blocks the float32 table picks, also among near-duplicates bf16 cannot tell apart, after
    appends across the table's doubling, a rollback and growth again."""
    monkeypatch.setattr(tiers, "FAST_SCAN_MIN_BLOCKS", 64)
    monkeypatch.setattr(tiers, "REPR_CHUNK", 7)  # candidates rescored in many chunks
    torch.manual_seed(5)
    fast = _store(n_heads=9, head_dim=64, kv_quantization="int8", compact_reprs=True, repr_heads=repr_heads)
    plain = _store(n_heads=9, head_dim=64, kv_quantization="int8", repr_heads=repr_heads)
    base = torch.randn(40, repr_heads, 64) * torch.rand(1, repr_heads, 1) * 4
    kv = torch.zeros(2, HKV, BS, 64)

    def grow(count):
        for i in range(count):
            r = base[i % 40] + 1e-3 * torch.randn(repr_heads, 64)  # copies 1e-3 apart: ties in bf16
            fast.append(0, kv, r)
            plain.append(0, kv, r)

    grow(300)
    fast.truncate(250)
    plain.truncate(250)
    grow(100)
    assert fast.layers[0].table.fast and len(fast.layers[0].table) == 350
    assert fast.repr_nbytes() * 3 < plain.repr_nbytes()
    queries = torch.randn(30, 9, 64)
    for relevance in RELEVANCE.values():
        want = [plain.select(0, q, 16, relevance) for q in queries]
        assert [fast.select(0, q, 16, relevance) for q in queries] == want
        assert [fast.select(0, q, 1, relevance) for q in queries] == [plain.select(0, q, 1, relevance) for q in queries]
