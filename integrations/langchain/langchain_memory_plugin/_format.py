"""The prompt format of tools and tool calls, and LangChain messages as memory_plugin message dicts.

Tool format (used when the model's chat template has no tool rendering of its own, e.g. SmolLM2's
ChatML): the tools are listed in the system message, one JSON schema per line inside
``<tools>...</tools>``, and the model calls a tool by replying with one block per call::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Earlier tool calls in the history are rendered the same way in the assistant's message; tool
results are ``tool`` messages. A template that renders ``tools`` itself (Qwen2.5, Hermes-style)
supplies the system text instead; the call format above is the one those templates use too.
"""

from __future__ import annotations

import json
import uuid
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

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

TOOLS_PROMPT = """You can call tools. Each tool is described by a JSON schema:
<tools>
{tools}
</tools>
To call a tool, reply with its name and arguments as JSON inside tags, one block per call:
<tool_call>
{{"name": "tool_name", "arguments": {{"argument_name": "value"}}}}
</tool_call>
The results come back as tool messages."""

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
_SENTINEL = "\x00LANGCHAIN-MEMORY-PLUGIN\x00"


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def render_tool_call(name: str, args: dict) -> str:
    """One call in the documented format (the text the model is asked to produce)."""
    body = json.dumps({"name": name, "arguments": args}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def tools_prompt(functions: Sequence[dict]) -> str:
    """The documented system-prompt block listing ``functions`` (OpenAI ``function`` dicts)."""
    lines = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in functions)
    return TOOLS_PROMPT.format(tools=lines)


def native_tools_system(tokenizer, functions: Sequence[dict], system: str | None) -> str | None:
    """The system message content the tokenizer's own chat template writes for ``tools``, or None
    when the template has no tool rendering (or renders it somewhere other than the system message).

    Found by rendering a system message with and without ``tools``: the template's text around a
    system message's content is the same in both, the content in between is what we store.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or "tools" not in template or not functions:
        return None
    tools = [{"type": "function", "function": f} for f in functions]
    try:
        bare = tokenizer.apply_chat_template([{"role": "system", "content": _SENTINEL}], tokenize=False)
        with_tools = tokenizer.apply_chat_template(
            [{"role": "system", "content": system or ""}], tools=tools, tokenize=False
        )
    except Exception:  # a template that rejects this input: use the documented format
        return None
    if _SENTINEL not in bare:
        return None
    before, after = bare.split(_SENTINEL, 1)
    if not (with_tools.startswith(before) and with_tools.endswith(after)):
        return None
    content = with_tools[len(before) : len(with_tools) - len(after)]
    if not all(f["name"] in content for f in functions):
        return None
    return content if system else content.lstrip()


def message_text(message: BaseMessage) -> str:
    """The text of a message whatever its content format (str or content blocks)."""
    text = message.text
    return text if isinstance(text, str) else str(text)


def to_core_messages(messages: Sequence[BaseMessage], system_content: str | None = None) -> list[dict]:
    """LangChain messages as ``{"role", "content"}`` dicts for a ContextMemory.

    SystemMessage → system, HumanMessage → user, AIMessage → assistant (its tool calls appended in
    the documented format), ToolMessage → tool. Messages with no text are left out: the memory
    stores no empty messages. ``system_content`` (the tools block) replaces the first system
    message's content, or becomes a system message of its own at the start.
    """
    out: list[dict] = []
    for m in messages:
        role = _role(m)
        content = message_text(m).strip()
        if isinstance(m, AIMessage) and m.tool_calls:
            calls = [render_tool_call(tc["name"], tc["args"]) for tc in m.tool_calls]
            content = "\n".join(([content] if content else []) + calls)
        elif isinstance(m, ToolMessage) and getattr(m, "status", "success") == "error" and content:
            if not content.lower().startswith("error"):
                content = f"Error: {content}"
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

    Tool calls are parsed out of assistant text. The memory keeps no tool-call ids, so calls get ids
    from their position (``call_<message index>_<call index>``) and each tool message takes the id
    of the next unanswered call before it. Entries without a role (``add_text`` documents) are
    not messages and are left out.
    """
    out: list[BaseMessage] = []
    unanswered: list[str] = []
    for index, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role == "system":
            out.append(SystemMessage(content))
        elif role == "user":
            out.append(HumanMessage(content))
        elif role == "assistant":
            counter = iter(range(1_000_000))
            parsed = parse_text(content, id_factory=lambda: f"call_{index}_{next(counter)}")
            unanswered = [tc["id"] for tc in parsed.tool_calls]
            out.append(
                AIMessage(
                    content=parsed.content, tool_calls=parsed.tool_calls, invalid_tool_calls=parsed.invalid_tool_calls
                )
            )
        elif role == "tool":
            out.append(ToolMessage(content, tool_call_id=unanswered.pop(0) if unanswered else ""))
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
def parse_call(block: str, raw: str, call_id: str) -> ToolCall | InvalidToolCall:
    """One ``<tool_call>`` block's inner text as a tool call, or an invalid tool call (with ``raw``,
    the model's text for the call, as its ``args``) when it is not ``{"name", "arguments"}`` JSON."""
    obj, error = _json_object(block)
    if obj is None:
        return invalid_tool_call(name=_guess_name(block), args=raw, id=call_id, error=error)
    name = obj.get("name")
    args = obj["arguments"] if "arguments" in obj else obj.get("args", obj.get("parameters", {}))
    if isinstance(args, str):  # arguments given as a JSON string (OpenAI style)
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            pass
    if not isinstance(name, str) or not name.strip():
        return invalid_tool_call(name=None, args=raw, id=call_id, error="the tool call has no name")
    if not isinstance(args, dict):
        error = "the tool call's arguments are not a JSON object"
        return invalid_tool_call(name=name, args=raw, id=call_id, error=error)
    return tool_call(name=name.strip(), args=args, id=call_id)


def _json_object(text: str) -> tuple[dict | None, str | None]:
    """The first JSON object in ``text``; closing braces a model left out are added back."""
    start = text.find("{")
    if start == -1:
        return None, "no JSON object in the tool call"
    decoder = json.JSONDecoder()
    body = text[start:].rstrip()
    error = None
    for missing in range(4):
        try:
            obj, _ = decoder.raw_decode(body + "}" * missing)
        except json.JSONDecodeError as e:
            error = error or e
            continue
        if isinstance(obj, dict):
            return obj, None
    return None, f"the tool call is not valid JSON: {error}"


def _guess_name(text: str) -> str | None:
    key = '"name"'
    at = text.find(key)
    if at == -1:
        return None
    rest = text[at + len(key) :].lstrip(" :")
    if not rest.startswith('"'):
        return None
    end = rest.find('"', 1)
    return rest[1:end] if end > 1 else None


@dataclass
class Parsed:
    """A whole reply, parsed."""

    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    invalid_tool_calls: list[InvalidToolCall] = field(default_factory=list)


def parse_text(text: str, id_factory=new_tool_call_id) -> Parsed:
    """A complete reply's text, its tool calls and invalid tool calls (same rules as streaming)."""
    parser = ReplyParser(tools=True, id_factory=id_factory)
    out = Parsed()
    for kind, value in [*parser.feed(text), *parser.finish()]:
        if kind == "text":
            out.content += value
        elif value["type"] == "tool_call":
            out.tool_calls.append(value)
        else:
            out.invalid_tool_calls.append(value)
    return out


class ReplyParser:
    """Splits a reply streamed piece by piece into text and tool calls.

    ``feed`` returns events ``("text", str)`` and ``("call", ToolCall | InvalidToolCall)`` as soon
    as they are certain: text that could be the start of ``<tool_call>`` is held back, a call is
    reported when its block closes (or at the end, for a block the model never closed). A call
    block and the whitespace after it are cut out, and trailing whitespace is dropped, so the text
    reads as if the calls were never there. With ``tools=False`` text passes through as is.
    """

    def __init__(self, tools: bool, id_factory=new_tool_call_id):
        self.tools = tools
        self.id_factory = id_factory
        self._buf = ""
        self._in_call = False
        self._pending_ws = ""
        self._after_block = False
        self.saw_call = False  # a tool call (valid or not) was reported

    def feed(self, piece: str) -> list[tuple[str, Any]]:
        if not self.tools:
            return [("text", piece)] if piece else []
        self._buf += piece
        events: list[tuple[str, Any]] = []
        while True:
            if not self._in_call:
                at = self._buf.find(TOOL_CALL_OPEN)
                if at == -1:
                    keep = _partial_suffix(self._buf, TOOL_CALL_OPEN)
                    events += self._text(self._buf[: len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep :]
                    return events
                events += self._text(self._buf[:at])
                self._buf = self._buf[at + len(TOOL_CALL_OPEN) :]
                self._in_call = True
            at = self._buf.find(TOOL_CALL_CLOSE)
            if at == -1:
                return events
            block = self._buf[:at]
            self.saw_call = True
            events.append(("call", parse_call(block, TOOL_CALL_OPEN + block + TOOL_CALL_CLOSE, self.id_factory())))
            self._buf = self._buf[at + len(TOOL_CALL_CLOSE) :]
            self._in_call = False
            self._after_block = True

    def finish(self) -> list[tuple[str, Any]]:
        if not self.tools:
            return []
        buf, self._buf = self._buf, ""
        if self._in_call:
            self._in_call = False
            self.saw_call = True
            return [("call", parse_call(buf, TOOL_CALL_OPEN + buf, self.id_factory()))]
        events = self._text(buf)
        self._pending_ws = ""
        return events

    def _text(self, s: str) -> list[tuple[str, Any]]:
        if self._after_block:
            s = s.lstrip()
            if not s:
                return []
            self._after_block = False
        s = self._pending_ws + s
        body = s.rstrip()
        self._pending_ws = s[len(body) :]
        return [("text", body)] if body else []


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


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

