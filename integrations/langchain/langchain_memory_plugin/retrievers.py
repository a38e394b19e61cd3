"""``ContextMemoryRetriever``: the long memory searched by the model's own attention, as documents."""

from __future__ import annotations

import asyncio

from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field

from memory_plugin import ContextMemory


class ContextMemoryRetriever(BaseRetriever):
    """The spans of a ContextMemory's history most relevant to a query, as LangChain ``Document``s.

    Relevance is the memory's own (:meth:`ContextMemory.retrieve`: the block selection InfLLM's
    attention uses), so any LLM, a hosted one too, can read from a history far longer than its
    context through retrieval. Metadata of each document: ``start``/``end`` (token span in the
    history), ``score``, ``message_index`` and ``role`` (the stored message the span starts in).

    Example:
        >>> retriever = ContextMemoryRetriever(memory=mem, k=3)  # doctest: +SKIP
        >>> retriever.invoke("database port")  # doctest: +SKIP
        >>> retriever.invoke("database port", k=1)  # doctest: +SKIP
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    memory: ContextMemory
    k: int = Field(default=4, ge=0)
    """Documents returned (fewer when the history has fewer spans); ``invoke(..., k=n)`` overrides it."""

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, k: int | None = None
    ) -> list[Document]:
        hits = self.memory.retrieve(query, k=self.k if k is None else k)
        return [
            Document(
                page_content=h.text,
                metadata={
                    "start": h.start,
                    "end": h.end,
                    "score": h.score,
                    "message_index": h.message_index,
                    "role": h.role,
                },
            )
            for h in hits
        ]

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun, k: int | None = None
    ) -> list[Document]:
        # Retrieval runs the model over the query: a worker thread keeps the event loop free.
        return await asyncio.to_thread(
            self._get_relevant_documents, query, run_manager=run_manager.get_sync(), k=k
        )
