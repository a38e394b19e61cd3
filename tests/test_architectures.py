"""Every supported family (memory_plugin.architectures) on a tiny random config built with
transformers' own config class: logits and greedy continuation equal to transformers' forward while
the history fits init + window (RoPE scaling included, at positions past the original context), the
memory path beyond the window, a save/load round trip, and loading from a GGUF file written here
(with the ``gguf`` package) for the families whose GGUF transformers reads."""

from __future__ import annotations

import pytest
import torch

from memory_plugin import ContextMemory, MemoryConfig, UnsupportedModelError, testing
from memory_plugin.architectures import ARCHITECTURES, FULL, describe
from memory_plugin.model import MemoryForward

SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
#: Histories up to n_init + n_local = 200 tokens equal full attention.
EXACT = MemoryConfig(block_size=8, n_init=16, n_local=184, topk=2, repr_topk=2, chunk_size=32, max_cached_blocks=4)
ORIGINAL_CONTEXT = 32  # the RoPE-scaled families' "original" context: the tests run past it


def _build(config_cls, model_cls, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = config_cls(vocab_size=len(_tok()), max_position_embeddings=4096, **{**SMALL, "num_hidden_layers": 2, **kw})
    cfg._attn_implementation = "eager"
    return model_cls(cfg).eval().requires_grad_(False)


def qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return _build(Qwen3Config, Qwen3ForCausalLM)


def llama3():
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=ORIGINAL_CONTEXT,
    )  # fmt: skip
    return _build(LlamaConfig, LlamaForCausalLM, rope_parameters=rope)


def mistral():
    """Mistral v0.2 and later (no sliding window; v0.1's is test_a_model_whose_every_layer_slides...)."""
    from transformers import MistralConfig, MistralForCausalLM

    return _build(MistralConfig, MistralForCausalLM, sliding_window=None)


def granite():
    from transformers import GraniteConfig, GraniteForCausalLM

    return _build(
        GraniteConfig, GraniteForCausalLM, embedding_multiplier=12.0, residual_multiplier=0.22,
        attention_multiplier=0.015625, logits_scaling=8.0,
    )  # fmt: skip


def olmo2():
    from transformers import Olmo2Config, Olmo2ForCausalLM

    return _build(Olmo2Config, Olmo2ForCausalLM)


def phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    half = SMALL["head_dim"] // 2
    rope = dict(
        rope_type="longrope", rope_theta=10000.0, short_factor=[1.0 + 0.1 * i for i in range(half)],
        long_factor=[1.0 + 2.0 * i for i in range(half)], original_max_position_embeddings=ORIGINAL_CONTEXT,
    )  # fmt: skip
    return _build(Phi3Config, Phi3ForCausalLM, rope_parameters=rope, pad_token_id=0)


def qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return _build(
        Qwen3MoeConfig, Qwen3MoeForCausalLM, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        decoder_sparse_step=1, mlp_only_layers=[1],
    )  # fmt: skip


def smollm3():
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    return _build(SmolLM3Config, SmolLM3ForCausalLM, num_hidden_layers=3, no_rope_layers=[1, 0, 1], pad_token_id=0, bos_token_id=1, eos_token_id=2)


def gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return _build(
        Gemma2Config, Gemma2ForCausalLM, num_hidden_layers=4, sliding_window=24, query_pre_attn_scalar=24,
        attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    )  # fmt: skip


def gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return _build(
        Gemma3TextConfig, Gemma3ForCausalLM, num_hidden_layers=4, sliding_window=24, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
    )  # fmt: skip


FAMILIES = {
    "qwen3": qwen3, "llama3": llama3, "mistral": mistral, "granite": granite, "olmo2": olmo2, "phi3": phi3, "qwen3_moe": qwen3_moe,
    "smollm3": smollm3, "gemma2": gemma2, "gemma3": gemma3,
}  # fmt: skip

_TOK = []


def _tok():
    if not _TOK:
        _TOK.append(testing.tiny_tokenizer())
    return _TOK[0]


_MODELS: dict = {}


@pytest.fixture(params=list(FAMILIES))
def model(request):
    if request.param not in _MODELS:
        _MODELS[request.param] = FAMILIES[request.param]()
    return _MODELS[request.param]


def _ids(n, vocab, seed=0):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def _hf_logits(model, ids):
    with torch.inference_mode():
        return model(ids[None]).logits[0]


@pytest.fixture(autouse=True)
def _gguf_cache(tmp_path, monkeypatch):
    """GGUFs written here are converted into the test's own directory, not the user's cache."""
    monkeypatch.setenv("MEMORY_PLUGIN_CACHE", str(tmp_path / "cache"))


def test_every_family_is_described():
    assert set(ARCHITECTURES) >= {"qwen3", "llama", "granite", "olmo2", "phi3", "qwen3_moe", "smollm3", "gemma2", "gemma3_text"}


def test_logits_and_greedy_continuation_equal_transformers_while_the_history_fits(model):
    vocab = model.config.vocab_size
    prompt = _ids(EXACT.n_init + EXACT.n_local - 8, vocab)
    ref = _hf_logits(model, prompt)
    fwd = MemoryForward(model)
    ctx = fwd.new_context(EXACT)
    with torch.inference_mode():
        out = fwd(prompt, ctx, logits="all")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    # Greedy continuation, one token per step through the memory, against a full recompute.
    ours, theirs = [], prompt
    with torch.inference_mode():
        logits = out[-1]
        for _ in range(8):
            ours.append(int(logits.argmax()))
            expected = _hf_logits(model, theirs)[-1]
            torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-4)
            theirs = torch.cat([theirs, expected.argmax()[None]])
            logits = fwd(torch.tensor(ours[-1:]), ctx)
    assert ours == theirs[len(prompt) :].tolist()
    assert len(ctx.store) == 0 and ctx.layout.n_tokens == EXACT.n_init + EXACT.n_local


@pytest.mark.parametrize("family", ["llama3", "phi3"])
def test_rope_scaling_is_the_models_own_past_its_original_context(family):
    """The equality above holds at 200 positions, past the original 32; without the scaling the
    same weights give other logits, so the memory really used the scaled tables."""
    model = FAMILIES[family]()
    cfg = model.config.to_dict()
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    plain = type(model)(type(model.config).from_dict(cfg)).eval()
    plain.load_state_dict(model.state_dict())
    ids = _ids(EXACT.n_init + EXACT.n_local, model.config.vocab_size, seed=1)
    assert len(ids) > ORIGINAL_CONTEXT
    fwd = MemoryForward(model)
    with torch.inference_mode():
        out = fwd(ids, fwd.new_context(EXACT), logits="all")
    torch.testing.assert_close(out, _hf_logits(model, ids), atol=2e-5, rtol=1e-4)
    assert (out - _hf_logits(plain, ids)).abs().max() > 1e-3


def test_memory_beyond_the_window_runs(model):
    cfg = testing.TINY_CONFIG.replace(kv_quantization="none")  # exact blocks: decoding must equal the one-shot pass
    ids = _ids(6 * cfg.n_local, model.config.vocab_size, seed=2)
    fwd = MemoryForward(model)
    ctx = fwd.new_context(cfg)
    with torch.inference_mode():
        out = fwd(ids, ctx, logits="all")
        step = fwd(ids[:1], ctx)
    assert torch.isfinite(out).all() and torch.isfinite(step).all()
    plan = describe(model)
    assert len(ctx.store) > cfg.topk and len(ctx.layers) == len(plan.memory_layers)
    # With every block attended, chunking does not change the memory: the last tokens one at a
    # time give the logits of one pass (retrieval is per chunk, so with topk 2 they may differ).
    every = cfg.replace(topk=64, max_cached_blocks=64)
    whole, ctx2 = fwd.new_context(every), fwd.new_context(every)
    with torch.inference_mode():
        out = fwd(ids, whole, logits="all")
        fwd(ids[:-4], ctx2, logits="none")
        tail = torch.stack([fwd(ids[i : i + 1], ctx2) for i in range(len(ids) - 4, len(ids))])
    torch.testing.assert_close(tail, out[-4:], atol=5e-5, rtol=1e-4)


def test_save_and_load_give_the_same_next_token_logits(model, tmp_path):
    tok = _tok()
    mem = ContextMemory(model, tok, testing.TINY_CONFIG)
    mem.add_text("The pass key is 12345. Remember it. The grass is green. " * 12)
    mem.save(tmp_path / "m")
    loaded = ContextMemory.load(tmp_path / "m", model, tokenizer=tok)
    assert len(loaded._engine.ctx.store) > 0
    q = torch.tensor(tok.encode("What is the pass key?"))
    with torch.inference_mode():
        a = mem._engine.forward(q, mem._engine.ctx)
        b = loaded._engine.forward(q, loaded._engine.ctx)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    loaded.close()


def test_partial_rotary_is_refused_with_what_is_missing():
    from transformers import Phi3Config, Phi3ForCausalLM

    model = _build(Phi3Config, Phi3ForCausalLM, partial_rotary_factor=0.5, pad_token_id=0)
    with pytest.raises(UnsupportedModelError, match=r"'phi3': RoPE over 8 of 16 head dimensions \(partial rotary\)"):
        MemoryForward(model)


def test_an_unsupported_architecture_is_named_with_what_is_missing():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(UnsupportedModelError, match=r"architecture 'gpt2' is not supported: no description .*supported: llama"):
        MemoryForward(model)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_sliding_layers_keep_their_window_and_only_full_layers_hold_memory(family):
    """Hybrids: the equality test above runs 200 tokens through 24-token sliding windows (their
    keys beyond it are masked as transformers masks them); past the memory's window the sliding
    layers still hold only their last window - 1 keys, and blocks are cut in the full layers only."""
    model = FAMILIES[family]()
    fwd = MemoryForward(model)
    assert fwd.geometry.memory_layers == [i for i, t in enumerate(model.config.layer_types) if t == "full_attention"]
    ctx = fwd.new_context(testing.TINY_CONFIG)
    with torch.inference_mode():
        fwd(_ids(5 * testing.TINY_CONFIG.n_local, model.config.vocab_size), ctx, logits="none")
    window = model.config.sliding_window
    assert set(ctx.windows) == {i for i, t in enumerate(model.config.layer_types) if t == "sliding_attention"}
    assert all(w.k.shape[1] == window - 1 for w in ctx.windows.values())
    assert len(ctx.store.layers) == len(fwd.geometry.memory_layers) and len(ctx.store) > 0


def test_a_model_whose_every_layer_slides_gets_memory_in_every_layer():
    """Mistral 7B v0.1's setting (InfLLM's own): the memory's local window replaces the sliding one."""
    from transformers import MistralConfig, MistralForCausalLM

    model = _build(MistralConfig, MistralForCausalLM, sliding_window=24)
    assert describe(model).memory_layers == [0, 1]


# ----------------------------------------------------------------------------- GGUF
#: transformers' config.model_type -> the GGUF architecture name (llama.cpp's).
GGUF_ARCH = {
    "llama": "llama", "qwen3": "qwen3", "qwen3_moe": "qwen3moe", "phi3": "phi3", "gemma2": "gemma2", "gemma3_text": "gemma3",
}  # fmt: skip


def _write_gguf(model, tok, path) -> None:
    """A float32 GGUF of ``model`` and ``tok`` as llama.cpp's converter lays it out (names from
    transformers' own GGUF name map; Llama's q/k rows permuted, Gemma's norms stored as 1 + w, MoE
    experts' fused gate/up split in two)."""
    import json

    import gguf
    import numpy as np
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    cfg = model.config
    arch = GGUF_ARCH[cfg.model_type]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters.get(FULL, cfg.rope_parameters)["rope_theta"])
    if getattr(cfg, "sliding_window", None):
        w.add_sliding_window(cfg.sliding_window)
    if getattr(cfg, "num_experts", None):
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
    spec = json.loads(tok.backend_tokenizer.to_str())["model"]
    vocab = [t for t, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1])]
    special = set(tok.all_special_tokens)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["merges"]])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    state = model.state_dict()
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)()
    for name, hf_name in get_gguf_hf_weights_map(model, processor).items():
        t = state[hf_name].float().numpy()
        if name.endswith(("_exps")):  # experts [E, out, in]; gate and up share one fused tensor
            half = t.shape[1] // 2
            t = {"gate": t[:, :half], "up": t[:, half:]}.get(name.rsplit("_", 2)[-2], t)
            name += ".weight"
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):  # llama.cpp's rotary row order
            n = cfg.num_attention_heads if ".attn_q." in name else cfg.num_key_value_heads
            t = t.reshape(n, 2, t.shape[0] // n // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
        if arch.startswith("gemma") and "norm.weight" in name:
            t = t + 1
        w.add_tensor(name, np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _qwen3_gguf():
    """Qwen3's GGUF carries no head_dim: transformers takes Qwen3's 128 (the real models' too)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return _build(Qwen3Config, Qwen3ForCausalLM, head_dim=128)


def _qwen3_moe_gguf():
    """Nor the experts' width (transformers reads none and takes Qwen3-MoE's 768)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return _build(
        Qwen3MoeConfig, Qwen3MoeForCausalLM, head_dim=128, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=768, decoder_sparse_step=1, norm_topk_prob=True,  # as llama.cpp (and its GGUFs) route
    )  # fmt: skip


WRITTEN_EXACTLY = {"qwen3": _qwen3_gguf, "qwen3_moe": _qwen3_moe_gguf}  # everything the model needs is in its GGUF


@pytest.mark.parametrize("family", ["llama3", "qwen3", "qwen3_moe", "phi3", "gemma2", "gemma3"])
def test_loads_from_gguf_and_equals_transformers_on_it(family, tmp_path):
    """What a GGUF does not carry, transformers fills with defaults (Llama 3's and Phi-3's RoPE
    scaling, Gemma's soft-caps and query scalar): the memory equals transformers on the model as
    loaded, and for Qwen3 and Qwen3-MoE (everything carried) the model as written."""
    from memory_plugin import load_model

    original = WRITTEN_EXACTLY[family]() if family in WRITTEN_EXACTLY else FAMILIES[family]()
    _write_gguf(original, _tok(), tmp_path / f"{family}.gguf")
    model, tok = load_model(tmp_path / f"{family}.gguf")
    assert model.config.model_type == original.config.model_type
    assert tok.encode("The pass key is 12345.") == _tok().encode("The pass key is 12345.")
    torch.testing.assert_close(model.model.embed_tokens.weight, original.model.embed_tokens.weight)
    ids = _ids(getattr(model.config, "sliding_window", None) or 24, model.config.vocab_size, seed=3)  # within every window
    fwd = MemoryForward(model)
    with torch.inference_mode():
        out = fwd(ids, fwd.new_context(EXACT), logits="all")
    torch.testing.assert_close(out, _hf_logits(model, ids), atol=2e-5, rtol=1e-4)
    if family in WRITTEN_EXACTLY:
        torch.testing.assert_close(out, _hf_logits(original, ids), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["gemma2", "smollm3"])
def test_the_memory_api_runs_on_hybrids_and_layers_without_rope(family):
    """Generation with explain, retrieval and the cold tier's rebuilt KV work per memory layer
    (sliding layers hold none; a layer without RoPE stores its keys unrotated)."""
    cfg = MemoryConfig(
        block_size=2, n_init=4, n_local=16, topk=2, repr_topk=1, chunk_size=8, max_cached_blocks=4,
        archive_vectors=2, archive_max_steps=300, archive_mode="rehydrate",
    )  # fmt: skip
    model = FAMILIES[family]()
    mem = ContextMemory(model, _tok(), cfg)
    mem.add_message("user", "The grass is green. The sky is blue. " * 3)
    answer = mem.generate("sky?", max_new_tokens=4, min_new_tokens=4, explain=True)
    assert answer.attended and mem.retrieve("the sky", k=2)
    assert mem.archive(older_than_tokens=0) > 0
    ctx = mem._engine.ctx
    b = next(iter(ctx.store.cold))
    kv = mem._engine.cold._rehydrate(b)
    assert len(kv) == len(describe(model).memory_layers) == len(ctx.store.layers)
    g = ctx.g
    assert all(t.shape == (2, g.n_kv_heads, cfg.block_size, g.head_dim) for t in kv)
    assert isinstance(mem.generate("sky?", max_new_tokens=4, min_new_tokens=4), str)


def test_a_shared_model_is_loaded_once_per_process_for_each_model_device_and_dtype(tmp_path):
    pytest.importorskip("gguf")
    from memory_plugin.loading import load_shared_model

    path = tmp_path / "llama3.gguf"
    _write_gguf(FAMILIES["llama3"](), _tok(), path)
    first = load_shared_model(path)
    assert load_shared_model(str(path)) is first and load_shared_model(path, device="cpu") is first
    other = load_shared_model(path, dtype=torch.bfloat16)
    assert other is not first and other[0].dtype == torch.bfloat16 and first[0].dtype == torch.float32


def test_a_gguf_is_converted_once_and_the_copy_loads_the_same_model(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    import transformers

    from memory_plugin.loading import converted_dir, load_model

    path = tmp_path / "llama3.gguf"
    _write_gguf(FAMILIES["llama3"](), _tok(), path)
    first, tok = load_model(path)
    copy = converted_dir(path)
    assert (copy / "converted.json").is_file() and copy.parent == tmp_path / "cache" / "gguf"
    sources = []
    real = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda src, **kw: sources.append((str(src), kw.get("gguf_file"))) or real(src, **kw))
    again, tok2 = load_model(path)
    assert sources == [(str(copy), None)]  # the copy was read, not the GGUF
    assert again.config._name_or_path == first.config._name_or_path == str(tmp_path)  # named by the GGUF
    ours, theirs = first.state_dict(), again.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    text = "The pass key is 12345."
    assert tok2.encode(text) == tok.encode(text) and tok2.chat_template == tok.chat_template
    ids = _ids(24, first.config.vocab_size, seed=1)
    torch.testing.assert_close(_hf_logits(again, ids), _hf_logits(first, ids), atol=0, rtol=0)
    assert load_model(path, dtype=torch.bfloat16)[0].dtype == torch.bfloat16  # the float32 copy, cast
    # a file changed in place gets a new copy; the cache can be turned off, or fail to be written
    path.write_bytes(path.read_bytes() + b"\0" * 32)
    assert converted_dir(path) != copy
    monkeypatch.setenv("MEMORY_PLUGIN_CACHE", "")
    assert converted_dir(path) is None
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("MEMORY_PLUGIN_CACHE", str(tmp_path / "a-file"))
    with pytest.warns(UserWarning, match="could not keep the converted model"):
        assert load_model(path)[0].config.model_type == first.config.model_type
