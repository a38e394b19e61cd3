"""ContextMemoryQueryEngine on the tiny random model: source-node mapping, streaming, async, persistence."""

from __future__ import annotations

import json

import pytest
from llama_index.core.base.response.schema import AsyncStreamingResponse, Response, StreamingResponse
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.schema import Document, TextNode

from llama_index_memory_plugin import ContextMemoryQueryEngine
from memory_plugin import ContextMemory
from memory_plugin.testing import TINY_CONFIG

QUESTION = "What is the pass key?"
SETTINGS = dict(max_new_tokens=8, stop=None, similarity_top_k=4, show_progress=False)


def _docs() -> list[Document]:
    docs = [
        Document(
            text=f"Chapter {i}. The grass is green. The sky is blue. " * (1 + i % 3), id_=f"doc-{i}", metadata={"i": i}
        )
        for i in range(12)
    ]
    fact = "The pass key is 12345. Remember it. 12345 is the pass key."
    docs[5] = Document(text=fact, id_="doc-5", metadata={"i": 5})
    return docs


@pytest.fixture
def engine(tiny_memory):
    return ContextMemoryQueryEngine.from_documents(_docs(), tiny_memory, **SETTINGS)


def _spans(response):
    return [(s.node.node_id, s.node.start_char_idx, s.node.end_char_idx, s.score) for s in response.source_nodes]


def _key(response):
    return response.response, _spans(response)


def test_each_node_is_one_entry_and_the_memory_holds_the_whole_corpus(engine, tiny_memory):
    docs = _docs()
    entries = tiny_memory.entries
    assert [e.content for e in entries] == [d.text + "\n\n" for d in docs]
    assert entries[-1].end == len(tiny_memory) and tiny_memory.stats().blocks > 10  # far past the tiny window
    assert [n.node_id for n in engine.nodes] == [d.doc_id for d in docs]


def test_source_nodes_are_the_retrieved_blocks_mapped_back_to_node_ids_and_character_spans(engine, tiny_memory):
    docs = {d.doc_id: d for d in _docs()}
    response = engine.query(QUESTION)
    assert isinstance(response, Response) and response.source_nodes
    hits = tiny_memory.retrieve(engine.format_prompt(QUESTION), k=SETTINGS["similarity_top_k"])
    hit_text = {round(h.score, 6): h.text for h in hits}
    for s in response.source_nodes:
        original = docs[s.node.node_id]
        assert original.text[s.node.start_char_idx : s.node.end_char_idx] == s.node.text
        assert s.node.metadata == original.metadata and s.node.ref_doc_id == original.doc_id
        # The cited text is what the retrieved block holds (a block may span two documents).
        assert s.node.text in hit_text[round(s.score, 6)]
    assert [s.score for s in response.source_nodes] == sorted((s.score for s in response.source_nodes), reverse=True)
    assert {round(s.score, 6) for s in response.source_nodes} <= set(hit_text)


def test_with_every_block_retrieved_the_citations_cover_every_document_exactly(tiny_memory):
    docs = _docs()
    engine = ContextMemoryQueryEngine.from_documents(docs, tiny_memory, **{**SETTINGS, "similarity_top_k": 1000})
    sources = engine.retrieve(QUESTION)
    covered = {d.doc_id: [False] * len(d.text) for d in docs}
    for s in sources:
        for c in range(s.node.start_char_idx, s.node.end_char_idx):
            covered[s.node.node_id][c] = True
    # Every character is cited (whitespace alone is not worth citing).
    assert all(f or d.text[c].isspace() for d in docs for c, f in enumerate(covered[d.doc_id]))
    # Blocks are 16 tokens and cut without regard to documents: some block is cited in two nodes.
    per_block = {}
    for s in sources:
        per_block.setdefault(s.score, set()).add(s.node.node_id)
    assert any(len(ids) > 1 for ids in per_block.values())


def test_the_query_leaves_the_memory_unchanged(engine, tiny_memory):
    before = tiny_memory.token_ids
    first = engine.query(QUESTION)
    assert tiny_memory.token_ids == before
    assert _key(engine.query(QUESTION)) == _key(first)


def test_streaming_pieces_join_to_the_full_answer(engine):
    full = engine.query(QUESTION)
    assert full.response  # the tiny model says something in 8 tokens, else the test proves nothing
    engine.streaming = True
    streamed = engine.query(QUESTION)
    assert isinstance(streamed, StreamingResponse)
    pieces = list(streamed.response_gen)
    assert len(pieces) > 1 and "".join(pieces) == full.response
    assert _spans(streamed) == _spans(full)


def test_a_stream_abandoned_early_restores_the_memory(engine, tiny_memory):
    before = tiny_memory.token_ids
    engine.streaming = True
    gen = engine.query(QUESTION).response_gen
    next(gen)
    gen.close()
    assert tiny_memory.token_ids == before


@pytest.mark.asyncio
async def test_async_query_and_async_streaming_match_the_sync_answer(engine):
    full = engine.query(QUESTION)
    response = await engine.aquery(QUESTION)
    assert _key(response) == _key(full)
    engine.streaming = True
    streamed = await engine.aquery(QUESTION)
    assert isinstance(streamed, AsyncStreamingResponse)
    pieces = [p async for p in streamed.async_response_gen()]
    assert len(pieces) > 1 and "".join(pieces) == full.response


def test_retrieve_returns_the_source_nodes_without_answering(engine):
    assert [(s.node.node_id, s.score) for s in engine.retrieve(QUESTION)] == [
        (s.node.node_id, s.score) for s in engine.query(QUESTION).source_nodes
    ]


def test_from_documents_with_a_splitter_cites_split_nodes_back_to_their_documents(tiny_memory):
    docs = [Document(text=" ".join(f"Sentence {j} of document {i}." for j in range(30)), id_=f"d{i}") for i in range(3)]
    engine = ContextMemoryQueryEngine.from_documents(
        docs, tiny_memory, transformations=[SentenceSplitter(chunk_size=64, chunk_overlap=0)], **SETTINGS
    )
    assert len(engine.nodes) > len(docs)
    by_id = {n.node_id: n for n in engine.nodes}
    sources = engine.query("Sentence 7 of document 1").source_nodes
    assert sources
    for s in sources:
        original = by_id[s.node.node_id]
        assert original.get_content()[s.node.start_char_idx : s.node.end_char_idx] == s.node.text
        assert s.node.ref_doc_id in {"d0", "d1", "d2"} and s.node.ref_doc_id == original.ref_doc_id


def test_from_index_ingests_the_index_nodes(tiny_memory):
    from llama_index.core import SummaryIndex

    nodes = [TextNode(text=f"Note {i}: the sky is blue.", id_=f"n{i}") for i in range(5)]
    engine = ContextMemoryQueryEngine.from_index(SummaryIndex(nodes), tiny_memory, **SETTINGS)
    assert [n.node_id for n in engine.nodes] == [f"n{i}" for i in range(5)]
    assert [e.content for e in tiny_memory.entries] == [n.text + "\n\n" for n in nodes]


def test_empty_nodes_are_skipped_and_a_memory_holding_something_else_is_refused(tiny_memory, new_tiny_memory):
    engine = ContextMemoryQueryEngine.from_nodes([TextNode(text="  "), TextNode(text="Kept.", id_="k")], tiny_memory)
    assert [n.node_id for n in engine.nodes] == ["k"]
    other = new_tiny_memory()
    other.add_text("something else")
    with pytest.raises(ValueError, match="does not hold exactly these nodes"):
        ContextMemoryQueryEngine(other, [TextNode(text="Kept.", id_="k")])
    with pytest.raises(ValueError, match="query_str"):
        ContextMemoryQueryEngine(new_tiny_memory(), [], prompt_template="no placeholder")


def test_without_core_save_load_the_nodes_are_reingested_with_the_same_answers(engine, new_tiny_memory, tmp_path, monkeypatch):
    # A core without save/load: the fallback re-ingests the nodes and checks the tokens.
    monkeypatch.delattr(ContextMemory, "save", raising=False)
    monkeypatch.delattr(ContextMemory, "load", raising=False)
    first = engine.query(QUESTION)
    engine.persist(tmp_path)
    saved = json.loads((tmp_path / "engine.json").read_text())
    assert saved["memory_saved"] is False and saved["n_tokens"] == len(engine.memory)
    loaded = ContextMemoryQueryEngine.from_persist_dir(tmp_path, new_tiny_memory(), show_progress=False)
    assert loaded.memory.token_ids == engine.memory.token_ids
    assert [n.node_id for n in loaded.nodes] == [n.node_id for n in engine.nodes]
    assert loaded.nodes[5].metadata == {"i": 5}
    again = loaded.query(QUESTION)
    assert _key(again) == _key(first)
    assert [s.node.text for s in again.source_nodes] == [s.node.text for s in first.source_nodes]


def test_loading_onto_a_memory_with_another_geometry_is_refused(engine, tiny_model, tiny_tokenizer, tmp_path):
    engine.persist(tmp_path)
    other = ContextMemory(tiny_model, tiny_tokenizer, TINY_CONFIG.replace(n_local=128))
    with pytest.raises(ValueError, match="was built with"):
        ContextMemoryQueryEngine.from_persist_dir(tmp_path, other)


def test_persist_saves_the_memory_and_load_reads_it_back_without_ingesting(
    engine, tiny_model, tiny_tokenizer, tmp_path, monkeypatch
):
    first = engine.query(QUESTION)
    engine.persist(tmp_path)
    assert json.loads((tmp_path / "engine.json").read_text())["memory_saved"] is True
    assert (tmp_path / "memory").is_dir()

    def no_ingest(self, text):
        raise AssertionError("the saved memory was encoded again")

    monkeypatch.setattr(ContextMemory, "add_text", no_ingest)
    loaded = ContextMemoryQueryEngine.from_persist_dir(tmp_path, model=tiny_model, tokenizer=tiny_tokenizer)
    assert loaded.memory is not engine.memory and loaded.memory.token_ids == engine.memory.token_ids
    again = loaded.query(QUESTION)
    assert _key(again) == _key(first)
    assert [s.node.text for s in again.source_nodes] == [s.node.text for s in first.source_nodes]
