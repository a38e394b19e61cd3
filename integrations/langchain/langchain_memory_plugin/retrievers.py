"""``ContextMemoryRetriever``: the long memory's hybrid search (BM25 + the model's attention), as documents."""

from __future__ import annotations

import asyncio
from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field

from memory_plugin import ContextMemory
from memory_plugin.recall import SearchMode


class ContextMemoryRetriever(BaseRetriever):
    """The passages of a ContextMemory's history most relevant to a query, as LangChain ``Document``s.

    The search is the memory's own (:meth:`ContextMemory.retrieve`): in ``mode="hybrid"`` (default)
    BM25 over the passages' words (exact for names, ids, numbers said once) fused with a small
    embedding model's ranking (paraphrases); ``"lexical"``, ``"semantic"`` or ``"attention"`` (the
    model's own queries against each passage's keys) use one channel; ``"rerank"`` has the memory's
    model rescore the hybrid's best ten (better on paraphrases, seconds per query on a CPU). A passage is a whole message, or a piece of at most
    ``block_size`` tokens of a longer entry, cut at sentence ends. Any LLM, a hosted one too, can so
    read from a history far longer than its context. Metadata of each document: ``start``/``end``
    (token span in the history), ``score`` (fused), ``message_index`` and ``role`` (the stored
    message the passage lies in) and ``channels`` (the channels that ranked it in their top ``k``).

    Example:
        >>> retriever = ContextMemoryRetriever(memory=mem, k=3)  # doctest: +SKIP
        >>> retriever.invoke("database port")  # doctest: +SKIP
        >>> retriever.invoke("database port", k=1, mode="lexical")  # doctest: +SKIP
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    memory: ContextMemory
    k: int = Field(default=4, ge=0)
    """Documents returned (fewer when the history has fewer passages); ``invoke(..., k=n)`` overrides it."""
    mode: SearchMode = "hybrid"
    """How the history is searched (see :meth:`ContextMemory.retrieve`); ``invoke(..., mode=...)`` overrides it."""

    def _get_relevant_documents(
        self,
        query: str,
        *,
        run_manager: CallbackManagerForRetrieverRun,
        k: int | None = None,
        mode: SearchMode | None = None,
    ) -> list[Document]:
        hits = self.memory.retrieve(query, k=self.k if k is None else k, mode=self.mode if mode is None else mode)
        return [
            Document(
                page_content=h.text,
                metadata={key: value for key, value in h.to_dict().items() if key != "text"},
            )
            for h in hits
        ]

    async def _aget_relevant_documents(
        self,
        query: str,
        *,
        run_manager: AsyncCallbackManagerForRetrieverRun,
        k: int | None = None,
        mode: SearchMode | None = None,
    ) -> list[Document]:
        # Retrieval runs the model over the query: a worker thread keeps the event loop free.
        return await asyncio.to_thread(
            self._get_relevant_documents, query, run_manager=run_manager.get_sync(), k=k, mode=mode
        )
