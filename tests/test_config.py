import pytest

from memory_plugin import MemoryConfig


def test_defaults_are_valid_and_span_adds_up():
    cfg = MemoryConfig()
    assert cfg.span == cfg.n_init + cfg.topk * cfg.block_size + cfg.n_local
    assert cfg.window_capacity == cfg.n_local + cfg.block_size - 1 + cfg.chunk_size


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("block_size", 0, "block_size must be >= 1"),
        ("n_local", -5, "n_local must be >= 1"),
        ("n_init", -1, "n_init must be >= 0"),
        ("topk", -1, "topk must be >= 0"),
        ("repr_topk", 0, "repr_topk must be >= 1"),
        ("chunk_size", 0, "chunk_size must be >= 1"),
        ("mass_stride", 0, "mass_stride must be >= 1"),
    ],
)
def test_non_positive_sizes_are_rejected(field, value, match):
    with pytest.raises(ValueError, match=match):
        MemoryConfig(**{field: value})


def test_chunk_larger_than_window_is_rejected():
    with pytest.raises(ValueError, match=r"chunk_size \(600\) must be <= n_local \(512\)"):
        MemoryConfig(n_local=512, chunk_size=600)


def test_more_representatives_than_block_tokens_is_rejected():
    with pytest.raises(ValueError, match="repr_topk"):
        MemoryConfig(block_size=4, repr_topk=8)


def test_accelerator_cache_must_hold_one_selection():
    with pytest.raises(ValueError, match="max_cached_blocks"):
        MemoryConfig(topk=16, max_cached_blocks=8)


@pytest.mark.parametrize("value", [1.5, "128", True, None])
def test_non_int_values_are_rejected(value):
    with pytest.raises(TypeError, match="block_size must be an int"):
        MemoryConfig(block_size=value)


def test_topk_zero_is_streaming_llm_and_replace_revalidates():
    cfg = MemoryConfig(topk=0)
    assert cfg.span == cfg.n_init + cfg.n_local
    with pytest.raises(ValueError):
        cfg.replace(n_local=0)


def test_far_distance_is_validated():
    assert MemoryConfig(far_distance=512).far_distance == 512
    with pytest.raises(ValueError, match="far_distance must be >= 1"):
        MemoryConfig(far_distance=0)
    with pytest.raises(ValueError, match=r"far_distance \(4096\) must be <= n_local \(2048\)"):
        MemoryConfig(far_distance=4096)


def test_repr_heads_is_validated():
    assert MemoryConfig().repr_heads == "kv" and MemoryConfig(repr_heads="query").repr_heads == "query"
    with pytest.raises(ValueError, match="repr_heads must be 'kv' or 'query', got 'group'"):
        MemoryConfig(repr_heads="group")


def test_relevance_is_validated():
    assert MemoryConfig().relevance == "zscore" and MemoryConfig(relevance="dot").relevance == "dot"
    with pytest.raises(ValueError, match="relevance must be 'dot' or 'zscore', got 'cosine'"):
        MemoryConfig(relevance="cosine")
