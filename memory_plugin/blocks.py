"""Storage of memory blocks: their KV (in RAM, or on disk in safetensors shards when a RAM budget
is set), their representative keys (always in RAM: every step scans them), optional quantisation,
and an LRU cache of blocks on the accelerator when the model runs on one.

Blocks are formed in every layer at the same token boundaries, so block ``b`` always covers
tokens ``[n_init + b * block_size, n_init + (b + 1) * block_size)`` of the history.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import os
import struct
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .attention import block_relevance

CODECS = ("none", "bf16", "int8")


class BlockCodec:
    """How block KV is stored: as computed (``none``), ``bf16``, or ``int8`` with one float scale
    per channel (kv, head, dim) of the block. Encoded blocks are dicts of tensors."""

    def __init__(self, kind: str, dtype: torch.dtype):
        if kind not in CODECS:
            raise ValueError(f"kv_quantization must be one of {CODECS}, got {kind!r}")
        self.kind, self.dtype = kind, dtype

    def encode(self, kv: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.kind == "none":
            return {"kv": kv}
        if self.kind == "bf16":
            return {"kv": kv.to(torch.bfloat16)}
        scale = kv.abs().amax(dim=-2, keepdim=True).float().clamp_min(1e-8) / 127.0  # [2, Hkv, 1, D]
        q = (kv.float() / scale).round_().clamp_(-127, 127).to(torch.int8)
        return {"kv": q, "scale": scale}

    def decode(self, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.kind == "int8":
            return (enc["kv"].float() * enc["scale"]).to(self.dtype)
        return enc["kv"].to(self.dtype)

    def decode_many(self, encs: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        kv = torch.stack([e["kv"] for e in encs])
        if self.kind == "int8":
            return (kv.float() * torch.stack([e["scale"] for e in encs])).to(self.dtype)
        return kv.to(self.dtype)


def _nbytes(enc: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in enc.values())


# ----------------------------------------------------------------------------------------- shards
@dataclass
class ShardInfo:
    """One immutable safetensors file holding blocks ``[first, first + n)`` of every layer."""

    file: str
    first: int
    n: int
    sha256: str
    nbytes: int

    def to_dict(self) -> dict:
        return vars(self).copy()


SHARD_BLOCKS = 8
"""Most blocks (of every layer) per shard file: 47 MB in float32 on the embedded model."""
MAX_OPEN_SHARDS = 64
"""Shard files kept open for reading (LRU): a shard is written about every chunk once a RAM budget
is reached, ~500 at 256k tokens, more than the common 1024-descriptor limit allows at 1M."""


class ShardSet:
    """Blocks on disk. Files are written once (temp file, fsync, rename) and read back with
    positioned reads, block by block: mapped pages would count against the process's resident
    memory, which is what a RAM budget is about."""

    def __init__(self, directory: Path, prefix: str = "blocks"):
        self.dir = Path(directory)
        self.prefix = prefix
        self.shards: list[ShardInfo] = []
        self._index: dict[str, tuple[dict, int]] = {}  # file -> (header, data start)
        self._fds: OrderedDict[str, int] = OrderedDict()  # open shard files, least recent first

    @property
    def n_blocks(self) -> int:
        return self.shards[-1].first + self.shards[-1].n if self.shards else 0

    def write(self, first: int, blocks: list[list[dict]], reprs: list[torch.Tensor]) -> ShardInfo:
        """Write blocks ``first..`` (``blocks[layer][i]`` encoded, ``reprs[layer]`` ``[n, H, D]``)."""
        tensors = {}
        for layer, (encs, rep) in enumerate(zip(blocks, reprs)):
            for name in encs[0]:
                tensors[f"{name}.{layer}"] = [e[name] for e in encs]  # stacked as written, never copied
            tensors[f"repr.{layer}"] = rep
        # Unique names: a file is never rewritten, so a manifest never points at a changed file.
        name = f"{self.prefix}-{first:08d}-{len(blocks[0]):06d}-{os.urandom(3).hex()}.safetensors"
        sha, size = write_safetensors(self.dir / name, tensors, {"first": str(first), "n": str(len(blocks[0]))})
        info = ShardInfo(name, first, len(blocks[0]), sha, size)
        self.shards.append(info)
        return info

    def _locate(self, b: int) -> ShardInfo:
        # Shards hold consecutive, ascending block ranges: bisect (there are hundreds at 256k tokens).
        i = bisect.bisect_right(self.shards, b, key=lambda s: s.first) - 1
        if i >= 0 and b < self.shards[i].first + self.shards[i].n:
            return self.shards[i]
        raise KeyError(f"block {b} is not on disk")

    def _header(self, file: str) -> tuple[dict, int, int]:
        fd = self._fds.get(file)
        if fd is None:
            fd = os.open(self.dir / file, os.O_RDONLY)
            if len(self._fds) >= MAX_OPEN_SHARDS:  # a long history has more shards than a process has fds
                os.close(self._fds.pop(next(iter(self._fds))))
            self._fds[file] = fd
        else:
            self._fds.move_to_end(file)
        if file not in self._index:
            (size,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            self._index[file] = (json.loads(os.pread(fd, size, 8)), 8 + size)
        header, start = self._index[file]
        return header, start, fd

    def read(self, layer: int, b: int) -> dict[str, torch.Tensor]:
        """Block ``b`` of ``layer``, encoded, read from disk."""
        s = self._locate(b)
        header, start, fd = self._header(s.file)
        out = {}
        for name in ("kv", "scale"):
            meta = header.get(f"{name}.{layer}")
            if meta is None:
                continue
            shape = meta["shape"]
            lo, hi = meta["data_offsets"]
            per = (hi - lo) // shape[0]
            buf = bytearray(os.pread(fd, per, start + lo + (b - s.first) * per))
            dtype = _DTYPES[meta["dtype"]]
            out[name] = torch.frombuffer(buf, dtype=dtype).view(shape[1:])
        return out

    def read_reprs(self, layer: int) -> torch.Tensor:
        parts = []
        for s in self.shards:
            header, start, fd = self._header(s.file)
            meta = header[f"repr.{layer}"]
            lo, hi = meta["data_offsets"]
            buf = bytearray(os.pread(fd, hi - lo, start + lo))
            parts.append(torch.frombuffer(buf, dtype=_DTYPES[meta["dtype"]]).view(meta["shape"])[: s.n])
        return torch.cat(parts) if parts else None

    def truncate(self, n: int) -> list[str]:
        """Forget blocks ``n`` and later; returns shard files no longer referenced."""
        dropped = [s.file for s in self.shards if s.first >= n]
        self.shards = [s for s in self.shards if s.first < n]
        if self.shards and self.shards[-1].first + self.shards[-1].n > n:
            self.shards[-1].n = n - self.shards[-1].first  # the file stays; its tail is ignored
        for f in dropped:
            self.forget(f)
        return dropped

    def forget(self, file: str) -> None:
        fd = self._fds.pop(file, None)
        if fd is not None:
            os.close(fd)
        self._index.pop(file, None)

    def close(self) -> None:
        for f in list(self._fds):
            self.forget(f)


_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I8": torch.int8}


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator:
    """A file object whose content replaces ``path`` only once fully written and synced: a crash
    leaves either the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one."""
    with _atomic_file(path) as f:
        f.write(data)


_ST_NAMES = {v: k for k, v in _DTYPES.items()}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor | list[torch.Tensor]], metadata: dict[str, str]) -> tuple[str, int]:
    """Write a safetensors file atomically, streaming one tensor at a time; a list of equal tensors
    is written as one tensor stacked along a new first dimension. Returns ``(sha256, size)``.

    safetensors' own writer first copies every tensor into one ``bytes`` object: for a shard or a
    window snapshot that doubled or tripled their RAM, which a RAM budget cannot allow.
    """
    header, offset = {"__metadata__": metadata}, 0
    for name, t in tensors.items():
        parts = t if isinstance(t, list) else [t]
        n = sum(p.numel() * p.element_size() for p in parts)
        shape = ([len(parts)] if isinstance(t, list) else []) + list(parts[0].shape)
        header[name] = {"dtype": _ST_NAMES[parts[0].dtype], "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format aligns the data to 8 bytes
    digest = hashlib.sha256()
    with _atomic_file(path) as f:
        for chunk in _safetensors_chunks(head, tensors):
            f.write(chunk)
            digest.update(chunk)
    return digest.hexdigest(), 8 + len(head) + offset


def _safetensors_chunks(head: bytes, tensors: dict) -> Iterator:
    yield struct.pack("<Q", len(head)) + head
    for t in tensors.values():
        for p in t if isinstance(t, list) else [t]:
            if p.numel():
                yield p.detach().cpu().contiguous().view(torch.uint8).numpy().reshape(-1).data


# ----------------------------------------------------------------------------------------- allocator
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
ALLOC_MMAP_THRESHOLD = 64 * 1024


def return_freed_memory_to_os() -> bool:
    """Make the C allocator give freed block buffers back to the OS (glibc only; returns whether set).

    glibc raises its mmap threshold each time a large buffer is freed, so later block-sized
    buffers come from heap arenas that keep their pages after ``free``: with a RAM budget the
    process then grew by ~420 MB beyond the blocks it held at 8k tokens (BENCHMARKS.md, durable
    memory). A fixed threshold keeps every buffer above it in its own mapping, unmapped on free.
    Process-wide, so it is never a side effect of building a store: :class:`ContextMemory` calls
    it when its config sets a budget; call it yourself for a bare :class:`BlockStore` with one.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, ALLOC_MMAP_THRESHOLD))
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl): nothing to tune
        return False


# ----------------------------------------------------------------------------------------- store
@dataclass
class ColdBlock:
    """A block whose KV was dropped: the memory vectors that reproduce its tokens, and (gist mode)
    the KV of those vectors per layer, ``[2, Hkv, n_vectors, D]``."""

    vectors: object  # memory_plugin.vectors.MemoryVectors
    gist: list[torch.Tensor] | None = None


COLD_MODES = ("rehydrate", "gist", "drop")


class _LayerBlocks:
    """Blocks of one layer: encoded KV per block (None while only on disk), reprs ``[n, H, D]``."""

    def __init__(self, n_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.kv: list[dict | None] = []
        self._repr = torch.empty(16, n_heads, head_dim, dtype=dtype, device=device)

    def __len__(self) -> int:
        return len(self.kv)

    @property
    def reprs(self) -> torch.Tensor:
        return self._repr[: len(self.kv)]

    def set_reprs(self, reprs: torch.Tensor) -> None:
        self._repr = reprs.to(self._repr.device, self._repr.dtype).clone()
        if self._repr.shape[0] == 0:
            self._repr = self._repr.new_empty(16, *self._repr.shape[1:])

    def append(self, enc: dict, repr_key: torch.Tensor) -> None:
        n = len(self.kv)
        if n == self._repr.shape[0]:  # grow by doubling: reprs stay one tensor for a fast top-k
            grown = self._repr.new_empty(2 * n, *self._repr.shape[1:])
            grown[:n] = self._repr
            self._repr = grown
        self._repr[n] = repr_key
        self.kv.append(enc)

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

    def slots(self, ids: list[int], load) -> list[int]:
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

    def forget_from(self, n: int) -> None:
        """Drop cached blocks with id >= n (they were rolled back)."""
        for b in [b for b in self.slot_of if b >= n]:
            self.free.append(self.slot_of.pop(b))


class BlockStore:
    """KV blocks of every layer.

    Args:
        n_layers, n_heads, n_kv_heads, head_dim, block_size: model and memory geometry.
        dtype: the dtype attention computes in (the model's).
        compute_device: where attention runs; reprs live there (they are scanned every step).
        cache_device: an accelerator to keep an LRU of ``max_cached_blocks`` blocks per layer on;
            None keeps blocks only in host memory (CPU inference).
        kv_quantization: "none", "bf16" or "int8" storage of block KV.
        spill_dir: directory for block shards; with ``resident_budget`` (bytes of block KV kept in
            RAM, or a callable returning it) older blocks are written there and read back on demand.

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
        resident_budget: int | None = None,
    ):
        self.block_size = block_size
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        self.codec = BlockCodec(kv_quantization, dtype)
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
        self.disk = ShardSet(spill_dir) if spill_dir is not None else None
        self.resident_budget = resident_budget  # the allocator is the memory's to tune (return_freed_memory_to_os)
        self.persisted = 0  # blocks [0, persisted) are on disk
        self._clean: OrderedDict[tuple[int, int], int] = OrderedDict()  # resident on-disk blocks, LRU
        self._resident = 0  # bytes of encoded block KV held in RAM
        # Last gathered selection per layer: consecutive decode steps mostly pick the same blocks.
        self._last: list[tuple[tuple[int, ...], torch.Tensor] | None] = [None] * n_layers
        # Cold tier: blocks reduced to memory vectors. A selected cold block is rehydrated (KV
        # recomputed by ``rehydrate(b) -> [per-layer kv]``, kept in a small LRU), or attended
        # through its vectors' own KV (gist), or skipped (drop).
        self.cold: dict[int, ColdBlock] = {}
        self.cold_mode = "rehydrate"
        self.rehydrate = None
        self.max_rehydrated = 32
        self._rehydrated: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        """Number of complete blocks (formed in every layer)."""
        return min(len(layer) for layer in self.layers)

    # -------------------------------------------------------------------------------- writing
    def append(self, layer: int, kv: torch.Tensor, repr_key: torch.Tensor) -> int:
        """Store one block's ``kv [2, Hkv, block_size, D]`` and representative key ``[H, D]``."""
        enc = {k: t.detach().to("cpu", copy=True).contiguous() for k, t in self.codec.encode(kv).items()}
        if self._pin:
            enc = {k: t.pin_memory() for k, t in enc.items()}
        blocks = self.layers[layer]
        blocks.append(enc, repr_key.to(self.compute_device))
        self._resident += _nbytes(enc)
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
            written.append(self.disk.write(first, encs, [layer.reprs[first:last].cpu() for layer in self.layers]))
            del encs
            for i in range(len(self.layers)):
                for b in range(first, last):
                    if self.layers[i].kv[b] is not None:
                        self._clean[(i, b)] = _nbytes(self.layers[i].kv[b])
            self.persisted = last
        return written

    def flush_nbytes(self) -> int:
        """RAM a flush may use beyond the blocks themselves: one shard stacked and serialised."""
        per_block = 2 * self.n_kv_heads * self.block_size * self.head_dim * self.codec.dtype.itemsize
        return 2 * SHARD_BLOCKS * len(self.layers) * per_block

    def _enforce_budget(self) -> None:
        if self.resident_budget is None or self.disk is None:
            return
        budget = self.resident_budget() if callable(self.resident_budget) else self.resident_budget
        if self._resident > budget:
            self.flush()
        while self._resident > budget and self._clean:
            (i, b), nb = self._clean.popitem(last=False)
            self.layers[i].kv[b] = None
            self._resident -= nb

    # -------------------------------------------------------------------------------- reading
    def select(self, layer: int, q_mean: torch.Tensor, topk: int, normalize: bool = False) -> list[int]:
        """Ids (ascending) of the ``topk`` blocks most relevant to ``q_mean [H, D]``; all when fewer.
        ``normalize``: per-head z-scores (see :func:`~memory_plugin.attention.block_relevance`)."""
        n = len(self.layers[layer])
        if n <= topk:
            return list(range(n))
        scores = block_relevance(q_mean, self.layers[layer].reprs, normalize)
        return sorted(scores.topk(topk).indices.tolist())

    def _encoded(self, layer: int, b: int) -> dict:
        enc = self.layers[layer].kv[b]
        if enc is None and b in self.cold:
            raise KeyError(f"block {b} is in the cold tier; its KV is rehydrated through fetch()")
        if enc is None:  # on disk only: read it back, keep it in the LRU
            enc = self.disk.read(layer, b)
            self.layers[layer].kv[b] = enc
            self._resident += _nbytes(enc)
            self._clean[(layer, b)] = _nbytes(enc)
            self._enforce_budget()
        elif (layer, b) in self._clean:
            self._clean.move_to_end((layer, b))
        return enc

    def stored(self, layer: int, b: int) -> dict:
        """Block ``b`` of ``layer`` encoded as stored, for writing out; a cold block (no KV) is a
        zero placeholder, never read back (the snapshot marks it cold)."""
        if b in self.cold and self.layers[layer].kv[b] is None:
            shape = (2, self.n_kv_heads, self.block_size, self.head_dim)
            return self.codec.encode(torch.zeros(shape, dtype=self.codec.dtype))
        return self._encoded(layer, b)

    def is_cold(self, b: int) -> bool:
        """Block ``b`` is in the cold tier with no KV at hand (only vectors and representative keys)."""
        return b in self.cold and self.layers[0].kv[b] is None

    def block(self, layer: int, b: int) -> torch.Tensor:
        """Block ``b`` of ``layer`` decoded: ``[2, Hkv, block_size, D]``."""
        return self.codec.decode(self._encoded(layer, b))

    def fetch(self, layer: int, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of blocks ``ids`` concatenated along tokens: two ``[Hkv, n, D]`` (``n`` is
        ``len(ids) * block_size`` unless cold blocks are attended as gists or dropped)."""
        key = tuple(ids)
        last = self._last[layer]
        if last is not None and last[0] == key:
            kv = last[1]
        else:
            parts = [p for p in (self._block_kv(layer, b) for b in ids) if p is not None]
            if parts:
                kv = torch.cat(parts, dim=2).to(self.compute_device)  # [2, Hkv, n, D]
            else:  # every selected block was a dropped cold block
                kv = torch.zeros(2, self.n_kv_heads, 0, self.head_dim, dtype=self.codec.dtype, device=self.compute_device)
            self._last[layer] = (key, kv)
        return kv[0], kv[1]

    def _block_kv(self, layer: int, b: int) -> torch.Tensor | None:
        """``[2, Hkv, n, D]`` for block ``b`` on the compute device, or None (a dropped cold block)."""
        if b in self.cold and self.layers[layer].kv[b] is None:
            if self.cold_mode == "gist":
                return self.cold[b].gist[layer]
            if self.cold_mode == "drop":
                return None
            self._rehydrate(b)
        if b in self._rehydrated:
            self._rehydrated.move_to_end(b)
        if self.caches is not None:
            cache = self.caches[layer]
            return cache.data[cache.slots([b], lambda x: self.block(layer, x))[0]]
        return self.block(layer, b)

    def _rehydrate(self, b: int) -> None:
        kvs = self.rehydrate(b)
        for i, kv in enumerate(kvs):
            self.layers[i].kv[b] = {k: t.cpu() for k, t in self.codec.encode(kv).items()}
            self._resident += _nbytes(self.layers[i].kv[b])
        self._rehydrated[b] = None
        while len(self._rehydrated) > self.max_rehydrated:  # back to cold: vectors only
            old, _ = self._rehydrated.popitem(last=False)
            self._drop_kv(old)

    def archive(self, b: int, cold: ColdBlock) -> None:
        """Move block ``b`` to the cold tier: its KV is dropped, its representative keys stay."""
        self._drop_kv(b)
        self.cold[b] = cold
        self._rehydrated.pop(b, None)

    def _drop_kv(self, b: int) -> None:
        for i, layer in enumerate(self.layers):
            enc = layer.kv[b]
            if enc is not None and (i, b) not in self._clean:
                self._resident -= _nbytes(enc)
            elif (i, b) in self._clean:
                self._resident -= self._clean.pop((i, b))
            layer.kv[b] = None
            if self.caches is not None and b in self.caches[i].slot_of:
                self.caches[i].free.append(self.caches[i].slot_of.pop(b))
            if self._last[i] is not None and b in self._last[i][0]:
                self._last[i] = None

    def tiers(self) -> dict[str, int]:
        """Blocks per tier: ``ram`` (KV in RAM), ``disk`` (KV only on disk), ``cold`` (memory vectors)."""
        n = len(self)
        cold = sum(1 for b in self.cold if b < n and self.layers[0].kv[b] is None)
        ram = sum(1 for b in range(n) if self.layers[0].kv[b] is not None)
        return {"ram": ram, "disk": n - ram - cold, "cold": cold}

    # -------------------------------------------------------------------------------- state
    def truncate(self, n: int) -> list[str]:
        """Forget blocks ``n`` and later (a rollback); returns shard files no longer needed."""
        for i, layer in enumerate(self.layers):
            for b in range(n, len(layer)):
                enc = layer.kv[b]
                if enc is not None:
                    self._resident -= _nbytes(enc)
                self._clean.pop((i, b), None)
            layer.truncate(n)
            if self.caches is not None:
                self.caches[i].forget_from(n)
            last = self._last[i]
            if last is not None and any(b >= n for b in last[0]):
                self._last[i] = None
        for b in [b for b in self.cold if b >= n]:
            del self.cold[b]
            self._rehydrated.pop(b, None)
        dropped = []
        if self.disk is not None and self.persisted > n:
            dropped = self.disk.truncate(n)
            self.persisted = n
        return dropped

    def attach(self, shards: list[ShardInfo], *, resident: bool) -> None:
        """Adopt blocks already on disk in ``spill_dir`` (loading a saved memory): reprs are read
        into RAM; KV too when ``resident``, otherwise on demand."""
        self.disk.shards = list(shards)
        n = self.disk.n_blocks
        for i, layer in enumerate(self.layers):
            if n:
                layer.set_reprs(self.disk.read_reprs(i))
            layer.kv = [None] * n
        self.persisted = n
        if resident:
            for i in range(len(self.layers)):
                for b in range(n):
                    self._encoded(i, b)

    def detach_disk(self) -> None:
        """Keep every block in RAM only (after loading a saved memory without a RAM budget)."""
        for i in range(len(self.layers)):
            for b in range(len(self.layers[i])):
                if b not in self.cold:
                    self._encoded(i, b)
        if self.disk is not None:
            self.disk.close()
        self.disk, self.persisted = None, 0
        self._clean.clear()

    def repr_nbytes(self) -> int:
        """Bytes of representative keys (always in RAM)."""
        return sum(layer.reprs.numel() * layer.reprs.element_size() for layer in self.layers)

    def nbytes(self) -> dict[str, int]:
        """Bytes held: ``host`` (block KV in RAM), ``disk`` (block KV on disk), ``device`` (accelerator
        cache), ``repr`` (representative keys)."""
        reprs = self.repr_nbytes()
        cache = sum(c.data.numel() * c.data.element_size() for c in self.caches) if self.caches else 0
        memo = sum(x[1].numel() * x[1].element_size() for x in self._last if x is not None)
        disk = sum(s.nbytes for s in self.disk.shards) if self.disk is not None else 0
        cold = sum(
            c.vectors.tensor.numel() * c.vectors.tensor.element_size()
            + sum(g.numel() * g.element_size() for g in c.gist or [])
            for c in self.cold.values()
        )
        return {"host": self._resident + memo, "disk": disk, "device": cache, "repr": reprs, "cold": cold}

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()
