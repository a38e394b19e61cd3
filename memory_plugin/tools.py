"""The tool-call text format every front end shares: how tools are offered, how a call is written,
and how calls are read back out of a reply, whole or piece by piece while it streams.

A local model sees tools and tool calls only as text, and a memory stores them as that text. With
one format for all front ends, a conversation written through LangChain is the same memory, token
for token, as the same conversation written through LlamaIndex (or a server), and each reads the
other's calls back.

The format (the Hermes style that Qwen2.5's chat template uses too):

* Tools on offer: the system message lists them, one JSON schema per line inside
  ``<tools>...</tools>`` (:func:`tools_prompt`), unless the model's chat template renders tools
  itself; then its text is used (:func:`tools_system`).
* A call: one block per call in the assistant's message, after any text (:func:`render_message`)::

      <tool_call>
      {"name": "get_weather", "arguments": {"city": "Paris"}}
      </tool_call>

* A tool result: a ``tool`` message holding the result's text; the result of a failed call starts
  with ``Error:`` (:func:`render_tool_result`).
* Ids: a memory keeps no tool-call ids. Read back (:func:`read_messages`), the calls of message
  ``i`` get the ids ``call_<i>_<n>`` and each tool message answers the oldest unanswered call before
  it, so the pairs survive a round trip.

Reading is tolerant of what small models write: a missing closing brace or ``</tool_call>``,
arguments as a JSON string or under ``args``/``parameters``. A block that still is not a call is an
:class:`InvalidToolCall` carrying the model's text, never an exception.

Example:
    >>> text = "Let me look.\\n" + render_tool_call("get_weather", {"city": "Paris"})
    >>> reply = parse_reply(text, id_factory=lambda: "c1")
    >>> reply.content, reply.calls
    ('Let me look.', (ToolCall(name='get_weather', args={'city': 'Paris'}, id='c1'),))
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

from .chat import partial_suffix

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
ERROR_PREFIX = "Error: "

TOOLS_PROMPT = """You can call tools. Each tool is described by a JSON schema:
<tools>
{tools}
</tools>
To call a tool, reply with its name and arguments as JSON inside tags, one block per call:
<tool_call>
{{"name": "tool_name", "arguments": {{"argument_name": "value"}}}}
</tool_call>
The results come back as tool messages."""

_SENTINEL = "\x00MEMORY-PLUGIN-TOOLS\x00"


@dataclass(frozen=True)
class ToolCall:
    """A call read from a reply: the tool's ``name``, its ``args`` (a JSON object) and an ``id``."""

    name: str
    args: dict
    id: str


@dataclass(frozen=True)
class InvalidToolCall:
    """A ``<tool_call>`` block that is not a call: ``raw`` is the model's text for it (tags
    included), ``name`` the tool's name when it could be made out, ``error`` what is wrong."""

    name: str | None
    raw: str
    id: str
    error: str


AnyCall = Union[ToolCall, InvalidToolCall]


@dataclass(frozen=True)
class Reply:
    """A whole reply, parsed: its text without the call blocks, and its calls in order."""

    content: str = ""
    calls: tuple[ToolCall, ...] = ()
    invalid_calls: tuple[InvalidToolCall, ...] = ()


@dataclass(frozen=True)
class StoredMessage:
    """A stored ``{"role", "content"}`` message as a front end reads it back: an assistant's text
    and calls apart; for a ``tool`` message, the id of the call it answers ("" when none is open)."""

    role: str
    content: str
    calls: tuple[ToolCall, ...] = ()
    invalid_calls: tuple[InvalidToolCall, ...] = ()
    tool_call_id: str = ""


def new_tool_call_id() -> str:
    """A fresh id for a call read from a reply (``call_`` and 24 hex digits)."""
    return f"call_{uuid.uuid4().hex[:24]}"


# ------------------------------------------------------------------------------------ writing
def render_tool_call(name: str, args: Mapping[str, Any] | str | None = None) -> str:
    """One call as the model is asked to write it. ``args`` may be given as JSON text (as OpenAI
    messages carry them): text holding a JSON object is written as that object, so a call reads the
    same whichever way a front end held its arguments.

    >>> print(render_tool_call("add", '{"a": 1}'))
    <tool_call>
    {"name": "add", "arguments": {"a": 1}}
    </tool_call>
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a tool's name, got {name!r}")
    body = json.dumps({"name": name, "arguments": _arguments(args)}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def _arguments(args: Mapping[str, Any] | str | None) -> Any:
    if args is None:
        return {}
    if isinstance(args, Mapping):
        return dict(args)
    if isinstance(args, str):
        if not args.strip():
            return {}
        try:
            decoded = json.loads(args)
        except json.JSONDecodeError:
            return args  # kept as the text it is: read back, an invalid call with this text
        return decoded if isinstance(decoded, dict) else args
    raise TypeError(f"args must be a dict or JSON text, got {type(args).__name__}")


def render_message(content: str, calls: Iterable[tuple[str, Mapping[str, Any] | str | None]] = ()) -> str:
    """An assistant message's stored text: its ``content``, then one block per ``(name, args)`` call.

    >>> render_message("Checking.", [("ping", {})]).splitlines()
    ['Checking.', '<tool_call>', '{"name": "ping", "arguments": {}}', '</tool_call>']
    """
    blocks = [render_tool_call(name, args) for name, args in calls]
    return "\n".join(([content] if content else []) + blocks)


def render_tool_result(content: str, error: bool = False) -> str:
    """A tool message's stored text; a failed call's result starts with ``Error:`` so the model
    reads it as a failure.

    >>> render_tool_result("timeout", error=True), render_tool_result("error: 404", error=True)
    ('Error: timeout', 'error: 404')
    """
    if error and content and not content.lower().startswith("error"):
        return ERROR_PREFIX + content
    return content


def tools_prompt(functions: Sequence[Mapping[str, Any]]) -> str:
    """The documented system-prompt block listing ``functions`` (OpenAI ``function`` dicts:
    ``name``, ``description``, ``parameters``)."""
    lines = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in functions)
    return TOOLS_PROMPT.format(tools=lines)


def tools_system(tokenizer, functions: Sequence[Mapping[str, Any]], system: str | None) -> str:
    """The system message content that offers ``functions``: the chat template's own tool text when
    it renders tools (:func:`template_tools_system`), else ``system`` followed by :func:`tools_prompt`."""
    native = template_tools_system(tokenizer, functions, system)
    if native is not None:
        return native
    block = tools_prompt(functions)
    return f"{system}\n\n{block}" if system else block


def template_tools_system(tokenizer, functions: Sequence[Mapping[str, Any]], system: str | None) -> str | None:
    """The system message content the tokenizer's own chat template writes for ``tools``, or None
    when the template has no tool rendering (or renders it somewhere other than the system message).

    Found by rendering a system message with and without ``tools``: the template's text around a
    system message's content is the same in both, the content in between is what is stored.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or "tools" not in template or not functions:
        return None
    tools = [{"type": "function", "function": dict(f)} for f in functions]
    try:
        bare = tokenizer.apply_chat_template([{"role": "system", "content": _SENTINEL}], tokenize=False)
        with_tools = tokenizer.apply_chat_template(
            [{"role": "system", "content": system or ""}], tools=tools, tokenize=False
        )
    except Exception:  # a template that rejects this input: the documented format is used
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


# ------------------------------------------------------------------------------------ reading
def parse_call(block: str, raw: str, call_id: str) -> AnyCall:
    """One ``<tool_call>`` block's inner text as a call, or an invalid call carrying ``raw`` (the
    model's text for the call) when it is not ``{"name", "arguments"}`` JSON.

    >>> parse_call('{"name": "f", "arguments": {"x": 1}', "<raw>", "c1")  # a brace left out
    ToolCall(name='f', args={'x': 1}, id='c1')
    >>> parse_call("call f", "<raw>", "c2").error
    'no JSON object in the tool call'
    """
    obj, error = _json_object(block)
    if obj is None:
        return InvalidToolCall(_guess_name(block), raw, call_id, error)
    name = obj.get("name")
    args = obj["arguments"] if "arguments" in obj else obj.get("args", obj.get("parameters", {}))
    if isinstance(args, str):  # arguments given as a JSON string (OpenAI style)
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            pass
    if not isinstance(name, str) or not name.strip():
        return InvalidToolCall(None, raw, call_id, "the tool call has no name")
    if not isinstance(args, dict):
        return InvalidToolCall(name, raw, call_id, "the tool call's arguments are not a JSON object")
    return ToolCall(name.strip(), args, call_id)


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


def parse_reply(text: str, id_factory: Callable[[], str] = new_tool_call_id) -> Reply:
    """A complete reply's text and calls (the same rules as :class:`ReplyParser` while streaming)."""
    parser = ReplyParser(tools=True, id_factory=id_factory)
    content, calls, invalid = [], [], []
    for kind, value in [*parser.feed(text), *parser.finish()]:
        if kind == "text":
            content.append(value)
        elif isinstance(value, ToolCall):
            calls.append(value)
        else:
            invalid.append(value)
    return Reply("".join(content), tuple(calls), tuple(invalid))


class ReplyParser:
    """Splits a reply streamed piece by piece into text and tool calls.

    ``feed`` returns events ``("text", str)`` and ``("call", ToolCall | InvalidToolCall)`` as soon
    as they are certain: text that could be the start of ``<tool_call>`` is held back, a call is
    reported when its block closes (or at :meth:`finish`, for a block the model never closed). A
    block and the whitespace after it are cut out, and trailing whitespace is dropped, so the text
    reads as if the calls were never there. With ``tools=False`` text passes through as it is.

    >>> p = ReplyParser(id_factory=lambda: "c1")
    >>> p.feed("Hi <tool_"), p.feed("call>{}"), p.finish()[0][1].error
    ([('text', 'Hi')], [], 'the tool call has no name')
    """

    def __init__(self, tools: bool = True, id_factory: Callable[[], str] = new_tool_call_id):
        self.tools = tools
        self.id_factory = id_factory
        self._buf = ""
        self._in_call = False
        self._pending_ws = ""
        self._after_block = False
        self.saw_call = False  # a call (valid or not) was reported

    def feed(self, piece: str) -> list[tuple[str, Any]]:
        if not self.tools:
            return [("text", piece)] if piece else []
        self._buf += piece
        events: list[tuple[str, Any]] = []
        while True:
            if not self._in_call:
                at = self._buf.find(TOOL_CALL_OPEN)
                if at == -1:
                    keep = partial_suffix(self._buf, TOOL_CALL_OPEN)
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
        """What is held back at the end of the reply: text, or a call block the model never closed."""
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


def read_messages(messages: Sequence[Mapping[str, Any]]) -> list[StoredMessage]:
    """Stored ``{"role", "content"}`` messages as front ends read them back: calls parsed out of
    assistant text with ids from their position (``call_<message index>_<call index>``), and each
    tool message paired with the oldest unanswered call before it. Entries without a role
    (``add_text`` documents) are not messages and are left out.

    >>> back = read_messages([{"role": "assistant", "content": render_tool_call("ping")},
    ...                       {"role": "tool", "content": "pong"}])
    >>> back[0].calls[0].id, back[1].tool_call_id
    ('call_0_0', 'call_0_0')
    """
    out: list[StoredMessage] = []
    unanswered: list[str] = []
    for index, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role == "assistant":
            counter = iter(range(1_000_000))
            reply = parse_reply(content, id_factory=lambda: f"call_{index}_{next(counter)}")
            unanswered = [c.id for c in reply.calls]
            out.append(StoredMessage(role, reply.content, reply.calls, reply.invalid_calls))
        elif role == "tool":
            out.append(StoredMessage(role, content, tool_call_id=unanswered.pop(0) if unanswered else ""))
        elif role is not None:
            out.append(StoredMessage(role, content))
    return out
