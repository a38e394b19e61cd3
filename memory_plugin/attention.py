"""The attention maths of InfLLM: rotary positions, one joint softmax over several key sets,
representative keys of a block, and block relevance.

Shapes (batch size is always 1 and left out):
    q: [H, c, D]      queries of a chunk of c tokens, H query heads
    k, v: [Hkv, N, D] keys/values, Hkv key/value heads; query head h reads kv head h // (H // Hkv)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., n, D]`` by the angles whose ``cos``/``sin`` are ``[n, D]`` (or ``[1, D]``)."""
    return x * cos + rotate_half(x) * sin


@dataclass
class AttnPart:
    """One set of keys in a joint softmax.

    Which keys each query sees: all of them by default; ``band=(lo, hi)`` lets query ``i`` see key
    ``j`` only when ``lo <= j - i <= hi`` (None: unbounded), which covers every pattern InfLLM needs
    (causal, sliding window, "older than the window") without building a mask where none is needed;
    ``mask [c, N]`` (True = visible) allows any other pattern. When ``want_mass`` is set,
    the attention probability each key received is summed over the chunk's queries (per query head).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None = None
    want_mass: bool = False
    band: tuple[int | None, int | None] | None = None

    def __post_init__(self) -> None:
        if self.band is not None:
            if self.mask is not None:
                raise ValueError("give a part a mask or a band, not both")
            if _vacuous(self.band, self.q.shape[1], self.k.shape[1]):
                self.band = None

    def visible(self, rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """The boolean mask ``[c, N]`` (or of ``rows`` only); None when every key is visible."""
        if self.band is None:
            return self.mask if self.mask is None or rows is None else self.mask[rows]
        i = torch.arange(self.q.shape[1], device=self.q.device) if rows is None else rows
        rel = torch.arange(self.k.shape[1], device=self.q.device)[None, :] - i[:, None]
        lo, hi = self.band
        if lo is None:
            return rel <= hi
        return rel >= lo if hi is None else (rel >= lo) & (rel <= hi)


def _vacuous(band, c: int, n: int) -> bool:
    lo, hi = band
    return (lo is None or lo <= -(c - 1)) and (hi is None or hi >= n - 1)


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_MIN_QUERIES = 16  # below this the explicit path is as fast and avoids per-call overhead


def joint_attention(
    parts: list[AttnPart],
    scaling: float,
    mass_rows: torch.Tensor | None = None,
    *,
    trace: bool = False,
    softcap: float | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor | None]] | tuple[torch.Tensor, list, list[torch.Tensor]]:
    """Softmax attention over the union of ``parts``, as one softmax over their concatenated logits.

    Each part may rotate the queries its own way (InfLLM: exact positions in the window, a fixed
    distance for memory blocks). Returns ``(out [H, c, D], masses)``: for each part with
    ``want_mass``, the normalised attention probability its keys received, summed over the query rows
    ``mass_rows`` (all rows when None) -> ``[H, N]``; None for the other parts. Every query must see
    at least one key. GQA is native: keys are never repeated. ``trace=True`` adds a third list: for
    every part, the probability its keys received summed over all heads and queries, ``[N]``
    (what the answer attended, for ``explain``). ``softcap``: logits become ``softcap *
    tanh(logits / softcap)`` before the softmax (Gemma 2/3; the fused kernel cannot, so the
    explicit path runs).
    """
    h, c, d = parts[0].q.shape
    if softcap is None and _FLASH_CPU is not None and c >= _FLASH_MIN_QUERIES and parts[0].q.device.type == "cpu":
        out, masses, probs = _flash_joint(parts, scaling, mass_rows, trace)
    else:
        out, masses, probs = _explicit_joint(parts, scaling, mass_rows, trace, softcap)
    return (out, masses, probs) if trace else (out, masses)


def _explicit_joint(parts, scaling, mass_rows, trace=False, softcap=None):
    """Logits materialised: the decode path (c small) and the path off CPU.

    Every part's logits are written into one ``[Hkv, g*c, N]`` tensor (N: all parts' keys), so the
    softmax's max, exp and sum run once over all of them instead of once per part: at decode on
    CPU the per-op cost, not the arithmetic, is what this path spends (issue 24)."""
    h, c, d = parts[0].q.shape
    hkv = parts[0].k.shape[0]
    g = h // hkv
    live = [p for p in parts if p.k.shape[-2] > 0]
    sizes = [p.k.shape[-2] for p in live]
    dtype = live[0].k.dtype
    lg_all = torch.empty(hkv, g * c, sum(sizes), dtype=torch.float32, device=live[0].k.device)
    logits, at = [], 0
    for p, n in zip(live, sizes):
        q = (p.q * scaling).reshape(hkv, g * c, d)  # scaling q is cheaper than scaling the logits
        lg = lg_all[..., at : at + n]
        at += n
        if lg_all.dtype == dtype:
            torch.matmul(q, p.k.transpose(-1, -2), out=lg)
        else:
            lg.copy_(torch.matmul(q, p.k.transpose(-1, -2)))
        if softcap is not None:
            lg.div_(softcap).tanh_().mul_(softcap)
        mask = p.visible()
        if mask is not None:
            lg.view(hkv, g, c, -1).masked_fill_(~mask, float("-inf"))
        logits.append(lg)
    m = lg_all.amax(dim=-1, keepdim=True)
    lg_all.sub_(m).exp_()  # logits become unnormalised probabilities, in place
    inv = lg_all.sum(dim=-1, keepdim=True).reciprocal_().view(h, c, 1)
    out = None
    for lg, p in zip(logits, live):
        o = torch.matmul(lg.to(p.v.dtype), p.v)
        out = o if out is None else out.add_(o)
    out = out.view(h, c, d) * inv.to(out.dtype)

    def mass(lg):
        probs = lg.view(h, c, -1) * inv
        return (probs if mass_rows is None else probs[:, mass_rows]).sum(dim=1)

    traced = _traces(parts, live, lambda p, lg: (lg.view(h, c, -1) * inv).sum(dim=(0, 1)), logits) if trace else None
    return out, _masses(parts, live, logits, mass), traced


def _flash_joint(parts, scaling, mass_rows, trace=False):
    """CPU path for chunks: one fused flash-attention call per part, merged by log-sum-exp; the
    attention mass is then computed for the ``mass_rows`` only (the full logits are never stored).
    (Splitting a banded part into mask-free causal pieces was measured: the CPU kernel's causal mode
    skips no work at these sizes and the masked call costs ~10% more, so it was not worth it.)"""
    h, c, d = parts[0].q.shape
    live = [p for p in parts if p.k.shape[-2] > 0]
    outs, lses = [], []
    for p in live:
        mask = p.visible()
        bias = None
        if mask is not None:
            bias = torch.zeros(mask.shape, dtype=p.q.dtype, device=p.q.device).masked_fill_(~mask, float("-inf"))
        o, lse = _FLASH_CPU(p.q[None].contiguous(), p.k[None], p.v[None], attn_mask=bias, scale=scaling)
        if mask is not None:  # rows that see no key of this part: the kernel reports lse 0, we need -inf
            lse = lse.masked_fill(~mask.any(dim=-1), float("-inf"))
        outs.append(o[0])
        lses.append(lse[0].float())
    lse_all = torch.logsumexp(torch.stack(lses), dim=0)  # [H, c]
    out = None
    for o, lse in zip(outs, lses):
        w = (lse - lse_all).exp_().unsqueeze(-1).to(o.dtype)
        out = o * w if out is None else out.add_(o * w)

    hkv = parts[0].k.shape[0]

    def mass(p, mass_rows=mass_rows):
        rows = slice(None) if mass_rows is None else mass_rows
        q = (p.q[:, rows] * scaling).reshape(hkv, -1, d)
        lg = torch.matmul(q, p.k.transpose(-1, -2)).float().view(h, -1, p.k.shape[-2])
        mask = p.visible(mass_rows)
        if mask is not None:
            lg.masked_fill_(~mask, float("-inf"))
        return lg.sub_(lse_all[:, rows].unsqueeze(-1)).exp_().sum(dim=1)

    traced = _traces(parts, live, lambda p, _: mass(p, None).sum(dim=0), live) if trace else None
    return out, _masses(parts, live, live, mass), traced


def _traces(parts, live, fn, per_live) -> list[torch.Tensor]:
    got = {id(p): fn(p, x) for p, x in zip(live, per_live)}
    return [got.get(id(p), p.k.new_zeros(p.k.shape[-2], dtype=torch.float32)) for p in parts]


def _masses(parts, live, per_live, mass_fn):
    h = parts[0].q.shape[0]
    got = {id(p): mass_fn(x) for p, x in zip(live, per_live) if p.want_mass}
    return [got.get(id(p), p.k.new_zeros(h, 0, dtype=torch.float32)) if p.want_mass else None for p in parts]


def representative_keys(k: torch.Tensor, mass: torch.Tensor, repr_topk: int) -> torch.Tensor:
    """One representative key per row of ``mass`` for a block: the mean of its ``repr_topk`` keys
    that received the most attention mass while in the local window (InfLLM's code; the paper
    states raw dot products, the code uses mass). A row per query head is InfLLM's; a row per KV
    head (its group's mass summed, :func:`group_sum`) gives one key per KV head.

    ``k [Hkv, n, D]`` unrotated keys, ``mass [R, n]`` (R = H or Hkv) -> ``[R, D]``.

    Example (two query heads share one KV head; each prefers another token, together the second):
        >>> k, mass = torch.tensor([[[1.0], [2.0], [4.0]]]), torch.tensor([[0.5, 0.4, 0.0], [0.0, 0.4, 0.5]])
        >>> representative_keys(k, mass, 1).tolist(), representative_keys(k, group_sum(mass, 1), 1).tolist()
        ([[1.0], [4.0]], [[2.0]])
    """
    k = k.repeat_interleave(mass.shape[0] // k.shape[0], dim=0)  # one per row of mass
    top = mass.topk(repr_topk, dim=-1).indices  # [R, r]
    picked = torch.gather(k, 1, top.unsqueeze(-1).expand(-1, -1, k.shape[-1]))
    return picked.mean(dim=1)


def group_sum(x: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Rows of ``x [H, ...]`` summed within each of ``n_groups`` consecutive groups (the query heads
    that share a KV head): ``[n_groups, ...]``.

        >>> group_sum(torch.arange(6.0).reshape(6, 1), 2).flatten().tolist()
        [3.0, 12.0]
    """
    return x.reshape(n_groups, -1, *x.shape[1:]).sum(dim=1)


def block_relevance(q_mean: torch.Tensor, reprs: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """Relevance of each block to a chunk: mean query · representative key, summed over heads.

    ``q_mean [H, D]``, ``reprs [n_blocks, R, D]`` -> ``[n_blocks]``; with one key per KV head
    (``R = Hkv``) each query head scores its group's key.

    ``normalize=False`` is InfLLM's rule. With ``normalize=True`` each head's scores are first
    standardised over the blocks (z-scores), so every head casts an equal vote: on SmolLM2-135M a
    few heads whose scores vary 10x more than the others' (and not with content) otherwise
    outvote the heads that recognise the needle's block (docs/BENCHMARKS.md, section 2).

    Example:
        >>> q, reprs = torch.ones(2, 4), torch.ones(3, 2, 4)
        >>> block_relevance(q, reprs).tolist(), block_relevance(q, reprs[:, :1]).tolist()
        ([8.0, 8.0, 8.0], [8.0, 8.0, 8.0])
    """
    reprs = reprs.repeat_interleave(q_mean.shape[0] // reprs.shape[1], dim=1)
    per_head = torch.einsum("hd,bhd->bh", q_mean.float(), reprs.float())
    if normalize:
        std, mean = torch.std_mean(per_head, dim=0, correction=0)
        per_head = (per_head - mean) / (std + 1e-6)
    return per_head.sum(dim=-1)


def maxsim_relevance(q: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Late-interaction relevance of spans to a query (as ColBERT's MaxSim, on the model's own
    attention keys): each query token's best-matching key in the span, averaged over the query's
    tokens, summed over heads.

    ``q [H, T, D]``, ``keys [S, H, n, D]`` (per query head), ``valid [S, n]`` (padding is False)
    -> ``[S]``.
    """
    sim = torch.einsum("htd,shnd->shtn", q.float(), keys.float())
    sim.masked_fill_(~valid[:, None, None, :], float("-inf"))
    return sim.amax(dim=-1).mean(dim=-1).sum(dim=-1)
