"""``ContextMemoryRetriever`` under LlamaIndex's integration layout (``llama_index.retrievers.<name>``):
the same class as ``llama_index_memory_plugin.ContextMemoryRetriever``.

Example:
    >>> from llama_index.retrievers.memory_plugin import ContextMemoryRetriever  # doctest: +SKIP
"""

from llama_index_memory_plugin.retriever import ContextMemoryRetriever, memory_tokenizer

__all__ = ["ContextMemoryRetriever", "memory_tokenizer"]
