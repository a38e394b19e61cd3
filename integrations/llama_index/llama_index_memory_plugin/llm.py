"""``ContextMemoryLLM``: a local model with ContextMemory attention as a LlamaIndex ``FunctionCallingLLM``.

LlamaIndex resends the whole conversation on every ``chat`` call. The LLM keeps the encoded
conversations in a :class:`memory_plugin.ConversationPool` (the core's prefix reuse, shared with the
LangChain adapter), so each call encodes only the messages that are new since the last one.

Tools are offered, and calls written and read, in the core's one tool-call format
(:mod:`memory_plugin.tools`), so ``FunctionAgent`` and ``AgentWorkflow`` run on it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.tools import BaseTool

from memory_plugin import Answer, ContextMemory, ConversationPool, MemoryConfig, load_model
from memory_plugin import tools as core_tools
from memory_plugin.bridge import iterate_in_thread
from memory_plugin.chat import ChatFormat
from memory_plugin.loading import DEFAULT_MODEL_NAME
from memory_plugin.memory import PLACED_HEADER
from memory_plugin.sampling import SamplingOptions

from ._common import to_memory_messages, tool_calls
from ._forced import ForcedCall

MEMORY_CONTEXT_WINDOW = 131_072
"""Reported as ``metadata.context_window``: what one conversation may hold. The memory has no hard
limit (each turn attends to ``config.span`` tokens however long the history); what bounds it is host
RAM for the key/value blocks, about 45 KB per token for the embedded SmolLM2-135M in float32 (30
layers x 3 KV heads x 64 dims x K and V), so 128k tokens take about 6 GB. Raise it with
``context_window=`` on a machine with more memory. The model's trained window is
:attr:`ContextMemoryLLM.trained_context_window` (8192 for SmolLM2)."""


class ContextMemoryLLM(FunctionCallingLLM):
    """A local Llama-family model whose attention reaches the whole conversation through ContextMemory.

    * ``chat`` / ``stream_chat``: the messages in the model's chat template; the reply is the
      assistant's next turn. Conversations are kept in a pool of ``max_conversations`` memories and
      only the new messages of each call are encoded (pass ``thread_id=`` to pin a conversation).
    * ``complete`` / ``stream_complete``: the prompt as raw text, continued (completion). A 135M
      model answers completion-style prompts ("...\\nQ: What is the pass key?\\nA: The pass key is")
      much better than chat questions.

    Per-call keyword arguments: ``max_new_tokens`` (or ``max_tokens``), ``temperature``, ``top_p``,
    ``stop``, ``seed``, ``min_new_tokens``, ``recall``, ``explain`` (the core's
    :class:`~memory_plugin.sampling.SamplingOptions`, as every front end takes them), ``thread_id``
    (chat only). Async methods run the model on a worker thread; cancelling one stops
    the generation at its next token.

    Tool calls and results in the messages are stored in the core's tool-call format
    (:mod:`memory_plugin.tools`), as the LangChain adapter stores them; read a memory's messages
    back with :func:`llama_index_memory_plugin.to_chat_messages`.

    Function calling (``chat_with_tools`` and its async and streaming forms, as ``FunctionAgent``
    and ``AgentWorkflow`` call them; or ``chat(messages, tools=[...], tool_choice=...)``): the tools
    are listed in the first system message (the chat template's own tool text when it renders
    tools, else :func:`memory_plugin.tools.tools_prompt`); the same tools give the same prefix, so
    the conversation is still reused. Calls the model writes come back as ``ToolCallBlock``s in the
    response message (:meth:`get_tool_calls_from_response` reads them as ``ToolSelection``s); a
    block that is not a valid call stays in the text as the model wrote it. ``tool_required=True``
    or ``tool_choice="required"`` forces one call, a tool's name forces a call of that tool (as
    ``FunctionAgent(initial_tool_choice=...)`` does): the call's JSON is guided by the tool's schema
    and the model writes the values (see :mod:`llama_index_memory_plugin._forced`).
    ``tool_choice="none"`` keeps the tools listed but stops the reply where a call would begin.

    Recall: before each chat reply the passages of the conversation that the memory's hybrid search
    finds for the last message are placed verbatim before it (``recall``: how many, default the
    memory config's ``recall_k``; 0: none). With ``explain=True`` a response's
    ``additional_kwargs["memory"]`` is ``{"attended": [...], "placed": [...]}``: the passages the
    model attended most while writing the reply and the placed ones, each a dict of ``text``,
    ``start``, ``end`` (token span in the history), ``score``, ``message_index``, ``role`` and
    ``channels``. When streaming, a last response with an empty ``delta`` carries it (it is known
    once the reply is complete).

    Example:
        >>> llm = ContextMemoryLLM.from_pretrained()  # doctest: +SKIP
        >>> llm.complete("The capital of France is").text  # doctest: +SKIP
        >>> llm.chat([ChatMessage(role="user", content="Hi!")]).message.content  # doctest: +SKIP
    """

    max_new_tokens: int = Field(default=256, gt=0, description="Tokens generated at most per call.")
    temperature: float = Field(default=0.0, ge=0.0, description="0 is greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[str] | None = Field(default=None, description="Strings that end a reply (not included).")
    context_window: int = Field(default=MEMORY_CONTEXT_WINDOW, gt=0, description="See MEMORY_CONTEXT_WINDOW.")
    model_name: str = Field(default="unknown")
    recall: int | None = Field(
        default=None, ge=0, description="Passages placed before the last message (None: the config's recall_k)."
    )
    explain: bool = Field(
        default=False, description='additional_kwargs["memory"]: the passages attended and placed for a reply.'
    )

    _pool: ConversationPool = PrivateAttr()
    _scratch: ContextMemory = PrivateAttr()
    _format: ChatFormat = PrivateAttr()

    def __init__(
        self,
        memory: ContextMemory | None = None,
        *,
        model: Any = None,
        tokenizer: Any = None,
        config: MemoryConfig | None = None,
        max_conversations: int = 4,
        **kwargs: Any,
    ) -> None:
        """``memory``: an existing memory (its model is used; if it holds a chat, that chat is the
        pool's first conversation); or ``model`` and ``tokenizer`` (see :func:`memory_plugin.load_model`)
        with an optional ``config``."""
        if memory is not None:
            pool = ConversationPool(memory=memory, max_conversations=max_conversations)
            kwargs.setdefault("model_name", memory.model_name)
        else:
            pool = ConversationPool(model, tokenizer, config, max_conversations=max_conversations)
        # Completions start from an empty history; generate() leaves it empty again. Unnamed, the
        # model's name is the one the core gives a memory on it.
        scratch = ContextMemory(pool.model, pool.tokenizer, pool.config, model_name=kwargs.get("model_name"))
        kwargs.setdefault("model_name", scratch.model_name)
        super().__init__(**kwargs)
        self._pool = pool
        self._scratch = scratch
        self._format = ChatFormat(pool.tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        model: str | None = None,
        *,
        config: MemoryConfig | None = None,
        device: Any = None,
        dtype: Any = None,
        **kwargs: Any,
    ) -> ContextMemoryLLM:
        """Load ``model`` (None: the embedded SmolLM2-135M-Instruct; see
        :meth:`memory_plugin.ContextMemory.from_pretrained`)."""
        hf_model, tokenizer = load_model(model, device=device, dtype=dtype)
        kwargs.setdefault("model_name", DEFAULT_MODEL_NAME if model is None else str(model))
        return cls(model=hf_model, tokenizer=tokenizer, config=config, **kwargs)

    @classmethod
    def class_name(cls) -> str:
        return "ContextMemoryLLM"

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self.context_window,
            num_output=self.max_new_tokens,
            is_chat_model=True,
            is_function_calling_model=True,
            model_name=self.model_name,
        )

    @property
    def trained_context_window(self) -> int | None:
        """The context the model was trained on (``max_position_embeddings``); the memory reaches past it."""
        return getattr(self._pool.model.config, "max_position_embeddings", None)

    @property
    def pool(self) -> ConversationPool:
        return self._pool

    # ------------------------------------------------------------------------------- completion
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return _last(self._completion_responses(prompt, formatted, kwargs))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return self._completion_responses(prompt, formatted, kwargs, stream=True)

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return await _alast(lambda: self._completion_responses(prompt, formatted, kwargs))

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        async def gen() -> CompletionResponseAsyncGen:
            responses = lambda: self._completion_responses(prompt, formatted, kwargs, stream=True)  # noqa: E731
            async for response in iterate_in_thread(responses):
                yield response

        return gen()

    def _completion_responses(self, prompt: str, formatted: bool, kwargs: dict, stream: bool = False):
        """Completion responses as the text grows (``stream``), or only the final one. Completions
        start from an empty history, so nothing is placed and nothing earlier is attended."""
        if not formatted:
            prompt = self.completion_to_prompt(prompt)
        opts, _ = self._options(kwargs)
        pieces = self._scratch.stream(prompt, chat=False, **opts.as_kwargs())
        text = ""
        try:
            for piece in pieces:
                text += piece
                if stream:
                    yield CompletionResponse(text=text, delta=piece)
        finally:
            pieces.close()
        extra = {"memory": pieces.explanation.sources()} if opts.explain else {}
        if not stream:
            yield CompletionResponse(text=text, additional_kwargs=extra)
        elif extra:
            yield CompletionResponse(text=text, delta="", additional_kwargs=extra)

    # ------------------------------------------------------------------------------------- chat
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return _last(self._chat_responses(messages, kwargs))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return self._chat_responses(messages, kwargs, stream=True)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await _alast(lambda: self._chat_responses(messages, kwargs))

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        async def gen() -> ChatResponseAsyncGen:
            async for response in iterate_in_thread(lambda: self._chat_responses(messages, kwargs, stream=True)):
                yield response

        return gen()

    def _chat_responses(self, messages: Sequence[ChatMessage], kwargs: dict, stream: bool = False):
        """Chat responses as the reply grows (``stream``), or only the final one. The conversation
        stays checked out of the pool (locked) until the generator ends. With tools, each response's
        message holds the reply's text and the calls read so far (see :class:`_Reply`)."""
        functions = tool_functions(kwargs.get("tools"))
        choice = normalise_tool_choice(kwargs.get("tool_choice"), [f["name"] for f in functions])
        choice = choice if functions else None
        msgs = to_memory_messages(messages)
        if not msgs:
            raise ValueError("no message with text to answer")
        if functions:  # listed in the first system message (or one of their own)
            system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
            offer = {"role": "system", "content": core_tools.tools_system(self._pool.tokenizer, functions, system)}
            msgs = [offer, *msgs[1:]] if system is not None else [offer, *msgs]
        opts, thread_id = self._options(kwargs)
        if choice == "none":  # the tools stay listed (the same prefix); a call is not let begin
            opts = opts.replace(stop=(*opts.stop, core_tools.TOOL_CALL_OPEN))
        reply = _Reply(core_tools.ReplyParser(tools=bool(functions) and choice != "none"))
        yielded = False
        with self._pool.conversation(msgs, thread_id=thread_id) as conv:
            reply.usage = {
                "reused_tokens": conv.reused_tokens,
                "new_tokens": conv.new_tokens,
                "memory_tokens": len(conv.memory),
            }
            if choice not in (None, "none"):
                forced, explanation = self._forced_call(conv.memory, msgs[-1]["content"], functions, choice, opts)
                delta = reply.feed(forced)
                if stream and delta is not None:
                    yielded = True
                    yield reply.response(delta)
            else:
                pieces = conv.memory.stream(None, **opts.as_kwargs())
                try:
                    for piece in pieces:
                        delta = reply.feed(piece)
                        if stream and delta is not None:
                            yielded = True
                            yield reply.response(delta)
                finally:
                    pieces.close()
                explanation = pieces.explanation
        delta = reply.finish()
        extra = {"memory": explanation.sources()} if opts.explain else {}
        if not stream:
            yield reply.response(reply.text, extra)
        elif delta is not None or extra or not yielded:  # an empty reply still ends with a response
            yield reply.response(delta or "", extra)

    def _forced_call(
        self, memory: ContextMemory, query: str, functions: list[dict], name: str, opts: SamplingOptions
    ) -> tuple[str, Answer]:
        """One call of tool ``name`` ("": the one the model names), schema-guided, after the passages
        recall places for the last message (as the core places them before a chat turn). The memory
        is left as it was."""
        placed = memory.place(query, opts.recall) if query.strip() else []
        header = ""
        if placed:
            text = "\n".join(h.text for h in reversed(placed))  # the best one nearest the reply
            try:
                header = self._format.message_text("system", f"{PLACED_HEADER}\n{text}", first=False)
            except ValueError:  # a template that refuses a system message here: nothing is placed
                placed = []
        forced = ForcedCall(memory, header + self._format.generation_prompt, opts)
        text = forced.call(functions, name or None)
        return text, Answer(text, forced.attended(), placed)

    # -------------------------------------------------------------------------------- tools
    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: str | dict | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The ``chat`` arguments for ``chat_with_tools``: the messages, the tools' OpenAI function
        specs and the tool choice (``tool_required`` with no ``tool_choice``: "required")."""
        messages = list(chat_history or [])
        if isinstance(user_msg, str):
            user_msg = ChatMessage(role=MessageRole.USER, content=user_msg)
        if user_msg is not None:
            messages.append(user_msg)
        functions = tool_functions(tools)
        if tool_choice is None:
            tool_choice = "required" if tool_required else "auto"
        normalise_tool_choice(tool_choice, [f["name"] for f in functions])  # a bad choice fails here
        return {"messages": messages, "tools": functions, "tool_choice": tool_choice, **kwargs}

    def _validate_chat_with_tools_response(
        self,
        response: ChatResponse,
        tools: Sequence[BaseTool],
        allow_parallel_tool_calls: bool = False,
        **kwargs: Any,
    ) -> ChatResponse:
        """Without ``allow_parallel_tool_calls`` only the first call is kept (as OpenAI's LLM does)."""
        if not allow_parallel_tool_calls:
            calls = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
            if len(calls) > 1:
                response.message.blocks = [
                    b for b in response.message.blocks if not isinstance(b, ToolCallBlock) or b is calls[0]
                ]
        return response

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        """The response message's calls (its ``ToolCallBlock``s, or OpenAI-style
        ``additional_kwargs["tool_calls"]``) as ``ToolSelection``s; with none, a ValueError, or []
        when ``error_on_no_tool_call`` is False."""
        selections = [
            ToolSelection(tool_id=b.tool_call_id or "", tool_name=b.tool_name, tool_kwargs=_kwargs(b.tool_kwargs))
            for b in response.message.blocks
            if isinstance(b, ToolCallBlock)
        ]
        if not selections:
            selections = [
                ToolSelection(tool_id=f"call_{i}", tool_name=name, tool_kwargs=_kwargs(args))
                for i, (name, args) in enumerate(tool_calls(response.message))
            ]
        if not selections and error_on_no_tool_call:
            raise ValueError("expected at least one tool call in the response, got none")
        return selections

    def _options(self, kwargs: dict) -> tuple[SamplingOptions, str | None]:
        """This call's generation options (its keyword arguments over the fields of the same names,
        see :data:`memory_plugin.sampling.ARGUMENTS`) and thread id."""
        return SamplingOptions().updated(dict(self)).updated(kwargs), kwargs.get("thread_id")


class _Reply:
    """A chat reply as it is read: its text and its calls (:class:`memory_plugin.tools.ReplyParser`
    events), turned into ``ChatResponse``s. A block that is not a valid call joins the text as the
    model wrote it (as :func:`~llama_index_memory_plugin.to_chat_messages` reads one back)."""

    def __init__(self, parser: core_tools.ReplyParser):
        self.parser = parser
        self.text = ""
        self.calls: list[ToolCallBlock] = []
        self.usage: dict = {}

    def feed(self, piece: str) -> str | None:
        """Reads a piece of the reply; the text it added ("" for a call alone), or None when
        nothing changed (text held back: it may be the start of a call)."""
        return self._events(self.parser.feed(piece))

    def finish(self) -> str | None:
        return self._events(self.parser.finish())

    def _events(self, events: list) -> str | None:
        if not events:
            return None
        before = len(self.text)
        for kind, value in events:
            if kind == "text":
                self.text += value
            elif isinstance(value, core_tools.ToolCall):
                self.calls.append(ToolCallBlock(tool_call_id=value.id, tool_name=value.name, tool_kwargs=value.args))
            else:
                self.text += ("\n" if self.text else "") + value.raw
        return self.text[before:]

    def response(self, delta: str, extra: dict | None = None) -> ChatResponse:
        blocks: list = [TextBlock(text=self.text)] if self.text or not self.calls else []
        message = ChatMessage(role=MessageRole.ASSISTANT, blocks=[*blocks, *self.calls])
        return ChatResponse(message=message, delta=delta, additional_kwargs={**self.usage, **(extra or {})})


def tool_functions(tools: Any) -> list[dict]:
    """``tools`` (LlamaIndex tools, OpenAI tool dicts or bare function specs) as OpenAI function
    specs: ``{"name", "description", "parameters"}``."""
    if tools is None:
        return []
    if isinstance(tools, (str, dict)) or not isinstance(tools, Sequence):
        raise TypeError(f"tools must be a list of tools, got {type(tools).__name__}")
    out = []
    for i, tool in enumerate(tools):
        if isinstance(tool, BaseTool):
            tool = tool.metadata.to_openai_tool(skip_length_check=True)
        if isinstance(tool, dict) and isinstance(tool.get("function"), dict):
            tool = tool["function"]
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not tool["name"].strip():
            raise TypeError(f"tools[{i}] must be a LlamaIndex tool or an OpenAI function spec with a name: {tool!r}")
        out.append(tool)
    return out


def normalise_tool_choice(choice: Any, names: list[str]) -> str | None:
    """``tool_choice`` as None (the model decides), "none", "" (a call of any tool is forced) or a
    tool's name (a call of it is forced). Accepts "auto", "none", "required"/"any", True, a name
    among ``names``, or OpenAI's ``{"type": "function", "function": {"name": ...}}``.

    >>> normalise_tool_choice("required", ["add"]), normalise_tool_choice({"function": {"name": "add"}}, ["add"])
    ('', 'add')
    """
    if choice is None or choice is False or choice == "auto":
        return None
    if choice is True or choice in ("required", "any"):
        return ""
    if choice == "none":
        return "none"
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else choice.get("name")
        if not isinstance(name, str):
            raise ValueError(f"tool_choice {choice!r} names no tool")
        choice = name
    if not isinstance(choice, str):
        raise TypeError(f"tool_choice must be a str, dict or bool, got {type(choice).__name__}")
    if choice not in names:
        raise ValueError(f"tool_choice {choice!r} is not one of the tools {names}")
    return choice


def _kwargs(args: Any) -> dict:
    """A call's arguments as a dict (JSON text is decoded; anything else is {})."""
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return {}
    return dict(args) if isinstance(args, dict) else {}

def _last(responses: Iterator[Any]) -> Any:
    out = None
    for out in responses:
        pass
    return out


async def _alast(make: Callable[[], Iterator[Any]]) -> Any:
    """The last item of ``make()``, run on a worker thread (see :mod:`memory_plugin.bridge`)."""
    out = None
    async for out in iterate_in_thread(make):
        pass
    return out
