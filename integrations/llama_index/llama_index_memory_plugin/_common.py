"""Helpers shared by the query engine, the LLM and the memory block."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import TypeVar

from llama_index.core.base.llms.types import ChatMessage, TextBlock, ToolCallBlock


T = TypeVar("T")

# LlamaIndex roles onto the four the memory's chat template knows.
_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "chatbot": "assistant",
    "model": "assistant",
    "tool": "tool",
    "function": "tool",
}


def message_text(message: ChatMessage) -> str:
    """The text of a chat message: its text blocks, plus any tool calls written out, since a local
    model sees tool calls only as text (FunctionAgent stores them as blocks with empty content)."""
    parts = []
    for block in message.blocks:
        if isinstance(block, TextBlock):
            parts.append(block.text)
        elif isinstance(block, ToolCallBlock):
            args = block.tool_kwargs if isinstance(block.tool_kwargs, str) else json.dumps(block.tool_kwargs)
            parts.append(f"[tool call] {block.tool_name}({args})")
    for call in message.additional_kwargs.get("tool_calls") or []:
        fn = getattr(call, "function", None) or (call.get("function") if isinstance(call, dict) else None)
        if fn is not None:
            name = getattr(fn, "name", None) or (fn.get("name") if isinstance(fn, dict) else None)
            args = getattr(fn, "arguments", None) or (fn.get("arguments") if isinstance(fn, dict) else "")
            parts.append(f"[tool call] {name}({args})")
    return "\n".join(p for p in parts if p)


def to_memory_messages(messages: Sequence[ChatMessage]) -> list[dict]:
    """LlamaIndex chat messages as the memory's ``{"role", "content"}`` dicts. Messages with no text
    are dropped: the memory stores text only and rejects empty messages."""
    out = []
    for m in messages:
        role = m.role.value if hasattr(m.role, "value") else str(m.role)
        text = message_text(m)
        if text.strip():
            out.append({"role": _ROLES.get(role, "user"), "content": text})
    return out


async def iterate_in_thread(make_iter: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
    """Consume a blocking iterator on one worker thread and yield its items to the event loop.

    One thread for the whole iteration matters: a memory's stream holds the memory's (re-entrant,
    thread-owned) lock from its first item to its last. If the consumer stops early, the iterator is
    closed on that same thread, which ends the turn and restores the memory.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()
    end = object()

    def put(item, error=None):
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (item, error))
        except RuntimeError:  # the loop is gone: nobody is listening any more
            stop.set()

    def work():
        it = None
        try:
            it = make_iter()
            for item in it:
                put(item)
                if stop.is_set():
                    break
        except BaseException as e:  # handed to the consumer, raised there
            put(end, e)
            return
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
        put(end)

    worker = loop.run_in_executor(None, work)
    try:
        while True:
            item, error = await queue.get()
            if item is end:
                if error is not None:
                    raise error
                break
            yield item
    finally:
        stop.set()
        await asyncio.shield(worker)
