"""LlamaIndex integration of memory_plugin: long memory inside the model's attention.

* :class:`ContextMemoryQueryEngine`: a query engine answering by attention over a whole corpus.
* :class:`ContextMemoryLLM`: a ``FunctionCallingLLM`` whose chats reuse their already-encoded
  prefixes; ``FunctionAgent`` and ``AgentWorkflow`` run on it.
* :class:`ContextMemoryRetriever`: a memory's history as a ``BaseRetriever`` (retriever query
  engines, fusion retrievers, retriever tools); :func:`memory_tokenizer` for ``Settings.tokenizer``.
* :class:`ContextMemoryBlock`: a ``Memory`` block giving agents long-term chat memory.
* :func:`to_memory_messages` / :func:`to_chat_messages`: chat messages to a memory's stored
  messages and back, tool calls included, in the core's one tool-call format (the LangChain
  adapter's too).
"""

from ._common import to_chat_messages, to_memory_messages
from .llm import MEMORY_CONTEXT_WINDOW, ContextMemoryLLM
from .memory_block import ContextMemoryBlock
from .query_engine import ContextMemoryQueryEngine
from .retriever import ContextMemoryRetriever, memory_tokenizer

__all__ = [
    "MEMORY_CONTEXT_WINDOW",
    "ContextMemoryBlock",
    "ContextMemoryLLM",
    "ContextMemoryQueryEngine",
    "ContextMemoryRetriever",
    "memory_tokenizer",
    "to_chat_messages",
    "to_memory_messages",
]
__version__ = "0.1.0"
