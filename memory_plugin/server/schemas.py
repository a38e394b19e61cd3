"""Request and response bodies of the server, as pydantic models: FastAPI validates every request
against these (a wrong type or an out-of-range value is a 400 naming the field before anything is
stored), and the responses follow the shapes OpenAI's clients parse.

Requests ignore fields they do not know (clients send many optional ones, e.g. ``logprobs`` or
``service_tier``); the ones that would change the answer and are not supported are refused by the
app with a 400 that names them.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..recall import SearchMode


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------------------------------- errors
class ErrorDetail(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error body: clients raise it as ``openai.BadRequestError`` and the like."""

    error: ErrorDetail


# ---------------------------------------------------------------------------------------- tools
class FunctionSpec(_Request):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(_Request):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCallIn(_Request):
    name: str = Field(min_length=1)
    arguments: str | dict[str, Any] = ""


class ToolCallIn(_Request):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


# ---------------------------------------------------------------------------------------- chat completions
class ContentPart(_Request):
    """A part of a message's content; only text parts are supported (the app refuses others)."""

    type: str
    text: str | None = None


class ChatMessageIn(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class StreamOptions(_Request):
    include_usage: bool = False


class ResponseFormat(_Request):
    type: str


class ChatCompletionRequest(_Request):
    model: str
    messages: list[ChatMessageIn] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    min_tokens: int | None = Field(default=None, ge=0)  # vLLM's extension: end-of-turn held back until then
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = Field(default=None, ge=1)
    tools: list[ChatTool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    metadata: dict[str, str] | None = None


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ToolCallDelta(BaseModel):
    index: int
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # tokens of the prompt the memory already held (not encoded again)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: None = None


class ChatCompletion(_Out):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    logprobs: None = None


class ChatCompletionChunk(_Out):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


# ---------------------------------------------------------------------------------------- models
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "memory-plugin"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------------------------------- responses
class InputContent(_Request):
    type: str  # input_text / output_text / text (others are refused)
    text: str | None = None


class InputItem(_Request):
    """A message (``role`` and ``content``), a ``function_call`` the model made, or a
    ``function_call_output`` the client sends back."""

    type: Literal["message", "function_call", "function_call_output"] = "message"
    role: Literal["system", "developer", "user", "assistant"] | None = None
    content: str | list[InputContent] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | None = None
    id: str | None = None


class ResponseTool(_Request):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponseNamedChoice(_Request):
    type: Literal["function"]
    name: str


class ConversationRef(_Request):
    id: str


class ResponsesRequest(_Request):
    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    previous_response_id: str | None = None
    conversation: str | ConversationRef | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    tools: list[ResponseTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ResponseNamedChoice | None = None
    parallel_tool_calls: bool | None = None
    stream: bool = False
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    prompt_cache_key: str | None = None


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list = Field(default_factory=list)


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["completed", "in_progress"] = "completed"
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class OutputFunctionCall(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["completed"] = "completed"


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class Response(_Out):
    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: Literal["completed", "incomplete", "in_progress"] = "completed"
    model: str
    output: list[OutputMessage | OutputFunctionCall]
    usage: ResponseUsage | None = None
    previous_response_id: str | None = None
    conversation: ConversationRef | None = None
    instructions: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    parallel_tool_calls: bool = True
    tool_choice: Any = "auto"
    tools: list[dict] = Field(default_factory=list)
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    incomplete_details: dict | None = None
    error: None = None


# ---------------------------------------------------------------------------------------- memory endpoints
class ThreadOut(BaseModel):
    id: str
    object: Literal["thread"] = "thread"
    disk_bytes: int
    last_active: float
    open: bool
    tokens: int | None = None
    entries: int | None = None
    blocks: dict[str, int] | None = None  # per tier: "ram", "disk", "cold" (known while open)


class ThreadList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ThreadOut]


class MessageOut(BaseModel):
    role: str | None
    content: str
    start: int | None = None  # its token span [start, end) in the thread's history
    end: int | None = None


class ThreadMessages(BaseModel):
    object: Literal["list"] = "list"
    thread: str
    data: list[MessageOut]


class SearchRequest(_Request):
    query: str = Field(min_length=1)
    k: int = Field(default=4, ge=0, le=100)
    mode: SearchMode = "hybrid"


class SearchHit(BaseModel):
    text: str
    start: int
    end: int
    score: float
    message_index: int | None
    role: str | None
    channels: list[str]


class SearchResult(BaseModel):
    object: Literal["list"] = "list"
    thread: str
    data: list[SearchHit]


class ForgetRequest(_Request):
    """What to forget: entry positions (as listed by ``GET /v1/threads/{id}/messages``), or every
    entry whose text contains ``contains``; one of the two."""

    indices: list[int] | None = None
    contains: str | None = Field(default=None, min_length=1)


class ForgetResult(BaseModel):
    thread: str
    forgotten: int


class Deleted(BaseModel):
    id: str
    object: Literal["thread.deleted"] = "thread.deleted"
    deleted: bool = True


class ForgetPreview(BaseModel):
    """What a forget would do (``POST /v1/threads/{id}/forget/preview``; nothing changes): the
    entries it removes and their tokens, the kept tokens after the first of them, and the tokens
    it encodes again (those, plus the ones between the thread's last snapshot and the first removed
    entry: :meth:`memory_plugin.ContextMemory.forget_cost`)."""

    thread: str
    indices: list[int]
    entries: list[MessageOut]
    tokens: int
    tokens_after: int
    reencode_tokens: int


class SegmentOut(BaseModel):
    """A stretch of a thread's history (:class:`memory_plugin.Segment`): ``kind`` init / block /
    dropped / window, the block's number and tier, and in an answer the share of its attention."""

    kind: Literal["init", "block", "dropped", "window"]
    start: int
    end: int
    block: int | None = None
    tier: Literal["ram", "disk", "cold"] | None = None
    attention: float | None = None


class EntrySpan(BaseModel):
    index: int
    role: str | None
    start: int
    end: int


class Timeline(BaseModel):
    """``GET /v1/threads/{id}/timeline``: where the blocks begin, their tiers, and the entries' spans."""

    object: Literal["thread.timeline"] = "thread.timeline"
    thread: str
    tokens: int
    segments: list[SegmentOut]
    entries: list[EntrySpan]


class AskRequest(_Request):
    """``POST /v1/threads/{id}/ask``: a question answered from the thread, not stored."""

    question: str = Field(min_length=1, max_length=8000)
    max_tokens: int = Field(default=64, ge=1)
    recall: int | None = Field(default=None, ge=0, le=16)  # passages placed before it (default: the config's)


class AskResult(BaseModel):
    """The answer with what it came from: the spans it attended most (score: share of its
    attention), the passages placed before the question, and every segment's share (the strip)."""

    object: Literal["thread.answer"] = "thread.answer"
    thread: str
    question: str
    answer: str
    stored: bool = False
    tokens: int  # the thread's history, unchanged
    attended: list[SearchHit]
    placed: list[SearchHit]
    timeline: list[SegmentOut]
