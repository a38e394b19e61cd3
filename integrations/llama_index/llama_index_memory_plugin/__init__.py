"""LlamaIndex integration of memory_plugin: long memory inside the model's attention.

* :class:`ContextMemoryQueryEngine`: a query engine answering by attention over a whole corpus.
* :class:`ContextMemoryLLM`: a ``CustomLLM`` whose chats reuse their already-encoded prefixes.
* :class:`ContextMemoryBlock`: a ``Memory`` block giving agents long-term chat memory.
"""

from .llm import MEMORY_CONTEXT_WINDOW, ContextMemoryLLM
from .memory_block import ContextMemoryBlock
from .query_engine import ContextMemoryQueryEngine

__all__ = ["MEMORY_CONTEXT_WINDOW", "ContextMemoryBlock", "ContextMemoryLLM", "ContextMemoryQueryEngine"]
__version__ = "0.1.0"
