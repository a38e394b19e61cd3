"""The forward pass with memory attention (model loading is :mod:`memory_plugin.loading`).

We own the loop over the decoder layers and reuse the model's modules by their stable names
(``embed_tokens``, ``layers[i].input_layernorm``, ``self_attn.{q,k,v,o}_proj``,
``post_attention_layernorm``, ``mlp``, ``norm``, ``lm_head``, ``rotary_emb``) instead of patching
transformers' attention: nothing is monkey-patched, so transformers' own code paths are untouched.
The tested transformers range is pinned in pyproject.toml and equivalence with transformers' own
forward is a test.
"""

from __future__ import annotations

import torch

from .architectures import describe
from .context import Context, Geometry
from .loading import (  # noqa: F401  (their old home: re-exported)
    DEFAULT_GGUF,
    DEFAULT_MODEL_NAME,
    DEFAULT_MODEL_PACKAGE,
    SUPPORTED_ARCHITECTURES,
    ModelNotFoundError,
    UnsupportedModelError,
    check_supported,
    default_model_path,
    load_model,
)


class MemoryForward:
    """The forward pass of a decoder-only causal LM with InfLLM memory attention, for every family
    :mod:`memory_plugin.architectures` describes (one loop; the description says what differs).

    Example:
        >>> fwd = MemoryForward(model)  # doctest: +SKIP
        >>> ctx = fwd.new_context(MemoryConfig())  # doctest: +SKIP
        >>> logits = fwd(torch.tensor(ids), ctx)  # doctest: +SKIP
    """

    def __init__(self, hf_model):
        self.plan = describe(hf_model)
        self.arch = self.plan.arch
        self.hf = hf_model
        base = hf_model.model
        self.embed = base.embed_tokens
        self.layers = list(base.layers)
        self.norm = base.norm
        self.rotary = base.rotary_emb
        self.lm_head = hf_model.lm_head
        attn = self.layers[0].self_attn
        cfg = hf_model.config
        self.geometry = Geometry(
            n_layers=len(self.layers),
            n_heads=cfg.num_attention_heads,
            n_kv_heads=cfg.num_key_value_heads,
            head_dim=attn.head_dim,
            scaling=attn.scaling,
            windows=tuple(layer.window for layer in self.plan.layers),
            rotary=tuple(layer.rope is not None for layer in self.plan.layers),
            softcap=self.plan.attn_softcap,
        )
        # One rotary table for the memory layers, one for the sliding-window layers (Gemma 3's local base).
        memory_ropes = {layer.rope for layer in self.plan.layers if layer.window is None} - {None}
        window_ropes = {layer.rope for layer in self.plan.layers if layer.window is not None} - {None}
        if len(memory_ropes) > 1 or len(window_ropes) > 1:
            raise UnsupportedModelError(f"architecture {cfg.model_type!r}: layers of one kind with different RoPE tables")
        self._memory_rope = next(iter(memory_ropes), "default")
        self._window_rope = next(iter(window_ropes), "default")
        dim = self.rope_tables(1)[0].shape[-1]
        if dim != attn.head_dim:
            raise UnsupportedModelError(
                f"architecture {cfg.model_type!r}: RoPE over {dim} of {attn.head_dim} head dimensions (partial rotary) is not supported"
            )

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def rope_tables(self, n: int, rope: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[n, D]`` for positions ``0..n-1``, from the model's own rotary module (scaling
        included); ``rope``: which table (a layer type, for families with RoPE per layer type),
        by default the memory layers'."""
        x = torch.zeros(1, dtype=torch.float32, device=self.device)
        pos = torch.arange(n, device=self.device)[None]
        rope = rope or self._memory_rope
        cos, sin = self.rotary(x, pos) if rope == "default" else self.rotary(x, pos, rope)
        return cos[0].to(self.dtype), sin[0].to(self.dtype)

    def new_context(self, config, spill_dir=None) -> Context:
        n = max(config.window_capacity + config.chunk_size, config.n_init + config.n_local, config.n_local + config.block_size)
        cos, sin = self.rope_tables(n + 1)
        window_rope = None
        windows = [w for w in self.geometry.windows if w is not None]
        if windows:
            window_rope = self.rope_tables(max(windows) + config.chunk_size, self._window_rope)
        return Context(
            self.geometry, config, cos, sin, dtype=self.dtype, device=self.device, spill_dir=spill_dir, window_rope=window_rope
        )

    def __call__(
        self,
        ids: torch.Tensor | None,
        ctx: Context,
        *,
        embeds: torch.Tensor | None = None,
        logits: str = "last",
        capture: list | None = None,
        trace: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Encode tokens ``ids [n]`` (or ``embeds [n, hidden]``, as the model's ``inputs_embeds``)
        into ``ctx`` chunk by chunk.

        Returns the logits of the last position (``logits="last"``, shape ``[vocab]``), of every
        position (``"all"``, ``[n, vocab]``) or nothing (``"none"``).
        """
        if embeds is None:
            embeds = self.embed(ids.to(self.device))
        token_ids = ids.tolist() if ids is not None else [-1] * embeds.shape[0]
        embeds = embeds * self.plan.embed_scale
        n = embeds.shape[0]
        outs = []
        chunk = ctx.cfg.chunk_size
        for s in range(0, n, chunk):
            h, step = self._step(embeds[s : s + chunk], ctx, capture, trace)
            ctx.commit(step, token_ids[s : s + chunk])
            if logits == "all" or (logits == "last" and s + chunk >= n):
                outs.append(h if logits == "all" else h[-1:])
        if logits == "none":
            return None
        out = self.lm_head(self.norm(torch.cat(outs))) / self.plan.logits_scaling
        if self.plan.final_softcap is not None:
            out = torch.tanh(out / self.plan.final_softcap) * self.plan.final_softcap
        return out[-1] if logits == "last" else out

    def _step(self, h: torch.Tensor, ctx: Context, capture: list | None, trace: torch.Tensor | None = None):
        arch, g, c = self.arch, self.geometry, h.shape[0]
        (attn_in, attn_out), (mlp_in, mlp_out) = arch.attn_norms, arch.mlp_norms
        step = ctx.begin(c, capture, trace)
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer.self_attn, _norm(layer, attn_in, h))
            o = ctx.attend(i, q, k, v, step)
            o = layer.self_attn.o_proj(o.transpose(0, 1).reshape(c, g.n_heads * g.head_dim))
            h = h + _norm(layer, attn_out, o) * self.plan.residual_scale
            m = layer.mlp(_norm(layer, mlp_in, h)[None])[0]  # with a batch dim: a sparse MoE block wants one
            h = h + _norm(layer, mlp_out, m) * self.plan.residual_scale
        return h, step

    def _qkv(self, attn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries ``[H, c, D]``, keys and values ``[Hkv, c, D]`` (unrotated) of ``x [c, hidden]``."""
        g, c, norm = self.geometry, x.shape[0], self.arch.qk_norm
        if len(self.arch.qkv) == 1:  # fused: [q | k | v]
            q, k, v = getattr(attn, self.arch.qkv[0])(x).split(
                [g.n_heads * g.head_dim, g.n_kv_heads * g.head_dim, g.n_kv_heads * g.head_dim], dim=-1
            )
        else:
            q, k, v = (getattr(attn, name)(x) for name in self.arch.qkv)
        if norm == "all":
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.view(c, g.n_heads, g.head_dim), k.view(c, g.n_kv_heads, g.head_dim), v.view(c, g.n_kv_heads, g.head_dim)
        if norm == "head":
            q, k = attn.q_norm(q), attn.k_norm(k)
        return q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)


def _norm(layer, name: str | None, x: torch.Tensor) -> torch.Tensor:
    """``layer.<name>(x)``, or ``x`` where the description has no norm there."""
    return x if name is None else getattr(layer, name)(x)
