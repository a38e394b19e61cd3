"""Durable memories per tenant and thread under one root, sharing one model: what a server (or an
agent framework keeping threads) holds.

Each ``(tenant, thread)`` is a memory directory (:meth:`ContextMemory.open`) at
``root/<tenant>/<thread>``. A few are kept open, least recently used closed first: closing is cheap
because they are durable, and reopening reuses every block written (only the tail after the last
snapshot is re-encoded). One RAM budget covers all open memories. A thread's turns are serialised
(its lock), different threads run concurrently.

Example:
    >>> pool = MemoryPool("memories", model, tokenizer)  # doctest: +SKIP
    >>> with pool.conversation("acme", "thread-1", messages) as conv:  # doctest: +SKIP
    ...     reply = conv.memory.generate(None)
    >>> [t.thread for t in pool.threads("acme")]  # doctest: +SKIP
    ['thread-1']
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

from .config import MemoryConfig
from .memory import ContextMemory
from .persistence import LOCK, SNAPSHOT_EVERY_TOKENS, MemoryLockedError
from .sessions import Conversation, check_messages, sync_messages

MAX_ID_CHARS = 200


@dataclass(frozen=True)
class ThreadInfo:
    """One thread's memory as listed by :meth:`MemoryPool.threads`."""

    tenant: str
    thread: str
    disk_bytes: int  # every file of its directory
    last_active: float  # Unix time of its last checkout
    open: bool  # held open (in RAM) by the pool now
    tokens: int | None = None  # known while open
    entries: int | None = None
    blocks: dict[str, int] | None = None  # known while open: blocks per tier ("ram", "disk", "cold")


@dataclass(frozen=True)
class Retention:
    """What :meth:`MemoryPool.sweep` deletes, per tenant: threads idle longer than
    ``max_idle_seconds``; beyond the ``max_threads`` most recently active; the least recently
    active ones while the tenant's threads take more than ``max_bytes`` on disk."""

    max_idle_seconds: float | None = None
    max_threads: int | None = None
    max_bytes: int | None = None

    def __post_init__(self):
        for name in ("max_idle_seconds", "max_threads", "max_bytes"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
                raise ValueError(f"{name} must be a non-negative number or None, got {v!r}")


@dataclass
class _Slot:
    memory: ContextMemory
    messages: list[dict] | None  # None: the memory holds raw text, no conversation extends it
    lock: threading.Lock
    before_last: object = None  # checkpoint before the last message (sessions.sync_messages)


class HeldThread:
    """One thread's memory while a caller holds it (:meth:`MemoryPool.held`); valid in that block only."""

    def __init__(self, slot: _Slot, key: str):
        self._slot, self.key = slot, key

    @property
    def memory(self) -> ContextMemory:
        return self._slot.memory

    @property
    def messages(self) -> list[dict] | None:
        """The conversation the thread holds (a copy); None when it holds raw text."""
        held = self._slot.messages
        return None if held is None else list(held)

    def sync(self, messages: Sequence[dict]) -> Conversation:
        """Make the memory hold exactly ``messages``, as :meth:`MemoryPool.conversation` does."""
        msgs, slot = check_messages(messages), self._slot
        if slot.messages is None:  # raw text: no conversation extends it
            slot.memory.reset()
            slot.messages, slot.before_last = [], None
        reused, new, slot.before_last = sync_messages(slot.memory, slot.messages, msgs, slot.before_last)
        slot.messages = msgs
        return Conversation(slot.memory, reused, new, self.key)

    @contextlib.contextmanager
    def atomic(self) -> Iterator[HeldThread]:
        """:meth:`ContextMemory.atomic` on the thread: what the block adds becomes durable together
        at its end, and an exception leaves the thread holding what it held before the block."""
        slot = self._slot
        before = (slot.messages, slot.before_last)
        try:
            with slot.memory.atomic():
                yield self
        except BaseException:
            msgs = slot.memory.messages
            if msgs == before[0]:
                slot.messages, slot.before_last = before
            else:  # the block cut below its start (ContextMemory.atomic): what it holds now
                slot.messages = None if any(m["role"] is None for m in msgs) else msgs
                slot.before_last = None
            raise


class MemoryPool:
    """Durable memories keyed by ``(tenant, thread)`` (see the module doc).

    Args:
        root: directory holding every tenant's threads (created).
        model, tokenizer: one loaded model all memories share (see :func:`memory_plugin.load_model`).
        config: the memory geometry of new threads (an existing thread keeps its own).
        max_open: memories kept open at most; the least recently used idle one is closed beyond it.
        max_resident_bytes: RAM for all open memories together (each is also bounded by it); the
            least recently used idle ones are closed while the open ones hold more.
        snapshot_every: as :meth:`ContextMemory.open`.
        lock_wait: seconds to wait for a thread another process has open for writing (another
            replica of a scaled-out server) before its :class:`MemoryLockedError` is raised.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        model,
        tokenizer,
        config: MemoryConfig | None = None,
        *,
        max_open: int = 8,
        max_resident_bytes: int | None = None,
        snapshot_every: int = SNAPSHOT_EVERY_TOKENS,
        lock_wait: float = 0.0,
    ):
        if isinstance(max_open, bool) or not isinstance(max_open, int) or max_open < 1:
            raise ValueError(f"max_open must be a positive int, got {max_open!r}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.model, self.tokenizer = model, tokenizer
        self.config = (config or MemoryConfig()).replace(max_resident_bytes=max_resident_bytes)
        self.max_open, self.max_resident_bytes, self.snapshot_every = max_open, max_resident_bytes, snapshot_every
        self._slots: OrderedDict[tuple[str, str], _Slot] = OrderedDict()  # open memories, least recent first
        self._locks: dict[tuple[str, str], threading.Lock] = {}  # one per thread ever checked out
        self._lock = threading.Lock()  # guards the two dicts, never held while a memory works
        self.lock_wait = float(lock_wait)

    # ---------------------------------------------------------------------------- threads
    @contextlib.contextmanager
    def thread(self, tenant: str, thread: str) -> Iterator[ContextMemory]:
        """The thread's memory (created if new), held for this thread alone during the block. What
        the block writes into it (``add_message``, ``forget``) is what the next :meth:`conversation`
        starts from."""
        with self._checkout(tenant, thread) as slot:
            try:
                yield slot.memory
            finally:
                msgs = slot.memory.messages
                if msgs != slot.messages:  # changed in the block: what it holds now is the conversation
                    slot.messages = None if any(m["role"] is None for m in msgs) else msgs
                    slot.before_last = None

    @contextlib.contextmanager
    def conversation(self, tenant: str, thread: str, messages: Sequence[dict]) -> Iterator[Conversation]:
        """The thread's memory holding exactly ``messages`` (chat messages): what it already holds
        is reused when ``messages`` extend it; a conversation that diverges rolls back to where
        they agree (the last message swapped cheaply, otherwise cropped from the thread's last
        snapshot before that point), never mixed."""
        msgs = check_messages(messages)
        with self.held(tenant, thread) as held:
            yield held.sync(msgs)

    @contextlib.contextmanager
    def held(self, tenant: str, thread: str) -> Iterator[HeldThread]:
        """The thread held for this caller alone during the block, to read what it holds and then
        change it in the same hold (:class:`HeldThread`): a turn that continues the thread's own
        history (the Responses API) reads that history under the lock its turn holds."""
        with self._checkout(tenant, thread) as slot:
            yield HeldThread(slot, f"{tenant}/{thread}")

    def forget(self, tenant: str, thread: str, indices: Sequence[int] | None = None, *, where=None) -> int:
        """:meth:`ContextMemory.forget` on the thread's memory (created if new); returns how many
        entries were removed."""
        with self._checkout(tenant, thread) as slot:
            n = slot.memory.forget(indices, where=where)
            msgs = slot.memory.messages
            slot.messages = None if any(m["role"] is None for m in msgs) else msgs
            slot.before_last = None
            return n

    def find_thread(self, tenant: str, messages: Sequence[dict]) -> str | None:
        """The open thread of ``tenant`` whose messages are the longest prefix of ``messages`` (what
        a client that names no thread continues), or None. Only open threads are searched."""
        msgs = check_messages(messages)
        best, found = 0, None
        with self._lock:
            for (t, thread), slot in self._slots.items():
                held = slot.messages
                if t == tenant and held and len(held) <= len(msgs) and msgs[: len(held)] == held and len(held) > best:
                    best, found = len(held), thread
        return found

    def threads(self, tenant: str) -> list[ThreadInfo]:
        """The tenant's threads, most recently active first."""
        base = self.root / _dirname(tenant, "tenant")
        out = []
        for d in base.iterdir() if base.is_dir() else []:
            if not d.name.startswith("t-"):
                continue
            thread = unquote(d.name[2:])
            with self._lock:
                slot = self._slots.get((tenant, thread))
            mem = slot.memory if slot is not None else None
            try:  # a thread deleted meanwhile is simply not listed
                size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
                active = (d / LOCK).stat().st_mtime
            except FileNotFoundError:
                continue
            n = (len(mem), len(mem.entries), _tiers(mem)) if mem is not None else (None, None, None)
            out.append(ThreadInfo(tenant, thread, size, active, mem is not None, *n))
        return sorted(out, key=lambda t: -t.last_active)

    def delete(self, tenant: str, thread: str) -> bool:
        """Delete the thread and its files (waits for a turn in progress); False if there was none."""
        key, path = (tenant, thread), self._path(tenant, thread)
        with self._thread_lock(key):
            with self._lock:
                slot = self._slots.pop(key, None)
            if slot is not None:
                slot.memory.close()
            existed = path.is_dir()
            shutil.rmtree(path, ignore_errors=True)
            return existed

    def sweep(self, retention: Retention, *, now: float | None = None) -> list[tuple[str, str]]:
        """Delete what ``retention`` says is too old or too much, tenant by tenant; a thread in use
        is skipped (the next sweep sees it again). Returns the ``(tenant, thread)`` deleted."""
        now = time.time() if now is None else now
        gone = []
        for tdir in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            if not tdir.name.startswith("t-"):
                continue
            tenant = unquote(tdir.name[2:])
            kept_bytes = 0
            for rank, info in enumerate(self.threads(tenant)):  # most recent first
                idle = retention.max_idle_seconds is not None and now - info.last_active > retention.max_idle_seconds
                many = retention.max_threads is not None and rank >= retention.max_threads
                big = retention.max_bytes is not None and kept_bytes + info.disk_bytes > retention.max_bytes
                if (idle or many or big) and self._delete_if_idle(tenant, info.thread):
                    gone.append((tenant, info.thread))
                else:
                    kept_bytes += info.disk_bytes
        return gone

    def close(self) -> None:
        """Close every open memory (each writes a final snapshot)."""
        with self._lock:
            slots = list(self._slots.items())
            self._slots.clear()
        for key, slot in slots:
            with slot.lock:
                slot.memory.close()

    def __enter__(self) -> MemoryPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        """Memories open now."""
        return len(self._slots)

    # ---------------------------------------------------------------------------- internals
    def _path(self, tenant: str, thread: str) -> Path:
        return self.root / _dirname(tenant, "tenant") / _dirname(thread, "thread")

    def _thread_lock(self, key: tuple[str, str]) -> threading.Lock:
        with self._lock:
            return self._locks.setdefault(key, threading.Lock())

    @contextlib.contextmanager
    def _checkout(self, tenant: str, thread: str) -> Iterator[_Slot]:
        key, path = (tenant, thread), self._path(tenant, thread)
        with self._thread_lock(key):
            with self._lock:
                slot = self._slots.get(key)
                if slot is not None:
                    self._slots.move_to_end(key)
            if slot is None:
                mem = self._open(path)
                msgs = mem.messages
                slot = _Slot(mem, None if any(m["role"] is None for m in msgs) else msgs, self._locks[key])
                with self._lock:
                    self._slots[key] = slot
            os.utime(path / LOCK)  # last activity, for listing and retention
            try:
                yield slot
            finally:
                self._shrink(keep=key)

    def _open(self, path: Path) -> ContextMemory:
        # The directory's flock is the only lock between processes: poll it (flock has no timeout).
        deadline = time.monotonic() + self.lock_wait
        while True:
            try:
                return ContextMemory.open(
                    path, self.model, tokenizer=self.tokenizer, config=self.config, snapshot_every=self.snapshot_every
                )
            except MemoryLockedError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def holds(self, thread: str) -> bool:
        """Whether a memory of ``thread`` (any tenant) is open here now."""
        with self._lock:
            return any(k[1] == thread for k in self._slots)

    def release(self, thread: str) -> int:
        """Close the idle open memories of ``thread`` (any tenant), releasing their directories to
        another process; a memory in a turn stays open. Returns how many were closed."""
        closed = 0
        with self._lock:
            keys = [k for k in self._slots if k[1] == thread]
        for key in keys:
            with self._lock:
                slot = self._slots.get(key)
                if slot is None or not slot.lock.acquire(blocking=False):
                    continue
                del self._slots[key]
            try:
                slot.memory.close()
                closed += 1
            finally:
                slot.lock.release()
        return closed

    def _shrink(self, keep: tuple[str, str]) -> None:
        """Close least recently used idle memories beyond ``max_open`` or the RAM budget."""
        while True:
            with self._lock:
                over = len(self._slots) > self.max_open
                if not over and self.max_resident_bytes is not None:
                    held = sum(s.memory.stats().bytes["host"] for s in self._slots.values())
                    over = held > self.max_resident_bytes and len(self._slots) > 1
                # a victim's own lock is taken before it leaves the dict: nobody reopens it half-closed
                victim = next((k for k, s in self._slots.items() if k != keep and s.lock.acquire(blocking=False)), None) if over else None
                if victim is None:
                    return
                slot = self._slots.pop(victim)
            try:
                slot.memory.close()
            finally:
                slot.lock.release()

    def _delete_if_idle(self, tenant: str, thread: str) -> bool:
        lock = self._thread_lock((tenant, thread))
        if not lock.acquire(blocking=False):
            return False
        lock.release()
        return self.delete(tenant, thread)


def _tiers(mem: ContextMemory) -> dict[str, int] | None:
    """Blocks per tier of an open memory, read without its lock (a listing must not wait for a
    turn): None when a turn changed the blocks meanwhile."""
    try:
        return mem.stats().blocks_by_tier
    except (IndexError, KeyError, RuntimeError):
        return None


def _dirname(name: str, what: str) -> str:
    """A directory name for a tenant or thread id: any text, percent-encoded, behind a prefix (so
    ``..`` or ``/`` can never leave the root).

    >>> _dirname("alice/../x", "thread")
    't-alice%2F..%2Fx'
    """
    if not isinstance(name, str) or not name or len(name) > MAX_ID_CHARS:
        raise ValueError(f"{what} must be a non-empty str of at most {MAX_ID_CHARS} characters, got {name!r}")
    return "t-" + quote(name, safe="")
