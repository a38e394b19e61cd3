"""The disk tier: blocks in immutable safetensors shard files, and the atomic writes they (and a
saved memory's other files) are made with.

Shapes: a shard holds, per layer ``l``, tensors ``kv.l`` ``[n, ...]`` (and ``scale.l`` for int8),
block ``first + i`` at index ``i`` as encoded by the KV codec (:mod:`~memory_plugin.policies`),
and the blocks' representative keys ``repr.l`` ``[n, H, D]`` as the codec encodes them (int8:
``repr.l`` in int8 and ``repr_scale.l`` ``[n, H, 1]``, since format 3); its metadata says
``first`` and ``n``, and (since format 4) ``cold``: the blocks, counted from ``first``, whose KV it
does not hold (they are in the cold tier; ``kv.l`` then stacks only the others, and has no rows
at all when every block is cold). Representative keys are kept for every block.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import os
import struct
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch


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
    memory, which is what a RAM budget is about. At most ``max_open`` files are kept open."""

    def __init__(self, directory: Path, prefix: str = "blocks", max_open: int = MAX_OPEN_SHARDS):
        self.dir = Path(directory)
        self.prefix, self.max_open = prefix, max_open
        self.shards: list[ShardInfo] = []
        self._index: dict[str, tuple[dict, int]] = {}  # file -> (header, data start)
        self._colds: dict[str, list[int]] = {}  # file -> its blocks without KV (format 4)
        self._fds: OrderedDict[str, int] = OrderedDict()  # open shard files, least recent first

    @property
    def n_blocks(self) -> int:
        return self.shards[-1].first + self.shards[-1].n if self.shards else 0

    def nbytes(self) -> int:
        """Bytes of the shard files (a truncated shard's file keeps its ignored tail)."""
        return sum(s.nbytes for s in self.shards)

    def write(self, first: int, blocks: list[list[dict | None]], reprs: list[dict]) -> ShardInfo:
        """Write blocks ``first..`` (``blocks[layer][i]`` encoded, None for a cold block without KV;
        ``reprs[layer]`` the encoded ``[n, H, D]`` representative keys: ``{"repr": ...}`` and the
        codec's other tensors)."""
        info = self._write(first, blocks, reprs)
        self.shards.append(info)
        return info

    def rewrite(self, i: int, blocks: list[list[dict | None]], reprs: list[dict]) -> str:
        """Replace shard ``i`` by a new file of the same blocks (now without the KV of blocks gone
        cold); returns the old file, which the caller deletes once no manifest names it."""
        old = self.shards[i]
        self.shards[i] = self._write(old.first, blocks, reprs)
        self.forget(old.file)
        return old.file

    def _write(self, first: int, blocks: list[list[dict | None]], reprs: list[dict]) -> ShardInfo:
        n = len(blocks[0])
        cold = [j for j, e in enumerate(blocks[0]) if e is None]
        tensors = {}
        for layer, (encs, rep) in enumerate(zip(blocks, reprs)):
            encs = [e for e in encs if e is not None]
            for name in encs[0] if encs else ():
                tensors[f"{name}.{layer}"] = [e[name] for e in encs]  # stacked as written, never copied
            for name, t in rep.items():
                tensors[f"{name}.{layer}"] = t
        meta = {"first": str(first), "n": str(n)}
        if cold:
            meta["cold"] = json.dumps(cold)
        # Unique names: a file is never rewritten, so a manifest never points at a changed file.
        name = f"{self.prefix}-{first:08d}-{n:06d}-{os.urandom(3).hex()}.safetensors"
        sha, size = write_safetensors(self.dir / name, tensors, meta)
        return ShardInfo(name, first, n, sha, size)

    def _cold(self, file: str, header: dict) -> list[int]:
        """Blocks of a shard (from its first) without KV in it, ascending."""
        if file not in self._colds:
            self._colds[file] = json.loads(header.get("__metadata__", {}).get("cold", "[]"))
        return self._colds[file]

    def has_kv(self, b: int) -> bool:
        """Block ``b``'s KV is in its shard (not a cold block written without it)."""
        s = self._locate(b)
        header, _, _ = self._header(s.file)
        return (b - s.first) not in self._cold(s.file, header)

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
            if len(self._fds) >= self.max_open:  # a long history has more shards than a process has fds
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
        cold, row = self._cold(s.file, header), b - s.first
        if row in cold:
            raise KeyError(f"block {b} is in the cold tier: {s.file} holds no KV for it")
        row -= bisect.bisect_left(cold, row)  # rows of blocks without KV are not in the file
        out = {}
        for name in ("kv", "scale"):
            meta = header.get(f"{name}.{layer}")
            if meta is None:
                continue
            shape = meta["shape"]
            lo, hi = meta["data_offsets"]
            per = (hi - lo) // shape[0]
            buf = bytearray(os.pread(fd, per, start + lo + row * per))
            dtype = _DTYPES[meta["dtype"]]
            out[name] = torch.frombuffer(buf, dtype=dtype).view(shape[1:])
        return out

    def read_reprs(self, layer: int) -> list[dict[str, torch.Tensor]]:
        """Representative keys of every block of ``layer``, encoded, one dict per shard: its
        ``repr.l`` and ``repr_scale.l`` (when written; shards of one memory may differ: those
        written before format 3 hold reprs as computed)."""
        parts = []
        for s in self.shards:
            header, start, fd = self._header(s.file)
            enc = {}
            for name in ("repr", "repr_scale"):
                meta = header.get(f"{name}.{layer}")
                if meta is None:
                    continue
                lo, hi = meta["data_offsets"]
                buf = bytearray(os.pread(fd, hi - lo, start + lo))
                enc[name] = torch.frombuffer(buf, dtype=_DTYPES[meta["dtype"]]).view(meta["shape"])[: s.n]
            parts.append(enc)
        return parts

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
        self._colds.pop(file, None)

    def close(self) -> None:
        for f in list(self._fds):
            self.forget(f)


_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I8": torch.int8, "I64": torch.int64}


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
