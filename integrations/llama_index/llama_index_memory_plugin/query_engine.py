"""``ContextMemoryQueryEngine``: a LlamaIndex query engine that answers by attention over a whole corpus.

The corpus is encoded once into a :class:`memory_plugin.ContextMemory`; every query is continued
from it, so the model itself attends over all the tokens (no re-reading). The passages the memory's
hybrid search (:meth:`ContextMemory.retrieve`: BM25 over the passages' words fused with the model's
attention ranking) finds for the query are returned as the response's ``source_nodes``, and the best
of them are also placed verbatim before the question (the core's recall, ``MemoryConfig.recall_k``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from llama_index.core.base.base_query_engine import BaseQueryEngine
from llama_index.core.base.response.schema import (
    RESPONSE_TYPE,
    AsyncStreamingResponse,
    Response,
    StreamingResponse,
)
from llama_index.core.callbacks import CallbackManager, CBEventType, EventPayload
from llama_index.core.prompts.mixin import PromptMixinType
from llama_index.core.schema import (
    BaseNode,
    Document,
    MetadataMode,
    NodeRelationship,
    NodeWithScore,
    QueryBundle,
    TextNode,
)
from llama_index.core.storage.docstore.utils import doc_to_json, json_to_doc
from tqdm.auto import tqdm

from memory_plugin import ContextMemory, MemoryConfig, MemoryHit
from memory_plugin.bridge import iterate_in_thread
from memory_plugin.recall import SEARCH_MODES
from memory_plugin.sampling import SamplingOptions

logger = logging.getLogger(__name__)

DEFAULT_PROMPT_TEMPLATE = "\n\nQuestion: {query_str}\nAnswer:"
"""Completion-style: the query is appended to the corpus as raw text and the model continues it.
A 135M model answers this far more reliably than a chat turn. A query that already holds the start
of its answer ("What is the pass key? The pass key is") works best with ``prompt_template="\\n{query_str}"``."""
DEFAULT_STOP = ("\n\n", "\nQuestion:")
CHANNELS_KEY = "memory_channels"
"""Source-node metadata key: the search channels that ranked the passage in their top k."""
SEPARATOR = "\n\n"
"""Appended to each node's text when it is ingested, so documents do not run into each other."""
PERSIST_FORMAT = 1
_ENGINE_FILE = "engine.json"
_NODES_FILE = "nodes.json"
_MEMORY_DIR = "memory"


class ContextMemoryQueryEngine(BaseQueryEngine):
    """Answers queries with a local model attending over a whole corpus held in a ContextMemory.

    Build it with :meth:`from_documents`, :meth:`from_nodes` or :meth:`from_index`; each node's text is
    encoded once (one memory entry per node, in order). A query is appended to the memory (by
    ``prompt_template``, completion-style by default) and answered; the memory is left unchanged.

    ``response.source_nodes`` are the ``similarity_top_k`` passages that the memory's hybrid search
    (:meth:`ContextMemory.retrieve`: BM25 over the passages' words fused with the model's own
    attention ranking) finds for the query string itself (not the formatted prompt). A passage is a
    whole node, or a piece of at most ``block_size`` tokens of a longer one cut at sentence ends. Each
    becomes a :class:`NodeWithScore` (score: the fused score) whose node has the original node's id,
    metadata and relationships, the passage's text, and ``start_char_idx``/``end_char_idx`` into the
    original node's text (``original.text[start:end] == source.node.text``); its metadata also holds
    ``memory_channels``, the channels (``"lexical"``, ``"semantic"``, ``"attention"``) that ranked it in their top
    ``similarity_top_k`` (left out of what the LLM and embeddings see).

    The answer is generated with the best passages for the query string placed verbatim before the
    prompt (the core's recall: at most ``recall`` of them, default ``MemoryConfig.recall_k``, only
    from outside the last ~1k tokens, which the model reads well anyway).

    Args:
        memory: the memory to hold the corpus. Empty: ``nodes`` are ingested into it. Not empty: it
            must already hold exactly ``nodes`` as ingested by this class (e.g. a loaded memory).
        nodes: the corpus, in order. Nodes with no text are skipped.
        similarity_top_k: passages returned as source nodes.
        mode: how source nodes are searched: "hybrid" (default), "lexical", "semantic", "attention" or "rerank" (see
            :meth:`ContextMemory.retrieve`).
        recall: passages placed before the prompt (None: the memory's ``config.recall_k``; 0: none).
        max_new_tokens, temperature, stop: generation settings (greedy by default).
        prompt_template: how a query is appended; must contain ``{query_str}``.
        chat: False (default) appends the prompt as raw text and continues it; True asks it as a
            user turn in the model's chat template (better for larger instruct models).
        streaming: ``query`` returns a ``StreamingResponse`` (``aquery`` an ``AsyncStreamingResponse``).
        show_progress: a progress bar while ingesting.

    Example:
        >>> engine = ContextMemoryQueryEngine.from_documents(docs)  # doctest: +SKIP
        >>> r = engine.query("Who wrote the report?")  # doctest: +SKIP
        >>> r.response, [(s.node.node_id, s.node.start_char_idx) for s in r.source_nodes]  # doctest: +SKIP
    """

    def __init__(
        self,
        memory: ContextMemory,
        nodes: Sequence[BaseNode],
        *,
        similarity_top_k: int = 4,
        mode: str = "hybrid",
        recall: int | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        stop: Sequence[str] | None = DEFAULT_STOP,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        chat: bool = False,
        streaming: bool = False,
        show_progress: bool = False,
        callback_manager: CallbackManager | None = None,
    ) -> None:
        if not isinstance(memory, ContextMemory):
            raise TypeError(f"memory must be a ContextMemory, got {type(memory).__name__}")
        if "{query_str}" not in prompt_template:
            raise ValueError("prompt_template must contain {query_str}")
        if isinstance(similarity_top_k, bool) or not isinstance(similarity_top_k, int) or similarity_top_k < 0:
            raise ValueError(f"similarity_top_k must be a non-negative int, got {similarity_top_k!r}")
        if mode not in SEARCH_MODES:
            raise ValueError(f"mode must be one of {', '.join(SEARCH_MODES)}, got {mode!r}")
        super().__init__(callback_manager=callback_manager)
        self._memory = memory
        self.similarity_top_k = similarity_top_k
        self.mode = mode
        self.recall = recall
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.stop = list(stop or [])
        self._options()  # bad generation settings fail here, naming the argument
        self.prompt_template = prompt_template
        self.chat = chat
        self.streaming = streaming
        self._offsets: dict[int, list[tuple[int, int]] | None] = {}
        kept = [n for n in nodes if _node_text(n).strip()]
        if len(kept) < len(nodes):
            logger.warning("skipped %d node(s) with no text", len(nodes) - len(kept))
        self._nodes: list[BaseNode] = kept
        if len(memory) == 0:
            self._ingest(show_progress)
        else:
            self._check_ingested()

    # ------------------------------------------------------------------------------- construction
    @classmethod
    def from_nodes(
        cls,
        nodes: Sequence[BaseNode],
        memory: ContextMemory | None = None,
        *,
        show_progress: bool = True,
        **kwargs: Any,
    ) -> ContextMemoryQueryEngine:
        """Ingest ``nodes`` (each as one entry, in order) into ``memory`` (default: a new memory on the
        embedded model) and return the engine. ``kwargs``: the constructor's settings."""
        memory = memory if memory is not None else ContextMemory.from_pretrained()
        return cls(memory, list(nodes), show_progress=show_progress, **kwargs)

    @classmethod
    def from_documents(
        cls,
        documents: Sequence[Document],
        memory: ContextMemory | None = None,
        *,
        transformations: Sequence[Any] | None = None,
        show_progress: bool = True,
        **kwargs: Any,
    ) -> ContextMemoryQueryEngine:
        """Like :meth:`from_nodes`. Documents are ingested whole by default: the memory needs no
        chunking, and whole documents keep source nodes pointing at documents. Pass LlamaIndex
        ``transformations`` (e.g. ``[SentenceSplitter()]``) to ingest their nodes instead."""
        nodes: Sequence[BaseNode] = list(documents)
        if transformations:
            from llama_index.core.ingestion import run_transformations

            nodes = run_transformations(nodes, transformations, show_progress=show_progress)
        return cls.from_nodes(nodes, memory, show_progress=show_progress, **kwargs)

    @classmethod
    def from_index(
        cls, index: Any, memory: ContextMemory | None = None, *, show_progress: bool = True, **kwargs: Any
    ) -> ContextMemoryQueryEngine:
        """The nodes of an existing LlamaIndex index (from its docstore, in insertion order)."""
        nodes = list(index.docstore.docs.values())
        if not nodes:
            raise ValueError(
                "the index's docstore holds no nodes (a vector store that keeps the text itself?); "
                "build the engine from the nodes with from_nodes()"
            )
        return cls.from_nodes(nodes, memory, show_progress=show_progress, **kwargs)

    def _ingest(self, show_progress: bool) -> None:
        mem = self._memory
        bar = tqdm(self._nodes, desc="ingesting into memory", unit="node", disable=not show_progress)
        for node in bar:
            mem.add_text(_ingest_text(node))
            bar.set_postfix(tokens=len(mem), refresh=False)
        bar.close()

    def _check_ingested(self) -> None:
        entries = self._memory.entries
        expected = [_ingest_text(n) for n in self._nodes]
        if [e.content for e in entries] != expected or any(e.role is not None for e in entries):
            raise ValueError(
                "the memory is not empty and does not hold exactly these nodes; pass an empty memory to ingest them"
            )

    # ---------------------------------------------------------------------------------- properties
    @property
    def memory(self) -> ContextMemory:
        return self._memory

    @property
    def nodes(self) -> list[BaseNode]:
        """The ingested nodes, in memory order."""
        return list(self._nodes)

    def _get_prompt_modules(self) -> PromptMixinType:
        return {}

    # ------------------------------------------------------------------------------------- queries
    def format_prompt(self, query_str: str) -> str:
        """The text appended to the memory for ``query_str`` and answered (the search uses
        ``query_str`` itself)."""
        return self.prompt_template.format(query_str=query_str)

    def retrieve(self, query_bundle: QueryBundle | str) -> list[NodeWithScore]:
        """The source nodes a query would get, without answering it."""
        if isinstance(query_bundle, str):
            query_bundle = QueryBundle(query_bundle)
        return self._retrieve(query_bundle.query_str)

    def _retrieve(self, query_str: str) -> list[NodeWithScore]:
        with self.callback_manager.event(CBEventType.RETRIEVE, payload={EventPayload.QUERY_STR: query_str}) as ev:
            out = []
            if self.similarity_top_k and query_str.strip():
                for hit in self._memory.retrieve(query_str, k=self.similarity_top_k, mode=self.mode):
                    source = self._source(hit)
                    if source is not None:
                        out.append(source)
            ev.on_end(payload={EventPayload.NODES: out})
        return out

    def _source(self, hit: MemoryHit) -> NodeWithScore | None:
        """The hit's passage as a part of the node it lies in (one memory entry per node)."""
        i = hit.message_index
        entries = self._memory.entries
        if i is None or not 0 <= i < min(len(entries), len(self._nodes)):
            return None
        entry = entries[i]
        a, b = max(hit.start, entry.start), min(hit.end, entry.end)
        node = self._source_node(i, entry, a, b) if a < b else None
        if node is None:
            return None
        node.metadata[CHANNELS_KEY] = list(hit.channels)
        for excluded in (node.excluded_llm_metadata_keys, node.excluded_embed_metadata_keys):
            if CHANNELS_KEY not in excluded:
                excluded.append(CHANNELS_KEY)
        return NodeWithScore(node=node, score=hit.score)

    def _source_node(self, i: int, entry, a: int, b: int) -> TextNode | None:
        """The part of node ``i`` that history tokens ``[a, b)`` cover, as a node pointing back to it."""
        src = self._nodes[i]
        text = _node_text(src)
        offsets = self._token_offsets(i, entry)
        if offsets is None:  # no offset mapping from this tokenizer: the whole node
            c0, c1 = 0, len(text)
        else:
            shift = (entry.end - entry.start) - len(offsets)  # a BOS token before the first entry
            lo, hi = a - entry.start - shift, b - entry.start - shift
            lo, hi = max(lo, 0), min(hi, len(offsets))
            if lo >= hi:
                return None
            c0, c1 = offsets[lo][0], offsets[hi - 1][1]
            c0, c1 = min(c0, len(text)), min(c1, len(text))  # the separator is not part of the node
        if not text[c0:c1].strip():
            return None
        while text[c0].isspace():  # cite the passage's text, not the whitespace around it
            c0 += 1
        while text[c1 - 1].isspace():
            c1 -= 1
        relationships = dict(src.relationships)
        if NodeRelationship.SOURCE not in relationships and isinstance(src, Document):
            relationships[NodeRelationship.SOURCE] = src.as_related_node_info()
        return TextNode(
            id_=src.node_id,
            text=text[c0:c1],
            start_char_idx=c0,
            end_char_idx=c1,
            metadata=dict(src.metadata),
            excluded_embed_metadata_keys=list(src.excluded_embed_metadata_keys),
            excluded_llm_metadata_keys=list(src.excluded_llm_metadata_keys),
            relationships=relationships,
        )

    def _token_offsets(self, i: int, entry) -> list[tuple[int, int]] | None:
        """Character offsets of the tokens of node ``i`` as ingested (the same call as ingestion uses,
        so the same ids), cached per node."""
        if i not in self._offsets:
            try:
                enc = self._memory.tokenizer(
                    entry.content, add_special_tokens=False, return_offsets_mapping=True
                )
                offsets = [tuple(o) for o in enc["offset_mapping"]]
                n = entry.end - entry.start
                if not 0 <= n - len(offsets) <= 1:  # only a BOS may precede the text's own tokens
                    raise ValueError(f"re-tokenising gave {len(offsets)} tokens, the entry has {n}")
            except (NotImplementedError, ValueError, KeyError, TypeError) as e:
                logger.warning("no character offsets for node %s (%s): citing the whole node", i, e)
                offsets = None
            self._offsets[i] = offsets
        return self._offsets[i]

    def _generate(self, query_str: str) -> Iterator[str]:
        # Recall searches for the user's query, not the formatted prompt ("Question: ... Answer:").
        opts = self._options().as_kwargs()
        pieces = self._memory.stream(self.format_prompt(query_str), chat=self.chat, recall_query=query_str, **opts)
        return _lstrip_pieces(pieces)

    def _options(self) -> SamplingOptions:
        return SamplingOptions(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, stop=self.stop, recall=self.recall
        )

    def _query(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        query_str = query_bundle.query_str
        t0 = time.perf_counter()
        sources = self._retrieve(query_str)
        meta = {"retrieve_seconds": time.perf_counter() - t0, "memory_tokens": len(self._memory)}
        if self.streaming:
            return StreamingResponse(response_gen=self._generate(query_str), source_nodes=sources, metadata=meta)
        prompt = self.format_prompt(query_str)
        with self.callback_manager.event(CBEventType.SYNTHESIZE, payload={EventPayload.QUERY_STR: prompt}) as ev:
            t1 = time.perf_counter()
            text = "".join(self._generate(query_str))
            meta["generate_seconds"] = time.perf_counter() - t1
            response = Response(text, source_nodes=sources, metadata=meta)
            ev.on_end(payload={EventPayload.RESPONSE: response})
        return response

    async def _aquery(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        # The model runs on a worker thread so the event loop stays free.
        if not self.streaming:
            return await asyncio.to_thread(self._query, query_bundle)
        query_str = query_bundle.query_str
        t0 = time.perf_counter()
        sources = await asyncio.to_thread(self._retrieve, query_str)
        meta = {"retrieve_seconds": time.perf_counter() - t0, "memory_tokens": len(self._memory)}
        gen = iterate_in_thread(lambda: self._generate(query_str))
        return AsyncStreamingResponse(response_gen=gen, source_nodes=sources, metadata=meta)

    # --------------------------------------------------------------------------------- persistence
    def persist(self, persist_dir: str | os.PathLike) -> None:
        """Write the engine to ``persist_dir``: nodes, settings and a fingerprint of the memory, plus
        the memory itself when the core can save it (``ContextMemory.save``). Without that, loading
        re-ingests the nodes and checks that the result is token for token the same."""
        d = Path(persist_dir)
        d.mkdir(parents=True, exist_ok=True)
        mem = self._memory
        saved = hasattr(mem, "save")
        if saved:
            mem.save(str(d / _MEMORY_DIR))
        engine = {
            "format": PERSIST_FORMAT,
            "model_name": mem.model_name,
            "config": mem.config.to_dict(),
            "n_tokens": len(mem),
            "tokens_sha256": _fingerprint(mem.token_ids),
            "memory_saved": saved,
            "settings": self._settings(),
        }
        (d / _NODES_FILE).write_text(json.dumps([doc_to_json(n) for n in self._nodes]), encoding="utf-8")
        (d / _ENGINE_FILE).write_text(json.dumps(engine, indent=1), encoding="utf-8")

    @classmethod
    def from_persist_dir(
        cls,
        persist_dir: str | os.PathLike,
        memory: ContextMemory | None = None,
        *,
        model: Any = None,
        tokenizer: Any = None,
        show_progress: bool = True,
        **overrides: Any,
    ) -> ContextMemoryQueryEngine:
        """Load an engine written by :meth:`persist`.

        When the memory was saved, it is read back with ``ContextMemory.load`` (nothing is encoded
        again) on ``model`` (None: the model it was saved with; a loaded transformers model: pass
        ``tokenizer`` too) or on the model of ``memory`` if you pass an empty one. Otherwise the
        nodes are ingested again, into ``memory`` or a new memory on ``model`` (default: the embedded
        model, when that is what the engine used), and the result is checked token for token.
        A ``memory`` that already holds the nodes is used as it is. ``overrides``: settings to change.
        """
        d = Path(persist_dir)
        engine = json.loads((d / _ENGINE_FILE).read_text(encoding="utf-8"))
        if engine.get("format") != PERSIST_FORMAT:
            raise ValueError(f"{d} holds persist format {engine.get('format')!r}; this version reads {PERSIST_FORMAT}")
        nodes = [json_to_doc(n) for n in json.loads((d / _NODES_FILE).read_text(encoding="utf-8"))]
        config = MemoryConfig(**engine["config"])
        if memory is not None and len(memory) == 0 and model is None:
            model, tokenizer = memory.model, memory.tokenizer
        if memory is not None:
            _check_geometry(config, memory.config)
        if (memory is None or len(memory) == 0) and engine["memory_saved"] and hasattr(ContextMemory, "load"):
            memory = ContextMemory.load(str(d / _MEMORY_DIR), model, tokenizer=tokenizer)
        elif memory is None and model is not None:
            memory = ContextMemory(model, tokenizer, config)
        elif memory is None:
            from memory_plugin.model import DEFAULT_MODEL_NAME

            if engine["model_name"] != DEFAULT_MODEL_NAME:
                raise ValueError(
                    f"the engine used {engine['model_name']!r}: pass model= (and tokenizer=) or memory="
                )
            memory = ContextMemory.from_pretrained(config=config)
        _check_geometry(config, memory.config)
        if memory.model_name != engine["model_name"]:
            logger.warning("the engine was built on %s, loading onto %s", engine["model_name"], memory.model_name)
        settings = {**engine["settings"], **overrides}
        out = cls(memory, nodes, show_progress=show_progress, **settings)
        if len(memory) != engine["n_tokens"] or _fingerprint(memory.token_ids) != engine["tokens_sha256"]:
            raise ValueError(
                "the memory does not hold the tokens the engine was persisted with (another tokenizer?)"
            )
        return out

    def _settings(self) -> dict:
        return {
            "similarity_top_k": self.similarity_top_k,
            "mode": self.mode,
            "recall": self.recall,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "stop": self.stop,
            "prompt_template": self.prompt_template,
            "chat": self.chat,
            "streaming": self.streaming,
        }

    def __repr__(self) -> str:
        mem = self._memory
        return f"ContextMemoryQueryEngine(nodes={len(self._nodes)}, tokens={len(mem)}, model={mem.model_name!r})"


# Settings that change where blocks are kept, not what the model computes.
_PLACEMENT_ONLY = ("max_cached_blocks", "max_resident_bytes")


def _check_geometry(saved: MemoryConfig, given: MemoryConfig) -> None:
    a, b = saved.to_dict(), given.to_dict()
    for k in _PLACEMENT_ONLY:
        a.pop(k, None)
        b.pop(k, None)
    if a != b:
        raise ValueError(f"the engine was built with {saved}, the memory has {given}")


def _node_text(node: BaseNode) -> str:
    return node.get_content(metadata_mode=MetadataMode.NONE)


def _ingest_text(node: BaseNode) -> str:
    return _node_text(node) + SEPARATOR


def _fingerprint(ids: Sequence[int]) -> str:
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()


def _lstrip_pieces(pieces: Iterator[str]) -> Iterator[str]:
    """The stream without its leading whitespace (a completion usually starts with a space)."""
    started = False
    try:
        for piece in pieces:
            if not started:
                piece = piece.lstrip()
                started = bool(piece)
            if piece:
                yield piece
    finally:
        pieces.close()  # now, on this thread: it ends the memory's turn and releases its lock
