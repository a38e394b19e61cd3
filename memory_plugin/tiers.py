"""Where a block's KV lives, one object per tier, composed by :class:`~memory_plugin.blocks.BlockStore`:

* :class:`LayerBlocks`: one layer's blocks (as ``transformers`` keeps one cache object per layer):
  encoded KV in RAM, representative keys and their running moments (:class:`ReprMoments`), its
  accelerator cache and its last gathered selection;
* :class:`RamTier`: the bytes of encoded KV in RAM against a budget, and which of them may be
  evicted (those already on disk, least recently used first);
* :class:`DeviceLRU`: a fixed number of decoded blocks per layer on the accelerator;
* :class:`ColdBlocks`: blocks whose KV was dropped for memory vectors, and how they come back.
  (The disk tier, :class:`~memory_plugin.shards.ShardSet`, is in :mod:`~memory_plugin.shards`.)

Every tier indexed by block id answers ``truncate(n)`` (a rollback forgets blocks ``n`` and later)
and ``nbytes()``.

Shapes: a block's KV is ``[2, Hkv, block_size, D]``, encoded as a dict of tensors by the KV codec
(:mod:`~memory_plugin.policies`); representative keys are ``[n_blocks, R, D]``, one per query
head (R = H) or per KV head (R = Hkv, ``MemoryConfig.repr_heads``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from .policies import COLD_MODES


def _size(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _nbytes(enc: dict[str, torch.Tensor]) -> int:
    return sum(_size(t) for t in enc.values())


class DeviceLRU:
    """Fixed-size cache of blocks on the accelerator for one layer (InfLLM's GPU cache)."""

    def __init__(self, capacity: int, block_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self.data = torch.empty(capacity, *block_shape, dtype=dtype, device=device)
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # block id -> slot, least recent first
        self.free = list(range(capacity - 1, -1, -1))
        self.hits = 0
        self.misses = 0

    def slots(self, ids: list[int], load) -> list[int]:
        """Slots of blocks ``ids``, copying in (``load(b)``) those not cached over the least recently
        used others."""
        wanted = set(ids)
        out = []
        for b in ids:
            if b in self.slot_of:
                self.slot_of.move_to_end(b)
                self.hits += 1
            else:
                if not self.free:
                    victim = next(v for v in self.slot_of if v not in wanted)
                    self.free.append(self.slot_of.pop(victim))
                slot = self.free.pop()
                self.data[slot].copy_(load(b), non_blocking=True)
                self.slot_of[b] = slot
                self.misses += 1
            out.append(self.slot_of[b])
        return out

    def discard(self, b: int) -> None:
        if b in self.slot_of:
            self.free.append(self.slot_of.pop(b))

    def truncate(self, n: int) -> None:
        """Drop cached blocks with id >= n (they were rolled back)."""
        for b in [b for b in self.slot_of if b >= n]:
            self.free.append(self.slot_of.pop(b))

    def nbytes(self) -> int:
        return _size(self.data)


class ReprMoments:
    """Running first and second moments of one layer's representative keys, per head: what the
    spread of every block's score against a query needs without reading the blocks (``std``).

    Kept in float64 on the CPU about a shift ``c`` (the mean when last recomputed, else the first
    key added), so the covariance does not cancel: ``count``, ``total = sum(r - c) [H, D]``,
    ``outer = sum((r - c)(r - c)^T) [H, D, D]``. Added to on append, subtracted from on truncate,
    recomputed when the keys are replaced.

    Example:
        >>> reprs, q = torch.randn(50, 2, 4), torch.randn(2, 4)
        >>> m = ReprMoments(2, 4)
        >>> m.add(reprs[:30]); m.add(reprs[30:]); m.remove(reprs[40:])
        >>> s = torch.einsum("hd,bhd->bh", q, reprs[:40]).std(dim=0, correction=0)
        >>> torch.allclose(m.std(q), s, rtol=1e-4)
        True
    """

    def __init__(self, n_heads: int, head_dim: int):
        self.shift: torch.Tensor | None = None
        self.count = 0
        self.total = torch.zeros(n_heads, head_dim, dtype=torch.float64)
        self.outer = torch.zeros(n_heads, head_dim, head_dim, dtype=torch.float64)
        self._cov: torch.Tensor | None = None  # [H, D, D] float32 on the keys' device, from the sums

    def reset(self, reprs: torch.Tensor) -> None:
        """The moments of ``reprs [n, H, D]`` alone."""
        self.shift = reprs.detach().to("cpu", torch.float64).mean(dim=0) if len(reprs) else None
        self.count = 0
        self.total.zero_()
        self.outer.zero_()
        self.add(reprs)

    def add(self, reprs: torch.Tensor, sign: int = 1) -> None:
        """Count keys ``reprs [k, H, D]`` in (``sign`` -1: out again)."""
        if not len(reprs):
            return
        r = reprs.detach().to("cpu", torch.float64)
        if self.shift is None:
            self.shift = r[0].clone()
        r = r - self.shift
        self.count += sign * len(r)
        self.total += sign * r.sum(dim=0)
        self.outer.baddbmm_(r.permute(1, 2, 0), r.permute(1, 0, 2), alpha=sign)  # += sign * sum_b r_b r_b^T
        self._cov = None

    def remove(self, reprs: torch.Tensor) -> None:
        self.add(reprs, sign=-1)

    def std(self, q: torch.Tensor) -> torch.Tensor:
        """Population standard deviation over the counted keys of each head's score ``q_h . r_bh``:
        ``q [H, D]`` -> ``[H]`` (float32), from the covariance alone (0 when nothing is counted).
        With keys per KV head (fewer heads than ``q``), each query head's score is against its
        group's key."""
        if self.count == 0:
            return torch.zeros(q.shape[0], device=q.device)
        if self._cov is None or self._cov.device != q.device:
            mean = self.total / self.count
            cov = self.outer / self.count - mean[:, :, None] * mean[:, None, :]
            self._cov = cov.to(q.device, torch.float32)
        qf = q.float()
        cov = self._cov.repeat_interleave(len(qf) // len(self._cov), dim=0) if len(qf) != len(self._cov) else self._cov
        var = ((cov * qf[:, None, :]).sum(dim=-1) * qf).sum(dim=-1)  # q_h^T cov_h q_h (bmm is slower here)
        return var.clamp_min(0).sqrt()


REPR_CHUNK = 256
"""Blocks a compact :class:`ReprTable` decodes at a time when it scans: 0.6 MB of float32 for
SmolLM2 (9 heads of 64), which stays in cache; one thread took 4.9 ms to scan 8,192 blocks in
chunks of 256 against 3.7 ms for the same keys held in float32 (and 6.5-10 ms in chunks of 512 and
more, when each chunk leaves the cache)."""


class ReprTable:
    """One layer's representative keys ``[n, H, D]``, held as ``encode`` gives them (a dict of
    tensors, the block first) and read through ``decode``; grown by doubling, so appends stay cheap
    and a scan reads one buffer per field.

    The store keeps them either decoded (one float tensor: one product scans them), or as the
    codec stores them on disk (int8 ones in :class:`Int8ReprTable`). The values decode exactly to
    what the float table holds, so either ranks blocks alike.

    Example:
        >>> t = ReprTable(lambda r: {"repr": (r * 2).round()}, lambda e, out=None: e["repr"] / 2, torch.zeros(0, 2, 3))
        >>> t.append(t.encode(torch.tensor([[[1.0, 0.2, 0.0], [0.0, 0.0, 1.0]]]))); len(t)
        1
        >>> t.decoded().tolist(), t.scores(torch.ones(6)).tolist()
        ([[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]], [2.0])
    """

    AXIS = 0
    """The axis of the blocks in the held tensors (an encoded field is ``[n, H, ...]``)."""

    def __init__(self, encode: Callable[[torch.Tensor], dict], decode: Callable[..., torch.Tensor], empty: torch.Tensor):
        """``decode(enc, out=None)`` may decode into ``out``, a float32 ``[k, H, D]`` buffer."""
        self.encode, self.decode = encode, decode
        self._data: dict[str, torch.Tensor] = {}
        self.n = 0
        self.set(encode(empty))
        self._chunk: torch.Tensor | None = None  # the chunked scan's buffer, made on first use

    def __len__(self) -> int:
        return self.n

    def _rows(self, t: torch.Tensor, first: int, last: int) -> torch.Tensor:
        return t.narrow(self.AXIS, first, last - first)

    def _held(self, t: torch.Tensor, cap: int) -> torch.Tensor:
        """An empty held tensor for ``cap`` blocks of field ``t`` (given block first)."""
        shape = list(t.shape[1:])
        shape.insert(self.AXIS, cap)
        return t.new_empty(shape)

    def set(self, enc: dict[str, torch.Tensor]) -> None:
        """Hold ``enc`` alone (a load)."""
        self.n = len(next(iter(enc.values())))
        self._data = {k: self._held(t, max(16, self.n)) for k, t in enc.items()}
        self._fill(enc, 0)

    def _fill(self, enc: dict[str, torch.Tensor], first: int) -> None:
        k = len(next(iter(enc.values())))
        for name, t in enc.items():
            self._rows(self._data[name], first, first + k).copy_(t.movedim(0, self.AXIS))

    def append(self, enc: dict[str, torch.Tensor]) -> None:
        """Add the keys of ``k`` blocks, encoded: ``{field: [k, ...]}``."""
        k = len(next(iter(enc.values())))
        cap = next(iter(self._data.values())).shape[self.AXIS]
        if self.n + k > cap:
            grow = max(2 * cap, self.n + k)
            for name, t in self._data.items():
                grown = self._held(t.movedim(self.AXIS, 0), grow)
                self._rows(grown, 0, self.n).copy_(self._rows(t, 0, self.n))
                self._data[name] = grown
        self._fill(enc, self.n)
        self.n += k

    def truncate(self, n: int) -> None:
        self.n = min(self.n, n)

    def encoded(self, first: int = 0, last: int | None = None) -> dict[str, torch.Tensor]:
        """Blocks ``[first, last)`` as held (views, block first)."""
        last = self.n if last is None else min(last, self.n)
        return {k: self._rows(t, first, last).movedim(self.AXIS, 0) for k, t in self._data.items()}

    def decoded(self, first: int = 0, last: int | None = None) -> torch.Tensor:
        """Blocks ``[first, last)`` decoded: ``[k, H, D]``."""
        return self.decode(self.encoded(first, last))

    def top(self, q: torch.Tensor, k: int) -> list[int]:
        """Ids (ascending) of the ``k < n`` blocks whose flattened keys have the largest dot
        product with ``q [H * D]`` (float32)."""
        return sorted(self.scores(q).topk(k).indices.tolist())

    def scores(self, q: torch.Tensor) -> torch.Tensor:
        """Each block's flattened keys dotted with ``q [H * D]`` (float32): ``[n]`` float32, a chunk
        of :data:`REPR_CHUNK` blocks decoded at a time (one product when held decoded)."""
        if self.n <= REPR_CHUNK or self._held_decoded():
            return torch.mv(self.decoded().reshape(self.n, -1).float(), q)
        if self._chunk is None or len(self._chunk) != REPR_CHUNK:
            # One buffer, reused: a fresh one per chunk is its own mapping under a budget's
            # allocator setting, and page faults then took most of a 1M turn (BENCHMARKS.md).
            self._chunk = torch.empty(REPR_CHUNK, *self.encoded(0, 0)["repr"].shape[1:], device=q.device)
        out = torch.empty(self.n, device=q.device)
        for i in range(0, self.n, REPR_CHUNK):
            j = min(self.n, i + REPR_CHUNK)
            keys = self.decode(self.encoded(i, j), out=self._chunk[: j - i])
            torch.mv(keys.reshape(j - i, -1).float(), q, out=out[i:j])
        return out

    def _held_decoded(self) -> bool:
        return len(self._data) == 1 and self._data["repr"].is_floating_point()

    def nbytes(self) -> int:
        """Bytes of the blocks held (the doubling's spare rows are not touched, so not resident)."""
        held = sum(_size(self._rows(t, 0, self.n)) for t in self._data.values())
        return held + (_size(self._chunk) if self._chunk is not None else 0)


BF16_UNIT = 2.0**-8
"""bf16's unit roundoff (8 significant bits): a value rounded to bf16 is within this fraction of it."""


FAST_SCAN_MIN_BLOCKS = 512
"""Below this many blocks an int8 table is scanned a decoded chunk at a time: the bf16 kernel's
~20 small operations per scan (nine heads, the bound, the candidates) cost about what they save.
One thread, 30 layers' tables of random keys scanned in turn, ms per scan (kernel / decoded
chunks / a float32 table): 0.30 / 0.23 / 0.17 at 494 blocks, 0.34 / 0.40 / 0.27 at 1,024, 0.44 /
0.66 / 0.50 at 2,030, 0.83 / 2.30 / 1.79 at 8,174 (``benchmarks/scan_cost.py tables``)."""


class Int8ReprTable(ReprTable):
    """Representative keys as the int8 codec stores them (int8, a float16 scale per block and
    head: a quarter of float32's bytes), held head-major (``[H, n, D]``), so that each head's keys
    are one contiguous int8 matrix and a scan is one int8 x bf16 product per head
    (``torch._weight_int8pack_mm``, the kernel of weight-only int8 linear layers).

    Selection stays exact: each block's bf16 score comes with a bound on its distance from the
    float32 one (:meth:`approximate`); every block whose upper bound reaches the ``k``-th largest
    lower bound is a candidate, and the candidates are scored again in float32 from their decoded
    keys. A block of the true top ``k`` is always a candidate, so the result is the float32
    table's. At 1M tokens (8,174 blocks of SmolLM2) one layer's scan reads 4.8 MB instead of 18.8
    (docs/BENCHMARKS.md, issue 24). Where the kernel is missing (an older torch, another device, a
    head width it does not take) it scans as :class:`ReprTable`, a chunk of keys decoded at a time.

    Example:
        >>> from memory_plugin.policies import Int8PerChannel
        >>> codec = Int8PerChannel()
        >>> t = Int8ReprTable(codec.encode_reprs, lambda e, out=None: codec.decode_reprs(e, torch.float32, out), torch.zeros(0, 2, 16))
        >>> t.append(codec.encode_reprs(torch.arange(6.0).reshape(6, 1, 1).expand(6, 2, 16) - 2))  # block b: keys all b - 2
        >>> t.top(torch.ones(32), 2), t.top(-torch.ones(32), 2)
        ([4, 5], [0, 1])
    """

    AXIS = 1

    def __init__(self, encode: Callable[[torch.Tensor], dict], decode: Callable[..., torch.Tensor], empty: torch.Tensor):
        self.fast = empty.device.type == "cpu" and _int8_kernel(empty.shape[-1])
        # Kept beside the keys while scans are fast: the scales in float32 [H, capacity] and
        # scale_bh * ||r_bh|| [capacity, H] (the query's rounding error is bounded with them).
        self._scale: torch.Tensor | None = None
        self._norms: torch.Tensor | None = None
        self._y: torch.Tensor | None = None
        # (n, per-head int8 keys as views, the kernel's scales: ones, the real ones come after),
        # until n changes
        self._heads: tuple[int, list, torch.Tensor] | None = None
        self._picked: torch.Tensor | None = None  # the candidates' int8 keys, a chunk at a time
        super().__init__(encode, decode, empty)

    def set(self, enc: dict[str, torch.Tensor]) -> None:
        super().set(enc)
        self._scale = self._norms = None
        self._derive(0)

    def append(self, enc: dict[str, torch.Tensor]) -> None:
        n = self.n
        super().append(enc)
        self._derive(n)

    def _derive(self, first: int) -> None:
        """The scan's side data of blocks ``[first, n)``, grown with the keys."""
        self._heads = None
        if not self.fast:
            return
        r, s = self._data["repr"], self._data["repr_scale"][..., 0]  # [H, cap, D], [H, cap]
        if self._scale is None or self._scale.shape[1] != s.shape[1]:
            scale, norms = torch.empty(s.shape), torch.empty(s.shape[::-1])
            if self._scale is not None:
                scale[:, :first], norms[:first] = self._scale[:, :first], self._norms[:first]
            self._scale, self._norms = scale, norms
            self._y = torch.empty(s.shape)  # a scan's per-head scores, reused
        self._scale[:, first : self.n] = s[:, first : self.n]
        self._norms[first : self.n] = (r[:, first : self.n].float().norm(dim=-1) * self._scale[:, first : self.n]).T

    def truncate(self, n: int) -> None:
        super().truncate(n)
        self._heads = None

    def top(self, q: torch.Tensor, k: int) -> list[int]:
        if not self.fast or self.n < FAST_SCAN_MIN_BLOCKS:
            return super().top(q, k)
        approx, margin = self.approximate(q)
        floor = (approx - margin).topk(k).values[-1]
        cand = torch.nonzero(approx.add_(margin) >= floor).flatten()
        return sorted(cand[self._rescore(cand, q).topk(k).indices].tolist())

    def approximate(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every block's score against ``q [H * D]`` from the bf16 kernel, and a bound on its
        distance from the float32 score: two ``[n]`` float32 (only where :attr:`fast`).

        Per head the kernel computes ``y = round_bf16(q'_h . r_bh)`` for the int8 keys ``r_bh``
        and the query rounded to bf16, ``q'_h`` (float32 accumulation), so the score
        ``s_bh * y`` is off by at most ``s_bh * (|y| * 2u + ||q'_h - q_h|| * ||r_bh|| +
        2**-16 * ||q_h|| * ||r_bh||)``: the result's rounding (u = 2**-8, doubled to cover the
        float32 steps), the query's actual rounding error (Cauchy-Schwarz) and the float32
        accumulation of D products. The scales multiply in float32 after the kernel (it is
        given ones), so they add no rounding."""
        n = self.n
        if self._heads is None or self._heads[0] != n:
            keys = [self._data["repr"][i, :n] for i in range(self._data["repr"].shape[0])]
            self._heads = (n, keys, torch.ones(n, dtype=torch.bfloat16))
        _, keys, ones = self._heads
        qh = q.reshape(len(keys), -1)
        qb = qh.to(torch.bfloat16)
        y = self._y[:, :n]  # [H, n]: each head's score
        for i in range(len(keys)):
            y[i] = torch._weight_int8pack_mm(qb[i : i + 1], keys[i], ones)[0]
        scores = y.mul_(self._scale[:, :n]).sum(dim=0)
        off = (qb.float() - qh).norm(dim=-1) + 2.0**-16 * qh.norm(dim=-1)  # [H]
        margin = torch.mv(self._norms[:n], off).add_(y.abs_().sum(dim=0), alpha=2 * BF16_UNIT)
        return scores, margin

    def _rescore(self, ids: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """The float32 scores of blocks ``ids`` (a few percent of them: tens to hundreds), decoded
        :data:`REPR_CHUNK` at a time into reused buffers (as :meth:`ReprTable.scores`)."""
        keys, scales = self._data["repr"].movedim(1, 0), self._data["repr_scale"].movedim(1, 0)  # block first
        if self._picked is None:
            self._chunk = torch.empty(REPR_CHUNK, *keys.shape[1:])
            self._picked = torch.empty(REPR_CHUNK, *keys.shape[1:], dtype=keys.dtype)
        out = torch.empty(len(ids))
        for i in range(0, len(ids), REPR_CHUNK):
            part = ids[i : i + REPR_CHUNK]
            m = len(part)
            picked = torch.index_select(keys, 0, part, out=self._picked[:m])
            dec = self.decode({"repr": picked, "repr_scale": scales[part]}, out=self._chunk[:m])
            torch.mv(dec.reshape(m, -1), q, out=out[i : i + m])
        return out

    def nbytes(self) -> int:
        side = [self._scale[:, : self.n], self._norms[: self.n], self._y[:, : self.n], self._picked] if self.fast else []
        return super().nbytes() + sum(_size(t) for t in side if t is not None)


_INT8_KERNEL: bool | None = None


def _int8_kernel(head_dim: int) -> bool:
    """Whether this torch has a CPU int8 x bf16 product (``_weight_int8pack_mm``, torch 2.3+) for
    keys of ``head_dim``, checked once on a small case. Only for multiples of 16 (64 and 128 in the
    models served): with torch 2.13 other widths gave NaN (40) or crashed the process (4, 8 and
    24, for some row counts), while every multiple of 16 up to 256 matched the float32 product
    within the bound for every row count tried (1-69, 255-257, 1,000, 4,097)."""
    global _INT8_KERNEL
    if head_dim % 16:
        return False
    if _INT8_KERNEL is None:
        try:
            a, b = torch.ones(1, 16, dtype=torch.bfloat16), torch.ones(3, 16, dtype=torch.int8)
            out = torch._weight_int8pack_mm(a, b, torch.ones(3, dtype=torch.bfloat16))
            _INT8_KERNEL = out.shape == (1, 3) and bool((out == 16).all())
        except (AttributeError, RuntimeError, NotImplementedError):
            _INT8_KERNEL = False
    return _INT8_KERNEL


class LayerBlocks:
    """Blocks of one layer: encoded KV per block (None while only on disk, or cold), their
    representative keys (a :class:`ReprTable`) and running moments (:class:`ReprMoments`, so a
    query's per-head score spread costs no pass over the blocks), the layer's accelerator cache
    (None on CPU), and its last gathered selection ``(ids, kv [2, Hkv, n, D])``: consecutive decode
    steps mostly pick the same blocks."""

    def __init__(self, n_heads: int, head_dim: int, reprs: ReprTable):
        self.kv: list[dict | None] = []
        self.table = reprs
        self.moments = ReprMoments(n_heads, head_dim)
        self.cache: DeviceLRU | None = None
        self.last: tuple[tuple[int, ...], torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.kv)

    @property
    def reprs(self) -> torch.Tensor:
        """Every block's representative keys decoded, ``[n, H, D]`` (a copy when held compact)."""
        return self.table.decoded(0, len(self.kv))

    def set_reprs(self, reprs: torch.Tensor | dict[str, torch.Tensor]) -> None:
        """Replace the representative keys wholesale (a load): decoded ``[n, H, D]``, or encoded as
        the table holds them."""
        self.table.set(reprs if isinstance(reprs, dict) else self.table.encode(reprs))
        self.moments.reset(self.table.decoded())

    def append(self, enc: dict, repr_key: torch.Tensor) -> None:
        """Add a block: its encoded KV and its representative key ``[H, D]`` (encoded as the table
        holds keys; the moments count the key as held)."""
        n = len(self.kv)
        self.table.truncate(n)
        self.table.append(self.table.encode(repr_key[None]))
        self.moments.add(self.table.decoded(n, n + 1))
        self.kv.append(enc)

    def score_std(self, q: torch.Tensor) -> torch.Tensor:
        """Per head, the population standard deviation over this layer's blocks of ``q_h . r_bh``:
        ``q [H, D]`` -> ``[H]``, as ``block_relevance``'s z-scoring computes it from every score."""
        if self.moments.count != len(self.kv):  # the block list was replaced wholesale: count again
            self.moments.reset(self.reprs)
        return self.moments.std(q)

    def drop(self, b: int) -> None:
        """Block ``b``'s KV is gone (archived, or back to memory vectors): from RAM, the cache and
        the last selection; its representative key stays."""
        self.kv[b] = None
        if self.cache is not None:
            self.cache.discard(b)
        if self.last is not None and b in self.last[0]:
            self.last = None

    def truncate(self, n: int) -> None:
        if n < len(self.kv) and self.moments.count == len(self.kv):
            self.moments.remove(self.table.decoded(n, len(self.kv)))
        del self.kv[n:]
        self.table.truncate(n)
        if self.cache is not None:
            self.cache.truncate(n)
        if self.last is not None and any(b >= n for b in self.last[0]):
            self.last = None

    def nbytes(self) -> int:
        """Bytes of the last gathered selection (a copy of its blocks; reprs are counted apart)."""
        return _size(self.last[1]) if self.last is not None else 0


class RamTier:
    """Bytes of encoded block KV held in RAM (in the layers' ``kv`` lists) against a budget: bytes,
    a callable returning them (the memory's share changes as its reprs grow), or None (no limit).
    Blocks also on disk are "clean", kept in an LRU: only they may be evicted, since a block held
    only in RAM would be lost. Blocks are keyed ``(layer, block)``."""

    def __init__(self, budget: int | Callable[[], int] | None = None):
        self.budget = budget
        self.resident = 0
        self.clean: OrderedDict[tuple[int, int], int] = OrderedDict()  # least recently used first

    def limit(self) -> int | None:
        return self.budget() if callable(self.budget) else self.budget

    def hold(self, key: tuple[int, int], enc: dict, *, clean: bool = False) -> None:
        """Count a block now in RAM; ``clean``: read back from disk, so evictable at once."""
        self.resident += _nbytes(enc)
        if clean:
            self.clean[key] = _nbytes(enc)

    def mark_clean(self, key: tuple[int, int], enc: dict) -> None:
        """A block held in RAM was written to disk: from now on it may be evicted."""
        self.clean[key] = _nbytes(enc)

    def touch(self, key: tuple[int, int]) -> None:
        if key in self.clean:
            self.clean.move_to_end(key)

    def release(self, key: tuple[int, int], enc: dict | None) -> None:
        """Stop counting a block whose KV ``enc`` (None: not in RAM) leaves RAM."""
        self.clean.pop(key, None)
        if enc is not None:
            self.resident -= _nbytes(enc)

    def evict(self, budget: int) -> list[tuple[int, int]]:
        """Clean blocks to drop from RAM, least recently used first, until under ``budget``."""
        out = []
        while self.resident > budget and self.clean:
            key, nb = self.clean.popitem(last=False)
            self.resident -= nb
            out.append(key)
        return out

    def nbytes(self) -> int:
        return self.resident


@dataclass
class ColdBlock:
    """A block whose KV was dropped: the memory vectors that reproduce its tokens (None in
    ``recompute`` mode: its token ids are enough), and (gist mode) the KV of those vectors per
    layer, ``[2, Hkv, n_vectors, D]``."""

    vectors: object = None  # memory_plugin.vectors.MemoryVectors
    gist: list[torch.Tensor] | None = None


class ColdBlocks(Mapping[int, ColdBlock]):
    """The cold tier: block id -> :class:`ColdBlock`, and what a selected one gives attention
    (``mode``, from :data:`~memory_plugin.policies.COLD_MODES`). Rehydrated KV (``rehydrate(b)`` ->
    per-layer ``[2, Hkv, block_size, D]``, set by :meth:`connect`) is kept for the
    ``max_rehydrated`` most recently used blocks; older ones go back to vectors only."""

    def __init__(self):
        self.blocks: dict[int, ColdBlock] = {}
        self.mode = COLD_MODES["rehydrate"]
        self.rehydrate: Callable[[int], list[torch.Tensor]] | None = None
        self.max_rehydrated = 32
        self.rehydrated: OrderedDict[int, None] = OrderedDict()  # least recently used first

    def connect(self, mode: str, rehydrate: Callable[[int], list[torch.Tensor]], max_rehydrated: int) -> None:
        self.mode, self.rehydrate, self.max_rehydrated = COLD_MODES[mode], rehydrate, max_rehydrated

    def __getitem__(self, b: int) -> ColdBlock:
        return self.blocks[b]

    def __contains__(self, b: object) -> bool:  # on every selected block: no KeyError round trip
        return b in self.blocks

    def __iter__(self) -> Iterator[int]:
        return iter(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def add(self, b: int, cold: ColdBlock) -> None:
        self.blocks[b] = cold
        self.rehydrated.pop(b, None)

    def touch(self, b: int) -> None:
        if b in self.rehydrated:
            self.rehydrated.move_to_end(b)

    def came_back(self, b: int) -> list[int]:
        """Block ``b`` was rehydrated; returns the blocks that now go back to vectors only."""
        self.rehydrated[b] = None
        out = []
        while len(self.rehydrated) > self.max_rehydrated:
            out.append(self.rehydrated.popitem(last=False)[0])
        return out

    def truncate(self, n: int) -> None:
        for b in [b for b in self.blocks if b >= n]:
            del self.blocks[b]
            self.rehydrated.pop(b, None)

    def nbytes(self) -> int:
        return sum(
            (_size(c.vectors.tensor) if c.vectors is not None else 0) + sum(_size(g) for g in c.gist or [])
            for c in self.blocks.values()
        )
