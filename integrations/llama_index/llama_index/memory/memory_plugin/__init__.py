"""``ContextMemoryBlock`` under LlamaIndex's integration layout (``llama_index.memory.<name>``): the
same class as ``llama_index_memory_plugin.ContextMemoryBlock``.

Example:
    >>> from llama_index.memory.memory_plugin import ContextMemoryBlock  # doctest: +SKIP
"""

from llama_index_memory_plugin.memory_block import ContextMemoryBlock

__all__ = ["ContextMemoryBlock"]
