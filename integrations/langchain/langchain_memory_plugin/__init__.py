"""LangChain integration of memory_plugin.

* :class:`ContextMemoryChatModel`: a chat model on a local model whose history lives in a
  ContextMemory (prefix reuse across calls, tool calling, structured output).
* :class:`ContextMemoryChatMessageHistory`: a message history stored in a ContextMemory.
* :class:`ContextMemoryRetriever`: a memory's ``retrieve`` as LangChain documents, for any LLM.
* :class:`ContextMemoryMiddleware` (needs ``langchain``): for ``create_agent`` agents on another
  model, the last messages plus what the thread's memory finds among the earlier ones.

Example:
    >>> from langchain_memory_plugin import ContextMemoryChatModel
    >>> llm = ContextMemoryChatModel()  # the embedded SmolLM2-135M-Instruct  # doctest: +SKIP
    >>> llm.invoke("Hello!")  # doctest: +SKIP
"""

from ._format import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, tools_prompt
from ._loading import load_shared_model
from .chat_history import ContextMemoryChatMessageHistory, ContextMemoryHistoryStore
from .chat_models import ContextMemoryChatModel
from ._threads import AGENT_NAMESPACE
from .retrievers import ContextMemoryRetriever

__all__ = [
    "AGENT_NAMESPACE",
    "TOOL_CALL_CLOSE",
    "TOOL_CALL_OPEN",
    "ContextMemoryChatMessageHistory",
    "ContextMemoryChatModel",
    "ContextMemoryHistoryStore",
    "ContextMemoryMiddleware",
    "ContextMemoryRetriever",
    "load_shared_model",
    "tools_prompt",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The middleware needs the `langchain` package (agents), not a dependency of the rest.
    if name == "ContextMemoryMiddleware":
        from .middleware import ContextMemoryMiddleware

        return ContextMemoryMiddleware
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
