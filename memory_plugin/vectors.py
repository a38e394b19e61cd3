"""Memory vectors ("cramming", Kuratov et al. 2025): a frozen causal LM reproduces a text exactly
when a few trained input-embedding vectors are put in front of it.

The vectors for a segment are found by per-sample optimisation: prepend ``n_vectors`` trainable
embeddings, run the frozen model over ``[vectors, tokens[:-1]]`` and minimise next-token
cross-entropy on ``tokens``. Success means *exact greedy reconstruction*, verified by decoding:
teacher-forced accuracy below 100% can decode to garbage (Tarasov et al., Progressive Cramming).

Two recipes:

* :data:`PAPER_RECIPE`: AdamW lr 1e-2, betas (0.9, 0.9), weight decay 0.01, one segment at a time;
* :data:`FAST_RECIPE` (default): lr 0.1 with linear warm-up and cosine decay, gradient clipping,
  many segments in one batch each with its own vectors, converged segments frozen and dropped
  from the batch (the speed-ups of the Progressive Cramming follow-up).

Example:
    >>> vecs = cram(model, token_ids, n_vectors=1)  # doctest: +SKIP
    >>> vecs.exact, decode(model, vecs) == token_ids  # doctest: +SKIP
    (True, True)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .loading import model_fingerprint


@dataclass(frozen=True)
class Recipe:
    """Optimisation settings for cramming."""

    lr: float = 0.1
    betas: tuple[float, float] = (0.9, 0.9)
    weight_decay: float = 0.01
    warmup_steps: int = 20
    cosine: bool = True
    clip_norm: float | None = 1.0
    batch_size: int = 16  # segments optimised together, each with its own vectors

    def lr_at(self, step: int, max_steps: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if not self.cosine:
            return self.lr
        progress = (step - self.warmup_steps) / max(1, max_steps - self.warmup_steps)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


PAPER_RECIPE = Recipe(lr=1e-2, warmup_steps=0, cosine=False, clip_norm=None, batch_size=1)
FAST_RECIPE = Recipe()


class ModelMismatchError(ValueError):
    """Memory vectors decoded with a model other than the one they were trained for."""


@dataclass
class MemoryVectors:
    """Trained input embeddings ``tensor [n_vectors, hidden]`` that make the model emit ``n_tokens`` tokens."""

    tensor: torch.Tensor
    n_tokens: int
    exact: bool  # greedy decoding from the vectors alone was verified to reproduce the tokens
    steps: int
    seconds: float
    fingerprint: str = ""  # the model's (memory_plugin.loading.model_fingerprint)
    token_ids: list[int] | None = field(default=None, repr=False)  # kept only when asked (verification)

    @property
    def n_vectors(self) -> int:
        return self.tensor.shape[0]

    def save(self, path: str | Path) -> None:
        """Write a safetensors file with the vectors and what is needed to decode them."""
        from safetensors.torch import save_file

        meta = {
            "n_tokens": str(self.n_tokens),
            "exact": str(self.exact),
            "steps": str(self.steps),
            "seconds": f"{self.seconds:.3f}",
            "fingerprint": self.fingerprint,
        }
        save_file({"vectors": self.tensor.detach().float().cpu().contiguous()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> MemoryVectors:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if "n_tokens" not in meta:
                raise ValueError(f"{path}: not a memory-vectors file (no n_tokens in its metadata)")
            return cls(
                f.get_tensor("vectors"),
                int(meta["n_tokens"]),
                meta.get("exact") == "True",
                int(meta.get("steps", 0)),
                float(meta.get("seconds", 0)),
                meta.get("fingerprint", ""),
            )


def _fingerprint(model, tokenizer=None) -> str:
    class _Len:  # the fingerprint hashes the tokenizer size; vectors don't depend on a tokenizer object
        def __len__(self):
            return model.config.vocab_size

    return model_fingerprint(model, tokenizer if tokenizer is not None else _Len())


def _check_segments(segments) -> list[list[int]]:
    out = []
    for i, s in enumerate(segments):
        ids = s.tolist() if isinstance(s, torch.Tensor) else list(s)
        if len(ids) < 1 or not all(isinstance(t, int) and t >= 0 for t in ids):
            raise ValueError(f"segment {i} must be a non-empty list of token ids")
        out.append(ids)
    return out


def cram_many(
    model,
    segments: list[list[int]],
    n_vectors: int = 1,
    *,
    max_steps: int = 2000,
    recipe: Recipe = FAST_RECIPE,
    verify: bool = True,
    keep_tokens: bool = False,
    progress=None,
    should_stop=None,
) -> list[MemoryVectors]:
    """Train memory vectors for each token segment; converged segments are frozen and leave the
    batch. A segment is ``exact`` only if greedy decoding from its vectors was checked to give it
    back. ``progress``: an optional callable ``(done, total)``; ``should_stop``: an optional
    callable checked every step: when it returns True, unfinished segments end as not exact."""
    if isinstance(n_vectors, bool) or not isinstance(n_vectors, int) or n_vectors < 1:
        raise ValueError(f"n_vectors must be a positive int, got {n_vectors!r}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    segs = _check_segments(segments)
    fp = _fingerprint(model)
    results: list[MemoryVectors | None] = [None] * len(segs)
    # Similar lengths batch together with little padding.
    order = sorted(range(len(segs)), key=lambda i: len(segs[i]))
    for start in range(0, len(order), recipe.batch_size):
        idx = order[start : start + recipe.batch_size]
        for i, mv in zip(idx, _cram_batch(model, [segs[i] for i in idx], n_vectors, max_steps, recipe, should_stop)):
            mv.fingerprint = fp
            if verify and mv.exact:
                mv.exact = greedy_decode(model, mv.tensor, mv.n_tokens) == segs[i]
            if keep_tokens:
                mv.token_ids = segs[i]
            results[i] = mv
        if progress is not None:
            progress(min(start + recipe.batch_size, len(order)), len(order))
    return results


def cram(model, token_ids, n_vectors: int = 1, **kw) -> MemoryVectors:
    """Memory vectors for one segment (see :func:`cram_many`)."""
    return cram_many(model, [token_ids], n_vectors, **kw)[0]


def _cram_batch(model, segs: list[list[int]], k: int, max_steps: int, recipe: Recipe, should_stop=None) -> list[MemoryVectors]:
    embed = model.get_input_embeddings()
    dev, dtype = embed.weight.device, embed.weight.dtype
    b, n_max = len(segs), max(len(s) for s in segs)
    targets = torch.full((b, n_max), -100, dtype=torch.long, device=dev)
    for i, s in enumerate(segs):
        targets[i, : len(s)] = torch.tensor(s, device=dev)
    with torch.no_grad():
        tok_emb = embed(targets.clamp(min=0))  # [b, n_max, d]; padding rows are masked below
        std = embed.weight.float().std()
    vectors = (torch.randn(b, k, embed.weight.shape[1], device=dev) * std).requires_grad_(True)
    opt = torch.optim.AdamW([vectors], lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay)
    lengths = torch.tensor([len(s) for s in segs], device=dev)
    active = torch.ones(b, dtype=torch.bool, device=dev)
    final = torch.zeros_like(vectors, requires_grad=False)  # vectors of converged segments, frozen
    steps = [max_steps] * b
    seconds = [0.0] * b
    t0 = time.perf_counter()
    for step in range(max_steps):
        live = active.nonzero().flatten()
        if len(live) == 0 or (should_stop is not None and should_stop()):
            break
        for g in opt.param_groups:
            g["lr"] = recipe.lr_at(step, max_steps)
        n = int(lengths[live].max())
        inputs = torch.cat([vectors[live].to(dtype), tok_emb[live, : n - 1]], dim=1)  # token i from position k-1+i
        mask = torch.arange(k + n - 1, device=dev)[None, :] < (k - 1 + lengths[live])[:, None]
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            logits = model(inputs_embeds=inputs, attention_mask=mask.long()).logits[:, k - 1 :]
        tgt = targets[live, :n]
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)
        with torch.no_grad():
            done = ((logits.argmax(-1) == tgt) | (tgt == -100)).all(dim=1)
            for j in live[done].tolist():  # all tokens right under teacher forcing: freeze these values
                final[j] = vectors[j]
                active[j] = False
                steps[j], seconds[j] = step, time.perf_counter() - t0
        if not active.any():
            break
        # Gradients for the vectors only: the model's weights stay frozen and untouched (no .grad
        # written on a user's model), and their gradients are not computed at all.
        (vectors.grad,) = torch.autograd.grad(loss, vectors)
        if recipe.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_([vectors], recipe.clip_norm)
        opt.step()
    now = time.perf_counter() - t0
    out = []
    for i, s in enumerate(segs):
        converged = not bool(active[i])
        tensor = (final[i] if converged else vectors[i]).detach().clone()
        out.append(MemoryVectors(tensor, len(s), converged, steps[i], seconds[i] if converged else now))
    return out


@torch.no_grad()
def greedy_decode(model, vectors: torch.Tensor, n_tokens: int) -> list[int]:
    """Tokens the model generates greedily from ``vectors [k, hidden]`` alone."""
    from transformers import DynamicCache

    embed = model.get_input_embeddings()
    cache = DynamicCache(config=model.config)
    x = vectors[None].to(embed.weight.device, embed.weight.dtype)
    out = []
    for _ in range(n_tokens):
        logits = model(inputs_embeds=x, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
        token = int(logits.argmax())
        out.append(token)
        x = embed(torch.tensor([[token]], device=embed.weight.device))
    return out


def decode(model, vectors: MemoryVectors, *, check_model: bool = True) -> list[int]:
    """Token ids reconstructed from memory vectors; refuses vectors trained for another model."""
    if check_model and vectors.fingerprint and vectors.fingerprint != _fingerprint(model):
        raise ModelMismatchError(
            f"these memory vectors were trained for another model (fingerprint {vectors.fingerprint}, "
            f"this model is {_fingerprint(model)}); they only decode with the model that made them"
        )
    return greedy_decode(model, vectors.tensor, vectors.n_tokens)
