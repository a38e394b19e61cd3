"""The on-disk format of a memory, and the pieces that make it crash safe.

A memory directory holds::

    manifest.json          format version, model fingerprint, config, and the files below with
                           their sha256; replaced atomically, so it always names a consistent set
    log.sqlite             every entry (role, content, token ids) in order; SQLite in WAL mode,
                           committed before add_* returns: the durable record of the history
                           (``log-<id>.sqlite`` after a forget: the manifest names the live one)
    state-<n>.safetensors  init tokens, local window and attention mass at the snapshot
    blocks-*.safetensors   KV and representative keys of memory blocks, append-only shards
    index.sqlite           the lexical index of the entries (derived: repaired from the log on open)
    LOCK                   held (flock) by the process that has the memory open for writing

Loading takes the snapshot and shards named by the manifest and re-encodes the log entries that
came after the snapshot, so a process killed at any moment loses nothing it acknowledged.

The files, format 4 (:data:`FORMAT_VERSION`; a manifest of a newer version is refused with a
:class:`MemoryFormatError` naming it, older ones are read as written):

* a shard (safetensors; metadata ``first``, ``n``) holds per memory layer ``l``: ``kv.l``
  ``[n, 2, Hkv, block_size, D]`` as the KV codec stores it (float32 for "none", bfloat16 for
  "bf16", int8 for "int8" with ``scale.l`` ``[n, 2, Hkv, 1, D]`` float16: one per channel of a
  block), and the representative keys ``repr.l`` ``[n, H, D]`` (int8 for "int8", with
  ``repr_scale.l`` ``[n, H, 1]`` float16; as computed otherwise). A rollback may leave a tail of a
  shard's last blocks that the manifest's ``n`` excludes;
* a state file holds per layer ``init_k.l``/``init_v.l`` ``[Hkv, init_len, D]``, ``win_k.l``/
  ``win_v.l`` ``[Hkv, window, D]`` (the local window, never quantised: it is attended exactly),
  ``init_mass.l``/``win_mass.l`` ``[H, n]`` (attention mass that picks representative keys) and
  ``q_sum.l``; ``window_k.i``/``window_v.i`` for sliding-window layers; ``cold.b`` the memory
  vectors of cold block ``b`` and ``cold_anchor.b`` (int64 ``[1]``) the token they were crammed after
  (absent: crammed with the vectors first), ``cold_recompute`` (int64 ``[n]``) the cold blocks kept
  as token ids only (archived in ``archive_mode="recompute"``; since format 4); its metadata ``layout`` is the context's :class:`~memory_plugin.context.Layout` as JSON;
* the log's ``entries`` rows hold ``token_ids`` as little-endian int32.

Bytes per token on the embedded model and where they go: docs/BENCHMARKS.md, section 6.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as st_load

from .blocks import ShardInfo, ShardSet, atomic_write, release_free_memory, write_safetensors
from .config import MemoryConfig
from .history import spans
from .loading import model_fingerprint  # noqa: F401  (its old home: re-exported)

FORMAT_VERSION = 4
"""Layout history; every older layout is read as it was written:

* 1: the log is ``log.sqlite``;
* 2: the manifest names its log (a forget commits a new one);
* 3: with ``kv_quantization="int8"``, KV scales in float16 (were float32) and representative keys
  in int8 with a float16 scale per block and head (were as computed, float32): 900 -> 319 bytes
  per token of blocks on the embedded model (docs/BENCHMARKS.md, section 6). A shard without ``repr_scale.l`` holds reprs as computed,
  so a memory opened from format 2 keeps its old shards and writes new ones in format 3;
* 4: a shard holds no KV for blocks in the cold tier (metadata ``cold``; their representative keys
  stay), and an open memory's snapshot rewrites the shards of blocks gone cold since. A shard
  without ``cold`` holds every block's KV. An older reader would misread such a shard, hence the
  version."""
# Config fields added after format 1 was first written, with the value that reproduces how a memory
# saved without them was built (a newer default must not silently change an old memory).
_CONFIG_BEFORE_FIELD = {"relevance": "dot", "repr_heads": "query"}
MANIFEST = "manifest.json"
LOG = "log.sqlite"
LOCK = "LOCK"
INDEX = "index.sqlite"  # the lexical index (derived from the log; rebuilt if stale)


class MemoryFormatError(ValueError):
    """A memory directory that cannot be loaded as it is: names the file and what is wrong."""


class MemoryLockedError(RuntimeError):
    """Another process has this memory directory open for writing."""


class DirLock:
    """An exclusive, non-blocking ``flock`` on ``<dir>/LOCK`` (released when the process dies)."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / LOCK
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            who = "this process" if holder == str(os.getpid()) else f"another process (pid {holder})"
            raise MemoryLockedError(
                f"{directory} is already open for writing by {who}; close it there first, "
                "or ContextMemory.load() it read-only"
            ) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class MemoryLog:
    """The durable list of entries: one SQLite row per message or text, with its token ids."""

    def __init__(self, path: Path, readonly: bool = False):
        self.path = Path(path)
        try:
            if readonly:  # loading must not touch the directory, not even the journal mode
                # A URI: the path percent-encoded, or a directory named with "%", "#" or "?" (as the
                # pool names threads) is read as another path.
                uri = f"{self.path.absolute().as_uri()}?mode=ro"
                self.db = sqlite3.connect(uri, uri=True, check_same_thread=False)
                self.db.execute("SELECT count(*) FROM entries").fetchone()
                return
            self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")  # a commit survives power loss, not just a crash
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS entries (seq INTEGER PRIMARY KEY, role TEXT, content TEXT NOT NULL, "
                "token_ids BLOB NOT NULL)"
            )
            self.db.execute("SELECT count(*) FROM entries").fetchone()
        except sqlite3.DatabaseError as e:
            raise MemoryFormatError(f"{self.path}: not a readable memory log ({e})") from e

    def append(self, rows: list[tuple[str | None, str, list[int]]]) -> None:
        """Add entries in one transaction; durable when this returns."""
        with self._tx():
            start = self.count()
            self.db.executemany(
                "INSERT INTO entries (seq, role, content, token_ids) VALUES (?, ?, ?, ?)",
                [(start + i, r, c, _pack(ids)) for i, (r, c, ids) in enumerate(rows)],
            )

    def truncate(self, n: int) -> None:
        with self._tx():
            self.db.execute("DELETE FROM entries WHERE seq >= ?", (n,))

    def count(self) -> int:
        return self.db.execute("SELECT count(*) FROM entries").fetchone()[0]

    def read(self) -> list[tuple[str | None, str, list[int]]]:
        try:
            rows = self.db.execute("SELECT seq, role, content, token_ids FROM entries ORDER BY seq").fetchall()
        except sqlite3.DatabaseError as e:
            raise MemoryFormatError(f"{self.path}: the memory log is corrupted ({e})") from e
        for i, (seq, *_rest) in enumerate(rows):
            if seq != i:
                raise MemoryFormatError(f"{self.path}: entry {i} is missing from the memory log")
        return [(role, content, _unpack(blob, self.path)) for _, role, content, blob in rows]

    def _tx(self):
        db = self.db

        class _Tx:
            def __enter__(self):
                db.execute("BEGIN IMMEDIATE")

            def __exit__(self, exc, *a):
                db.execute("ROLLBACK" if exc else "COMMIT")

        return _Tx()

    def close(self) -> None:
        self.db.close()


def _pack(ids: list[int]) -> bytes:
    return torch.tensor(ids, dtype=torch.int32).numpy().tobytes()


def _unpack(blob: bytes, where: Path) -> list[int]:
    if len(blob) % 4:
        raise MemoryFormatError(f"{where}: token ids of an entry are truncated")
    return torch.frombuffer(bytearray(blob), dtype=torch.int32).tolist() if blob else []


@dataclass
class Manifest:
    model_fingerprint: str
    model_name: str
    config: dict
    n_tokens: int = 0  # tokens covered by the snapshot
    n_entries: int = 0  # log entries covered by the snapshot
    log: str = LOG  # the log file (a forget commits a new one by naming it here)
    state: dict | None = None  # {"file", "sha256"}
    shards: list[ShardInfo] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    def write(self, directory: Path) -> None:
        data = dict(vars(self))
        data["shards"] = [s.to_dict() for s in self.shards]
        atomic_write(Path(directory) / MANIFEST, json.dumps(data, indent=1).encode())

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        path = Path(directory) / MANIFEST
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise MemoryFormatError(f"{path}: missing; {directory} is not a saved memory") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MemoryFormatError(f"{path}: not valid JSON ({e}); the file is truncated or corrupted") from e
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise MemoryFormatError(
                f"{path}: format version {version!r} is newer than this memory_plugin reads "
                f"({FORMAT_VERSION}); upgrade memory_plugin"
            )
        if isinstance(data.get("config"), dict):
            for name, value in _CONFIG_BEFORE_FIELD.items():
                data["config"].setdefault(name, value)
        try:
            data["shards"] = [ShardInfo(**s) for s in data.get("shards", [])]
            return cls(**data)
        except TypeError as e:
            raise MemoryFormatError(f"{path}: unexpected fields ({e})") from e

    def files(self) -> set[str]:
        out = {s.file for s in self.shards} | {self.log}
        if self.state:
            out.add(self.state["file"])
        return out


def verify_file(directory: Path, name: str, sha256: str, size: int | None = None) -> bytes:
    """Read a file named by the manifest and check it is whole and unchanged."""
    path = Path(directory) / name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MemoryFormatError(f"{path}: missing (named by the manifest)") from None
    if size is not None and len(data) != size:
        raise MemoryFormatError(f"{path}: {len(data)} bytes, expected {size}; the file is truncated or corrupted")
    if hashlib.sha256(data).hexdigest() != sha256:
        raise MemoryFormatError(f"{path}: checksum mismatch; the file is corrupted")
    return data


def write_state(directory: Path, ctx) -> tuple[str, dict]:
    """Window, init and attention mass of every layer -> a new state file; its manifest entry."""
    tensors, layout = ctx.state_tensors()
    name = _unique("state")
    sha, size = write_safetensors(directory / name, tensors, {"layout": json.dumps(layout)})
    return name, {"file": name, "sha256": sha, "nbytes": size}


def decode_state(data: bytes, where: Path) -> tuple[dict[str, torch.Tensor], dict]:
    try:
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + header_len])["__metadata__"]
        return tensors, json.loads(meta["layout"])
    except Exception as e:  # safetensors raises its own error types
        raise MemoryFormatError(f"{where}: not a readable state snapshot ({e})") from e


# ----------------------------------------------------------------------------------- orchestration
SNAPSHOT_EVERY_TOKENS = 4096
"""An open memory writes a snapshot (new blocks, window state, manifest) every this many tokens:
on recovery at most this many tokens are re-encoded from the log."""


def _unique(prefix: str) -> str:
    return f"{prefix}-{os.urandom(4).hex()}.safetensors"


class Durable:
    """Keeps an open memory directory in step with the memory's context and history: entries go
    to the log before ``add_*`` returns; snapshots follow every few thousand tokens."""

    def __init__(
        self,
        directory: Path,
        lock: DirLock,
        fingerprint: str,
        model_name: str,
        config,
        manifest: Manifest | None,
        every: int = SNAPSHOT_EVERY_TOKENS,
    ):
        if every < 1:
            raise ValueError(f"snapshot_every must be >= 1, got {every}")
        self.every = every
        self.dir = Path(directory)
        self.lock = lock
        self.fingerprint, self.model_name, self.config = fingerprint, model_name, config
        self.manifest = manifest
        self.log_name = manifest.log if manifest is not None else LOG
        self.log = MemoryLog(self.dir / self.log_name)

    def record(self, rows: list[tuple[str | None, str, list[int]]]) -> None:
        self.log.append(rows)

    def maybe_snapshot(self, ctx, history) -> None:
        done = self.manifest.n_tokens if self.manifest else 0
        n = ctx.layout.n_tokens
        if n - done >= self.every or n < done:
            self.snapshot(ctx, history)

    def snapshot(self, ctx, history) -> None:
        """Make the directory describe the memory exactly as it is now."""
        self.manifest = write_snapshot(self.dir, ctx, history, self.config, self.fingerprint, self.model_name, self.log_name)
        collect_garbage(self.dir, self.manifest, ctx.store)

    def replace(self, ctx, history) -> None:
        """Make ``ctx`` and ``history`` (a rebuilt memory: after a forget) the directory's memory,
        atomically: everything is written to new files first, and the manifest naming them is the
        commit; a crash before it leaves the old memory, after it the new one. Then every file
        holding what was dropped is deleted."""
        name = f"log-{os.urandom(4).hex()}.sqlite"
        log = MemoryLog(self.dir / name)
        log.append(history.rows(ctx.tokens))
        manifest = write_snapshot(self.dir, ctx, history, self.config, self.fingerprint, self.model_name, name)
        self.log.close()
        self.log, self.log_name, self.manifest = log, name, manifest
        collect_garbage(self.dir, manifest, ctx.store)

    def truncate_log(self, n_entries: int) -> None:
        self.log.truncate(n_entries)

    def close(self) -> None:
        self.log.close()
        self.lock.release()


def write_snapshot(directory: Path, ctx, history, config, fingerprint: str, model_name: str, log: str = LOG) -> Manifest:
    """Blocks not yet on disk -> a new shard; shards holding KV of blocks gone cold since -> new
    shards without it; window state -> a new state file; then the manifest (the replaced shards
    are deleted after it, by the caller's :func:`collect_garbage`)."""
    ctx.store.flush()
    ctx.store.reclaim_cold()
    name, state = write_state(Path(directory), ctx)
    manifest = Manifest(
        model_fingerprint=fingerprint,
        model_name=model_name,
        config=_config_dict(config),
        n_tokens=ctx.layout.n_tokens,
        n_entries=len(history),
        state=state,
        shards=[ShardInfo(**s.to_dict()) for s in ctx.store.disk.shards] if ctx.store.disk else [],
        log=log,
    )
    manifest.write(directory)
    return manifest


def collect_garbage(directory: Path, manifest: Manifest, store) -> None:
    """Remove files neither the manifest nor the live store needs (old snapshots, dropped shards,
    temp files of an interrupted write)."""
    keep = manifest.files() | ({s.file for s in store.disk.shards} if store.disk else set())
    keep |= {f"{manifest.log}{suffix}" for suffix in ("-wal", "-shm")}
    for f in Path(directory).iterdir():
        stale = f.name.startswith(("blocks-", "state-", "log")) and f.name not in keep
        if stale or (f.name.startswith(".") and ".tmp-" in f.name):
            f.unlink(missing_ok=True)


def _config_dict(config) -> dict:
    d = config.to_dict()
    for name in config.RUNTIME_FIELDS:  # runtime choices, not part of what is stored
        d.pop(name, None)
    return d


def write_copy(directory: Path, ctx, history, config, fingerprint: str, model_name: str) -> None:
    """Save a complete copy of a memory (its context and history) into ``directory`` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock = DirLock(directory)
    try:
        if any(f.name not in (LOCK,) for f in directory.iterdir()) and not (directory / MANIFEST).exists():
            raise MemoryFormatError(f"{directory}: exists and is not a saved memory; refusing to write into it")
        _write_log_copy(directory, history.rows(ctx.tokens))
        store = ctx.store
        shards = ShardSet(directory, prefix=f"blocks-{os.urandom(4).hex()}")
        per_shard = 64
        for first in range(0, len(store), per_shard):
            ids = range(first, min(first + per_shard, len(store)))
            encs = [[store.stored(i, b) for b in ids] for i in range(len(store.layers))]
            shards.write(first, encs, [store.stored_reprs(i, first, ids[-1] + 1) for i in range(len(store.layers))])
        name, state = write_state(directory, ctx)
        manifest = Manifest(
            fingerprint,
            model_name,
            _config_dict(config),
            n_tokens=ctx.layout.n_tokens,
            n_entries=len(history),
            state=state,
            shards=shards.shards,
        )
        manifest.write(directory)
        shards.close()
        collect_garbage(directory, manifest, _NoStore)
    finally:
        lock.release()


class _NoStore:
    disk = None


def _write_log_copy(directory: Path, rows) -> None:
    """A fresh log, built aside and swapped in whole."""
    path = directory / LOG
    if path.exists():  # fold an old WAL into its database before replacing both
        old = sqlite3.connect(path)
        old.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        old.close()
    tmp = directory / f".{LOG}.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    log = MemoryLog(tmp)
    log.db.execute("PRAGMA journal_mode=DELETE")
    log.append(rows)
    log.close()
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    os.replace(tmp, path)


def read_manifest_for(directory: Path, fingerprint: str, model_name: str) -> Manifest:
    manifest = Manifest.read(directory)
    if manifest.model_fingerprint != fingerprint:
        raise MemoryFormatError(
            f"{Path(directory) / MANIFEST}: saved with model {manifest.model_name!r} (fingerprint "
            f"{manifest.model_fingerprint}), but the model given is {model_name!r} (fingerprint {fingerprint}); "
            "KV blocks are only meaningful to the model that computed them"
        )
    return manifest


def restore(ctx, directory: Path, manifest: Manifest, *, verify: bool = True) -> tuple[list, list[tuple]]:
    """Load the snapshot and shards named by ``manifest`` into ``ctx`` (created with its spill
    directory holding those shards). Returns the entries the snapshot covers and the log rows after
    it, which the caller re-encodes."""
    directory = Path(directory)
    st = manifest.state
    state_bytes = verify_file(directory, st["file"], st["sha256"], st.get("nbytes"))
    tensors, layout = decode_state(state_bytes, directory / st["file"])
    if verify:
        for s in manifest.shards:
            verify_file(directory, s.file, s.sha256, s.nbytes)
    log = directory / manifest.log
    entries = MemoryLog(log, readonly=True) if log.exists() else None
    if entries is None:
        raise MemoryFormatError(f"{log}: missing; the memory's log is required")
    rows = entries.read()
    entries.close()
    if len(rows) < manifest.n_entries:
        raise MemoryFormatError(
            f"{log}: holds {len(rows)} entries but the snapshot covers {manifest.n_entries}; "
            "the log was truncated or replaced"
        )
    kept, tokens = spans(rows[: manifest.n_entries])
    if len(tokens) != manifest.n_tokens or layout.get("n_tokens") != manifest.n_tokens:
        raise MemoryFormatError(f"{directory}: log ({len(tokens)} tokens) and snapshot ({manifest.n_tokens}) disagree")
    n_blocks = sum(s.n for s in manifest.shards)
    if ctx.cfg.topk and n_blocks != layout["n_evicted_blocks"]:
        raise MemoryFormatError(f"{directory}: shards hold {n_blocks} blocks, the snapshot expects {layout['n_evicted_blocks']}")
    try:
        if ctx.store.disk is not None:
            ctx.store.attach(manifest.shards, resident=ctx.cfg.max_resident_bytes is None)
        ctx.load_state(tensors, layout)
    except (KeyError, RuntimeError) as e:
        raise MemoryFormatError(f"{directory}: snapshot does not fit this configuration ({e})") from e
    ctx.tokens = tokens
    return kept, rows[manifest.n_entries :]


# ----------------------------------------------------------------------------------- load and open
# ContextMemory.load/open resolve the model and build the memory; these fill its engine
# (:class:`~memory_plugin.engine.Engine`: context, history, index) from the directory.


def spill_copy(directory: Path, manifest: Manifest) -> Path:
    """A private directory holding links to (or copies of) the saved shards, which are immutable:
    a memory loaded under a RAM budget reads its blocks from there without touching ``directory``."""
    spill = Path(tempfile.mkdtemp(prefix="memory_plugin-"))
    for s in manifest.shards:
        try:
            os.link(directory / s.file, spill / s.file)
        except OSError:
            shutil.copyfile(directory / s.file, spill / s.file)
    return spill


def load_into(engine, directory: Path, manifest: Manifest, *, verify: bool, keep_disk: bool) -> None:
    """Fill an empty engine from a saved memory (read-only: the directory is not changed)."""
    read_manifest_for(directory, engine.fingerprint, engine.model_name)
    entries, tail = restore(engine.ctx, directory, manifest, verify=verify)
    engine.cold.attach(engine.ctx)  # cold blocks came back as vectors only
    engine.history.extend(entries)
    if not keep_disk:
        engine.ctx.store.detach_disk()
        engine.spill_dir = None
    engine.replay(tail)
    engine.reindex()
    release_free_memory(0)  # the shard buffers read and freed while loading


# Fields an opened memory keeps from its directory whatever the config given says: how its blocks
# are stored. A pool opening threads with ``MemoryConfig()`` must open those written before the
# default became int8 (they stay float32: a memory has one codec for all its blocks).
_KEPT_FROM_SAVED = ("kv_quantization",)


def open_config(directory: Path, manifest: Manifest | None, config):
    """The config an opened memory runs with: the saved one, with the runtime fields (how it is
    used, not what it holds) taken from ``config``, and the switchable ones from it when given; the storage of its blocks is the saved one's
    (``kv_quantization``); any other difference is an error."""
    if manifest is None:
        return config or MemoryConfig()
    saved = MemoryConfig(**manifest.config)
    runtime = {k: getattr(config or MemoryConfig(), k) for k in MemoryConfig.RUNTIME_FIELDS}
    runtime |= {k: getattr(config or saved, k) for k in MemoryConfig.SWITCHABLE_FIELDS}
    runtime["max_resident_bytes"] = config.max_resident_bytes if config is not None else None
    kept = {k: getattr(saved, k) for k in (*runtime, *_KEPT_FROM_SAVED)}
    if config is not None and config.replace(**kept) != saved:
        diff = [k for k, v in saved.to_dict().items() if getattr(config, k) != v and k not in kept]
        raise ValueError(f"{directory}: config differs from the saved memory's in {', '.join(diff)}")
    return saved.replace(**runtime)


def open_into(engine, directory: Path, lock: DirLock, manifest: Manifest | None, *, verify: bool, every: int) -> None:
    """Make an empty engine the writer of ``directory`` (holding ``lock``): restore what is saved,
    re-encode the log's tail, index the history in ``index.sqlite``, snapshot if due."""
    tail = []
    if manifest is not None:  # validate everything before writing anything
        read_manifest_for(directory, engine.fingerprint, engine.model_name)
        entries, tail = restore(engine.ctx, directory, manifest, verify=verify)
        engine.cold.attach(engine.ctx)  # cold blocks came back as vectors only
        engine.history.extend(entries)
    durable = Durable(directory, lock, engine.fingerprint, engine.model_name, engine.config, manifest, every)
    engine.replay(tail)
    engine.reindex(engine.new_index(directory / INDEX))
    engine.durable = durable
    if manifest is not None:
        durable.maybe_snapshot(engine.ctx, engine.history)
    else:
        durable.snapshot(engine.ctx, engine.history)
    release_free_memory(0)  # the shard buffers read and freed while opening


def snapshot_entries(engine, first_dropped: int) -> int:
    """For a forget: how many entries the open directory's snapshot covers when it covers only
    entries before ``first_dropped`` (a forget restores it and re-encodes the rest), else 0."""
    durable = engine.durable
    m = durable.manifest if durable is not None else None
    return m.n_entries if m is not None and 0 < m.n_entries <= first_dropped else 0


def snapshot_base(engine, first_dropped: int):
    """For a forget: the open directory's snapshot as ``(context, entries)`` when it covers only
    entries before ``first_dropped`` (then only the log after it is re-encoded), else None."""
    if not snapshot_entries(engine, first_dropped):
        return None
    durable = engine.durable
    m = durable.manifest
    ctx = engine.forward.new_context(engine.config, spill_dir=durable.dir)
    entries, _ = restore(ctx, durable.dir, m, verify=False)
    return ctx, entries
