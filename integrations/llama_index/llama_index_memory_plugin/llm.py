"""``ContextMemoryLLM``: a local model with ContextMemory attention as a LlamaIndex ``CustomLLM``.

LlamaIndex resends the whole conversation on every ``chat`` call. The LLM keeps the encoded
conversations in a :class:`memory_plugin.ConversationPool` (the core's prefix reuse, shared with the
LangChain adapter), so each call encodes only the messages that are new since the last one.
"""

from __future__ import annotations

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
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM

from memory_plugin import ContextMemory, ConversationPool, MemoryConfig, load_model
from memory_plugin.bridge import iterate_in_thread
from memory_plugin.loading import DEFAULT_MODEL_NAME
from memory_plugin.sampling import SamplingOptions

from ._common import to_memory_messages

MEMORY_CONTEXT_WINDOW = 131_072
"""Reported as ``metadata.context_window``: what one conversation may hold. The memory has no hard
limit (each turn attends to ``config.span`` tokens however long the history); what bounds it is host
RAM for the key/value blocks, about 45 KB per token for the embedded SmolLM2-135M in float32 (30
layers x 3 KV heads x 64 dims x K and V), so 128k tokens take about 6 GB. Raise it with
``context_window=`` on a machine with more memory. The model's trained window is
:attr:`ContextMemoryLLM.trained_context_window` (8192 for SmolLM2)."""


class ContextMemoryLLM(CustomLLM):
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
            is_function_calling_model=False,
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
        stays checked out of the pool (locked) until the generator ends."""
        msgs = to_memory_messages(messages)
        if not msgs:
            raise ValueError("no message with text to answer")
        opts, thread_id = self._options(kwargs)
        with self._pool.conversation(msgs, thread_id=thread_id) as conv:
            usage = {
                "reused_tokens": conv.reused_tokens,
                "new_tokens": conv.new_tokens,
                "memory_tokens": len(conv.memory),
            }
            text = ""
            pieces = conv.memory.stream(None, **opts.as_kwargs())
            try:
                for piece in pieces:
                    text += piece
                    if stream:
                        yield self._chat_response(text, piece, usage)
            finally:
                pieces.close()
            extra = {"memory": pieces.explanation.sources()} if opts.explain else {}
            if not stream:
                yield self._chat_response(text, text, {**usage, **extra})
            elif extra:
                yield self._chat_response(text, "", {**usage, **extra})

    @staticmethod
    def _chat_response(text: str, delta: str, extra: dict) -> ChatResponse:
        return ChatResponse(
            message=ChatMessage(role=MessageRole.ASSISTANT, content=text),
            delta=delta,
            additional_kwargs=dict(extra),
        )

    def _options(self, kwargs: dict) -> tuple[SamplingOptions, str | None]:
        """This call's generation options (its keyword arguments over the fields of the same names,
        see :data:`memory_plugin.sampling.ARGUMENTS`) and thread id."""
        return SamplingOptions().updated(dict(self)).updated(kwargs), kwargs.get("thread_id")


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
