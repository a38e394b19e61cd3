"""``ContextMemoryRetriever``: a memory's history as a LlamaIndex ``BaseRetriever``, so retriever
query engines, fusion retrievers and retriever tools can search it.

The search is :meth:`memory_plugin.ContextMemory.retrieve` (BM25 over the passages' words fused
with the model's own attention ranking); each passage it finds becomes a ``NodeWithScore``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.callbacks import CallbackManager
from llama_index.core.schema import NodeRelationship, NodeWithScore, QueryBundle, RelatedNodeInfo, TextNode

from memory_plugin import ContextMemory, Entry, MemoryHit
from memory_plugin.recall import SEARCH_MODES

SOURCE_ID_PREFIX = "memory-entry-"
"""A passage's source (its entry) is ``SOURCE_ID_PREFIX + str(entry index)`` unless ``id_prefix`` says otherwise."""
_HIDDEN = ("message_index", "token_start", "token_end")  # metadata the LLM and embeddings do not see


class ContextMemoryRetriever(BaseRetriever):
    """Retrieves the passages of a :class:`~memory_plugin.ContextMemory`'s history that its hybrid
    search finds for a query, best first.

    A passage is a whole message (or ``add_text`` document), or a piece of at most ``block_size``
    tokens of a longer one, cut at sentence ends. Each becomes a ``NodeWithScore`` (score: the fused
    score of :meth:`ContextMemory.retrieve`) whose ``TextNode`` has

    * ``id_``: ``<source id>:<start char>-<end char>``, and a ``SOURCE`` relationship to
      ``<source id>`` = ``id_prefix`` + the entry's index (``memory.entries[i]``). The same passage
      gets the same node (id, text and metadata, hence the same ``hash``) whatever the query, so
      fusion retrievers merge it. Ids follow positions: :meth:`ContextMemory.forget` shifts the
      entries after the ones it removes.
    * ``text``: the passage; ``start_char_idx``/``end_char_idx``: where it lies in the entry's
      content (``memory.entries[i].content[start:end] == node.text``).
    * ``metadata``: ``role`` (None for ``add_text`` documents; the one key the LLM sees),
      ``message_index``, ``token_start``/``token_end`` (the passage's token span in the history).

    Which search channel found a passage depends on the query, so it is not in the node (it would
    make one passage two nodes); ``memory.retrieve(query)`` reports it.

    Args:
        memory: the memory searched (not changed).
        similarity_top_k: passages per query.
        mode: "hybrid" (default), "lexical", "semantic", "attention" or "rerank" (see :meth:`ContextMemory.retrieve`).
        id_prefix: the start of every source id (default :data:`SOURCE_ID_PREFIX`): give each
            memory its own when retrieving from several.

    Example:
        >>> retriever = ContextMemoryRetriever(memory, similarity_top_k=3)  # doctest: +SKIP
        >>> [(n.node.node_id, n.score, n.node.text) for n in retriever.retrieve("locker code")]  # doctest: +SKIP
        >>> RetrieverQueryEngine.from_args(retriever, llm=llm).query("What is my locker code?")  # doctest: +SKIP
    """

    def __init__(
        self,
        memory: ContextMemory,
        *,
        similarity_top_k: int = 4,
        mode: str = "hybrid",
        id_prefix: str = SOURCE_ID_PREFIX,
        callback_manager: CallbackManager | None = None,
        verbose: bool = False,
    ) -> None:
        if not isinstance(memory, ContextMemory):
            raise TypeError(f"memory must be a ContextMemory, got {type(memory).__name__}")
        if isinstance(similarity_top_k, bool) or not isinstance(similarity_top_k, int) or similarity_top_k < 0:
            raise ValueError(f"similarity_top_k must be a non-negative int, got {similarity_top_k!r}")
        if mode not in SEARCH_MODES:
            raise ValueError(f"mode must be one of {', '.join(SEARCH_MODES)}, got {mode!r}")
        if not isinstance(id_prefix, str):
            raise TypeError(f"id_prefix must be a str, got {type(id_prefix).__name__}")
        super().__init__(callback_manager=callback_manager, verbose=verbose)
        self._memory = memory
        self.similarity_top_k = similarity_top_k
        self.mode = mode
        self.id_prefix = id_prefix

    @property
    def memory(self) -> ContextMemory:
        return self._memory

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        query = query_bundle.query_str
        if not query.strip() or self.similarity_top_k == 0:
            return []
        hits = self._memory.retrieve(query, k=self.similarity_top_k, mode=self.mode)
        entries = self._memory.entries
        return [self._node(hit, entries) for hit in hits if hit.message_index is not None]

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        # The search runs the model: a worker thread keeps the event loop free.
        return await asyncio.to_thread(self._retrieve, query_bundle)

    def _node(self, hit: MemoryHit, entries: list[Entry]) -> NodeWithScore:
        i = hit.message_index
        source = f"{self.id_prefix}{i}"
        c0, c1 = char_span(entries[i], hit)
        node = TextNode(
            id_=f"{source}:{c0}-{c1}",
            text=hit.text,
            start_char_idx=c0,
            end_char_idx=c1,
            metadata={"role": hit.role, "message_index": i, "token_start": hit.start, "token_end": hit.end},
            excluded_llm_metadata_keys=list(_HIDDEN),
            excluded_embed_metadata_keys=list(_HIDDEN),
            relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=source, metadata={"role": hit.role})},
        )
        return NodeWithScore(node=node, score=hit.score)


def char_span(entry: Entry, hit: MemoryHit) -> tuple[int, int]:
    """Where ``hit``'s text lies in ``entry``'s content (a passage is a piece of it, stripped): of
    several occurrences, the one nearest where the passage's tokens put it.

    >>> e = Entry("tool", "ab. ab. ab.", 0, 9)
    >>> char_span(e, MemoryHit("ab.", 6, 9, 1.0, 0, "tool"))
    (8, 11)
    """
    text, content = hit.text, entry.content
    n = max(1, entry.end - entry.start)
    guess = round((hit.start - entry.start) / n * len(content))
    starts, at = [], content.find(text)
    while at != -1:
        starts.append(at)
        at = content.find(text, at + 1)
    if not starts:  # not a piece of the content as stored: the whole entry is cited
        return 0, len(content)
    best = min(starts, key=lambda s: abs(s - guess))
    return best, best + len(text)


def memory_tokenizer(source: Any) -> Callable[[str], list[int]]:
    """A text -> token ids function for ``Settings.tokenizer`` (token counting, prompt sizes) from a
    :class:`~memory_plugin.ContextMemory`, a :class:`ContextMemoryLLM`, or a transformers tokenizer,
    so LlamaIndex counts tokens as the memory's model does.

    Example:
        >>> Settings.tokenizer = memory_tokenizer(memory)  # doctest: +SKIP
    """
    tokenizer = getattr(source, "tokenizer", None)
    if tokenizer is None and getattr(source, "pool", None) is not None:  # a ContextMemoryLLM
        tokenizer = source.pool.tokenizer
    if tokenizer is None and callable(getattr(source, "encode", None)):
        tokenizer = source
    if tokenizer is None:
        raise TypeError(
            f"source must be a ContextMemory, a ContextMemoryLLM or a tokenizer, got {type(source).__name__}"
        )

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return encode
