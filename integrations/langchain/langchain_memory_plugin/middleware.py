"""``ContextMemoryMiddleware``: long memory for a ``create_agent`` agent whose model is not ours (a
hosted one): the model is sent the last messages and what the thread's memory finds for the user's
question among the earlier ones.

It is the lossless counterpart of LangChain's ``SummarizationMiddleware``: nothing is summarised
away and no extra LLM call is made. The whole conversation is written into a ContextMemory per
thread (a small local model encodes it, only the new messages on each call), and its hybrid search
(BM25 fused with the local model's attention) picks the passages to send.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from langchain.agents.middleware import AgentMiddleware, ModelRequest, ModelResponse
from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.runnables.config import ensure_config

from memory_plugin import ContextMemory, MemoryConfig, MemoryHit
from memory_plugin.memory import PLACED_HEADER

from ._format import message_text, to_core_messages
from ._loading import load_shared_model
from ._threads import AGENT_NAMESPACE, ThreadMemories, config_key


class ContextMemoryMiddleware(AgentMiddleware):
    """Keeps the last ``keep_last`` messages in each model request and adds, to its system message,
    the ``k`` passages of the earlier messages that the thread's memory retrieves for the last user
    message; the conversation itself is written into the thread's memory.

    A thread is the run config's ``thread_id`` (a checkpointer's), its memory kept per agent (the
    namespace of the agent's model node, ``"model"`` for a top-level agent). The messages sent start
    earlier than ``keep_last`` when needed so that no tool result is sent without the call it
    answers. The passages go after the system prompt under the line ``"Earlier in this
    conversation:"``, in the order they were said, each prefixed with its role; they stay the same
    while the agent works on one question (its tool calls), so a provider's prompt cache still
    applies. The final answer of a run is written when the run ends.

    Example:
        >>> agent = create_agent(  # doctest: +SKIP
        ...     model="openai:gpt-4.1-mini", tools=tools, checkpointer=saver,
        ...     middleware=[ContextMemoryMiddleware(keep_last=8, memory_dir="memories")],
        ... )

    Args:
        keep_last: messages sent as they are (the most recent), at least 1.
        k: passages of the earlier messages added to a request (0: none).
        model, memory, memory_config, memory_dir, device, max_conversations: the local model that
            encodes the memories and where they live, as for
            :class:`~langchain_memory_plugin.ContextMemoryChatModel` (default: the embedded
            SmolLM2-135M-Instruct, memories in RAM; with ``memory_dir`` durable per thread).
    """

    def __init__(
        self,
        keep_last: int = 8,
        k: int = 3,
        *,
        model: str | None = None,
        memory: ContextMemory | None = None,
        memory_config: MemoryConfig | None = None,
        memory_dir: str | os.PathLike | None = None,
        device: str | None = None,
        max_conversations: int = 4,
    ):
        super().__init__()
        for name, value, least in (("keep_last", keep_last, 1), ("k", k, 0), ("max_conversations", max_conversations, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        if memory is not None and model is not None:
            raise ValueError("pass either memory= (its model is used) or model=, not both")
        self.keep_last, self.k = keep_last, k
        self._settings = dict(
            model=model, memory=memory, memory_config=memory_config, memory_dir=memory_dir, device=device,
            max_conversations=max_conversations,
        )  # fmt: skip
        self._memories: ThreadMemories | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------ thread memories
    @contextlib.contextmanager
    def thread_memory(self, thread_id: str, namespace: str = AGENT_NAMESPACE) -> Iterator[ContextMemory]:
        """The durable memory of a thread (``memory_dir`` only), held during the ``with`` block (see
        :meth:`ContextMemoryChatModel.thread_memory`); a top-level agent's is namespace ``"model"``."""
        with self._pool().thread(thread_id, namespace) as mem:
            yield mem

    def close(self) -> None:
        """Close the durable memories open now (each writes its final snapshot)."""
        if self._memories is not None:
            self._memories.close()

    # ------------------------------------------------------------------------ agent hooks
    def wrap_model_call(self, request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]) -> ModelResponse:
        return handler(self._request(request, _agent_key()))

    async def awrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], Awaitable[ModelResponse]]
    ) -> ModelResponse:
        # Encoding is blocking torch work: a worker thread keeps the event loop free.
        return await handler(await asyncio.to_thread(self._request, request, _agent_key()))

    def after_agent(self, state: Any, runtime: Any) -> None:
        self._write(state["messages"], _agent_key())

    async def aafter_agent(self, state: Any, runtime: Any) -> None:
        await asyncio.to_thread(self._write, state["messages"], _agent_key())

    # ------------------------------------------------------------------------ internals
    def _pool(self) -> ThreadMemories:
        with self._lock:
            if self._memories is None:
                s = self._settings
                kw = dict(memory_dir=s["memory_dir"], max_open=s["max_conversations"])
                if s["memory"] is not None:
                    self._memories = ThreadMemories(memory=s["memory"], **kw)
                else:
                    hf_model, tokenizer = load_shared_model(s["model"], device=s["device"])
                    self._memories = ThreadMemories(hf_model, tokenizer, s["memory_config"], **kw)
            return self._memories

    def _write(self, messages: list[BaseMessage], key: tuple[str | None, str]) -> None:
        core, _ = _core_messages(messages)
        if core:
            with self._pool().conversation(core, *key):
                pass

    def _request(self, request: ModelRequest, key: tuple[str | None, str]) -> ModelRequest:
        """The request with the last messages only and the retrieved passages; writes the memory."""
        messages = request.messages
        core, origin = _core_messages(messages)
        if not core:
            return request
        start = _kept_start(messages, self.keep_last)
        query = next((message_text(m) for m in reversed(messages) if isinstance(m, HumanMessage)), "").strip()
        hits: list[MemoryHit] = []
        with self._pool().conversation(core, *key) as conv:
            if start > 0 and query and self.k:
                # Passages of the kept messages are found too: ask for enough to leave k earlier ones.
                hits = conv.memory.retrieve(query, k=4 * self.k + self.keep_last)
        earlier = [h for h in hits if h.message_index is not None and origin[h.message_index] < start][: self.k]
        if start == 0:
            return request
        if not earlier:
            return request.override(messages=messages[start:])
        lines = "\n".join(f"[{h.role}] {h.text.strip()}" for h in sorted(earlier, key=lambda h: h.start))
        note = f"{PLACED_HEADER}\n{lines}"
        system = request.system_message
        prompt = system.text.strip() if system is not None else ""
        return request.override(
            messages=messages[start:], system_message=SystemMessage(f"{prompt}\n\n{note}" if prompt else note)
        )


def _agent_key() -> tuple[str | None, str]:
    """The run's thread and the namespace of the agent's model node, from any node of the agent:
    the node path of the call with its last node replaced by the model node."""
    thread_id, namespace = config_key(ensure_config())
    graph = namespace.rpartition("|")[0]
    return thread_id, f"{graph}|{AGENT_NAMESPACE}" if graph else AGENT_NAMESPACE


def _core_messages(messages: list[BaseMessage]) -> tuple[list[dict], list[int]]:
    """The messages as the memory stores them, and for each the index of the message it came from
    (messages without text are not stored)."""
    core, origin = [], []
    for i, m in enumerate(messages):
        for c in to_core_messages([m]):
            core.append(c)
            origin.append(i)
    return core, origin


def _kept_start(messages: list[BaseMessage], keep_last: int) -> int:
    """Index of the first message sent: ``keep_last`` from the end, earlier while it would be a tool
    result separated from its call."""
    start = max(0, len(messages) - keep_last)
    while 0 < start < len(messages) and isinstance(messages[start], ToolMessage):
        start -= 1
    return start
