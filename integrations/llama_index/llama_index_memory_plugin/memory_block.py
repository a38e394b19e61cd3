"""``ContextMemoryBlock``: long-term chat memory for LlamaIndex agents, as a ``Memory`` block.

``llama_index.core.memory.Memory`` keeps recent messages in a token-limited queue and hands the
messages it flushes out of that queue to its memory blocks. This block encodes them into a
:class:`memory_plugin.ContextMemory`; when the agent next reads its memory, the block returns the
passages of the whole history that the memory's hybrid search (BM25 over the passages' words fused
with the model's attention ranking) finds for the latest input.
"""

from __future__ import annotations

import asyncio
from typing import Any

from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.bridge.pydantic import Field
from llama_index.core.memory.memory import BaseMemoryBlock

from memory_plugin import ContextMemory, MemoryHit
from memory_plugin.recall import SearchMode

from ._common import message_text, to_memory_messages


class ContextMemoryBlock(BaseMemoryBlock[str]):
    """A ``Memory`` block holding every flushed message in a ContextMemory.

    ``aget`` searches the history (:meth:`ContextMemory.retrieve` in ``mode``, default ``"hybrid"``:
    BM25 over the passages' words fused with the model's own attention ranking) for the
    ``similarity_top_k`` passages most relevant to the last ``query_messages`` messages and returns
    them in history order, one line per message (``role: text``). A passage is a whole message, or a
    piece of at most ``block_size`` tokens of a longer one cut at sentence ends; a message short
    enough (at most ``whole_message_tokens`` tokens) is returned whole, a longer one as the pieces
    found (``...`` where text is left out). To see which channel found what, call
    ``block.memory.retrieve(query)``: each hit's ``channels`` names them.

    Example:
        >>> block = ContextMemoryBlock(memory=ContextMemory.from_pretrained())  # doctest: +SKIP
        >>> memory = Memory.from_defaults(token_limit=2000, memory_blocks=[block])  # doctest: +SKIP
        >>> await FunctionAgent(tools=..., llm=...).run("...", memory=memory)  # doctest: +SKIP
    """

    name: str = Field(default="long_term_memory", description="The block's name in the memory template.")
    description: str | None = Field(
        default="Earlier conversation retrieved from long-term memory by relevance to the latest input."
    )
    memory: ContextMemory = Field(exclude=True, description="Where flushed messages are encoded.")
    similarity_top_k: int = Field(default=3, ge=0, description="Memory passages retrieved per read.")
    mode: SearchMode = Field(
        default="hybrid", description="How the history is searched (see ContextMemory.retrieve)."
    )
    query_messages: int = Field(default=1, ge=1, description="Latest messages whose text forms the query.")
    whole_message_tokens: int = Field(default=256, ge=0, description="Messages up to this size come back whole.")

    async def _aput(self, messages: list[ChatMessage]) -> None:
        msgs = to_memory_messages(messages)
        if msgs:
            await asyncio.to_thread(self.memory.add_messages, msgs)

    async def _aget(self, messages: list[ChatMessage] | None = None, **block_kwargs: Any) -> str:
        texts = [t for t in (message_text(m) for m in messages or []) if t.strip()]
        if not texts or len(self.memory) == 0 or self.similarity_top_k == 0:
            return ""
        query = "\n".join(texts[-self.query_messages :])
        return await asyncio.to_thread(self.recall, query)

    def recall(self, query: str) -> str:
        """The retrieved history for ``query``, formatted as :meth:`aget` returns it."""
        mem = self.memory
        entries = mem.entries
        found: dict[int, list[MemoryHit]] = {}  # entry index -> its passages found
        for hit in mem.retrieve(query, k=self.similarity_top_k, mode=self.mode):
            if hit.message_index is not None and 0 <= hit.message_index < len(entries):
                found.setdefault(hit.message_index, []).append(hit)
        lines, last = [], None
        for i in sorted(found):
            e = entries[i]
            if e.end - e.start <= self.whole_message_tokens:
                text = e.content
            else:
                text = _pieces(e, sorted(found[i], key=lambda h: h.start))
            if last is not None and i > last + 1:
                lines.append("...")
            lines.append(f"{e.role or 'text'}: {text.strip()}")
            last = i
        return "\n".join(lines)


def _pieces(entry, hits: list[MemoryHit]) -> str:
    """The found passages of a long entry, in order, with ``...`` where text is left out."""
    out = "... " if hits[0].start > entry.start else ""
    for j, h in enumerate(hits):
        if j:
            out += " " if h.start <= hits[j - 1].end else " ... "
        out += h.text.strip()
    return out + (" ..." if hits[-1].end < entry.end else "")
