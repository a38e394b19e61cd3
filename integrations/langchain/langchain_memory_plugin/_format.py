"""LangChain messages and tool calls as the core's: the tool-call format itself is
:mod:`memory_plugin.tools` (one format for every front end, documented there), so a conversation
stored through this adapter reads the same through any other.

Here: LangChain messages to and from a memory's ``{"role", "content"}`` dicts, the core's
:class:`~memory_plugin.tools.ToolCall` / :class:`~memory_plugin.tools.InvalidToolCall` as LangChain's
``tool_call`` / ``invalid_tool_call`` dicts, and the prompts and watcher of structured output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.tool import InvalidToolCall, ToolCall, invalid_tool_call, tool_call

from memory_plugin import tools as core
from memory_plugin.tools import (  # noqa: F401  (their old home: re-exported)
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    TOOLS_PROMPT,
    new_tool_call_id,
    render_tool_call,
    tools_prompt,
)
from memory_plugin.tools import template_tools_system as native_tools_system  # noqa: F401

JSON_MODE_PROMPT = "Reply with a single JSON object and nothing else."
JSON_SCHEMA_PROMPT = "Reply with a single JSON object that matches this JSON schema, and nothing else:\n{schema}"

_ROLES = {
    "human": "user",
    "user": "user",
    "ai": "assistant",
    "assistant": "assistant",
    "system": "system",
    "tool": "tool",
}


def message_text(message: BaseMessage) -> str:
    """The text of a message whatever its content format (str or content blocks)."""
    text = message.text
    return text if isinstance(text, str) else str(text)


def to_core_messages(messages: Sequence[BaseMessage], system_content: str | None = None) -> list[dict]:
    """LangChain messages as ``{"role", "content"}`` dicts for a ContextMemory.

    SystemMessage → system, HumanMessage → user, AIMessage → assistant (its tool calls written in
    the core format), ToolMessage → tool (a failed one's text starts with ``Error:``). Messages with
    no text are left out: the memory stores no empty messages. ``system_content`` (the tools block)
    replaces the first system message's content, or becomes a system message of its own at the start.
    """
    out: list[dict] = []
    for m in messages:
        role = _role(m)
        content = message_text(m).strip()
        if isinstance(m, AIMessage) and m.tool_calls:
            content = core.render_message(content, [(tc["name"], tc["args"]) for tc in m.tool_calls])
        elif isinstance(m, ToolMessage):
            content = core.render_tool_result(content, error=getattr(m, "status", "success") == "error")
        if content:
            out.append({"role": role, "content": content})
    if system_content:
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": system_content}
        else:
            out.insert(0, {"role": "system", "content": system_content})
    return out


def first_system_text(messages: Sequence[BaseMessage]) -> str | None:
    """The first message's text when it is a system message (the tools block is added to it)."""
    for m in messages:
        if _role(m) == "system":
            text = message_text(m).strip()
            return text or None
        return None
    return None


def from_core_messages(messages: Sequence[dict]) -> list[BaseMessage]:
    """Stored ``{"role", "content"}`` messages back as LangChain messages.

    Tool calls are parsed out of assistant text. The memory keeps no tool-call ids: calls get ids
    from their position (``call_<message index>_<call index>``) and each tool message takes the id
    of the next unanswered call before it (see :func:`memory_plugin.tools.read_messages`). Entries
    without a role (``add_text`` documents) are not messages and are left out.
    """
    out: list[BaseMessage] = []
    for m in core.read_messages(messages):
        if m.role == "system":
            out.append(SystemMessage(m.content))
        elif m.role == "user":
            out.append(HumanMessage(m.content))
        elif m.role == "assistant":
            out.append(
                AIMessage(
                    content=m.content,
                    tool_calls=[to_langchain_call(c) for c in m.calls],
                    invalid_tool_calls=[to_langchain_call(c) for c in m.invalid_calls],
                )
            )
        elif m.role == "tool":
            out.append(ToolMessage(m.content, tool_call_id=m.tool_call_id))
    return out


def _role(m: BaseMessage) -> str:
    if isinstance(m, SystemMessage):
        return "system"
    if isinstance(m, HumanMessage):
        return "user"
    if isinstance(m, AIMessage):
        return "assistant"
    if isinstance(m, (ToolMessage, FunctionMessage)):
        return "tool"
    if isinstance(m, ChatMessage) and m.role in _ROLES:
        return _ROLES[m.role]
    raise ValueError(f"cannot map a {type(m).__name__} (role {getattr(m, 'role', m.type)!r}) to a chat role")


# ------------------------------------------------------------------------------------ parsing
def to_langchain_call(call: core.ToolCall | core.InvalidToolCall) -> ToolCall | InvalidToolCall:
    """A core call as LangChain's dict; an invalid one carries the model's text as its ``args``."""
    if isinstance(call, core.ToolCall):
        return tool_call(name=call.name, args=call.args, id=call.id)
    return invalid_tool_call(name=call.name, args=call.raw, id=call.id, error=call.error)


def parse_call(block: str, raw: str, call_id: str) -> ToolCall | InvalidToolCall:
    """:func:`memory_plugin.tools.parse_call`, as a LangChain tool call or invalid tool call."""
    return to_langchain_call(core.parse_call(block, raw, call_id))


@dataclass
class Parsed:
    """A whole reply, parsed."""

    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    invalid_tool_calls: list[InvalidToolCall] = field(default_factory=list)


def parse_text(text: str, id_factory=new_tool_call_id) -> Parsed:
    """A complete reply's text, its tool calls and invalid tool calls (same rules as streaming)."""
    reply = core.parse_reply(text, id_factory=id_factory)
    return Parsed(
        reply.content, [to_langchain_call(c) for c in reply.calls], [to_langchain_call(c) for c in reply.invalid_calls]
    )


class ReplyParser(core.ReplyParser):
    """:class:`memory_plugin.tools.ReplyParser` whose ``("call", ...)`` events carry LangChain's
    tool-call dicts."""

    def feed(self, piece: str) -> list[tuple[str, Any]]:
        return _langchain_events(super().feed(piece))

    def finish(self) -> list[tuple[str, Any]]:
        return _langchain_events(super().finish())


def _langchain_events(events: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return [(kind, to_langchain_call(value) if kind == "call" else value) for kind, value in events]


class JsonObjectEnd:
    """Watches streamed text that starts with a JSON object and tells when the object closes, so
    generation can stop there instead of running to ``max_tokens``."""

    def __init__(self):
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.done = False

    def feed(self, text: str) -> int | None:
        """Feed text; returns the index just past the object's closing brace if it is in ``text``."""
        for i, ch in enumerate(text):
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth <= 0:
                    self.done = True
                    return i + 1
        return None

