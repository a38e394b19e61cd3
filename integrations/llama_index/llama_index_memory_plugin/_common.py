"""LlamaIndex chat messages to and from a memory's ``{"role", "content"}`` dicts, shared by the LLM
and the memory block.

Tool calls and results are written in the core's one format (:mod:`memory_plugin.tools`), the one
the LangChain adapter writes too: a conversation stored through either front end is the same memory
and reads back the same through the other.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from llama_index.core.base.llms.types import ChatMessage, TextBlock, ToolCallBlock

from memory_plugin import tools

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
    """The text a memory stores for a chat message: its text blocks, then its tool calls in the
    core format (a local model sees calls only as text; FunctionAgent stores them as blocks with
    empty content)."""
    text = "\n".join(b.text for b in message.blocks if isinstance(b, TextBlock) and b.text)
    return tools.render_message(text, tool_calls(message))


def tool_calls(message: ChatMessage) -> list[tuple[str, Any]]:
    """A message's tool calls as ``(name, arguments)``: its ``ToolCallBlock``s, or, for a message
    without any, the OpenAI-style entries of ``additional_kwargs["tool_calls"]`` (objects or dicts
    with ``function.name``/``function.arguments``, or ``ToolSelection``-like ``tool_name``/``tool_kwargs``).
    A message that carries its calls both ways (as :func:`to_chat_messages` writes them) counts them
    once. Calls without a name are left out."""
    calls = [(b.tool_name, b.tool_kwargs) for b in message.blocks if isinstance(b, ToolCallBlock)]
    if not calls:
        for call in message.additional_kwargs.get("tool_calls") or []:
            fn = _field(call, "function")
            if fn is not None:
                calls.append((_field(fn, "name"), _field(fn, "arguments")))
            else:
                calls.append((_field(call, "tool_name"), _field(call, "tool_kwargs")))
    return [(name, args) for name, args in calls if isinstance(name, str) and name.strip()]


def _field(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def to_memory_messages(messages: Sequence[ChatMessage]) -> list[dict]:
    """LlamaIndex chat messages as a memory's ``{"role", "content"}`` dicts. Messages with no text
    are dropped: the memory stores text only and rejects empty messages."""
    out = []
    for m in messages:
        role = m.role.value if hasattr(m.role, "value") else str(m.role)
        text = message_text(m)
        if text.strip():
            out.append({"role": _ROLES.get(role, "user"), "content": text})
    return out


def to_chat_messages(messages: Sequence[dict]) -> list[ChatMessage]:
    """A memory's stored messages (``memory.messages``) back as LlamaIndex chat messages.

    An assistant message's tool calls come back as ``ToolCallBlock``s (as FunctionAgent keeps them)
    and as OpenAI-style ``additional_kwargs["tool_calls"]`` (as function-calling LLMs return them);
    a tool message carries ``additional_kwargs["tool_call_id"]``. The memory keeps no call ids: they
    come from the calls' positions (see :func:`memory_plugin.tools.read_messages`). A malformed call
    stays in the text as the model wrote it. Entries without a role (``add_text`` documents) are
    left out.

    Example:
        >>> to_chat_messages(memory.messages)  # doctest: +SKIP
    """
    out = []
    for m in tools.read_messages(messages):
        if m.role == "assistant" and (m.calls or m.invalid_calls):
            text = "\n".join([m.content] * bool(m.content) + [c.raw for c in m.invalid_calls])
            blocks: list = [TextBlock(text=text)] if text else []
            blocks += [ToolCallBlock(tool_call_id=c.id, tool_name=c.name, tool_kwargs=c.args) for c in m.calls]
            openai = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": _json(c.args)}}
                for c in m.calls
            ]
            extra = {"tool_calls": openai} if openai else {}
            out.append(ChatMessage(role=m.role, blocks=blocks, additional_kwargs=extra))
        elif m.role == "tool":
            extra = {"tool_call_id": m.tool_call_id} if m.tool_call_id else {}
            out.append(ChatMessage(role=m.role, content=m.content, additional_kwargs=extra))
        else:
            out.append(ChatMessage(role=m.role, content=m.content))
    return out


def _json(args: dict) -> str:
    return json.dumps(args, ensure_ascii=False)
