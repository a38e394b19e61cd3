"""What each supported decoder family does differently from Llama, as data the forward pass reads.

An :class:`Architecture` names the model's own modules and switches (fused projections, query/key
norms, where the norms sit, multipliers, soft-caps, RoPE per layer type, layers without RoPE, where
sliding windows are read); :func:`describe` resolves it against one model into a :class:`Plan` of
numbers and per-layer facts (:class:`LayerPlan`). The forward pass (:mod:`memory_plugin.model`)
has no branch per model type: every family runs the same loop over this description.

Adding a family: check its ``modeling_<name>.py`` in transformers, add an entry to
:data:`ARCHITECTURES`, and an equivalence test on a tiny random config (tests/test_architectures.py).
"""

from __future__ import annotations

from dataclasses import dataclass

FULL = "full_attention"
SLIDING = "sliding_attention"


class UnsupportedModelError(ValueError):
    """The model's architecture is not one the memory attention supports."""


@dataclass(frozen=True)
class Architecture:
    """How one family's decoder layer is wired; the defaults are Llama's.

    Norm placement is a pair ``(before, after)`` per sub-layer, each the name of a module of the
    decoder layer or None: Llama ``attn_norms=("input_layernorm", None)``, ``mlp_norms=
    ("post_attention_layernorm", None)``; OLMo 2 norms the outputs (``(None, "post_attention_layernorm")``,
    ``(None, "post_feedforward_layernorm")``); Gemma 2/3 both (sandwich).
    """

    qkv: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    """The projections: three, or one fused module (Phi-3: ``("qkv_proj",)``, split ``[q | k | v]``)."""
    qk_norm: str | None = None
    """``"head"``: ``q_norm``/``k_norm`` over each head's dimensions (Qwen3, Gemma 3); ``"all"``: over
    all heads at once, before splitting them (OLMo 2); None: none."""
    attn_norms: tuple[str | None, str | None] = ("input_layernorm", None)
    mlp_norms: tuple[str | None, str | None] = ("post_attention_layernorm", None)
    multipliers: bool = False
    """Granite: embeddings times ``embedding_multiplier``, sub-layer outputs times
    ``residual_multiplier``, logits divided by ``logits_scaling`` (attention's
    ``attention_multiplier`` is the attention module's own ``scaling``)."""
    softcaps: bool = False
    """Gemma 2/3: ``tanh`` soft-capping of attention logits (``attn_logit_softcapping``) and final
    logits (``final_logit_softcapping``), each when the config sets it."""
    rope_per_layer_type: bool = False
    """Gemma 3: the rotary module takes the layer type (sliding layers have their own RoPE base)."""
    nope_layers: bool = False
    """SmolLM3: ``config.no_rope_layers[i] == 0`` marks a layer that uses no RoPE."""
    windows: str = "layer"
    """Where a layer's sliding window is read: ``"layer"`` (its attention module's ``sliding_window``,
    None for full attention) or ``"config"`` (``config.sliding_window``, every layer: Mistral, Phi-3)."""


LLAMA = Architecture()
QWEN3 = Architecture(qk_norm="head")
SANDWICH = dict(attn_norms=("input_layernorm", "post_attention_layernorm"), mlp_norms=("pre_feedforward_layernorm", "post_feedforward_layernorm"))

#: ``config.model_type`` -> its description. What each was checked against: README.md, "Models".
ARCHITECTURES: dict[str, Architecture] = {
    "llama": LLAMA,  # Llama 1-3.x (RoPE scaling is the model's rotary module's), SmolLM/SmolLM2
    "mistral": Architecture(windows="config"),
    "qwen2": LLAMA,
    "qwen3": QWEN3,
    "qwen3_moe": QWEN3,  # the sparse MoE block is the layer's `mlp`, called whole
    "granite": Architecture(multipliers=True),
    "olmo2": Architecture(qk_norm="all", attn_norms=(None, "post_attention_layernorm"), mlp_norms=(None, "post_feedforward_layernorm")),
    "phi3": Architecture(qkv=("qkv_proj",), windows="config"),  # gate_up_proj is inside the layer's `mlp`
    "smollm3": Architecture(nope_layers=True),
    "gemma2": Architecture(softcaps=True, **SANDWICH),  # embeddings are scaled by the embedding module
    "gemma3_text": Architecture(qk_norm="head", softcaps=True, rope_per_layer_type=True, **SANDWICH),
}


@dataclass(frozen=True)
class LayerPlan:
    """One decoder layer: ``window`` is its sliding window (keys a query sees, itself included),
    None for full attention, the layers that get InfLLM memory; ``rope`` the rotary table it uses
    (a layer type for families with RoPE per layer type, else ``"default"``), None without RoPE."""

    window: int | None = None
    rope: str | None = "default"


@dataclass(frozen=True)
class Plan:
    """An :class:`Architecture` resolved against one model: the numbers the forward pass applies."""

    arch: Architecture
    layers: tuple[LayerPlan, ...]
    embed_scale: float = 1.0
    residual_scale: float = 1.0
    logits_scaling: float = 1.0  # logits are divided by it (Granite)
    attn_softcap: float | None = None
    final_softcap: float | None = None

    @property
    def memory_layers(self) -> list[int]:
        """Indices of the layers with InfLLM memory (full attention)."""
        return [i for i, layer in enumerate(self.layers) if layer.window is None]


def supported() -> tuple[str, ...]:
    return tuple(ARCHITECTURES)


def describe(hf_model) -> Plan:
    """The :class:`Plan` of a transformers causal LM, or :class:`UnsupportedModelError` saying what is missing.

    Sliding-window layers keep their window (as trained) while full-attention layers get the
    memory; a model whose every layer is sliding (Mistral 7B v0.1, Phi-3 with ``sliding_window``)
    is InfLLM's own setting: the memory's local window takes the sliding window's place in every layer.
    """
    cfg = hf_model.config
    name = getattr(cfg, "model_type", None)
    arch = ARCHITECTURES.get(name)
    if arch is None:
        raise UnsupportedModelError(
            f"architecture {name!r} is not supported: no description of its decoder layer "
            f"(memory_plugin.architectures.ARCHITECTURES); supported: {', '.join(ARCHITECTURES)}"
        )
    base = getattr(hf_model, "model", None)
    layers = list(getattr(base, "layers", []))
    missing = [m for m in ("embed_tokens", "norm", "rotary_emb") if not hasattr(base, m)]
    if not hasattr(hf_model, "lm_head"):
        missing.append("lm_head")
    for m in (*arch.qkv, "o_proj", *((["q_norm", "k_norm"]) if arch.qk_norm else [])):
        if layers and not hasattr(layers[0].self_attn, m):
            missing.append(f"self_attn.{m}")
    for m in (*arch.attn_norms, *arch.mlp_norms, "mlp"):
        if m is not None and layers and not hasattr(layers[0], m):
            missing.append(m)
    if not layers or missing:
        raise UnsupportedModelError(
            f"architecture {name!r} is not supported in this form: its modules lack {', '.join(missing) or 'layers'}"
        )
    if getattr(cfg, "use_bidirectional_attention", False):
        raise UnsupportedModelError(f"architecture {name!r} with bidirectional attention is not supported: the memory is causal")
    windows = [_window(arch, cfg, layer) for layer in layers]
    if all(w is not None for w in windows):  # InfLLM's setting: the memory window replaces the sliding one
        windows = [None] * len(windows)
    if not any(w is None for w in windows):
        raise UnsupportedModelError(f"architecture {name!r}: no full-attention layer to hold the memory")
    types = getattr(cfg, "layer_types", None) or [FULL] * len(layers)
    nope = getattr(cfg, "no_rope_layers", None) if arch.nope_layers else None
    plan_layers = tuple(
        LayerPlan(
            window=w,
            rope=None if nope is not None and not nope[i] else (types[i] if arch.rope_per_layer_type else "default"),
        )
        for i, w in enumerate(windows)
    )
    scales = {}
    if arch.multipliers:
        scales.update(embed_scale=cfg.embedding_multiplier, residual_scale=cfg.residual_multiplier, logits_scaling=cfg.logits_scaling)
    if arch.softcaps:
        scales.update(attn_softcap=cfg.attn_logit_softcapping, final_softcap=cfg.final_logit_softcapping)
    return Plan(arch, plan_layers, **scales)


def _window(arch: Architecture, cfg, layer) -> int | None:
    if arch.windows == "config":
        return getattr(cfg, "sliding_window", None)
    return getattr(layer.self_attn, "sliding_window", None)
