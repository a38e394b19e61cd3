"""The InfLLM memory on tiny random Llama models: equivalence with transformers, block formation,
representative keys, top-k choice, chunking invariance, and against a naive per-query reference."""

import pytest
import torch

from memory_plugin import MemoryConfig
from memory_plugin.attention import apply_rope, block_relevance, representative_keys
from memory_plugin.model import MemoryForward

from .conftest import make_tiny_llama

VOCAB = 300


@pytest.fixture(scope="module")
def gqa_model():
    return make_tiny_llama(VOCAB, seed=1)


def _ids(n, seed=0):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def _encode(model, cfg, ids, pieces=None, logits="all"):
    fwd = MemoryForward(model)
    ctx = fwd.new_context(cfg)
    outs = []
    with torch.inference_mode():
        for piece in pieces or [ids]:
            outs.append(fwd(piece, ctx, logits=logits))
    return ctx, (torch.cat(outs) if logits == "all" else outs[-1])


@pytest.mark.parametrize(
    "cfg",
    [
        MemoryConfig(block_size=8, n_init=16, n_local=184, topk=2, repr_topk=2, chunk_size=32, max_cached_blocks=4),
        MemoryConfig(block_size=8, n_init=0, n_local=200, topk=2, repr_topk=2, chunk_size=7, max_cached_blocks=4),
        MemoryConfig(block_size=8, n_init=50, n_local=150, topk=2, repr_topk=2, chunk_size=150, max_cached_blocks=4),
    ],
    ids=["chunk32", "no-init-chunk7", "chunk150"],
)
@pytest.mark.parametrize("arch", ["llama", "qwen2-bias"])
def test_equals_full_attention_while_history_fits_init_plus_window(cfg, arch):
    if arch == "llama":
        model = make_tiny_llama(VOCAB, seed=2)
    else:  # Qwen2: q/k/v projections with bias
        from transformers import Qwen2Config, Qwen2ForCausalLM

        torch.manual_seed(3)
        qcfg = Qwen2Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        )  # fmt: skip
        model = Qwen2ForCausalLM(qcfg).eval()
    ids = _ids(cfg.n_init + cfg.n_local)  # exactly fills init + window
    with torch.inference_mode():
        ref = model(ids[None]).logits[0]
    ctx, out = _encode(model, cfg, ids)
    assert len(ctx.store) == 0
    # Tolerance: float32 rounding of a different summation order (flash kernel, split softmax).
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_diverges_from_full_attention_once_history_leaves_the_window(gqa_model):
    cfg = MemoryConfig(block_size=8, n_init=8, n_local=64, topk=1, repr_topk=2, chunk_size=32, max_cached_blocks=4)
    ids = _ids(300)
    with torch.inference_mode():
        ref = gqa_model(ids[None]).logits[0]
    _, out = _encode(gqa_model, cfg, ids)
    torch.testing.assert_close(out[:72], ref[:72], atol=2e-5, rtol=1e-4)
    assert (out[200:] - ref[200:]).abs().max() > 1e-3  # only part of the history is attended now


@pytest.mark.parametrize("n", [8, 72, 73, 80, 81, 200, 333])
def test_blocks_are_cut_at_block_boundaries_once_out_of_every_window(gqa_model, n):
    cfg = MemoryConfig(block_size=8, n_init=8, n_local=64, topk=2, repr_topk=2, chunk_size=16, max_cached_blocks=4)
    ctx, _ = _encode(gqa_model, cfg, _ids(n), logits="none")
    expected_blocks = max(0, n - cfg.n_init - cfg.n_local) // cfg.block_size
    assert len(ctx.store) == expected_blocks
    assert ctx.layout.init_len == min(n, cfg.n_init)
    start, end = ctx.window_range
    assert start == cfg.n_init + expected_blocks * cfg.block_size and end == n
    assert cfg.n_local <= end - start < cfg.n_local + cfg.block_size or n <= cfg.n_init + cfg.n_local
    assert all(len(layer) == expected_blocks for layer in ctx.store.layers)
    if expected_blocks:
        assert ctx.block_span(expected_blocks - 1) == (start - cfg.block_size, start)


def _reference(model, cfg, ids):
    """Naive InfLLM with every block attended: for each query t and key p <= t,
    p < n_init: init (query at min(t, n_init+n_local-1), key at p); t - n_local < p: local window,
    exact; otherwise the fixed distance n_local. Returns logits and, per layer, the attention mass
    window tokens received from queries at positions divisible by mass_stride, and unrotated keys."""
    base, g = model.model, MemoryForward(model).geometry
    n = len(ids)
    cos, sin = MemoryForward(model).rope_tables(n + cfg.n_local + cfg.n_init)
    t = torch.arange(n)
    p_init = t.clamp(max=cfg.n_init + cfg.n_local - 1)
    dist = t[:, None] - t[None, :]
    causal = dist >= 0
    is_init = (t < cfg.n_init)[None, :].expand(n, n)
    is_local = ~is_init & (dist < cfg.n_local) & causal
    is_far = ~is_init & (dist >= cfg.n_local)
    rep = g.n_heads // g.n_kv_heads
    h = base.embed_tokens(ids)
    masses, keys = [], []
    for layer in base.layers:
        x = layer.input_layernorm(h)
        a = layer.self_attn
        q = a.q_proj(x).view(n, g.n_heads, -1).transpose(0, 1)
        k = a.k_proj(x).view(n, g.n_kv_heads, -1).transpose(0, 1)
        v = a.v_proj(x).view(n, g.n_kv_heads, -1).transpose(0, 1)
        keys.append(k)
        kx, vx = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        k_rot = apply_rope(kx, cos[:n], sin[:n])
        lg_local = apply_rope(q, cos[:n], sin[:n]) @ k_rot.transpose(-1, -2)
        lg_init = apply_rope(q, cos[p_init], sin[p_init]) @ k_rot.transpose(-1, -2)
        if cfg.block_positions == "fixed":  # every far key at distance n_local
            lg_far = apply_rope(q, cos[cfg.n_local], sin[cfg.n_local]) @ kx.transpose(-1, -2)
        else:  # far keys keep their order inside their block
            off = (t - cfg.n_init).clamp(min=0) % cfg.block_size
            far = cfg.n_local + cfg.block_size - 1
            lg_far = apply_rope(q, cos[far], sin[far]) @ apply_rope(kx, cos[off], sin[off]).transpose(-1, -2)
        lg = torch.where(is_init, lg_init, torch.where(is_local, lg_local, lg_far)) * g.scaling
        probs = torch.softmax(lg.masked_fill(~causal, float("-inf")), dim=-1)
        rows = (t % cfg.mass_stride == 0)[None, :, None]
        masses.append((probs * is_local * rows).sum(dim=1))
        out = (probs @ vx).transpose(0, 1).reshape(n, -1)
        h = h + a.o_proj(out)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(base.norm(h)), masses, keys


@pytest.mark.parametrize("mass_stride, positions, repr_heads", [(1, "fixed", "query"), (3, "fixed", "query"), (3, "ordered", "query"), (3, "fixed", "kv")])
def test_matches_naive_reference_including_representative_keys(gqa_model, mass_stride, positions, repr_heads):
    cfg = MemoryConfig(
        block_size=8, n_init=6, n_local=40, topk=64, repr_topk=3, chunk_size=16, mass_stride=mass_stride,
        max_cached_blocks=64, block_positions=positions, kv_quantization="none", repr_heads=repr_heads,  # exact maths
    )  # fmt: skip
    ids = _ids(260, seed=4)
    ctx, out = _encode(gqa_model, cfg, ids)
    with torch.inference_mode():
        ref, masses, keys = _reference(gqa_model, cfg, ids)
    torch.testing.assert_close(out, ref, atol=5e-5, rtol=1e-4)
    assert len(ctx.store) > 20
    for layer in range(len(masses)):
        for b in range(len(ctx.store)):
            a, e = ctx.block_span(b)
            mass = masses[layer][:, a:e]
            if repr_heads == "kv":  # one key per KV head, by its group's summed mass
                mass = mass.reshape(len(keys[layer]), -1, e - a).sum(dim=1)
            expected = representative_keys(keys[layer][:, a:e], mass, cfg.repr_topk)
            torch.testing.assert_close(ctx.store.layers[layer].reprs[b], expected, atol=1e-5, rtol=1e-4)
            k_block, _ = ctx.store.fetch(layer, [b])
            k_ref = keys[layer][:, a:e]
            if positions == "ordered":
                cos, sin = MemoryForward(gqa_model).rope_tables(cfg.block_size)
                k_ref = apply_rope(k_ref, cos, sin)
            torch.testing.assert_close(k_block, k_ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("pieces", [[300], [1] * 40 + [260], [37, 5, 100, 3, 155], [16] * 18 + [12], [203] + [1] * 61 + [36]])
def test_chunked_and_one_shot_ingestion_give_the_same_memory(gqa_model, pieces):
    # Exact blocks: int8 would let later chunks read rounded KV that one shot reads from the window.
    cfg = MemoryConfig(block_size=8, n_init=8, n_local=64, topk=64, repr_topk=2, chunk_size=32, max_cached_blocks=64,
                       kv_quantization="none")
    ids = _ids(300, seed=5)
    one, out_one = _encode(gqa_model, cfg, ids)
    split = list(torch.split(ids, pieces))
    many, out_many = _encode(gqa_model, cfg, ids, pieces=split)
    torch.testing.assert_close(out_many, out_one, atol=2e-5, rtol=1e-4)
    assert many.tokens == one.tokens == ids.tolist()
    assert len(many.store) == len(one.store) > 0
    assert many.window_range == one.window_range
    for a, b in zip(many.store.layers, one.store.layers):
        torch.testing.assert_close(a.reprs, b.reprs, atol=1e-5, rtol=1e-4)
        for blk in range(len(a)):
            torch.testing.assert_close(a.kv[blk]["kv"], b.kv[blk]["kv"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("relevance, repr_heads", [("dot", "query"), ("zscore", "query"), ("zscore", "kv")])
def test_topk_selects_blocks_by_mean_query_at_fixed_distance(gqa_model, relevance, repr_heads):
    cfg = MemoryConfig(
        block_size=8, n_init=8, n_local=64, topk=3, repr_topk=2, chunk_size=32, max_cached_blocks=4, relevance=relevance,
        repr_heads=repr_heads,
    )  # fmt: skip
    fwd = MemoryForward(gqa_model)
    ctx = fwd.new_context(cfg)
    ids = _ids(400, seed=6)
    with torch.inference_mode():
        fwd(ids, ctx, logits="none")
        n_blocks = len(ctx.store)
        capture = []
        query = _ids(10, seed=7)
        fwd(query, ctx, logits="none", capture=capture)
    assert n_blocks > cfg.topk and len(capture) == len(ctx.layers)
    for layer, q in enumerate(capture):  # the chunk's queries [H, c, D], rotated at the far distance
        scores = block_relevance(q.mean(dim=1), ctx.store.layers[layer].reprs[:n_blocks], relevance == "zscore")
        chosen = ctx.store.layers[layer].last[0]  # the blocks that layer attended for the query chunk
        assert list(chosen) == sorted(scores.topk(cfg.topk).indices.tolist())


def test_streaming_mode_keeps_no_blocks(gqa_model):
    cfg = MemoryConfig(block_size=8, n_init=4, n_local=64, topk=0, repr_topk=2, chunk_size=32)
    ctx, _ = _encode(gqa_model, cfg, _ids(300), logits="none")
    assert len(ctx.store) == 0 and ctx.layout.n_evicted_blocks > 0
    assert ctx.store.nbytes()["host"] == 0


def test_checkpoint_rollback_restores_every_tensor(gqa_model):
    cfg = MemoryConfig(block_size=8, n_init=8, n_local=64, topk=2, repr_topk=2, chunk_size=32, max_cached_blocks=4)
    fwd = MemoryForward(gqa_model)
    ctx = fwd.new_context(cfg)
    with torch.inference_mode():
        fwd(_ids(150), ctx, logits="none")
        cp = ctx.checkpoint()
        before = _state(ctx)
        after_cp = fwd(_ids(10, seed=9), ctx)  # logits of a probe continuation
        for seed in (8, 10):  # the same checkpoint twice: a rollback must not consume it
            fwd(_ids(200, seed=seed), ctx, logits="none")  # forms blocks, compacts the window
            ctx.rollback(cp)
            assert _state(ctx) == before
        again = fwd(_ids(10, seed=9), ctx)
    torch.testing.assert_close(again, after_cp)


def _state(ctx):
    """Everything that defines the memory, as comparable Python values."""
    s, e = ctx.layout.win_start, ctx.layout.win_end
    il = ctx.layout.init_len
    layers = []
    for st in ctx.layers:
        for t in (st.win_k[:, s:e], st.win_krot[:, s:e], st.win_v[:, s:e], st.win_mass[:, s:e]):
            layers.append(t.flatten().tolist())
        for t in (st.init_k[:, :il], st.init_v[:, :il], st.init_mass[:, :il], st.q_sum):
            layers.append(t.flatten().tolist())
    blocks = [
        (layer.reprs.flatten().tolist(), [ctx.store.block(i, b).flatten().tolist() for b in range(len(layer))])
        for i, layer in enumerate(ctx.store.layers)
    ]
    return (vars(ctx.layout).copy(), list(ctx.tokens), layers, blocks)


def test_far_distance_moves_only_what_is_outside_the_local_window(gqa_model):
    cfg = MemoryConfig(block_size=8, n_init=4, n_local=64, topk=2, repr_topk=2, chunk_size=32)
    fits = _ids(cfg.n_init + cfg.n_local)
    base = _encode(gqa_model, cfg, fits)[1]
    near = _encode(gqa_model, cfg.replace(far_distance=16), fits)[1]
    torch.testing.assert_close(near, base)  # nothing is outside the window yet: same as full attention
    long = _ids(300, seed=3)
    explicit = _encode(gqa_model, cfg.replace(far_distance=cfg.n_local), long)[1]
    torch.testing.assert_close(explicit, _encode(gqa_model, cfg, long)[1])  # None means n_local (InfLLM)
    moved = _encode(gqa_model, cfg.replace(far_distance=16), long)[1]
    early = cfg.n_init + cfg.n_local
    torch.testing.assert_close(moved[:early], explicit[:early])
    assert not torch.allclose(moved[early:], explicit[early:])
