"""memory_plugin: long-term memory for LLM agents inside the model's attention (InfLLM + memory vectors).

Example:
    >>> from memory_plugin import ContextMemory
    >>> mem = ContextMemory.from_pretrained()  # doctest: +SKIP
    >>> mem.add_message("user", "The blue folder is in the attic.")  # doctest: +SKIP
    >>> mem.generate("Where is the blue folder?")  # doctest: +SKIP
"""

from .config import MemoryConfig
from .memory import Answer, Checkpoint, ContextMemory, Entry, MemoryHit, MemoryStats, Segment, TurnStream
from .loading import ModelNotFoundError, UnsupportedModelError, load_model
from .pool import MemoryPool, Retention, ThreadInfo
from .sessions import Conversation, ConversationPool

__all__ = [
    "Answer",
    "Checkpoint",
    "ContextMemory",
    "Conversation",
    "ConversationPool",
    "Entry",
    "MemoryConfig",
    "MemoryHit",
    "MemoryPool",
    "MemoryStats",
    "TurnStream",
    "Retention",
    "Segment",
    "ThreadInfo",
    "ModelNotFoundError",
    "UnsupportedModelError",
    "load_model",
]
__version__ = "0.1.0"
