"""Message histories stored in a ContextMemory.

``BaseChatMessageHistory`` and ``RunnableWithMessageHistory`` are deprecated in langchain-core 1.x
in favour of LangGraph persistence; these classes are a compatibility path for code that still
uses them. With LangGraph, keep the conversation in the graph state and let
:class:`~langchain_memory_plugin.ContextMemoryChatModel` (keyed by ``thread_id``) hold the memory.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import BaseMessage

from memory_plugin import ContextMemory, MemoryConfig

from ._format import from_core_messages, to_core_messages
from ._loading import load_shared_model


class ContextMemoryChatMessageHistory(BaseChatMessageHistory):
    """A chat message history whose messages live in a ContextMemory (as durable as the memory).

    Messages are converted as the chat model converts them (tool calls rendered in the documented
    ``<tool_call>`` format, tool results as ``tool`` messages), so the memory can also be searched
    with :class:`~langchain_memory_plugin.ContextMemoryRetriever` or answered from directly. The
    memory keeps no tool-call ids: read back, calls get ids from their position and each tool
    message the id of the call it answers. Messages without text are not stored.

    Deprecated upstream (see the module docstring): a compatibility path for
    ``RunnableWithMessageHistory``.

    Do not give the same ContextMemory to a ContextMemoryChatModel as well: the model brings its
    memory to exactly the messages of each call, which would interleave with the history's writes.

    Example:
        >>> history = ContextMemoryChatMessageHistory()  # embedded model  # doctest: +SKIP
        >>> history.add_user_message("My locker code is 4721.")  # doctest: +SKIP
        >>> history.memory.generate("\\nThe locker code is", chat=False)  # doctest: +SKIP
    """

    def __init__(
        self,
        memory: ContextMemory | None = None,
        *,
        model: str | None = None,
        config: MemoryConfig | None = None,
    ):
        if memory is None:
            hf_model, tokenizer = load_shared_model(model)
            memory = ContextMemory(hf_model, tokenizer, config)
        elif model is not None or config is not None:
            raise ValueError("pass either memory= or model=/config=, not both")
        self.memory = memory

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        """The stored messages as LangChain messages (``add_text`` documents are not messages)."""
        return from_core_messages([m for m in self.memory.messages if m["role"] is not None])

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Encode ``messages`` into the memory, in order (all are checked before any is stored)."""
        core = to_core_messages(list(messages))
        if core:
            self.memory.add_messages(core)

    def clear(self) -> None:
        """Forget every message (the memory is reset)."""
        self.memory.reset()


class ContextMemoryHistoryStore:
    """One :class:`ContextMemoryChatMessageHistory` per session (or LangGraph-style thread) id, all
    sharing one model's weights; pass the store as ``get_session_history``.

    Example:
        >>> store = ContextMemoryHistoryStore()  # doctest: +SKIP
        >>> chain = RunnableWithMessageHistory(llm, store)  # doctest: +SKIP
        >>> chain.invoke("hi", config={"configurable": {"session_id": "alice"}})  # doctest: +SKIP

    Args:
        model: None (the embedded model), a model name or path, or a loaded transformers model
            (then ``tokenizer`` too).
        config: the memory geometry of each history.
        max_sessions: histories kept; the least recently used is dropped beyond it (None: all).
    """

    def __init__(
        self,
        model=None,
        tokenizer=None,
        *,
        config: MemoryConfig | None = None,
        max_sessions: int | None = None,
    ):
        if model is None or isinstance(model, str):
            if tokenizer is not None:
                raise ValueError("tokenizer= goes with a loaded model, not a model name")
            model, tokenizer = load_shared_model(model)
        elif tokenizer is None:
            raise ValueError("a loaded model needs its tokenizer")
        if max_sessions is not None and max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.max_sessions = max_sessions
        self._histories: OrderedDict[str, ContextMemoryChatMessageHistory] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, session_id: str) -> ContextMemoryChatMessageHistory:
        """The history of ``session_id``, created empty on first use."""
        key = str(session_id)
        with self._lock:
            history = self._histories.get(key)
            if history is None:
                history = ContextMemoryChatMessageHistory(ContextMemory(self.model, self.tokenizer, self.config))
                self._histories[key] = history
            self._histories.move_to_end(key)
            while self.max_sessions is not None and len(self._histories) > self.max_sessions:
                self._histories.popitem(last=False)
            return history

    get = __call__

    def __contains__(self, session_id: object) -> bool:
        return str(session_id) in self._histories

    def __len__(self) -> int:
        return len(self._histories)
