"""``ContextMemoryLLM`` under LlamaIndex's integration layout (``llama_index.llms.<name>``): the same
class as ``llama_index_memory_plugin.ContextMemoryLLM``.

Example:
    >>> from llama_index.llms.memory_plugin import ContextMemoryLLM  # doctest: +SKIP
"""

from llama_index_memory_plugin.llm import MEMORY_CONTEXT_WINDOW, ContextMemoryLLM

__all__ = ["MEMORY_CONTEXT_WINDOW", "ContextMemoryLLM"]
