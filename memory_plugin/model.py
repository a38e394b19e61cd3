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
    """The forward pass of a Llama-family causal LM with InfLLM memory attention.

    Example:
        >>> fwd = MemoryForward(model)  # doctest: +SKIP
        >>> ctx = fwd.new_context(MemoryConfig())  # doctest: +SKIP
        >>> logits = fwd(torch.tensor(ids), ctx)  # doctest: +SKIP
    """

    def __init__(self, hf_model):
        check_supported(hf_model)
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
        )

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def rope_tables(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[n, D]`` for positions ``0..n-1``, from the model's own rotary module (scaling included)."""
        x = torch.zeros(1, dtype=torch.float32, device=self.device)
        cos, sin = self.rotary(x, torch.arange(n, device=self.device)[None])
        return cos[0].to(self.dtype), sin[0].to(self.dtype)

    def new_context(self, config, spill_dir=None) -> Context:
        n = max(config.window_capacity + config.chunk_size, config.n_init + config.n_local, config.n_local + config.block_size)
        cos, sin = self.rope_tables(n + 1)
        return Context(self.geometry, config, cos, sin, dtype=self.dtype, device=self.device, spill_dir=spill_dir)

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
        """Encode tokens ``ids [n]`` (or ``embeds [n, hidden]``) into ``ctx`` chunk by chunk.

        Returns the logits of the last position (``logits="last"``, shape ``[vocab]``), of every
        position (``"all"``, ``[n, vocab]``) or nothing (``"none"``).
        """
        if embeds is None:
            embeds = self.embed(ids.to(self.device))
        token_ids = ids.tolist() if ids is not None else [-1] * embeds.shape[0]
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
        out = self.lm_head(self.norm(torch.cat(outs)))
        return out[-1] if logits == "last" else out

    def _step(self, h: torch.Tensor, ctx: Context, capture: list | None, trace: torch.Tensor | None = None):
        g = self.geometry
        c = h.shape[0]
        step = ctx.begin(c, capture, trace)
        for i, layer in enumerate(self.layers):
            x = layer.input_layernorm(h)
            attn = layer.self_attn
            q = attn.q_proj(x).view(c, g.n_heads, g.head_dim).transpose(0, 1)
            k = attn.k_proj(x).view(c, g.n_kv_heads, g.head_dim).transpose(0, 1)
            v = attn.v_proj(x).view(c, g.n_kv_heads, g.head_dim).transpose(0, 1)
            o = ctx.attend(i, q, k, v, step)
            h = h + attn.o_proj(o.transpose(0, 1).reshape(c, g.n_heads * g.head_dim))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return h, step
