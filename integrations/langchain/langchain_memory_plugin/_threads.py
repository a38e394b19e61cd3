"""The memories of a chat model or middleware: one per conversation thread and LangGraph namespace,
durable under a directory (:class:`memory_plugin.pool.MemoryPool`) or kept in RAM
(:class:`memory_plugin.ConversationPool`).

LangGraph runs every node of a graph with the same ``thread_id``; it tells the nodes apart by
``checkpoint_ns`` (``"model:<task id>"`` for ``create_agent``'s model node, ``"tools:<id>|model:<id>"``
for an agent run inside a tool). A memory is kept per thread and per *namespace*, that path of node
names without the task ids, so a summariser, a router or a subagent calling the same model in the
same thread gets a memory of its own instead of resetting the main one.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

from memory_plugin import ContextMemory, ConversationPool, MemoryConfig
from memory_plugin.pool import MAX_ID_CHARS, MemoryPool
from memory_plugin.sessions import Conversation

#: The pool tenant every thread of these memories is kept under (one model per directory).
TENANT = "langchain"
#: The namespace of ``langchain.agents.create_agent``'s own model calls (its node is named "model").
AGENT_NAMESPACE = "model"


def graph_namespace(checkpoint_ns: Any) -> str:
    """The namespace of a LangGraph ``checkpoint_ns``: its node names without the task ids.

    >>> graph_namespace("tools:1f0e|model:9ab2")
    'tools|model'
    >>> graph_namespace(None)
    ''
    """
    if not checkpoint_ns:
        return ""
    return "|".join(part.split(":", 1)[0] for part in str(checkpoint_ns).split("|"))


def config_key(config: dict | None) -> tuple[str | None, str]:
    """``(thread_id, namespace)`` of a run config: LangGraph's ``thread_id`` (else the ``session_id``
    of ``RunnableWithMessageHistory``) and the namespace of its ``checkpoint_ns``."""
    configurable = (config or {}).get("configurable") or {}
    thread = configurable.get("thread_id", configurable.get("session_id"))
    return (None if thread is None else str(thread)), graph_namespace(configurable.get("checkpoint_ns"))


def thread_key(thread_id: str, namespace: str = "") -> str:
    """One pool thread id for a thread and namespace: each escaped (``%`` and ``#``), joined by ``#``
    (the pool percent-encodes the result into a directory name)."""
    if not isinstance(thread_id, str) or not thread_id:
        raise ValueError(f"thread_id must be a non-empty str, got {thread_id!r}")
    if not isinstance(namespace, str):
        raise TypeError(f"namespace must be a str, got {type(namespace).__name__}")
    key = _escape(thread_id) + ("#" + _escape(namespace) if namespace else "")
    if len(key) > MAX_ID_CHARS:
        raise ValueError(
            f"thread_id and namespace are too long together ({len(key)} characters escaped, at most {MAX_ID_CHARS})"
        )
    return key


def split_key(key: str) -> tuple[str, str]:
    """The ``(thread_id, namespace)`` of a :func:`thread_key`."""
    thread, _, namespace = key.partition("#")
    return _unescape(thread), _unescape(namespace)


def _escape(text: str) -> str:
    return text.replace("%", "%25").replace("#", "%23")


def _unescape(text: str) -> str:
    return text.replace("%23", "#").replace("%25", "%")


class ThreadMemories:
    """Memories per ``(thread_id, namespace)`` sharing one model.

    With ``memory_dir`` a thread's memory is a directory (:class:`~memory_plugin.pool.MemoryPool`,
    tenant :data:`TENANT`): it outlives being closed (LRU, ``max_open``) and the process, and is
    reopened without encoding again what it holds. Without, thread memories live in RAM (the
    ``max_open`` most recent). Calls without a thread id are kept in RAM either way, found by the
    conversation's prefix (:class:`~memory_plugin.ConversationPool`); ``memory`` is the first of
    those, and its model and config are the threads' too.
    """

    def __init__(
        self,
        model=None,
        tokenizer=None,
        config: MemoryConfig | None = None,
        *,
        memory_dir: str | os.PathLike | None = None,
        max_open: int = 4,
        memory: ContextMemory | None = None,
    ):
        if memory is not None:
            self.ram = ConversationPool(memory=memory, max_conversations=max_open)
        else:
            self.ram = ConversationPool(model, tokenizer, config, max_conversations=max_open)
        self.durable: MemoryPool | None = None
        if memory_dir is not None:
            cfg = self.ram.config
            self.durable = MemoryPool(
                memory_dir, self.ram.model, self.ram.tokenizer, cfg, max_open=max_open,
                max_resident_bytes=cfg.max_resident_bytes,
            )  # fmt: skip
            # An interpreter that exits normally writes each open memory's final snapshot, so the
            # next process re-encodes nothing.
            weakref.finalize(self, self.durable.close)

    @property
    def tokenizer(self):
        return self.ram.tokenizer

    @contextlib.contextmanager
    def conversation(self, messages: Sequence[dict], thread_id: str | None, namespace: str = "") -> Iterator[Conversation]:
        """The memory holding exactly ``messages`` (see :meth:`MemoryPool.conversation`), locked."""
        if thread_id is None:
            with self.ram.conversation(messages) as conv:
                yield conv
            return
        key = thread_key(thread_id, namespace)
        if self.durable is None:
            with self.ram.conversation(messages, thread_id=key) as conv:
                yield conv
        else:
            with self.durable.conversation(TENANT, key, messages) as conv:
                yield conv

    @contextlib.contextmanager
    def thread(self, thread_id: str, namespace: str = "") -> Iterator[ContextMemory]:
        """The durable memory of a thread and namespace (created if new), held for this block alone."""
        key = thread_key(thread_id, namespace)
        if self.durable is None:
            raise ValueError("a thread's memory is kept only with memory_dir= (in RAM it may be dropped any time)")
        with self.durable.thread(TENANT, key) as mem:
            yield mem

    def namespaces(self, thread_id: str) -> list[str]:
        """The namespaces a durable thread has memories in, most recently used first."""
        thread_key(thread_id)  # checks it
        if self.durable is None:
            return []
        keys = [split_key(t.thread) for t in self.durable.threads(TENANT)]
        return [ns for thread, ns in keys if thread == thread_id]

    def delete(self, thread_id: str) -> int:
        """Delete the thread's memories in every namespace, files included; returns how many."""
        if self.durable is None:
            raise ValueError("threads are deleted only with memory_dir= (in RAM they are dropped when least recent)")
        return sum(bool(self.durable.delete(TENANT, thread_key(thread_id, ns))) for ns in self.namespaces(thread_id))

    def close(self) -> None:
        """Close the open durable memories (each writes its final snapshot); they reopen on next use."""
        if self.durable is not None:
            self.durable.close()
