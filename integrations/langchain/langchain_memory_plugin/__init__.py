"""LangChain integration of memory_plugin.

* :class:`ContextMemoryChatModel`: a chat model on a local model whose history lives in a
  ContextMemory (prefix reuse across calls, tool calling, structured output).
* :class:`ContextMemoryChatMessageHistory`: a message history stored in a ContextMemory.
* :class:`ContextMemoryRetriever`: a memory's ``retrieve`` as LangChain documents, for any LLM.

Example:
    >>> from langchain_memory_plugin import ContextMemoryChatModel
    >>> llm = ContextMemoryChatModel()  # the embedded SmolLM2-135M-Instruct  # doctest: +SKIP
    >>> llm.invoke("Hello!")  # doctest: +SKIP
"""

from ._format import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, tools_prompt
from ._loading import load_shared_model
from .chat_history import ContextMemoryChatMessageHistory, ContextMemoryHistoryStore
from .chat_models import ContextMemoryChatModel
from .retrievers import ContextMemoryRetriever

__all__ = [
    "TOOL_CALL_CLOSE",
    "TOOL_CALL_OPEN",
    "ContextMemoryChatMessageHistory",
    "ContextMemoryChatModel",
    "ContextMemoryHistoryStore",
    "ContextMemoryRetriever",
    "load_shared_model",
    "tools_prompt",
]
__version__ = "0.1.0"
