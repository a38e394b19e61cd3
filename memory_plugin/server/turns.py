"""What a request asks of a thread, in the core's terms: OpenAI messages (or Responses input items)
as stored ``{"role", "content"}`` messages with tool calls in the core's text format
(:mod:`memory_plugin.tools`), and one assistant turn over the pool as a stream of events.

Everything here that can refuse a request does so before the pool is touched (:class:`APIError`
naming the field), so bad input stores nothing.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from ..chat import ChatFormat, check_text
from ..sampling import SamplingOptions
from ..tools import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    InvalidToolCall,
    ReplyParser,
    ToolCall,
    render_message,
    render_tool_result,
    tools_system,
)
from . import schemas
from .store import digest


class APIError(Exception):
    """A request refused with an OpenAI-style error body (see :class:`schemas.ErrorBody`)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        detail = schemas.ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        return schemas.ErrorBody(error=detail).model_dump()


# ---------------------------------------------------------------------------------------- messages
def _text(content, param: str, *, required: bool = True) -> str:
    """A message's text: a string, or text parts joined (other parts are not supported)."""
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        texts = []
        for j, part in enumerate(content):
            if part.type not in ("text", "input_text", "output_text") or part.text is None:
                raise APIError(400, f"{param}[{j}]: only text content is supported, got type {part.type!r}", f"{param}[{j}]")
            texts.append(part.text)
        text = "".join(texts)
    if required:
        try:
            check_text(text, param)
        except (TypeError, ValueError) as e:
            raise APIError(400, str(e), param) from None
    return text


def chat_messages(messages: Sequence[schemas.ChatMessageIn]) -> list[dict]:
    """OpenAI chat messages as stored messages: ``developer`` is a system message, an assistant's
    ``tool_calls`` are written after its text in the core's format, a ``tool`` (or legacy
    ``function``) message holds the result's text."""
    out = []
    for i, m in enumerate(messages):
        param = f"messages[{i}].content"
        if m.role == "assistant":
            calls = [(c.function.name, c.function.arguments) for c in m.tool_calls or []]
            text = _text(m.content, param, required=not calls)
            try:
                content = render_message(text.strip() if calls else text, calls)
            except (TypeError, ValueError) as e:
                raise APIError(400, str(e), f"messages[{i}].tool_calls") from None
            out.append({"role": "assistant", "content": content})
        elif m.role in ("tool", "function"):
            out.append({"role": "tool", "content": render_tool_result(_text(m.content, param))})
        else:
            out.append({"role": "system" if m.role == "developer" else m.role, "content": _text(m.content, param)})
    return out


def response_items(items: str | Sequence[schemas.InputItem], instructions: str | None) -> list[dict]:
    """Responses input as stored messages: messages as in :func:`chat_messages`, consecutive
    ``function_call`` items as one assistant message, ``function_call_output`` as a tool message;
    ``instructions`` as a system message before them."""
    out = []
    if instructions is not None:
        out.append({"role": "system", "content": _text(instructions, "instructions")})
    if isinstance(items, str):
        out.append({"role": "user", "content": _text(items, "input")})
        return out
    calls: list[tuple[str, str]] = []
    for i, item in enumerate(items):
        if item.type != "function_call" and calls:
            out.append({"role": "assistant", "content": render_message("", calls)})
            calls = []
        if item.type == "function_call":
            if not item.name:
                raise APIError(400, f"input[{i}].name is required for a function_call", f"input[{i}].name")
            calls.append((item.name, item.arguments or ""))
        elif item.type == "function_call_output":
            out.append({"role": "tool", "content": _text(item.output, f"input[{i}].output")})
        else:
            if item.role is None:
                raise APIError(400, f"input[{i}].role is required for a message", f"input[{i}].role")
            role = "system" if item.role == "developer" else item.role
            out.append({"role": role, "content": _text(item.content, f"input[{i}].content")})
    if calls:
        out.append({"role": "assistant", "content": render_message("", calls)})
    if not out:
        raise APIError(400, "input is empty", "input")
    return out


# ---------------------------------------------------------------------------------------- tools
def tool_choice(choice: Any, functions: list[dict], param: str = "tool_choice") -> str | None:
    """None (no tools), "auto", "none", "required" or the name of the function a call is forced to."""
    if not functions:
        if choice not in (None, "none", "auto"):
            raise APIError(400, f"{param} needs tools", param)
        return None
    if choice is None or isinstance(choice, str):
        return choice or "auto"
    name = choice.function.name if hasattr(choice, "function") else choice.name
    if name not in {f["name"] for f in functions}:
        raise APIError(400, f"{param} names {name!r}, which is not among the tools", param)
    return name


def offer_tools(tokenizer, messages: list[dict], functions: list[dict], *, history: int = 0) -> list[dict]:
    """``messages`` with the tools on offer written into the first system message (one is added
    when there is none). With ``history`` messages already stored, those are kept as they are (the
    memory reuses them): the offer is then a system message before the new ones, unless a stored
    system message already makes this offer."""
    if not functions:
        return messages
    if history:
        offer = {"role": "system", "content": tools_system(tokenizer, functions, None)}
        if any(m["role"] == "system" and offer["content"].strip() in m["content"] for m in messages[:history]):
            return messages
        return [*messages[:history], offer, *messages[history:]]
    if messages[0]["role"] == "system":
        return [{"role": "system", "content": tools_system(tokenizer, functions, messages[0]["content"])}, *messages[1:]]
    return [{"role": "system", "content": tools_system(tokenizer, functions, None)}, *messages]


# ---------------------------------------------------------------------------------------- options
def options(defaults: SamplingOptions, values: dict[str, Any], limit: int, names: dict[str, str]) -> SamplingOptions:
    """The request's generation options over the server's defaults (None: not given); ``names``
    maps the request's field names to :class:`SamplingOptions` fields."""
    try:
        opts = defaults.updated({k: v for k, v in values.items() if v is not None}, names=names)
    except (TypeError, ValueError) as e:
        raise APIError(400, str(e), str(e).split(" ", 1)[0]) from None
    if opts.max_new_tokens > limit:
        name = next((k for k in ("max_completion_tokens", "max_tokens", "max_output_tokens") if values.get(k)), "max_tokens")
        raise APIError(400, f"{name} must be at most {limit}, got {opts.max_new_tokens}", name)
    return opts


# ---------------------------------------------------------------------------------------- the turn
@dataclass
class Done:
    """How a turn ended, for usage and ``finish_reason``."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    finish_reason: str  # stop / length / tool_calls
    text: str = ""  # the model's raw text (calls included)
    held: list[dict] | None = None  # a stateful turn: what the thread holds after it, reply included


@dataclass
class TurnPlan:
    tenant: str
    thread: str
    messages: list[dict]  # what the thread holds before the answer; with ``stateful``, the new input only
    options: SamplingOptions
    choice: str | None = None  # see tool_choice
    functions: list[dict] = field(default_factory=list)
    # The Responses API: ``messages`` follow the thread's own history, read under the turn's hold of
    # the thread, and the reply is stored with them (input and reply durable together).
    stateful: bool = False
    previous: Any = None  # with ``stateful``: continue from this StoredResponse's point, not the end


def continued(held: list[dict] | None, previous, thread: str) -> list[dict]:
    """What a Responses turn continues: all the thread holds (``held``, None: raw text), or with a
    ``previous`` response (its ``id``, ``entries`` and ``digest``) the part up to it, checked."""
    if held is None:
        raise APIError(409, f"thread {thread!r} holds documents, not a conversation", "conversation")
    if previous is None:
        return held
    if len(held) < previous.entries or digest(held[: previous.entries]) != previous.digest:
        raise APIError(
            409,
            f"the conversation changed since {previous.id!r} (entries forgotten, or another branch continued); "
            "continue from a later response or the conversation id",
            "previous_response_id",
            "conversation_changed",
        )
    return held[: previous.entries]


@lru_cache(maxsize=8)
def chat_format(tokenizer) -> ChatFormat:
    return ChatFormat(tokenizer)


def run_turn(pool, plan: TurnPlan) -> Iterator[tuple[str, Any]]:
    """The assistant's next turn after ``plan.messages`` in its thread, as events ``("text", str)``,
    ``("call", ToolCall | InvalidToolCall)`` and finally ``("done", Done)``.

    The thread is held from the first event to the last: closing this generator early (a client gone)
    ends the model's turn and releases the thread. A forced call (``tool_choice`` "required" or a
    name) is started for the model (``<tool_call>`` and the name written into its turn) and ends
    where its block closes; with "none" the model is stopped if it starts a call.

    A ``stateful`` turn reads the thread's history, encodes the input after it, generates and stores
    the reply all in that one hold, inside :meth:`ContextMemory.atomic`: concurrent turns on a thread
    follow one another whole, and a turn cut short (client gone, process killed) leaves neither its
    input nor its reply in the thread.
    """
    opts, choice, fmt = plan.options, plan.choice, chat_format(pool.tokenizer)
    parser = ReplyParser(tools=choice not in (None, "none"))
    stop = list(opts.stop)
    prefill = ""
    if choice == "none":
        stop.append(TOOL_CALL_OPEN)
    elif choice not in (None, "auto"):
        names = [f["name"] for f in plan.functions]
        name = choice if choice != "required" else (names[0] if len(names) == 1 else None)
        prefill = f'{TOOL_CALL_OPEN}\n{{"name": "' + (f'{name}", "arguments": ' if name else "")
        stop.append(TOOL_CALL_CLOSE)
    opts = opts.replace(stop=tuple(stop))
    generated, text, calls, after = "", [], [], None

    def seen(events):
        for kind, value in events:
            (text if kind == "text" else calls).append(value)
            yield kind, value

    with pool.held(plan.tenant, plan.thread) as held, contextlib.ExitStack() as turn:
        messages = plan.messages
        if plan.stateful:
            history = continued(held.messages, plan.previous, plan.thread)
            messages = offer_tools(pool.tokenizer, history + plan.messages, plan.functions, history=len(history))
            if history != held.messages:  # a branch from an earlier response: cut back to it (durable) first
                held.sync(history)
            turn.enter_context(held.atomic())
        conv = held.sync(messages)
        mem = conv.memory
        if prefill:  # the turn's start is written for the model, as raw text after the history
            start = fmt.generation_prompt + prefill
            pieces = mem.stream(start, chat=False, **opts.replace(recall=0).as_kwargs())
            yield from seen(parser.feed(prefill))
        else:
            start = fmt.generation_prompt
            pieces = mem.stream(None, **opts.as_kwargs())
        prompt_tokens = len(mem) + len(fmt.encode(start))
        with contextlib.closing(pieces):
            for piece in pieces:
                generated += piece
                yield from seen(parser.feed(piece))
        # Re-tokenised, a reply may count a token more or less than generated; never above the cap.
        out_tokens = min(len(fmt.encode(generated)), opts.max_new_tokens) if generated else 0
        cached = conv.reused_tokens
        last = list(seen(parser.finish()))
        if plan.stateful:
            reply = stored_reply("".join(text), calls)
            after = messages + ([{"role": "assistant", "content": reply}] if reply.strip() else [])
            held.sync(after)  # the reply's tokens are encoded now: the next input continues after it
    yield from last
    if parser.saw_call or prefill:
        reason = "tool_calls"
    elif out_tokens >= opts.max_new_tokens:
        reason = "length"
    else:
        reason = "stop"
    yield "done", Done(prompt_tokens, out_tokens, cached, reason, prefill + generated, after)


def call_arguments(call: ToolCall | InvalidToolCall) -> str:
    """A call's arguments as OpenAI carries them (JSON text); for a call the model wrote badly, its
    text after the name, so the client sees what was written."""
    if isinstance(call, ToolCall):
        return json.dumps(call.args, ensure_ascii=False)
    raw = call.raw.removeprefix(TOOL_CALL_OPEN).removesuffix(TOOL_CALL_CLOSE).strip()
    at = raw.find('"arguments"')
    return raw[at + len('"arguments"') :].lstrip(" :").rstrip("} \n") if at != -1 else raw


def stored_reply(content: str, calls: Sequence[ToolCall | InvalidToolCall]) -> str:
    """The assistant message a thread keeps for a reply: its text and its calls in the core's format
    (a badly written call as the model wrote it)."""
    valid = [(c.name, c.args) for c in calls if isinstance(c, ToolCall)]
    text = render_message(content, valid)
    bad = "\n".join(c.raw for c in calls if isinstance(c, InvalidToolCall))
    return "\n".join(s for s in (text, bad) if s)
