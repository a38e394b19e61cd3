"""Memory vectors ("cramming", Kuratov et al. 2025): a frozen causal LM reproduces a text exactly
when a few trained input-embedding vectors are put in front of it.

Shapes: a segment is ``n`` token ids; its vectors are ``[n_vectors, hidden]``; a batch trains
``vectors [b, n_vectors, hidden]`` on ``targets [b, n_max]`` (padding is ``-100``).

The vectors for a segment are found by per-sample optimisation: prepend ``n_vectors`` trainable
embeddings, run the frozen model over ``[anchor, vectors, tokens[:-1]]`` and minimise next-token
cross-entropy on ``tokens``. The anchor is one fixed token (the model's start token,
:func:`anchor_token`) in the first position: a causal LM's output at position 0 hardly depends on
what is there (it is where attention sinks), so a lone vector at position 0 never learnt to emit
the segment's first token on SmolLM2-135M, while after the anchor it does in tens of steps
(docs/BENCHMARKS.md section 7). Success means *exact greedy reconstruction*: teacher-forced accuracy
below 100% can decode to garbage (Tarasov et al., Progressive Cramming), so the default stopping
rule greedy-decodes every live segment from its vectors, in the model's own precision, every
``check_every`` steps, and a segment stops only when that gives its tokens back.

Two recipes:

* :data:`PAPER_RECIPE`: AdamW lr 1e-2, betas (0.9, 0.9), weight decay 0.01, float32, one segment
  at a time, stopping when teacher-forced accuracy reaches 1.0 (Kuratov et al.);
* :data:`FAST_RECIPE` (default): bf16 autocast through the frozen model where bf16 is fast (the
  vectors and the optimiser state stay float32; the last steps run in float32), many segments per
  batch, each with its own vectors, its own loss and gradient clipping (no segment slows another)
  and its own stopping; a segment that decodes exactly is frozen and leaves the batch, the batch
  ends when all have or at ``max_steps``.
  Learning rate and schedule: the measured best (docs/BENCHMARKS.md, memory vectors).

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

STOPPING_RULES = ("greedy", "teacher_forced")


@dataclass(frozen=True)
class Recipe:
    """Optimisation settings for cramming.

    ``stop``: ``"greedy"`` (a segment is done when greedy decoding from its vectors gives its tokens
    back, checked every ``check_every`` steps and at any step where every teacher-forced argmax is
    right, which in the model's own precision is the same condition: no check is wasted and no
    step is lost waiting for the next periodic one) or ``"teacher_forced"`` (the paper's: when the
    argmax under teacher forcing is right at every position; verified by decoding afterwards).
    ``progressive``: 0 trains on the whole segment from the first step; ``p > 0`` trains on its first
    ``p`` tokens and adds ``p`` more each time those are right under teacher forcing (progressive
    lengthening). ``anchor``: put the model's start token (:func:`anchor_token`) before the vectors
    (the papers put the vectors first). ``bf16``: autocast the frozen model's forward and backward
    to bfloat16 while segments learn, then finish in float32 (the precision the vectors are decoded
    in) once every live segment is right under bf16 teacher forcing; None (the default) does where
    bf16 matrix products are fast: CUDA, or a CPU with AMX or AVX512-BF16 (on an AVX2-only CPU a
    bf16 linear layer is ~4.5x *slower* than float32, docs/BENCHMARKS.md section 7).

    >>> Recipe(lr=0.1, warmup_steps=10, cosine=True).lr_at(0, 100)
    0.01
    >>> round(Recipe(lr=0.1, warmup_steps=0, cosine=True).lr_at(100, 100), 6)  # cosine ends at a tenth
    0.01
    >>> Recipe(stop="perplexity")
    Traceback (most recent call last):
    ...
    ValueError: Recipe.stop must be one of ('greedy', 'teacher_forced'), got 'perplexity'
    """

    lr: float = 0.3  # 8 of 8 16-token segments exact in 31-93 steps, against 6 of 8 by 113 at 0.1 (BENCHMARKS section 7)
    betas: tuple[float, float] = (0.9, 0.9)
    weight_decay: float = 0.01
    warmup_steps: int = 20
    cosine: bool = True
    clip_norm: float | None = 1.0  # per segment
    batch_size: int = 16  # segments optimised together, each with its own vectors
    bf16: bool | None = None
    stop: str = "greedy"
    check_every: int = 10
    progressive: int = 0
    anchor: bool = True

    def __post_init__(self):
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"Recipe.lr must be > 0, got {self.lr!r}")
        for name in ("batch_size", "check_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Recipe.{name} must be an int >= 1, got {v!r}")
        for name in ("warmup_steps", "progressive"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"Recipe.{name} must be an int >= 0, got {v!r}")
        if not isinstance(self.anchor, bool):
            raise ValueError(f"Recipe.anchor must be True or False, got {self.anchor!r}")
        if self.bf16 not in (None, True, False):
            raise ValueError(f"Recipe.bf16 must be True, False or None (where fast), got {self.bf16!r}")
        if self.stop not in STOPPING_RULES:
            raise ValueError(f"Recipe.stop must be one of {STOPPING_RULES}, got {self.stop!r}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"Recipe.clip_norm must be > 0 or None, got {self.clip_norm!r}")

    def lr_at(self, step: int, max_steps: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if not self.cosine:
            return self.lr
        progress = (step - self.warmup_steps) / max(1, max_steps - self.warmup_steps)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def fast_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matrix products beat float32 on ``device``: CUDA, or a CPU with AMX tiles
    or AVX512-BF16 instructions (torch's own probes)."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


PAPER_RECIPE = Recipe(
    lr=1e-2, warmup_steps=0, cosine=False, clip_norm=None, batch_size=1, bf16=False, stop="teacher_forced", anchor=False
)
FAST_RECIPE = Recipe()


@torch.no_grad()
def anchor_token(model) -> int:
    """The token put before memory vectors: of the model's special tokens (``config`` bos, eos and pad,
    and id 0), the one after which its next-token distribution is broadest (highest entropy), i.e. a
    document start rather than a chat-turn opener the model expects a role name after (on
    SmolLM2-135M-Instruct: ``<|endoftext|>``, not the configured bos ``<|im_start|>``, after which
    2 of 8 16-token segments still had their first token wrong at 125 steps, docs/BENCHMARKS.md
    section 7). Ties go to the earlier candidate."""
    c = model.config
    cands = []
    for ids in (getattr(c, "bos_token_id", None), getattr(c, "eos_token_id", None), getattr(c, "pad_token_id", None), 0):
        for t in ids if isinstance(ids, (list, tuple)) else [ids]:
            if isinstance(t, int) and 0 <= t < c.vocab_size and t not in cands:
                cands.append(t)
    embed = model.get_input_embeddings()
    x = embed(torch.tensor(cands, device=embed.weight.device))[:, None]  # each alone at position 0
    logp = model(inputs_embeds=x).logits[:, -1].float().log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return cands[int(entropy.argmax())]


def _prefix(model, vectors: torch.Tensor, anchor: int | None) -> torch.Tensor:
    """``[anchor, vectors]`` as input embeddings ``[b, (1 +) k, hidden]`` from ``vectors [b, k, hidden]``."""
    embed = model.get_input_embeddings()
    x = vectors.to(embed.weight.device, embed.weight.dtype)
    if anchor is None:
        return x
    with torch.no_grad():
        a = embed(torch.tensor([anchor], device=embed.weight.device))
    return torch.cat([a[None].expand(len(x), 1, -1), x], dim=1)


def memory_prefix(model, vectors: MemoryVectors) -> torch.Tensor:
    """The input embeddings that stand for a segment: ``[anchor, vectors]`` (or the vectors alone
    when they were crammed without an anchor), ``[(1 +) n_vectors, hidden]``."""
    return _prefix(model, vectors.tensor[None], vectors.anchor)[0]


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
    anchor: int | None = None  # token id before the vectors (anchor_token); None: vectors first
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
            "anchor": "" if self.anchor is None else str(self.anchor),
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
                int(meta["anchor"]) if meta.get("anchor") else None,
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
    """Train memory vectors for each token segment, ``recipe.batch_size`` segments at a time; a
    segment that meets ``recipe.stop`` is frozen and leaves its batch. A segment is ``exact`` only
    if greedy decoding from its vectors (one at a time, as :func:`decode`) was checked to give it
    back (``verify``). ``progress``: an optional callable ``(done, total)``; ``should_stop``: an optional
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
                mv.exact = greedy_decode(model, mv.tensor, mv.n_tokens, anchor=mv.anchor) == segs[i]
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
    vectors = (torch.randn(b, k, embed.weight.shape[1], device=dev) * std).requires_grad_(True)  # float32 always
    opt = torch.optim.AdamW([vectors], lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay)
    lengths = torch.tensor([len(s) for s in segs], device=dev)
    # Tokens each segment trains on now: all of them, or a prefix that grows (progressive lengthening).
    trained = lengths.clone() if recipe.progressive == 0 else lengths.clamp(max=recipe.progressive)
    positions = torch.arange(n_max, device=dev)
    active = torch.ones(b, dtype=torch.bool, device=dev)
    final = torch.zeros_like(vectors, requires_grad=False)  # vectors of finished segments, frozen
    steps = [0] * b  # of a finished segment; an unfinished one ran them all (or until should_stop)
    seconds = [0.0] * b
    bf16 = fast_bf16(dev) if recipe.bf16 is None else recipe.bf16
    # bf16 learns, float32 finishes. A segment whose tokens all come out right under bf16 teacher
    # forcing can still decode wrongly in float32, where its vectors are used (one of 8 16-token
    # segments was right in bf16 steps before it decoded: docs/BENCHMARKS.md section 7). Such a
    # segment is "settled"; once every live segment is, steps run in float32 until they decode.
    settled = torch.zeros(b, dtype=torch.bool, device=dev)
    anchor = anchor_token(model) if recipe.anchor else None
    a = int(anchor is not None)  # the vectors are at positions a .. a+k-1, token i is predicted at a+k-1+i
    t0 = time.perf_counter()

    def finish(rows: list[int], step: int) -> None:
        for j in rows:
            final[j] = vectors[j].detach()
            active[j] = False
            steps[j], seconds[j] = step + 1, time.perf_counter() - t0

    ran = 0
    for step in range(max_steps):
        live = active.nonzero().flatten()
        if len(live) == 0 or (should_stop is not None and should_stop()):
            break
        ran = step + 1
        for g in opt.param_groups:
            g["lr"] = recipe.lr_at(step, max_steps)
        n = int(lengths[live].max())
        inputs = torch.cat([_prefix(model, vectors[live], anchor), tok_emb[live, : n - 1]], dim=1)
        mask = torch.arange(a + k + n - 1, device=dev)[None, :] < (a + k - 1 + lengths[live])[:, None]
        low = bf16 and not bool(settled[live].all())
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=low):
            logits = model(inputs_embeds=inputs, attention_mask=mask.long()).logits[:, a + k - 1 :]
        tgt = targets[live, :n].masked_fill(positions[None, :n] >= trained[live, None], -100)
        # Each segment's own mean loss, summed: a segment's gradient does not depend on the others.
        per_token = F.cross_entropy(logits.float().transpose(1, 2), tgt, ignore_index=-100, reduction="none")
        loss = (per_token.sum(1) / (tgt != -100).sum(1).clamp(min=1)).sum()
        with torch.no_grad():
            right = ((logits.argmax(-1) == tgt) | (tgt == -100)).all(dim=1)  # under teacher forcing
            whole = trained[live] == lengths[live]
            if low:
                settled[live[right & whole]] = True
            if recipe.progressive:  # a learnt prefix grows
                grow = live[right & ~whole]
                trained[grow] = (trained[grow] + recipe.progressive).clamp(max=lengths[grow])
            if recipe.stop == "teacher_forced":
                finish(live[right & whole].tolist(), step)
            else:  # greedy: check every check_every steps, and at once where teacher forcing is all right
                periodic = (step + 1) % recipe.check_every == 0 or step == max_steps - 1
                check = live[whole] if periodic else live[right & whole]
                if len(check):
                    finish(check[_decodes_exactly(model, vectors[check].detach(), targets[check], anchor)].tolist(), step)
        if not active.any():
            break
        # Gradients for the vectors only: the model's weights stay frozen and untouched (no .grad
        # written on a user's model), and their gradients are not computed at all.
        (vectors.grad,) = torch.autograd.grad(loss, vectors)
        if recipe.clip_norm is not None:  # per segment
            norms = vectors.grad.flatten(1).norm(dim=1).clamp(min=1e-12)
            vectors.grad.mul_((recipe.clip_norm / norms).clamp(max=1.0)[:, None, None])
        opt.step()
    now = time.perf_counter() - t0
    out = []
    for i, s in enumerate(segs):
        done = not bool(active[i])
        tensor = (final[i] if done else vectors[i]).detach().clone()
        out.append(MemoryVectors(tensor, len(s), done, steps[i] if done else ran, seconds[i] if done else now, anchor=anchor))
    return out


@torch.no_grad()
def _decodes_exactly(model, vectors: torch.Tensor, targets: torch.Tensor, anchor: int | None = None) -> torch.Tensor:
    """Greedy decoding, batched, from ``vectors [b, k, hidden]`` alone (after ``anchor``), in the model's own precision:
    ``[b]`` bool, True where it gives back ``targets [b, n]`` (padding ``-100``) token for token.
    While a row agrees, feeding its target is feeding its greedy token; decoding stops as soon as no
    row still agrees with tokens left to check."""
    from transformers import DynamicCache

    embed = model.get_input_embeddings()
    cache = DynamicCache(config=model.config)
    x = _prefix(model, vectors, anchor)
    ok = torch.ones(len(targets), dtype=torch.bool, device=targets.device)
    left = (targets != -100).sum(1)
    for i in range(targets.shape[1]):
        logits = model(inputs_embeds=x, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        tgt = targets[:, i]
        ok &= (logits.argmax(-1) == tgt) | (tgt == -100)
        if not (ok & (left > i + 1)).any():
            break
        x = embed(tgt.clamp(min=0))[:, None]
    return ok


@torch.no_grad()
def greedy_decode(model, vectors: torch.Tensor, n_tokens: int, anchor: int | None = None) -> list[int]:
    """Tokens the model generates greedily from ``vectors [k, hidden]`` alone (after the ``anchor`` token, if any)."""
    from transformers import DynamicCache

    embed = model.get_input_embeddings()
    cache = DynamicCache(config=model.config)
    x = _prefix(model, vectors[None], anchor)
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
    return greedy_decode(model, vectors.tensor, vectors.n_tokens, anchor=vectors.anchor)
