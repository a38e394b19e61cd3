"""``ContextMemoryBlock``: long-term chat memory for LlamaIndex agents, as a ``Memory`` block.

``llama_index.core.memory.Memory`` keeps recent messages in a token-limited queue and hands the
messages it flushes out of that queue to its memory blocks. This block encodes them into a
:class:`memory_plugin.ContextMemory`; when the agent next reads its memory, the block returns the
stretches of the whole history that the memory's attention finds most relevant to the latest input.
"""

from __future__ import annotations

import asyncio
from typing import Any

from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.bridge.pydantic import Field
from llama_index.core.memory.memory import BaseMemoryBlock

from memory_plugin import ContextMemory

from ._common import entry_overlaps, message_text, to_memory_messages


class ContextMemoryBlock(BaseMemoryBlock[str]):
    """A ``Memory`` block holding every flushed message in a ContextMemory.

    ``aget`` retrieves (``ContextMemory.retrieve``, the memory's own block relevance) the
    ``similarity_top_k`` spans most relevant to the last ``query_messages`` messages and returns them
    in history order, one line per message (``role: text``); a message short enough (at most
    ``whole_message_tokens`` tokens) is returned whole, a longer one only where the span covers it.

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
    similarity_top_k: int = Field(default=3, ge=0, description="Memory spans retrieved per read.")
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
        pieces: dict[int, tuple[int, int]] = {}  # entry index -> covered token span
        for hit in mem.retrieve(query, k=self.similarity_top_k):
            for i, a, b in entry_overlaps(entries, hit.start, hit.end):
                if i in pieces:
                    a, b = min(a, pieces[i][0]), max(b, pieces[i][1])
                pieces[i] = (a, b)
        ids = mem.token_ids
        lines, last = [], None
        for i in sorted(pieces):
            e = entries[i]
            if e.end - e.start <= self.whole_message_tokens:
                text = e.content
            else:
                a, b = pieces[i]
                text = mem.tokenizer.decode(ids[a:b], skip_special_tokens=True)
                text = ("... " if a > e.start else "") + text.strip() + (" ..." if b < e.end else "")
            if last is not None and i > last + 1:
                lines.append("...")
            lines.append(f"{e.role or 'text'}: {text.strip()}")
            last = i
        return "\n".join(lines)
