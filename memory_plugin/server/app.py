"""The OpenAI-compatible HTTP server over one :class:`~memory_plugin.pool.MemoryPool`.

Endpoints (all under ``/v1``, each answering for the caller's tenant only):

* ``POST /chat/completions`` (streamed or not) and ``GET /models``: a client resends the whole
  conversation; its thread (header ``X-Thread-Id``, else ``metadata.thread_id``,
  ``prompt_cache_key`` or ``user``; else the open thread whose messages it extends; else a new one,
  named in the response's ``X-Thread-Id`` header) reuses what it already holds
  (``usage.prompt_tokens_details.cached_tokens``).
* ``POST /responses``: the stateful form. A client sends only the new input with
  ``previous_response_id`` (or a ``conversation`` id, which is the thread's id); the thread holds
  the rest, including the replies.
* ``GET /threads``, ``GET /threads/{id}``, ``GET /threads/{id}/messages``,
  ``GET /threads/{id}/timeline`` (where blocks begin, their tiers), ``POST /threads/{id}/search``,
  ``POST /threads/{id}/ask`` (an answer from the thread that is not stored, with the spans it
  attended, the passages placed and the attention per segment), ``POST /threads/{id}/forget/preview``
  (what a forget removes and re-encodes; nothing changes), ``POST /threads/{id}/forget``,
  ``DELETE /threads/{id}`` (shared with the inspector: :mod:`.threads`).

The memory inspector (:mod:`.inspector`) is a page under ``/inspector`` over the same operations.

Model work runs on worker threads (:func:`memory_plugin.bridge.iterate_in_thread`), at most
``max_concurrency`` turns at once; the pool serialises one thread's turns. A client that goes away
mid-stream cancels its turn, which releases the thread.

Example:
    >>> app = create_app(MemoryPool("memories", model, tokenizer), {"sk-1": "alice"})  # doctest: +SKIP
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..bridge import iterate_in_thread
from ..persistence import MemoryLockedError
from ..pool import MAX_ID_CHARS
from ..sampling import SamplingOptions
from ..tools import InvalidToolCall, ToolCall
from . import schemas as s
from . import threads as ops
from .inspector import add_inspector
from .store import ResponseStore, StoredResponse, digest
from .tenants import tenant_of
from .turns import (
    APIError,
    Done,
    TurnPlan,
    call_arguments,
    chat_messages,
    continued,
    offer_tools,
    options,
    response_items,
    run_turn,
    tool_choice,
)

DEFAULT_OPTIONS = SamplingOptions(max_new_tokens=256)
MAX_TOKENS_LIMIT = 4096
MAX_BODY_BYTES = 4 << 20

CHAT_OPTION_NAMES = {
    "max_completion_tokens": "max_new_tokens",
    "max_tokens": "max_new_tokens",
    "min_tokens": "min_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "stop": "stop",
}
RESPONSE_OPTION_NAMES = {"max_output_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p", "seed": "seed"}


def create_app(
    pool,
    keys: dict[str, str] | None = None,
    *,
    model_name: str = "memory-plugin",
    max_concurrency: int = 2,
    max_body_bytes: int = MAX_BODY_BYTES,
    defaults: SamplingOptions = DEFAULT_OPTIONS,
    max_tokens_limit: int = MAX_TOKENS_LIMIT,
    close_pool: bool = True,
) -> FastAPI:
    """The app serving ``pool``.

    Args:
        pool: the memories (:class:`~memory_plugin.pool.MemoryPool`); closed at shutdown when
            ``close_pool`` (every open memory writes its final snapshot).
        keys: ``{api key: tenant}`` (see :func:`~memory_plugin.server.tenants.load_keys`); empty or
            None: no authentication, every request is the tenant ``default``.
        model_name: the one model id served (``GET /v1/models``); requests naming another get a 404.
        max_concurrency: turns generated at once (each on its own worker thread).
        max_body_bytes: larger request bodies get a 413.
        defaults: generation options a request does not set (greedy, 256 tokens).
        max_tokens_limit: the most tokens a request may ask for.
    """
    if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
        raise ValueError(f"max_concurrency must be a positive int, got {max_concurrency!r}")
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be a positive int, got {max_body_bytes!r}")
    server = _Server(pool, dict(keys or {}), model_name, max_concurrency, defaults, max_tokens_limit)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # Turns hold a worker thread each while they stream; the default executor is sized for them.
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(max_workers=max_concurrency + 4, thread_name_prefix="memory-turn")
        loop.set_default_executor(executor)
        server.slots = asyncio.Semaphore(max_concurrency)
        try:
            yield
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
            server.store.close()
            if close_pool:
                await run_in_threadpool(pool.close)

    app = FastAPI(title="memory-plugin", lifespan=lifespan)
    app.state.server = server
    app.add_middleware(_BodyLimit, limit=max_body_bytes)
    _errors(app)
    _routes(app, server)
    add_inspector(app, server)
    return app


class _Server:
    """What the routes share."""

    def __init__(self, pool, keys, model_name, max_concurrency, defaults, limit):
        self.pool, self.keys, self.model_name = pool, keys, model_name
        self.defaults, self.limit = defaults, limit
        self.store = ResponseStore(pool.root)
        self.slots = asyncio.Semaphore(max_concurrency)
        self.running: Counter[str] = Counter()  # turns in progress per "tenant/thread" (tests, stats)
        self.last_answers: dict[tuple[str, str], s.AskResult] = {}  # (tenant, thread): the last ask, oldest first

    def tenant(self, authorization: str | None = Header(default=None)) -> str:
        tenant = tenant_of(authorization, self.keys)
        if tenant is None:
            raise APIError(401, "a valid API key is required (Authorization: Bearer <key>)", code="invalid_api_key")
        return tenant

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(404, f"model {model!r} does not exist; this server has {self.model_name!r}", "model", "model_not_found")

    def exists(self, tenant: str, thread: str) -> bool:
        return ops.exists(self.pool, tenant, thread)

    async def ask(self, tenant: str, thread: str, req: s.AskRequest) -> s.AskResult:
        """A question answered from the thread and not stored; it takes a turn slot like any turn.
        The answer is kept as the thread's last explained one (the inspector draws it)."""
        async with self.slots:
            result = await run_in_threadpool(ops.ask, self.pool, tenant, thread, req, self.limit)
        self.last_answers.pop((tenant, thread), None)
        self.last_answers[tenant, thread] = result
        while len(self.last_answers) > 256:
            self.last_answers.pop(next(iter(self.last_answers)))
        return result

    async def events(self, plan: TurnPlan) -> AsyncIterator[tuple[str, Any]]:
        """The turn's events; waits for a free slot first. Closing this (a client gone) stops the
        model and releases the thread."""
        key = f"{plan.tenant}/{plan.thread}"
        async with self.slots:
            self.running[key] += 1
            try:
                async with contextlib.aclosing(iterate_in_thread(lambda: run_turn(self.pool, plan))) as events:
                    async for event in events:
                        yield event
            finally:
                self.running[key] -= 1
                if not self.running[key]:
                    del self.running[key]


def _thread_id(value: str | None, param: str) -> str | None:
    if value is not None and not (0 < len(value) <= MAX_ID_CHARS):
        raise APIError(400, f"{param} must be 1 to {MAX_ID_CHARS} characters, got {len(value)}", param)
    return value


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _usage(done: Done) -> s.Usage:
    return s.Usage(
        prompt_tokens=done.prompt_tokens,
        completion_tokens=done.completion_tokens,
        total_tokens=done.prompt_tokens + done.completion_tokens,
        prompt_tokens_details=s.PromptTokensDetails(cached_tokens=done.cached_tokens),
    )


def _json(model) -> str:
    return model.model_dump_json(exclude_none=True)


# ---------------------------------------------------------------------------------------- routes
def _routes(app: FastAPI, server: _Server) -> None:
    pool = server.pool

    @app.get("/v1/models", response_model=s.ModelList)
    def models(tenant: str = Depends(server.tenant)):
        return s.ModelList(data=[s.ModelCard(id=server.model_name)])

    @app.post("/v1/chat/completions")
    async def chat_completions(
        req: s.ChatCompletionRequest,
        tenant: str = Depends(server.tenant),
        x_thread_id: str | None = Header(default=None),
    ):
        server.check_model(req.model)
        if req.n not in (None, 1):
            raise APIError(400, f"n must be 1 (one answer per request), got {req.n}", "n")
        if req.logprobs:
            raise APIError(400, "logprobs are not supported", "logprobs")
        if req.response_format is not None and req.response_format.type != "text":
            raise APIError(400, f"response_format {req.response_format.type!r} is not supported", "response_format")
        functions = [t.function.model_dump(exclude_none=True) for t in req.tools or []]
        choice = tool_choice(req.tool_choice, functions)
        messages = offer_tools(pool.tokenizer, chat_messages(req.messages), functions)
        opts = options(server.defaults, {k: getattr(req, k) for k in CHAT_OPTION_NAMES}, server.limit, CHAT_OPTION_NAMES)
        thread = _thread_id(x_thread_id, "X-Thread-Id") or _thread_id(
            (req.metadata or {}).get("thread_id") or req.prompt_cache_key or req.user, "prompt_cache_key"
        )
        if thread is None:
            thread = await run_in_threadpool(_continued_thread, pool, tenant, messages) or _new_id("thread")
        plan = TurnPlan(tenant, thread, messages, opts, choice, functions)
        headers = {"X-Thread-Id": thread}
        cid = _new_id("chatcmpl")
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventSourceResponse(_chat_chunks(server, plan, cid, usage), headers=headers, ping=15)
        content, calls, done = await _collect(server, plan)
        message = s.AssistantMessage(content=content or (None if calls else ""), tool_calls=_tool_calls(calls) or None)
        body = s.ChatCompletion(
            id=cid,
            model=server.model_name,
            choices=[s.Choice(message=message, finish_reason=done.finish_reason)],
            usage=_usage(done),
        )
        return JSONResponse(body.model_dump(exclude_none=True), headers=headers)

    @app.post("/v1/responses")
    async def responses(req: s.ResponsesRequest, tenant: str = Depends(server.tenant)):
        server.check_model(req.model)
        functions = [t.model_dump(exclude_none=True, exclude={"type"}) for t in req.tools or []]
        choice = tool_choice(req.tool_choice, functions)
        new = response_items(req.input, req.instructions)
        opts = options(server.defaults, {k: getattr(req, k) for k in RESPONSE_OPTION_NAMES}, server.limit, RESPONSE_OPTION_NAMES)
        conversation = req.conversation.id if isinstance(req.conversation, s.ConversationRef) else req.conversation
        thread = _thread_id(conversation, "conversation")
        previous = None
        if req.previous_response_id is not None:
            previous = server.store.get(tenant, req.previous_response_id)
            if previous is None:
                raise APIError(404, f"response {req.previous_response_id!r} not found", "previous_response_id", "response_not_found")
            if thread is not None and thread != previous.thread:
                raise APIError(400, "previous_response_id belongs to another conversation", "conversation")
            thread = previous.thread
        thread = thread or _new_id("conv")
        # Refused here with its status before a stream starts; the turn reads the history again
        # under its own hold of the thread, so concurrent turns on it follow one another whole.
        await run_in_threadpool(_check_history, server, tenant, thread, previous)
        plan = TurnPlan(tenant, thread, new, opts, choice, functions, stateful=True, previous=previous)
        rid = _new_id("resp")
        echo = dict(
            id=rid,
            model=server.model_name,
            previous_response_id=req.previous_response_id,
            conversation=s.ConversationRef(id=thread),
            instructions=req.instructions,
            metadata=req.metadata or {},
            tool_choice=req.tool_choice.model_dump() if hasattr(req.tool_choice, "model_dump") else req.tool_choice or "auto",
            tools=[t.model_dump(exclude_none=True) for t in req.tools or []],
            temperature=opts.temperature,
            top_p=opts.top_p,
            max_output_tokens=req.max_output_tokens,
        )
        if req.stream:
            return EventSourceResponse(_response_events(server, plan, echo), ping=15)
        content, calls, done = await _collect(server, plan)
        body = await run_in_threadpool(_finish_response, server, plan, echo, content, calls, done)
        return JSONResponse(body.model_dump(exclude_none=True))

    # ------------------------------------------------------------------------------------ memory
    @app.get("/v1/threads", response_model=s.ThreadList)
    async def list_threads(tenant: str = Depends(server.tenant)):
        return await run_in_threadpool(ops.list_threads, pool, tenant)

    @app.get("/v1/threads/{thread_id}", response_model=s.ThreadOut)
    async def get_thread(thread_id: str, tenant: str = Depends(server.tenant)):
        return await run_in_threadpool(ops.stats, pool, tenant, thread_id)

    @app.get("/v1/threads/{thread_id}/messages", response_model=s.ThreadMessages)
    async def thread_messages(thread_id: str, tenant: str = Depends(server.tenant)):
        return await run_in_threadpool(ops.messages, pool, tenant, thread_id)

    @app.get("/v1/threads/{thread_id}/timeline", response_model=s.Timeline)
    async def thread_timeline(thread_id: str, tenant: str = Depends(server.tenant)):
        return await run_in_threadpool(ops.timeline, pool, tenant, thread_id)

    @app.post("/v1/threads/{thread_id}/search", response_model=s.SearchResult)
    async def search(thread_id: str, req: s.SearchRequest, tenant: str = Depends(server.tenant)):
        return await run_in_threadpool(ops.search, pool, tenant, thread_id, req)

    @app.post("/v1/threads/{thread_id}/ask", response_model=s.AskResult)
    async def ask(thread_id: str, req: s.AskRequest, tenant: str = Depends(server.tenant)):
        return await server.ask(tenant, thread_id, req)

    @app.post("/v1/threads/{thread_id}/forget/preview", response_model=s.ForgetPreview)
    async def forget_preview(thread_id: str, req: s.ForgetRequest, tenant: str = Depends(server.tenant)):
        return await run_in_threadpool(ops.forget_preview, pool, tenant, thread_id, req)

    @app.post("/v1/threads/{thread_id}/forget", response_model=s.ForgetResult)
    async def forget(thread_id: str, req: s.ForgetRequest, tenant: str = Depends(server.tenant)):
        return await run_in_threadpool(ops.forget, pool, tenant, thread_id, req)

    @app.delete("/v1/threads/{thread_id}", response_model=s.Deleted)
    async def delete_thread(thread_id: str, tenant: str = Depends(server.tenant)):
        return await run_in_threadpool(ops.delete, pool, server.store, tenant, thread_id)


def _continued_thread(pool, tenant: str, messages: list[dict]) -> str | None:
    """The open thread this conversation extends (a client naming no thread), if it adds messages
    to it: a conversation that only repeats a thread's messages (a new one starting the same way)
    gets a thread of its own rather than rolling another one back."""
    found = pool.find_thread(tenant, messages)
    if found is None:
        return None
    info = next((i for i in pool.threads(tenant) if i.thread == found), None)
    return found if info is not None and info.entries is not None and info.entries < len(messages) else None


def _check_history(server: _Server, tenant: str, thread: str, previous: StoredResponse | None) -> None:
    """Refuse a response that cannot continue its thread (:func:`~.turns.continued`): one holding
    documents, or one changed since ``previous``."""
    if previous is None and not server.exists(tenant, thread):
        return
    with server.pool.held(tenant, thread) as held:
        continued(held.messages, previous, thread)


async def _collect(server: _Server, plan: TurnPlan) -> tuple[str, list, Done]:
    content, calls, done = [], [], None
    try:
        async for kind, value in server.events(plan):
            if kind == "text":
                content.append(value)
            elif kind == "call":
                calls.append(value)
            else:
                done = value
    except (TypeError, ValueError) as e:  # the core refused the conversation (e.g. its template)
        raise APIError(400, str(e), "messages") from None
    return "".join(content), calls, done


def _tool_calls(calls) -> list[s.ToolCallOut]:
    return [
        s.ToolCallOut(id=c.id, function=s.FunctionCallOut(name=c.name or "", arguments=call_arguments(c)))
        for c in calls
        if isinstance(c, ToolCall) or c.name
    ]


async def _chat_chunks(server: _Server, plan: TurnPlan, cid: str, include_usage: bool):
    """The chat completion as SSE chunks, ``[DONE]`` last."""

    def chunk(delta: s.Delta, finish=None, usage=None, choices=True) -> dict:
        choice = [s.ChunkChoice(delta=delta, finish_reason=finish)] if choices else []
        body = s.ChatCompletionChunk(id=cid, model=server.model_name, choices=choice, usage=usage)
        return {"data": _json(body)}

    yield chunk(s.Delta(role="assistant", content=""))
    index = 0
    try:
        async for kind, value in server.events(plan):
            if kind == "text":
                yield chunk(s.Delta(content=value))
            elif kind == "call" and (isinstance(value, ToolCall) or value.name):
                fn = s.FunctionCallOut(name=value.name, arguments=call_arguments(value))
                yield chunk(s.Delta(tool_calls=[s.ToolCallDelta(index=index, id=value.id, function=fn)]))
                index += 1
            elif kind == "call":  # a call with no name: shown as the text the model wrote
                yield chunk(s.Delta(content=value.raw))
            else:
                yield chunk(s.Delta(), finish=value.finish_reason)
                if include_usage:
                    yield chunk(s.Delta(), usage=_usage(value), choices=False)
    except (TypeError, ValueError) as e:  # headers are sent: the error is the stream's last event
        yield {"data": json.dumps(APIError(400, str(e), "messages").body())}
    yield {"data": "[DONE]"}


def _output(content: str, calls: list) -> list:
    out: list = []
    if content:
        out.append(s.OutputMessage(id=_new_id("msg"), content=[s.OutputText(text=content)]))
    for c in calls:
        if isinstance(c, ToolCall) or c.name:
            out.append(s.OutputFunctionCall(id=_new_id("fc"), call_id=c.id, name=c.name, arguments=call_arguments(c)))
    return out


def _finish_response(server: _Server, plan: TurnPlan, echo: dict, content: str, calls: list, done: Done) -> s.Response:
    """Store the response id (the turn stored its input and reply in the thread), then the response body."""
    held = done.held
    server.store.add(StoredResponse(echo["id"], plan.tenant, plan.thread, len(held), digest(held)))
    usage = s.ResponseUsage(
        input_tokens=done.prompt_tokens,
        input_tokens_details=s.InputTokensDetails(cached_tokens=done.cached_tokens),
        output_tokens=done.completion_tokens,
        total_tokens=done.prompt_tokens + done.completion_tokens,
    )
    incomplete = done.finish_reason == "length"
    return s.Response(
        **echo,
        output=_output(content, calls),
        usage=usage,
        status="incomplete" if incomplete else "completed",
        incomplete_details={"reason": "max_output_tokens"} if incomplete else None,
    )


async def _response_events(server: _Server, plan: TurnPlan, echo: dict):
    """A response as Responses-API stream events (text deltas as they come, calls when complete)."""
    seq = iter(range(1 << 30))

    def event(kind: str, **fields) -> dict:
        return {"event": kind, "data": json.dumps({"type": kind, "sequence_number": next(seq), **fields})}

    started = s.Response(**echo, output=[], status="in_progress").model_dump(exclude_none=True)
    yield event("response.created", response=started)
    yield event("response.in_progress", response=started)
    msg_id, text, calls, done = _new_id("msg"), [], [], None
    try:
        async for kind, value in server.events(plan):
            if kind == "text":
                if not text:
                    item = {"type": "message", "id": msg_id, "status": "in_progress", "role": "assistant", "content": []}
                    yield event("response.output_item.added", output_index=0, item=item)
                    part = {"type": "output_text", "text": "", "annotations": []}
                    yield event("response.content_part.added", item_id=msg_id, output_index=0, content_index=0, part=part)
                text.append(value)
                yield event("response.output_text.delta", item_id=msg_id, output_index=0, content_index=0, delta=value)
            elif kind == "call":
                calls.append(value)
            else:
                done = value
    except (TypeError, ValueError) as e:
        yield event("error", **APIError(400, str(e), "input").body()["error"])
        return
    except APIError as e:  # the thread changed between the check and the turn (another turn on it)
        yield event("error", **e.body()["error"])
        return
    content = "".join(text)
    body = await run_in_threadpool(_finish_response, server, plan, echo, content, calls, done)
    output = body.model_dump(exclude_none=True)["output"]
    index = 0
    if text:
        item = output[0]
        part = item["content"][0]
        yield event("response.output_text.done", item_id=msg_id, output_index=0, content_index=0, text=content)
        yield event("response.content_part.done", item_id=msg_id, output_index=0, content_index=0, part=part)
        yield event("response.output_item.done", output_index=0, item={**item, "id": msg_id})
        output[0]["id"] = msg_id
        index = 1
    for i, item in enumerate(output[index:], index):
        yield event("response.output_item.added", output_index=i, item={**item, "status": "in_progress", "arguments": ""})
        yield event("response.function_call_arguments.done", item_id=item["id"], output_index=i, arguments=item["arguments"])
        yield event("response.output_item.done", output_index=i, item=item)
    final = body.model_dump(exclude_none=True)
    final["output"] = output
    # "response.completed" even for an incomplete one (its status says so): the clients' stream
    # helpers (openai's, LangChain's) wait for that event to hand back the final response.
    yield event("response.completed", response=final)


# ---------------------------------------------------------------------------------------- errors
def _errors(app: FastAPI) -> None:
    """Every error as OpenAI's body ``{"error": {"message", "type", "param", "code"}}``."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(MemoryLockedError)
    async def locked(request: Request, exc: MemoryLockedError):
        # Only a scaled-out server (several replicas on one shared directory) meets this: the
        # thread is open for writing in another process; the client may retry once that lets go.
        err = APIError(409, f"this thread is open for writing in another server replica; retry shortly ({exc})", code="thread_busy")
        return JSONResponse(err.body(), status_code=409, headers={"Retry-After": "1"})

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return JSONResponse(ops.invalid_request(exc.errors()).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
        return JSONResponse(APIError(exc.status_code, str(exc.detail), code=code).body(), status_code=exc.status_code)


class _TooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than {limit} bytes")


class _BodyLimit:
    """Refuses bodies over ``limit`` bytes with a 413: by their Content-Length before reading, and
    while reading one sent without it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            response = JSONResponse(APIError(413, str(_TooLarge(self.limit).detail), code="request_too_large").body(), 413)
            return await response(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge(self.limit)
            return message

        await self.app(scope, limited, send)
