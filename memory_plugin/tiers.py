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
(:mod:`~memory_plugin.policies`); representative keys are ``[n_blocks, H, D]``.
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
        ``q [H, D]`` -> ``[H]`` (float32), from the covariance alone (0 when nothing is counted)."""
        if self.count == 0:
            return torch.zeros(q.shape[0], device=q.device)
        if self._cov is None or self._cov.device != q.device:
            mean = self.total / self.count
            cov = self.outer / self.count - mean[:, :, None] * mean[:, None, :]
            self._cov = cov.to(q.device, torch.float32)
        qf = q.float()
        var = ((self._cov * qf[:, None, :]).sum(dim=-1) * qf).sum(dim=-1)  # q_h^T cov_h q_h (bmm is slower here)
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

    The store keeps them either decoded (one float tensor: the fastest scan), or, under a RAM
    budget, as the int8 codec stores them on disk: int8 and a float16 scale per head, ~145 MB at
    1M tokens of SmolLM2 where float32 takes 565 MB (docs/BENCHMARKS.md, issue 24 target 4). The
    values decode exactly to what the float table holds, so either ranks blocks alike.

    Example:
        >>> t = ReprTable(lambda r: {"repr": (r * 2).round()}, lambda e, out=None: e["repr"] / 2, torch.zeros(0, 2, 3))
        >>> t.append(t.encode(torch.tensor([[[1.0, 0.2, 0.0], [0.0, 0.0, 1.0]]]))); len(t)
        1
        >>> t.decoded().tolist(), t.scores(torch.ones(6)).tolist()
        ([[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]], [2.0])
    """

    def __init__(self, encode: Callable[[torch.Tensor], dict], decode: Callable[..., torch.Tensor], empty: torch.Tensor):
        """``decode(enc, out=None)`` may decode into ``out``, a float32 ``[k, H, D]`` buffer."""
        self.encode, self.decode = encode, decode
        self._data: dict[str, torch.Tensor] = {}
        self.n = 0
        self.set(encode(empty))
        self._chunk: torch.Tensor | None = None  # the chunked scan's buffer, made on first use

    def __len__(self) -> int:
        return self.n

    def set(self, enc: dict[str, torch.Tensor]) -> None:
        """Hold ``enc`` alone (a load)."""
        self.n = len(next(iter(enc.values())))
        self._data = {k: t.new_empty(max(16, self.n), *t.shape[1:]) for k, t in enc.items()}
        for k, t in enc.items():
            self._data[k][: self.n] = t

    def append(self, enc: dict[str, torch.Tensor]) -> None:
        """Add the keys of ``k`` blocks, encoded: ``{field: [k, ...]}``."""
        k = len(next(iter(enc.values())))
        cap = len(next(iter(self._data.values())))
        if self.n + k > cap:
            grow = max(2 * cap, self.n + k)
            for name, t in self._data.items():
                grown = t.new_empty(grow, *t.shape[1:])
                grown[: self.n] = t[: self.n]
                self._data[name] = grown
        for name, t in enc.items():
            self._data[name][self.n : self.n + k] = t
        self.n += k

    def truncate(self, n: int) -> None:
        self.n = min(self.n, n)

    def encoded(self, first: int = 0, last: int | None = None) -> dict[str, torch.Tensor]:
        """Blocks ``[first, last)`` as held (views)."""
        last = self.n if last is None else min(last, self.n)
        return {k: t[first:last] for k, t in self._data.items()}

    def decoded(self, first: int = 0, last: int | None = None) -> torch.Tensor:
        """Blocks ``[first, last)`` decoded: ``[k, H, D]``."""
        return self.decode(self.encoded(first, last))

    def scores(self, q: torch.Tensor) -> torch.Tensor:
        """Each block's flattened keys dotted with ``q [H * D]`` (float32): ``[n]`` float32, a chunk
        of :data:`REPR_CHUNK` blocks decoded at a time (one product when held decoded)."""
        if self.n <= REPR_CHUNK or self._held_decoded():
            return torch.mv(self.decoded().reshape(self.n, -1).float(), q)
        if self._chunk is None or len(self._chunk) != REPR_CHUNK:
            # One buffer, reused: a fresh one per chunk is its own mapping under a budget's
            # allocator setting, and page faults then took most of a 1M turn (BENCHMARKS.md).
            self._chunk = torch.empty(REPR_CHUNK, *self._data["repr"].shape[1:], device=q.device)
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
        return sum(_size(t[: self.n]) for t in self._data.values()) + (_size(self._chunk) if self._chunk is not None else 0)


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
