"""Storage of memory blocks: their KV in host memory, their representative keys, and an LRU
cache of blocks on the accelerator when the model runs on one.

Blocks are formed in every layer at the same token boundaries, so block ``b`` always covers
tokens ``[n_init + b * block_size, n_init + (b + 1) * block_size)`` of the history.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from .attention import block_relevance


class _LayerBlocks:
    """Blocks of one layer: KV per block ``[2, Hkv, block_size, D]`` on the host, reprs ``[n, H, D]``."""

    def __init__(self, n_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.kv: list[torch.Tensor] = []
        self._repr = torch.empty(16, n_heads, head_dim, dtype=dtype, device=device)

    def __len__(self) -> int:
        return len(self.kv)

    @property
    def reprs(self) -> torch.Tensor:
        return self._repr[: len(self.kv)]

    def append(self, kv: torch.Tensor, repr_key: torch.Tensor) -> None:
        n = len(self.kv)
        if n == self._repr.shape[0]:  # grow by doubling: reprs stay one tensor for a fast top-k
            grown = self._repr.new_empty(2 * n, *self._repr.shape[1:])
            grown[:n] = self._repr
            self._repr = grown
        self._repr[n] = repr_key
        self.kv.append(kv)

    def truncate(self, n: int) -> None:
        del self.kv[n:]


class _DeviceLRU:
    """Fixed-size cache of blocks on the accelerator for one layer (InfLLM's GPU cache)."""

    def __init__(self, capacity: int, block_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self.data = torch.empty(capacity, *block_shape, dtype=dtype, device=device)
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # block id -> slot, least recent first
        self.free = list(range(capacity - 1, -1, -1))
        self.hits = 0
        self.misses = 0

    def slots(self, ids: list[int], host: list[torch.Tensor]) -> list[int]:
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
                self.data[slot].copy_(host[b], non_blocking=True)
                self.slot_of[b] = slot
                self.misses += 1
            out.append(self.slot_of[b])
        return out

    def forget_from(self, n: int) -> None:
        """Drop cached blocks with id >= n (they were rolled back)."""
        for b in [b for b in self.slot_of if b >= n]:
            self.free.append(self.slot_of.pop(b))


class BlockStore:
    """KV blocks of every layer.

    Args:
        n_layers, n_heads, n_kv_heads, head_dim, block_size: model and memory geometry.
        dtype: storage dtype of K/V (the model's).
        compute_device: where attention runs; reprs live there (they are scanned every step).
        cache_device: an accelerator to keep an LRU of ``max_cached_blocks`` blocks per layer on;
            None keeps blocks only in host memory (CPU inference).

    Example:
        >>> store = BlockStore(2, 4, 2, 8, block_size=16, dtype=torch.float32)
        >>> store.append(0, torch.zeros(2, 2, 16, 8), torch.zeros(4, 8))
        0
    """

    def __init__(
        self,
        n_layers: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        block_size: int,
        dtype: torch.dtype,
        compute_device: torch.device | str = "cpu",
        cache_device: torch.device | str | None = None,
        max_cached_blocks: int = 64,
    ):
        self.block_size = block_size
        self.compute_device = torch.device(compute_device)
        self.cache_device = torch.device(cache_device) if cache_device is not None else None
        self._pin = self.cache_device is not None and self.cache_device.type == "cuda"
        self.layers = [_LayerBlocks(n_heads, head_dim, dtype, self.compute_device) for _ in range(n_layers)]
        shape = (2, n_kv_heads, block_size, head_dim)
        self.caches = (
            [_DeviceLRU(max_cached_blocks, shape, dtype, self.cache_device) for _ in range(n_layers)]
            if self.cache_device is not None
            else None
        )
        # Last gathered selection per layer: consecutive decode steps mostly pick the same blocks.
        self._last: list[tuple[tuple[int, ...], torch.Tensor] | None] = [None] * n_layers

    def __len__(self) -> int:
        """Number of complete blocks (formed in every layer)."""
        return min(len(layer) for layer in self.layers)

    def append(self, layer: int, kv: torch.Tensor, repr_key: torch.Tensor) -> int:
        """Store one block's ``kv [2, Hkv, block_size, D]`` and representative key ``[H, D]``."""
        host = kv.detach().to("cpu", copy=True).contiguous()
        if self._pin:
            host = host.pin_memory()
        blocks = self.layers[layer]
        blocks.append(host, repr_key.to(self.compute_device))
        return len(blocks) - 1

    def select(self, layer: int, q_mean: torch.Tensor, topk: int) -> list[int]:
        """Ids (ascending) of the ``topk`` blocks most relevant to ``q_mean [H, D]``; all when fewer."""
        n = len(self.layers[layer])
        if n <= topk:
            return list(range(n))
        scores = block_relevance(q_mean, self.layers[layer].reprs)
        return sorted(scores.topk(topk).indices.tolist())

    def fetch(self, layer: int, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of blocks ``ids`` concatenated along tokens: two ``[Hkv, len(ids) * block_size, D]``."""
        key = tuple(ids)
        last = self._last[layer]
        if last is not None and last[0] == key:
            kv = last[1]
        else:
            host = self.layers[layer].kv
            if self.caches is not None:
                cache = self.caches[layer]
                kv = cache.data[cache.slots(ids, host)]
            else:
                kv = torch.stack([host[b] for b in ids])
            kv = kv.to(self.compute_device)  # [n, 2, Hkv, bs, D]
            n, _, hkv, bs, d = kv.shape
            kv = kv.permute(1, 2, 0, 3, 4).reshape(2, hkv, n * bs, d)
            self._last[layer] = (key, kv)
        return kv[0], kv[1]

    def truncate(self, n: int) -> None:
        """Forget blocks ``n`` and later (rollback of a turn that is not remembered)."""
        for i, layer in enumerate(self.layers):
            layer.truncate(n)
            if self.caches is not None:
                self.caches[i].forget_from(n)
            last = self._last[i]
            if last is not None and any(b >= n for b in last[0]):
                self._last[i] = None

    def nbytes(self) -> dict[str, int]:
        """Bytes held: ``host`` (block KV), ``device`` (accelerator cache), ``repr`` (representative keys)."""
        host = sum(t.numel() * t.element_size() for layer in self.layers for t in layer.kv)
        reprs = sum(layer.reprs.numel() * layer.reprs.element_size() for layer in self.layers)
        cache = sum(c.data.numel() * c.data.element_size() for c in self.caches) if self.caches else 0
        return {"host": host, "device": cache, "repr": reprs}
