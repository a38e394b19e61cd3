"""``ContextMemoryChatModel``: a LangChain chat model on a local model whose history lives in a
ContextMemory, so conversations longer than the model's trained context work, and a growing
conversation is encoded once, not on every call."""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput, ModelProfile
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig, RunnableMap, RunnablePassthrough
from langchain_core.runnables.config import ensure_config
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import ConfigDict, Field, PrivateAttr, model_validator
from typing_extensions import Self

from memory_plugin import Answer, ContextMemory, MemoryConfig, MemoryHit
from memory_plugin.bridge import iterate_in_thread
from memory_plugin.chat import ChatFormat
from memory_plugin.loading import DEFAULT_GGUF, DEFAULT_MODEL_NAME
from memory_plugin.memory import PLACED_HEADER
from memory_plugin.sampling import SamplingOptions
from memory_plugin.tools import tools_system

from ._format import (
    JSON_MODE_PROMPT,
    JSON_SCHEMA_PROMPT,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    JsonObjectEnd,
    ReplyParser,
    first_system_text,
    message_text,
    to_core_messages,
)
from ._loading import load_shared_model
from ._threads import ThreadMemories, config_key

#: ``profile["max_input_tokens"]``: the longest history the memory was measured answering at
#: (64k tokens, docs/BENCHMARKS.md). Not a hard limit: the memory attends over any length at about
#: the same cost per turn; middleware that trims by the profile (``SummarizationMiddleware`` with
#: fractional limits) starts trimming only beyond it.
MEASURED_INPUT_TOKENS = 65_536


@dataclass
class _Plan:
    """How one call is turned into a memory and a generation."""

    messages: list[dict]
    stop: list[str]
    parse_tools: bool = False
    functions: list[dict] = field(default_factory=list)
    force: str | None = None  # a forced tool call: the tool's name, or "" for any of the bound tools
    schema: dict | None = None  # json_schema output: the reply is this object, generated guided
    json_object: bool = False  # json_mode: the reply starts with "{" and ends where the object closes
    head: str = ""  # continue_final_message: the final assistant message's text, which the reply continues
    query: str = ""  # the conversation's last message: what recall searches for


@dataclass
class _Done:
    """What the last event of a call reports."""

    model_name: str
    input_tokens: int
    output_tokens: int
    reused_tokens: int
    finish_reason: str
    thread_id: str | None = None
    memory: dict | None = None  # explain: {"attended": [...], "placed": [...]}
    namespace: str = ""


class ContextMemoryChatModel(BaseChatModel):
    """A chat model on a local transformers model whose history lives in a ContextMemory.

    LangChain agents resend the whole conversation on every call. This model keeps a memory per
    conversation thread (the ``thread_id`` in the run config's ``configurable``, or ``session_id`` as
    ``RunnableWithMessageHistory`` sets it; else found by the conversation's prefix) and LangGraph
    namespace (the graph node calling it, from ``checkpoint_ns``: see :mod:`._threads`), so a
    summariser or subagent calling the same model in the same thread does not reset the agent's
    memory. When a call's messages extend what a memory holds, only the new messages are encoded;
    an edited or unrelated conversation gets a correct memory of its own. The memory attends over
    its whole history at a cost per turn that does not grow with it, so conversations far longer
    than the model's trained context work.

    With ``memory_dir`` each thread's memory is a directory there: it survives being closed (LRU)
    and restarts, and a new process continues a thread without encoding its history again (the
    LangGraph checkpointer keeps the messages, this directory their encoding). Get one with
    :meth:`thread_memory` to search, save or forget in it.

    Tool calling uses the model's chat template when it renders tools, else the documented prompt
    format of :mod:`memory_plugin.tools` (``<tool_call>{"name", "arguments"}</tool_call>``), the one
    every front end of memory_plugin writes into a memory.

    Example:
        >>> from langchain_memory_plugin import ContextMemoryChatModel
        >>> llm = ContextMemoryChatModel(max_tokens=64)  # embedded SmolLM2-135M-Instruct  # doctest: +SKIP
        >>> llm.invoke("Hello!").content  # doctest: +SKIP
        >>> llm.invoke(msgs, config={"configurable": {"thread_id": "alice"}})  # doctest: +SKIP
        >>> agent = create_agent(ContextMemoryChatModel(memory_dir="memories"), tools, checkpointer=saver)  # doctest: +SKIP

    Args:
        model: None for the embedded SmolLM2-135M-Instruct, else a local directory, ``.gguf`` file or
            hub id in the local cache (Llama, Mistral, Qwen2 architectures). Loaded on first use;
            instances naming the same model share its weights.
        memory: an existing ContextMemory to answer with (its model and config are used for every
            conversation); a call without a thread id whose messages extend the memory's messages
            reuses it.
        memory_config: the memory geometry for new conversations (default: ``MemoryConfig()``).
        memory_dir: a directory for durable thread memories (created; see above). Calls without a
            thread id are kept in RAM. Close with :meth:`close` (done at interpreter exit too) so the
            next process reopens every memory without encoding its last messages again.
        max_tokens, temperature, top_p, seed, stop: generation defaults, overridable per call (with
            ``min_new_tokens``: the core's :class:`~memory_plugin.sampling.SamplingOptions`, as every
            front end takes them; ``max_new_tokens`` is accepted for ``max_tokens``).
        max_conversations: memories kept (LRU); with ``memory_dir``, memories kept open (the others
            stay on disk).
        continue_final_message: when the messages end with an assistant message (without tool
            calls), continue it instead of starting a new turn (an "assistant prefill", as
            transformers' ``continue_final_message``); the reply holds only the continuation.
            Overridable per call. Completion-style starts such as ``AIMessage("port =")`` get far
            better answers from small models than open questions.
        recall: passages of the conversation that the memory's hybrid search finds for the last
            message and places verbatim before the reply (None: the memory config's ``recall_k``;
            0: none). Overridable per call.
        explain: when set (or ``explain=True`` per call), the reply's ``response_metadata["memory"]``
            (the last chunk's, when streaming) is ``{"attended": [...], "placed": [...]}``: the
            passages of the history the model attended most while writing the reply, and those placed
            before it, each a dict of ``text``, ``start``/``end`` (token span in the history),
            ``score``, ``message_index``, ``role`` and ``channels``.
        profile: LangChain's model profile (default: :meth:`_resolve_model_profile`).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model: str | None = None
    memory: ContextMemory | None = Field(default=None, exclude=True)
    memory_config: MemoryConfig | None = Field(default=None, exclude=True)
    memory_dir: Path | None = None
    device: str | None = None
    max_tokens: int = Field(default=256, gt=0)
    temperature: float = Field(default=0.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = None
    stop: list[str] | None = None
    max_conversations: int = Field(default=4, ge=1)
    continue_final_message: bool = False
    recall: int | None = Field(default=None, ge=0)
    explain: bool = False
    streaming: bool = False

    _pools: dict = PrivateAttr(default_factory=dict)
    _pools_lock: Any = PrivateAttr(default_factory=threading.Lock)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.memory is not None and self.model is not None:
            raise ValueError("pass either memory= (its model is used) or model=, not both")
        return self

    # ------------------------------------------------------------------------ thread memories
    @contextlib.contextmanager
    def thread_memory(self, thread_id: str, namespace: str = "") -> Iterator[ContextMemory]:
        """The durable memory of a thread (``memory_dir`` only), held for this thread alone during
        the ``with`` block: search it (``retrieve``), save a copy (``save``), forget in it
        (``forget``). The next call on the thread continues from what it holds then.

        ``namespace``: the LangGraph node path that made the calls (``checkpoint_ns`` without task
        ids): ``"model"`` for the agent of ``langchain.agents.create_agent`` (``AGENT_NAMESPACE``),
        a node's name in a graph of your own, ``""`` for calls made outside a graph. See
        :meth:`namespaces`.

        Example:
            >>> with llm.thread_memory("alice", namespace="model") as mem:  # doctest: +SKIP
            ...     hits = mem.retrieve("database port", k=2)
        """
        pools, _ = self._pool(None)
        with pools.thread(thread_id, namespace) as mem:
            yield mem

    def namespaces(self, thread_id: str) -> list[str]:
        """The namespaces a durable thread has memories in, most recently used first."""
        return self._pool(None)[0].namespaces(thread_id)

    def delete_thread(self, thread_id: str) -> int:
        """Delete a durable thread's memories, in every namespace, with their files (as a LangGraph
        checkpointer's ``delete_thread`` deletes its checkpoints); returns how many."""
        return self._pool(None)[0].delete(thread_id)

    def close(self) -> None:
        """Close the durable memories open now: each writes its final snapshot, so the next process
        (or call: they reopen on use) encodes nothing again."""
        with self._pools_lock:
            pools = list(self._pools.values())
        for p in pools:
            p.close()

    # ------------------------------------------------------------------------ LangChain plumbing
    @property
    def _llm_type(self) -> str:
        return "context-memory"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        config = self.memory.config if self.memory is not None else (self.memory_config or MemoryConfig())
        return {
            "model_name": self._model_name(None),
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "recall": self.recall,
            "memory_config": config.to_dict(),
            "memory_dir": None if self.memory_dir is None else str(self.memory_dir),
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop or self.stop, **kwargs)
        params["ls_provider"] = "memory_plugin"
        override = kwargs.get("model")
        params["ls_model_name"] = _model_id(override if isinstance(override, str) else self._model_name(None))
        return params

    def _resolve_model_profile(self) -> ModelProfile | None:
        """What middleware reads of the model: ``max_input_tokens`` (:data:`MEASURED_INPUT_TOKENS`,
        not a hard limit), text in and out, tool calling with tool choice and streamed calls.
        ``structured_output`` (native, alongside tools) is False: ``create_agent`` then asks for
        structured output through a forced tool call, which this model guides by the schema."""
        return ModelProfile(
            max_input_tokens=MEASURED_INPUT_TOKENS,
            text_inputs=True,
            image_inputs=False,
            pdf_inputs=False,
            audio_inputs=False,
            video_inputs=False,
            text_outputs=True,
            tool_calling=True,
            tool_choice=True,
            tool_call_streaming=True,
            structured_output=False,
            temperature=True,
            open_weights=True,
        )

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` in this model's tokenizer (loads the model if needed)."""
        pool, _ = self._pool(None)
        return pool.tokenizer(text, add_special_tokens=False)["input_ids"]

    # The run config reaches a chat model's _generate only through the context, which a direct
    # invoke(..., config=...) does not set; pass its thread_id and namespace on explicitly.
    def invoke(self, input: LanguageModelInput, config: RunnableConfig | None = None, *, stop=None, **kwargs):
        return super().invoke(input, config, stop=stop, **_with_thread_id(config, kwargs))

    async def ainvoke(self, input: LanguageModelInput, config: RunnableConfig | None = None, *, stop=None, **kwargs):
        return await super().ainvoke(input, config, stop=stop, **_with_thread_id(config, kwargs))

    def stream(self, input: LanguageModelInput, config: RunnableConfig | None = None, *, stop=None, **kwargs):
        return super().stream(input, config, stop=stop, **_with_thread_id(config, kwargs))

    def astream(self, input: LanguageModelInput, config: RunnableConfig | None = None, *, stop=None, **kwargs):
        return super().astream(input, config, stop=stop, **_with_thread_id(config, kwargs))

    # ------------------------------------------------------------------------ generation
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return _result(self._events(messages, stop, kwargs))

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        for chunk in self._chunks(messages, stop, kwargs):
            if run_manager and isinstance(chunk.message.content, str) and chunk.message.content:
                run_manager.on_llm_new_token(chunk.message.content, chunk=chunk)
            yield chunk

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        # Generation is blocking torch work: a worker thread keeps the event loop free. The memory's
        # own lock (one per conversation) serialises calls on the same conversation; a cancelled
        # call stops generating at its next token (see memory_plugin.bridge).
        return _result([event async for event in iterate_in_thread(lambda: self._events(messages, stop, kwargs))])

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        # The whole sync generator runs in one worker thread (the memory's lock is re-entrant per
        # thread, so a generator must not hop between executor threads) and hands chunks over.
        async for chunk in iterate_in_thread(lambda: self._chunks(messages, stop, kwargs)):
            if run_manager and isinstance(chunk.message.content, str) and chunk.message.content:
                await run_manager.on_llm_new_token(chunk.message.content, chunk=chunk)
            yield chunk

    def _chunks(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict
    ) -> Iterator[ChatGenerationChunk]:
        index = 0
        for kind, value in self._events(messages, stop, kwargs):
            if kind == "text":
                yield ChatGenerationChunk(message=AIMessageChunk(content=value))
            elif kind == "call":
                valid = value["type"] == "tool_call"
                args = json.dumps(value["args"], ensure_ascii=False) if valid else value["args"]
                chunk = tool_call_chunk(name=value["name"], args=args, id=value["id"], index=index)
                index += 1
                yield ChatGenerationChunk(message=AIMessageChunk(content="", tool_call_chunks=[chunk]))
            elif kind == "done":
                yield ChatGenerationChunk(
                    message=AIMessageChunk(
                        content="",
                        usage_metadata=_usage(value),
                        response_metadata=_response_metadata(value),
                        chunk_position="last",
                    )
                )

    def _events(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict) -> Iterator[tuple[str, Any]]:
        """The reply as events: ("text", str), ("call", ToolCall | InvalidToolCall), ("done", _Done),
        and ("tick", None) after each generated piece: a consumer that stops (a cancelled async
        call) stops the generation there, even while the parser holds text back."""
        opts = self._options(kwargs, stop)
        max_tokens, recall, explain = opts.max_new_tokens, opts.recall, opts.explain
        pool, name = self._pool(kwargs.get("model"))
        plan = self._plan(messages, pool.tokenizer, kwargs, list(opts.stop))
        thread_id, namespace = _call_key(kwargs)
        parser = ReplyParser(tools=plan.parse_tools)
        watcher = JsonObjectEnd() if plan.json_object else None
        with pool.conversation(plan.messages, thread_id, namespace) as conv:
            mem = conv.memory
            reused = conv.reused_tokens
            guided = plan.force is not None or plan.schema is not None
            prefill = "{" if plan.json_object else ""
            placed: list[MemoryHit] | None = None  # None: the core places (and reports) them itself
            # A continued final assistant message is the start of this turn, written after the
            # template's generation prompt.
            gen_prompt = _generation_prompt(pool.tokenizer) + plan.head
            if guided or prefill or plan.head:
                # The turn is written as raw text (chat=False). The core would search that text (a
                # template fragment) and place its finds as raw text before it: recall is done here
                # instead, for the last message, as the core does for a chat turn (a system message).
                placed = mem.place(plan.query, recall) if plan.query.strip() else []
                header = _placed_message(pool.tokenizer, placed)
                placed = placed if header else []
                gen_prompt = header + gen_prompt
            prompt_tokens = len(mem) + len(_encode(pool.tokenizer, gen_prompt))
            turn = opts.replace(recall=recall if placed is None else 0, stop=plan.stop)
            answer: Answer | None = None
            if guided:
                guide = _Guide(mem, pool.tokenizer, gen_prompt, opts)
                if plan.force is not None:
                    reply = guide.tool_call(plan.functions, plan.force or None)
                else:
                    reply = guide.json_object("", plan.schema)
                out_tokens = guide.used
                answer = guide.explanation()
                yield from parser.feed(reply)
            else:
                if prefill or plan.head:  # the turn's start is given: written as raw text, then continued
                    pieces = mem.stream(gen_prompt + prefill, chat=False, **turn.as_kwargs())
                    prompt_tokens += len(_encode(pool.tokenizer, prefill))
                    if watcher:
                        watcher.feed(prefill)
                    yield from parser.feed(prefill)
                else:
                    pieces = mem.stream(None, **turn.replace(min_new_tokens=max(1, turn.min_new_tokens)).as_kwargs())
                generated = ""
                with contextlib.closing(pieces):  # stopping early ends the turn and restores the memory
                    for piece in pieces:
                        if watcher:
                            end = watcher.feed(piece)
                            piece = piece if end is None else piece[:end]
                        generated += piece
                        yield from parser.feed(piece)
                        yield "tick", None
                        if watcher and watcher.done:
                            break
                answer = pieces.explanation if explain else None
                # Re-tokenised, a reply may count a token more or less than generated; never above the cap.
                out_tokens = min(len(_encode(pool.tokenizer, generated)), max_tokens) if generated else 0
        memory = _explanation(answer, placed) if explain else None
        yield from parser.finish()
        if out_tokens >= max_tokens and not (watcher and watcher.done):
            reason = "length"
        elif plan.force is not None or parser.saw_call:
            reason = "tool_calls"
        else:
            reason = "stop"
        yield "done", _Done(name, prompt_tokens, out_tokens, reused, reason, thread_id, memory, namespace)

    def _plan(self, messages: list[BaseMessage], tokenizer, kwargs: dict, stop: list[str]) -> _Plan:
        functions = [t["function"] for t in kwargs.get("tools") or [] if isinstance(t, dict) and "function" in t]
        choice = _normalise_tool_choice(kwargs.get("tool_choice"), functions)
        response_format = kwargs.get("response_format")
        head = ""
        if kwargs.get("continue_final_message", self.continue_final_message) and messages:
            last = messages[-1]
            if isinstance(last, AIMessage) and not last.tool_calls and message_text(last).strip():
                head, messages = message_text(last), messages[:-1]
        system = first_system_text(messages)
        content = None  # the first system message's new content, when tools are offered
        use_tools = bool(functions)
        if use_tools:
            content = tools_system(tokenizer, functions, system)
        plan = _Plan(to_core_messages(messages, content), stop=list(stop), parse_tools=use_tools and choice != "none")
        plan.head = head
        plan.query = plan.messages[-1]["content"] if plan.messages else ""
        if use_tools and choice == "none":
            # The tools stay listed (the conversation's prefix, and its memory, stay the same); the
            # model is stopped if it starts a call.
            plan.stop.append(TOOL_CALL_OPEN)
        if response_format and plan.messages:
            # After the conversation, not in its first message: the history stays a prefix of what
            # the memory holds, so a structured question on a long conversation encodes only this.
            plan.messages.append({"role": "system", "content": _format_prompt(response_format)})
        if not plan.messages:
            raise ValueError("none of the messages has any text to answer")
        if use_tools and choice not in (None, "auto", "none"):
            plan.functions = functions
            plan.force = "" if choice == "any" else choice
        elif response_format and response_format.get("type") == "json_schema" and response_format.get("schema"):
            plan.schema = response_format["schema"]
        elif response_format:
            plan.json_object = True
        return plan

    def _pool(self, override: Any) -> tuple[ThreadMemories, str]:
        """The memories of the model (``override``: another model named per call; its durable
        threads live in a subdirectory of ``memory_dir`` named after it)."""
        key = override if isinstance(override, str) and override != self.model else None
        with self._pools_lock:
            pool = self._pools.get(key)
            if pool is None:
                memory_dir = self.memory_dir
                if memory_dir is not None and key is not None:
                    memory_dir = memory_dir / "models" / _model_id(key)
                kw = dict(memory_dir=memory_dir, max_open=self.max_conversations)
                if key is None and self.memory is not None:
                    pool = ThreadMemories(memory=self.memory, **kw)
                else:
                    hf_model, tokenizer = load_shared_model(key if key is not None else self.model, device=self.device)
                    pool = ThreadMemories(hf_model, tokenizer, self.memory_config, **kw)
                self._pools[key] = pool
        return pool, self._model_name(key)

    def _options(self, kwargs: dict, stop: list[str] | None) -> SamplingOptions:
        """This call's generation options: its keyword arguments over the model's fields (the same
        names, see :data:`memory_plugin.sampling.ARGUMENTS`)."""
        return SamplingOptions().updated(dict(self)).updated({**kwargs, "stop": stop})

    def _model_name(self, key: str | None) -> str:
        if key is not None:
            return key
        if self.memory is not None:
            return self.memory.model_name
        return DEFAULT_MODEL_NAME if self.model is None else self.model

    # ------------------------------------------------------------------------ tools, structure
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: dict | str | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (LangChain tools, functions, Pydantic models, TypedDicts or JSON/OpenAI schemas).

        ``tool_choice``: None or "auto" (the model decides), "none" (no call: the tools stay listed,
        so the conversation's memory is reused, but the reply stops if the model starts a call), "any" /
        "required" / True (a call is forced; with several tools the model writes the name and the
        closest bound name is taken), or a tool's name (``{"type": "function", "function": {"name":
        ...}}`` also works). A forced call is schema-guided (see :class:`_Guide`) and is exactly one.
        """
        formatted = [convert_to_openai_tool(t) for t in tools]
        _normalise_tool_choice(tool_choice, [t["function"] for t in formatted])  # fail early on a bad choice
        return super().bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    def with_structured_output(
        self,
        schema: dict | type,
        *,
        method: Literal["function_calling", "json_schema", "json_mode"] = "function_calling",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict | Any]:
        """A runnable whose output follows ``schema`` (Pydantic class, TypedDict or JSON schema).

        ``method="function_calling"`` (default): a forced, schema-guided call of a tool named after
        the schema; ``"json_schema"``: the schema is given in a system message after the conversation
        and the reply is the schema-guided JSON object; ``"json_mode"``: the reply is forced to start
        with ``{`` and ends where the object closes, its shape is up to the model (describe it in the
        prompt). Schema-guided: the keys of required properties come from the schema, the model
        writes the values (see :class:`_Guide`). ``strict`` is accepted for compatibility and not
        enforced: output that does not match the schema fails to parse (or gives ``parsing_error``
        with ``include_raw=True``).
        """
        if kwargs:
            raise ValueError(f"unsupported arguments: {sorted(kwargs)}")
        if method not in ("function_calling", "json_schema", "json_mode"):
            raise ValueError(f"method must be 'function_calling', 'json_schema' or 'json_mode', got {method!r}")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        ls_format = {"kwargs": {"method": method, "strict": strict}, "schema": schema}
        if method == "function_calling":
            tool_name = convert_to_openai_tool(schema)["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=tool_name, ls_structured_output_format=ls_format)
            parser: Runnable = (
                PydanticToolsParser(tools=[schema], first_tool_only=True)
                if is_pydantic
                else JsonOutputKeyToolsParser(key_name=tool_name, first_tool_only=True)
            )
        else:
            if method == "json_schema":
                response_format = {"type": "json_schema", "schema": convert_to_json_schema(schema)}
            else:
                response_format = {"type": "json_object"}
            llm = self.bind(response_format=response_format, ls_structured_output_format=ls_format)
            parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()
        if not include_raw:
            return llm | parser
        with_parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        without = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | with_parsed.with_fallbacks([without], exception_key="parsing_error")


class _Guide:
    """Schema-guided generation of a forced tool call or a JSON-schema reply.

    The JSON syntax and the keys come from the schema; the model generates the tool's name (when
    several tools may be called; the closest bound name is taken) and every value: each required
    property's key is written, then the model continues with its value, stopped at the value's end
    (a closing quote for strings; a comma, brace or newline for numbers and booleans). Values of
    other types (arrays, objects, unions) and everything after them are written by the model
    freely. Optional properties are left out. Small models fill in values far more reliably than
    they write JSON; an unparseable value still ends up as an invalid tool call.
    """

    def __init__(self, mem: ContextMemory, tokenizer, gen_prompt: str, options: SamplingOptions):
        self.mem, self.tokenizer, self.gen_prompt = mem, tokenizer, gen_prompt
        self.options = options.replace(recall=0, min_new_tokens=0)
        self.budget = options.max_new_tokens
        self.used = 0
        self.explain = options.explain
        self.attended: dict[tuple[int, int], MemoryHit] = {}

    def _generate(self, text: str, stop: list[str], limit: int) -> str | None:
        """The model's continuation of the reply ``text``; None when the token budget is spent.
        ``gen_prompt`` already holds any placed passages: the core places none (recall=0)."""
        n = min(limit, self.budget - self.used)
        if n <= 0:
            return None
        out = self.mem.generate(
            self.gen_prompt + text, chat=False, **self.options.replace(max_new_tokens=n, stop=stop).as_kwargs()
        )
        if self.explain:
            for hit in out.attended:
                best = self.attended.get((hit.start, hit.end))
                if best is None or hit.score > best.score:
                    self.attended[(hit.start, hit.end)] = hit
            out = out.text
        self.used += max(1, min(n, len(_encode(self.tokenizer, out)))) if out else 1
        return out

    def explanation(self) -> Answer | None:
        """With ``explain``: the passages any of the guided generations attended most (each with its
        highest share of a generation's attention), best first."""
        if not self.explain:
            return None
        attended = sorted(self.attended.values(), key=lambda h: -h.score)[:_EXPLAIN_K]
        return Answer("", attended, [])

    def tool_call(self, functions: list[dict], name: str | None) -> str:
        text = TOOL_CALL_OPEN + '\n{"name": "'
        names = [f["name"] for f in functions]
        if name is None:
            if len(names) == 1:
                name = names[0]
            else:
                guess = self._generate(text, ['"', "\n"], 16)
                name = _closest_name(guess or "", names)
        text = TOOL_CALL_OPEN + '\n{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '
        params = next(f for f in functions if f["name"] == name).get("parameters") or {}
        text, complete = self._object(text, params, closing=TOOL_CALL_CLOSE)
        return text + ("}\n" + TOOL_CALL_CLOSE if complete else "")

    def json_object(self, text: str, schema: dict) -> str:
        return self._object(text, schema, closing=None)[0]

    def _object(self, text: str, schema: dict, closing: str | None) -> tuple[str, bool]:
        """``text`` + the object; ``complete`` is False when the model wrote the end itself (or ran
        out of tokens)."""
        props = schema.get("properties") or {}
        required = [k for k in schema.get("required") or [] if k in props]
        text += "{"
        for i, key in enumerate(required):
            text += (", " if i else "") + json.dumps(key, ensure_ascii=False) + ": "
            kind = _value_type(props[key])
            if kind == "string":  # an equal share of what is left, so later values get tokens too
                share = max(1, (self.budget - self.used) // (len(required) - i))
                value = self._generate(text + '"', ['"', "\n"], share)
                if value is None:
                    return text, False
                text += json.dumps(value, ensure_ascii=False)
            elif kind in ("integer", "number", "boolean"):
                value = self._generate(text, [",", "}", "\n"], 16)
                if value is None:
                    return text, False
                text += value.strip()
            else:  # the model writes the rest of the object (and of the call) itself
                rest = self._generate(text, [closing] if closing else [], self.budget)
                if rest is None:
                    return text, False
                if closing is None:
                    watcher = JsonObjectEnd()
                    end = watcher.feed(text + rest)
                    return (text + rest)[: end if end is not None else None], False
                return text + rest + "\n" + closing, False
        return text + "}", True


def _value_type(spec: dict) -> str | None:
    """The JSON type of a property, looking through ``anyOf`` with null (Optional[...])."""
    if "type" in spec and isinstance(spec["type"], str):
        return spec["type"]
    options = [o for o in spec.get("anyOf") or [] if o.get("type") != "null"]
    if len(options) == 1 and isinstance(options[0].get("type"), str):
        return options[0]["type"]
    if "enum" in spec and all(isinstance(v, str) for v in spec["enum"]):
        return "string"
    return None


def _closest_name(guess: str, names: list[str]) -> str:
    guess = guess.strip()
    if guess in names:
        return guess
    lowered = {n.lower(): n for n in names}
    if guess.lower() in lowered:
        return lowered[guess.lower()]
    match = difflib.get_close_matches(guess, names, n=1, cutoff=0.0)
    return match[0] if match else names[0]


# ---------------------------------------------------------------------------- helpers
def _result(events: Iterator[tuple[str, Any]] | list[tuple[str, Any]]) -> ChatResult:
    """The whole reply of :meth:`ContextMemoryChatModel._events` as one message."""
    text, calls, invalid, done = [], [], [], None
    for kind, value in events:
        if kind == "text":
            text.append(value)
        elif kind == "call":
            (calls if value["type"] == "tool_call" else invalid).append(value)
        elif kind == "done":
            done = value
    message = AIMessage(
        content="".join(text),
        tool_calls=calls,
        invalid_tool_calls=invalid,
        usage_metadata=_usage(done),
        response_metadata=_response_metadata(done),
    )
    return ChatResult(generations=[ChatGeneration(message=message)], llm_output={"model_name": done.model_name})


def _with_thread_id(config: RunnableConfig | None, kwargs: dict) -> dict:
    """``kwargs`` with the ``thread_id`` and ``namespace`` of an explicit run config."""
    thread_id, namespace = config_key(config)
    if thread_id is not None and "thread_id" not in kwargs:
        return {"namespace": namespace, **kwargs, "thread_id": thread_id}
    return kwargs


def _call_key(kwargs: dict) -> tuple[str | None, str]:
    """A call's ``(thread_id, namespace)``: its keyword arguments (set from an explicit config by
    :func:`_with_thread_id`), else the run config in the context (LangGraph nodes, chains)."""
    if kwargs.get("thread_id") is not None:
        thread_id, namespace = str(kwargs["thread_id"]), kwargs.get("namespace")
    else:
        thread_id, namespace = config_key(ensure_config())
        namespace = kwargs.get("namespace", namespace)
    if namespace is None:
        namespace = ""
    if not isinstance(namespace, str):
        raise TypeError(f"namespace must be a str, got {type(namespace).__name__}")
    return thread_id, namespace


def _model_id(name: str) -> str:
    """A model's id (LangSmith's ``ls_model_name``), not its description: the embedded model's file
    name, a local file's or directory's name, else the name as given (a hub id).

    >>> _model_id(DEFAULT_MODEL_NAME), _model_id("Qwen/Qwen2.5-0.5B-Instruct")
    ('SmolLM2-135M-Instruct.Q4_1', 'Qwen/Qwen2.5-0.5B-Instruct')
    """
    if name == DEFAULT_MODEL_NAME:
        return Path(DEFAULT_GGUF).stem
    if os.path.exists(name):
        path = Path(name)
        return path.stem if path.suffix == ".gguf" else path.name
    return name


def _normalise_tool_choice(choice: Any, functions: list[dict]) -> str | None:
    """None, "auto", "none", "any", or the name of a bound tool."""
    names = [f["name"] for f in functions]
    if choice is None or choice is False:
        return None
    if choice is True:
        return "any"
    if isinstance(choice, dict):
        if choice.get("type") in ("any", "required", "auto", "none") and "function" not in choice:
            return _normalise_tool_choice(choice["type"], functions)
        name = (choice.get("function") or {}).get("name") or choice.get("name")
        if not isinstance(name, str):
            raise ValueError(f"unrecognised tool_choice {choice!r}")
        choice = name
    if not isinstance(choice, str):
        raise TypeError(f"tool_choice must be a str, dict or bool, got {type(choice).__name__}")
    if choice in ("auto", "none"):
        return choice
    if choice in ("any", "required"):
        return "any"
    if choice not in names:
        raise ValueError(f"tool_choice {choice!r} is not one of the bound tools {names}")
    return choice


def _format_prompt(response_format: dict) -> str:
    if response_format.get("type") == "json_schema" and response_format.get("schema"):
        return JSON_SCHEMA_PROMPT.format(schema=json.dumps(response_format["schema"], ensure_ascii=False))
    return JSON_MODE_PROMPT


_FORMATS: dict[int, ChatFormat] = {}  # each holds its tokenizer, so the id is not reused


def _chat_format(tokenizer) -> ChatFormat:
    key = id(tokenizer)
    if key not in _FORMATS:
        _FORMATS[key] = ChatFormat(tokenizer)
    return _FORMATS[key]


def _generation_prompt(tokenizer) -> str:
    """The text the chat template adds to start the assistant's turn (cached per tokenizer)."""
    return _chat_format(tokenizer).generation_prompt


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


_EXPLAIN_K = 4  # attended passages reported for a guided reply (the core reports 4 per answer)


def _placed_message(tokenizer, placed: list[MemoryHit]) -> str:
    """The system message the core writes before a chat turn for its placed passages (the best one
    last, nearest the reply); "" when none, or when the template refuses a system message there."""
    if not placed:
        return ""
    text = "\n".join(h.text for h in reversed(placed))
    try:
        return _chat_format(tokenizer).message_text("system", f"{PLACED_HEADER}\n{text}", first=False)
    except ValueError:
        return ""


def _explanation(answer: Answer, placed: list[MemoryHit] | None) -> dict:
    """``{"attended": [...], "placed": [...]}``; ``placed``: the passages placed here, not by the core."""
    return Answer(answer.text, answer.attended, answer.placed if placed is None else placed).sources()


def _usage(done: _Done) -> UsageMetadata:
    return UsageMetadata(
        input_tokens=done.input_tokens,
        output_tokens=done.output_tokens,
        total_tokens=done.input_tokens + done.output_tokens,
        input_token_details={"cache_read": done.reused_tokens},
    )


def _response_metadata(done: _Done) -> dict:
    meta = {"model_name": done.model_name, "finish_reason": done.finish_reason, "reused_tokens": done.reused_tokens}
    if done.thread_id is not None:
        meta["thread_id"] = done.thread_id
        if done.namespace:
            meta["namespace"] = done.namespace
    if done.memory is not None:
        meta["memory"] = done.memory
    return meta
