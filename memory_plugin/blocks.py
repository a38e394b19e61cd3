"""Storage of memory blocks, by tier, behind one store (:class:`BlockStore`).

Blocks are formed in every layer at the same token boundaries, so block ``b`` always covers
tokens ``[n_init + b * block_size, n_init + (b + 1) * block_size)`` of the history.

A block's KV is in one of three places: RAM (encoded by the KV codec, under an optional budget),
disk (safetensors shards, read back on demand), or nowhere (cold: memory vectors only). Its
representative keys are always in RAM: every step scans them. On an accelerator each layer keeps
an LRU of decoded blocks. The tiers are objects of :mod:`~memory_plugin.tiers` and
:mod:`~memory_plugin.shards`; the variants (codec, cold mode, relevance) are policies of
:mod:`~memory_plugin.policies`. A read takes one path, :meth:`BlockStore.fetch`: the layer's last
selection, else per block the accelerator cache, else RAM, else disk (read back into RAM, where
it may be evicted again); a cold block gives what the cold mode says (its KV rehydrated, its
gist, or nothing).

Shapes: a block's KV is ``[2, Hkv, block_size, D]``, representative keys ``[n_blocks, H, D]``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections.abc import Callable
from pathlib import Path

import torch

# Codec, shard and cold-block names are also imported from here, their home before the split.
from .attention import group_sum
from .policies import KV_CODECS, RELEVANCE, BlockCodec
from .shards import MAX_OPEN_SHARDS, SHARD_BLOCKS, ShardInfo, ShardSet
from .shards import atomic_write, write_safetensors  # noqa: F401  (re-exported)
from .tiers import ColdBlock, ColdBlocks, DeviceLRU, Int8ReprTable, LayerBlocks, RamTier, ReprTable

CODECS = tuple(KV_CODECS)


# ----------------------------------------------------------------------------------------- allocator
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
# 64k tokens opened with a 1 GiB budget, 3 turns (benchmarks/heap.py): peak 544 MiB beyond the model
# and 7.21 CPU s a turn at 1 MiB, 547 MiB and 10.54 s at 64 KB (every working buffer of a step its
# own mapping, page-faulted anew), 1,289 MiB (over the budget) and 5.76 s with glibc's own.
ALLOC_MMAP_THRESHOLD = 1024 * 1024


def return_freed_memory_to_os() -> bool:
    """Make the C allocator give freed block buffers back to the OS (glibc only; returns whether set).

    glibc raises its mmap threshold each time a large buffer is freed, so later large buffers
    come from heap arenas that keep their pages after ``free``: with a RAM budget the process then
    grew by ~420 MB beyond the blocks it held at 8k tokens (BENCHMARKS.md, durable memory), and at
    64k tokens with a 1 GiB budget peaked at 1,289 MiB beyond the model. A fixed threshold
    (``ALLOC_MMAP_THRESHOLD``) keeps every buffer above it in its own mapping, unmapped on free;
    smaller ones are reused from the heap, whose free pages :func:`release_free_memory` returns.
    Process-wide, so it is never a side effect of building a store: :class:`ContextMemory` calls
    it when its config sets a budget; call it yourself for a bare :class:`BlockStore` with one.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, ALLOC_MMAP_THRESHOLD))
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl): nothing to tune
        return False


# Fragments of freed buffers are handed back at most this often, process-wide: malloc_trim walks the
# heap (7-24 ms with a 64k-token memory all in RAM, against a 5.7 CPU s turn there).
TRIM_INTERVAL_S = 1.0
_last_trim = 0.0


def release_free_memory(min_interval_s: float = TRIM_INTERVAL_S) -> bool:
    """Give the pages of freed heap buffers back to the OS (glibc ``malloc_trim``; returns whether
    it ran), at most once per ``min_interval_s`` in the process.

    Without it a process keeps what a load or a turn freed: a 64k-token memory loaded all in RAM
    held 1,118 MiB of anonymous memory for the 931 MiB it accounts for (1.20x), 1,285 MiB for
    1,021 after four turns (1.26x); released, 1,002 and 1,142 MiB (1.08x, 1.12x), with turns no
    slower (``benchmarks/heap.py``, docs/BENCHMARKS.md section 6). Unlike
    :func:`return_freed_memory_to_os` it changes no setting: buffers are reused from the heap
    within a turn, and only what is free at its end is returned.
    The memory calls it after each write and turn, and once a load or open is done.
    """
    global _last_trim
    now = time.monotonic()
    if now - _last_trim < min_interval_s:
        return False
    _last_trim = now
    try:
        return bool(ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0))
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl): nothing to trim
        return False


# ----------------------------------------------------------------------------------------- store
class BlockStore:
    """KV blocks of every layer, by tier.

    Args:
        n_layers, n_heads, n_kv_heads, head_dim, block_size: model and memory geometry.
        repr_heads: representative keys per block: ``n_heads`` (one per query head, InfLLM's; the
            default) or ``n_kv_heads`` (one per KV head, scored by each query head of its group).
        dtype: the dtype attention computes in (the model's).
        compute_device: where attention runs; reprs live there (they are scanned every step).
        cache_device: an accelerator to keep an LRU of ``max_cached_blocks`` blocks per layer on;
            None keeps blocks only in host memory (CPU inference).
        kv_quantization: "none", "bf16" or "int8" storage of block KV.
        spill_dir: directory for block shards; with ``resident_budget`` (bytes of block KV kept in
            RAM, or a callable returning it) older blocks are written there and read back on demand.
            The allocator is the memory's to tune (:func:`return_freed_memory_to_os`), not the store's.

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
        kv_quantization: str = "none",
        spill_dir: Path | None = None,
        resident_budget: int | Callable[[], int] | None = None,
        compact_reprs: bool = False,
        repr_heads: int | None = None,
    ):
        self.block_size, self.n_kv_heads, self.head_dim = block_size, n_kv_heads, head_dim
        self.repr_heads = n_heads if repr_heads is None else repr_heads
        if n_heads % self.repr_heads:
            raise ValueError(f"repr_heads ({self.repr_heads}) must divide n_heads ({n_heads})")
        self.codec = BlockCodec(kv_quantization, dtype)
        self.compute_device = torch.device(compute_device)
        self.cache_device = torch.device(cache_device) if cache_device is not None else None
        self._pin = self.cache_device is not None and self.cache_device.type == "cuda"
        empty = torch.empty(0, self.repr_heads, head_dim, dtype=dtype, device=self.compute_device)
        if compact_reprs and self.codec.kind == "int8":  # as on disk: a quarter of float32's RAM, scanned faster
            table = lambda: Int8ReprTable(self.codec.encode_reprs, self.codec.decode_reprs, empty)  # noqa: E731
        elif compact_reprs:
            table = lambda: ReprTable(self.codec.encode_reprs, self.codec.decode_reprs, empty)  # noqa: E731
        else:  # decoded, rounded as the codec stores them: a memory read back from disk selects alike
            table = lambda: ReprTable(lambda r: {"repr": self.codec.round_reprs(r)}, lambda e, out=None: e["repr"], empty)  # noqa: E731
        self.compact_reprs = compact_reprs
        self.layers = [LayerBlocks(self.repr_heads, head_dim, table()) for _ in range(n_layers)]
        if self.cache_device is not None:  # InfLLM's GPU cache: an LRU of decoded blocks per layer
            shape = (2, n_kv_heads, block_size, head_dim)
            for layer in self.layers:
                layer.cache = DeviceLRU(max_cached_blocks, shape, dtype, self.cache_device)
        self.ram = RamTier(resident_budget)
        # The open-file limit as this module says it at construction (a test lowers it here).
        self.disk = ShardSet(spill_dir, max_open=MAX_OPEN_SHARDS) if spill_dir is not None else None
        self.cold = ColdBlocks()

    def __len__(self) -> int:
        """Number of complete blocks (formed in every layer)."""
        return min(len(layer) for layer in self.layers)

    @property
    def persisted(self) -> int:
        """Blocks ``[0, persisted)`` are on disk."""
        return self.disk.n_blocks if self.disk is not None else 0

    def connect_cold_tier(self, mode: str, rehydrate: Callable[[int], list[torch.Tensor]], max_rehydrated: int) -> None:
        """Say what a selected cold block gives attention (``mode``, a ``MemoryConfig.archive_mode``),
        how its KV is recomputed (``rehydrate(b)`` -> per layer ``[2, Hkv, block_size, D]``), and
        for how many blocks at most rehydrated KV is kept."""
        self.cold.connect(mode, rehydrate, max_rehydrated)

    # -------------------------------------------------------------------------------- writing
    def append(self, layer: int, kv: torch.Tensor, repr_key: torch.Tensor) -> int:
        """Store one block's ``kv [2, Hkv, block_size, D]`` and representative key ``[H, D]``."""
        enc = {k: t.detach().to("cpu", copy=True).contiguous() for k, t in self.codec.encode(kv).items()}
        if self._pin:
            enc = {k: t.pin_memory() for k, t in enc.items()}
        blocks = self.layers[layer]
        blocks.append(enc, repr_key.to(self.compute_device))
        self.ram.hold((layer, len(blocks) - 1), enc)
        if layer == len(self.layers) - 1:
            self._enforce_budget()
        return len(blocks) - 1

    def flush(self) -> list[ShardInfo]:
        """Write blocks not yet on disk to new shards (they stay in RAM, now evictable). At most
        ``SHARD_BLOCKS`` blocks per shard: serialising copies a shard, and that copy must stay small
        against a RAM budget however many blocks are waiting."""
        n = len(self)
        written = []
        while self.disk is not None and self.persisted < n:
            first, last = self.persisted, min(n, self.persisted + SHARD_BLOCKS)
            encs = [[self.stored(i, b) for b in range(first, last)] for i in range(len(self.layers))]
            written.append(self.disk.write(first, encs, [self.stored_reprs(i, first, last) for i in range(len(self.layers))]))
            del encs
            for i, layer in enumerate(self.layers):
                for b in range(first, last):
                    if layer.kv[b] is not None and b not in self.cold:  # rehydrated KV is not on disk
                        self.ram.mark_clean((i, b), layer.kv[b])
        return written

    def reclaim_cold(self) -> list[str]:
        """Rewrite the shards that still hold the KV of blocks gone cold since, without it (reprs
        stay); returns the replaced files, to delete once the manifest names the new ones."""
        old = []
        for k, s in enumerate(list(self.disk.shards) if self.disk is not None else []):
            ids = range(s.first, s.first + s.n)
            if not any(b in self.cold and self.disk.has_kv(b) for b in ids):
                continue
            encs = [[None if b in self.cold else self.disk.read(i, b) for b in ids] for i in range(len(self.layers))]
            old.append(self.disk.rewrite(k, encs, [self.stored_reprs(i, s.first, s.first + s.n) for i in range(len(self.layers))]))
        return old

    def flush_nbytes(self) -> int:
        """RAM a flush may use beyond the blocks themselves: one shard stacked and serialised."""
        per_block = 2 * self.n_kv_heads * self.block_size * self.head_dim * self.codec.dtype.itemsize
        return 2 * SHARD_BLOCKS * len(self.layers) * per_block

    def _enforce_budget(self) -> None:
        budget = self.ram.limit() if self.disk is not None else None
        if budget is None:
            return
        if self.ram.resident > budget:
            self.flush()
        for i, b in self.ram.evict(budget):
            self.layers[i].kv[b] = None

    # -------------------------------------------------------------------------------- reading
    def select(self, layer: int, q_mean: torch.Tensor, topk: int, relevance=RELEVANCE["dot"]) -> list[int]:
        """Ids (ascending) of the ``topk`` blocks most relevant to ``q_mean [H, D]``; all when fewer.
        ``relevance``: a policy of :data:`~memory_plugin.policies.RELEVANCE` (InfLLM's by default).

        The blocks ``relevance.scores`` ranks first, found by scoring the flattened reprs
        ``[n, H * D]`` against the policy's re-weighted query (z-scoring needs only each head's
        score spread, from the layer's running moments): every step reads each representative key
        once, in place (int8 ones through a bf16 kernel and an exact rescoring of the few blocks
        near the cut, :class:`~memory_plugin.tiers.Int8ReprTable`). With one key per KV head the
        query heads of a group score the same key, so their queries are summed first."""
        blocks = self.layers[layer]
        n = len(blocks)
        if n <= topk:
            return list(range(n))
        q = group_sum(relevance.query(q_mean, lambda: blocks.score_std(q_mean)), self.repr_heads)
        return blocks.table.top(q.reshape(-1).float(), topk)

    def fetch(self, layer: int, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of blocks ``ids`` concatenated along tokens: two ``[Hkv, n, D]`` (``n`` is
        ``len(ids) * block_size`` unless cold blocks are attended as gists or dropped)."""
        blocks, key = self.layers[layer], tuple(ids)
        if blocks.last is None or blocks.last[0] != key:
            if blocks.cache is None and not any(self.is_cold(b, layer) for b in ids):
                kv = self._gather(layer, ids).to(self.compute_device)
            else:  # through the accelerator cache, or with cold blocks (gists, dropped: other sizes)
                parts = [p for p in (self._block_kv(layer, b) for b in ids) if p is not None]
                if parts:
                    kv = torch.cat(parts, dim=2).to(self.compute_device)  # [2, Hkv, n, D]
                else:  # every selected block was a dropped cold block
                    kv = torch.zeros(2, self.n_kv_heads, 0, self.head_dim, dtype=self.codec.dtype, device=self.compute_device)
            blocks.last = (key, kv)
        kv = blocks.last[1]
        return kv[0], kv[1]

    def _gather(self, layer: int, ids: list[int]) -> torch.Tensor:
        """Blocks ``ids`` (in RAM or on disk, none cold) decoded straight into one ``[2, Hkv, n, D]``
        buffer. Decoding each block on its own made two block-sized temporaries per block read
        (196 KB each in float32): heap that grew within a turn at 1M tokens under a budget."""
        bs = self.block_size
        kv = torch.empty(2, self.n_kv_heads, len(ids) * bs, self.head_dim, dtype=self.codec.dtype)
        for i, b in enumerate(ids):
            self.cold.touch(b)
            self.codec.decode_into(self._encoded(layer, b), kv[:, :, i * bs : (i + 1) * bs])
        return kv

    def _block_kv(self, layer: int, b: int) -> torch.Tensor | None:
        """``[2, Hkv, n, D]`` for block ``b``: through the layer's accelerator cache when it has one;
        a cold block as the cold mode says (None: dropped)."""
        if self.is_cold(b, layer):
            return self.cold.mode.attend(self.cold[b], layer, lambda: self._rehydrate(layer, b))
        self.cold.touch(b)
        return self._cached(layer, b)

    def _cached(self, layer: int, b: int) -> torch.Tensor:
        cache = self.layers[layer].cache
        if cache is None:
            return self.block(layer, b)
        return cache.data[cache.slots([b], lambda x: self.block(layer, x))[0]]

    def block(self, layer: int, b: int) -> torch.Tensor:
        """Block ``b`` of ``layer`` decoded: ``[2, Hkv, block_size, D]``."""
        return self.codec.decode(self._encoded(layer, b))

    def _encoded(self, layer: int, b: int) -> dict:
        """Block ``b`` of ``layer`` as stored: from RAM, else read back from disk into RAM."""
        enc = self.layers[layer].kv[b]
        if enc is None and b in self.cold:
            raise KeyError(f"block {b} is in the cold tier; its KV is rehydrated through fetch()")
        if enc is None:
            enc = self.layers[layer].kv[b] = self.disk.read(layer, b)
            self.ram.hold((layer, b), enc, clean=True)
            self._enforce_budget()
        else:
            self.ram.touch((layer, b))
        return enc

    def _rehydrate(self, layer: int, b: int) -> torch.Tensor:
        """Cold block ``b``'s KV recomputed in every layer and held in RAM (until it falls out of
        the cold tier's LRU of rehydrated blocks); returns ``layer``'s, read as any block."""
        for i, kv in enumerate(self.cold.rehydrate(b)):
            enc = self.layers[i].kv[b] = {k: t.cpu() for k, t in self.codec.encode(kv).items()}
            self.ram.hold((i, b), enc)
        for old in self.cold.came_back(b):  # back to cold: vectors only
            self._drop_kv(old)
        return self._cached(layer, b)

    def stored(self, layer: int, b: int) -> dict | None:
        """Block ``b`` of ``layer`` encoded as stored, for writing out; None for a cold block (its
        shard holds no KV for it, even while its KV is rehydrated)."""
        if b in self.cold:
            return None
        return self._encoded(layer, b)

    def stored_reprs(self, layer: int, first: int, last: int) -> dict:
        """Representative keys of blocks ``[first, last)`` of ``layer`` encoded as stored, for writing out."""
        table = self.layers[layer].table
        if self.compact_reprs:  # already as stored
            return {k: t.cpu().contiguous() for k, t in table.encoded(first, last).items()}
        return self.codec.encode_reprs(table.decoded(first, last).cpu())

    def is_cold(self, b: int, layer: int = 0) -> bool:
        """Block ``b`` is in the cold tier with no KV at hand (only vectors and representative keys)."""
        return b in self.cold and self.layers[layer].kv[b] is None

    # -------------------------------------------------------------------------------- cold tier
    def archive(self, b: int, cold: ColdBlock) -> None:
        """Move block ``b`` to the cold tier: its KV is dropped, its representative keys stay."""
        self._drop_kv(b)
        self.cold.add(b, cold)

    def _drop_kv(self, b: int) -> None:
        for i, layer in enumerate(self.layers):
            self.ram.release((i, b), layer.kv[b])
            layer.drop(b)

    # -------------------------------------------------------------------------------- state
    def truncate(self, n: int) -> list[str]:
        """Forget blocks ``n`` and later (a rollback); returns shard files no longer needed."""
        for i, layer in enumerate(self.layers):
            for b in range(n, len(layer)):
                self.ram.release((i, b), layer.kv[b])
            layer.truncate(n)
        self.cold.truncate(n)
        return self.disk.truncate(n) if self.persisted > n else []

    def attach(self, shards: list[ShardInfo], *, resident: bool) -> None:
        """Adopt blocks already on disk in ``spill_dir`` (loading a saved memory): reprs are read
        into RAM; KV too when ``resident``, otherwise on demand."""
        self.disk.shards = list(shards)
        n = self.disk.n_blocks
        for i, layer in enumerate(self.layers):
            if n:
                layer.set_reprs(self._adopt_reprs(self.disk.read_reprs(i)))
            layer.kv = [None] * n
        if resident:
            for i in range(len(self.layers)):
                for b in range(n):
                    if self.disk.has_kv(b):  # a cold block's shard has no KV for it
                        self._encoded(i, b)

    def _adopt_reprs(self, parts: list[dict]) -> torch.Tensor | dict:
        """One layer's representative keys as read from its shards (a dict per shard) as this store
        holds them: encoded alike, the shards' own encoding kept (compact), else decoded."""
        if not self.compact_reprs:
            return torch.cat([self.codec.decode_reprs(enc) for enc in parts])
        # shards written before format 3 hold keys as computed: encoded here, as written since
        old = self.codec.kind == "int8"
        encs = [self.codec.encode_reprs(self.codec.decode_reprs(e)) if old and "repr_scale" not in e else e for e in parts]
        return {k: torch.cat([e[k] for e in encs]) for k in encs[0]}

    def detach_disk(self) -> None:
        """Keep every block in RAM only (after loading a saved memory without a RAM budget)."""
        for i, layer in enumerate(self.layers):
            for b in range(len(layer)):
                if b not in self.cold:
                    self._encoded(i, b)
        if self.disk is not None:
            self.disk.close()
        self.disk = None
        self.ram.clean.clear()

    def tier(self, b: int) -> str:
        """Where block ``b`` is: ``ram`` (KV in RAM), ``disk`` (KV only on disk), ``cold`` (memory vectors)."""
        if self.is_cold(b):
            return "cold"
        return "ram" if self.layers[0].kv[b] is not None else "disk"

    def tiers(self) -> dict[str, int]:
        """Blocks per tier: ``ram`` (KV in RAM), ``disk`` (KV only on disk), ``cold`` (memory vectors)."""
        n = len(self)
        cold = sum(1 for b in self.cold if b < n and self.is_cold(b))
        ram = sum(1 for b in range(n) if self.layers[0].kv[b] is not None)
        return {"ram": ram, "disk": n - ram - cold, "cold": cold}

    def repr_nbytes(self) -> int:
        """Bytes of representative keys (always in RAM)."""
        return sum(layer.table.nbytes() for layer in self.layers)

    def nbytes(self) -> dict[str, int]:
        """Bytes held: ``host`` (block KV in RAM, and each layer's last selection), ``disk`` (block KV
        on disk), ``device`` (accelerator cache), ``repr`` (representative keys), ``cold`` (vectors)."""
        return {
            "host": self.ram.nbytes() + sum(layer.nbytes() for layer in self.layers),
            "disk": self.disk.nbytes() if self.disk is not None else 0,
            "device": sum(layer.cache.nbytes() for layer in self.layers if layer.cache is not None),
            "repr": self.repr_nbytes(),
            "cold": self.cold.nbytes(),
        }

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()
