"""ContextMemoryQueryEngine on the tiny random model: source nodes from the hybrid search mapped back to
nodes, recall placement searched by the query string, streaming, async, persistence."""

from __future__ import annotations

import json

import pytest
from llama_index.core.base.response.schema import AsyncStreamingResponse, Response, StreamingResponse
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.schema import Document, MetadataMode, TextNode

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


def test_source_nodes_are_the_hybrid_hits_mapped_back_to_node_ids_and_character_spans(engine, tiny_memory):
    docs = {d.doc_id: d for d in _docs()}
    response = engine.query(QUESTION)
    assert isinstance(response, Response) and response.source_nodes
    # The query string itself is searched, not the prompt it is answered with.
    hits = tiny_memory.retrieve(QUESTION, k=SETTINGS["similarity_top_k"])
    assert len(response.source_nodes) == len(hits)
    for s, hit in zip(response.source_nodes, hits):
        original = docs[s.node.node_id]
        assert s.node.node_id == engine.nodes[hit.message_index].node_id  # one memory entry per node
        assert original.text[s.node.start_char_idx : s.node.end_char_idx] == s.node.text == hit.text
        assert s.score == hit.score and s.node.ref_doc_id == original.doc_id
        assert s.node.metadata == {**original.metadata, "memory_channels": list(hit.channels)}
        assert "memory_channels" not in s.node.get_content(metadata_mode=MetadataMode.LLM)
        assert "memory_channels" not in s.node.get_content(metadata_mode=MetadataMode.EMBED)
    assert [s.score for s in response.source_nodes] == sorted((s.score for s in response.source_nodes), reverse=True)
    # The fact's document is found by its words; the rest by the attention channel.
    assert response.source_nodes[0].node.node_id == "doc-5"
    assert "lexical" in response.source_nodes[0].node.metadata["memory_channels"]
    assert all(s.node.metadata["memory_channels"] for s in response.source_nodes)


def test_with_every_passage_retrieved_the_citations_cover_every_document_exactly(tiny_memory):
    docs = _docs()
    engine = ContextMemoryQueryEngine.from_documents(docs, tiny_memory, **{**SETTINGS, "similarity_top_k": 1000})
    sources = engine.retrieve(QUESTION)
    covered = {d.doc_id: [0] * len(d.text) for d in docs}
    for s in sources:
        for c in range(s.node.start_char_idx, s.node.end_char_idx):
            covered[s.node.node_id][c] += 1
    # Every character is cited once (whitespace between passages is not worth citing).
    assert all(n == 1 or (n == 0 and d.text[c].isspace()) for d in docs for c, n in enumerate(covered[d.doc_id]))
    # Documents longer than a block (16 tokens) are cut into several passages at sentence ends.
    per_doc = {}
    for s in sources:
        per_doc[s.node.node_id] = per_doc.get(s.node.node_id, 0) + 1
        assert s.node.text.endswith(".")
    assert max(per_doc.values()) > 1 and len(sources) == len(tiny_memory.retrieve(QUESTION, k=1000))


MEMO = "Memo: Henrietta Vosk and Bartholomew Quince signed the Zephyrine accord at Kelderwick."
NAMED_QUESTION = "What did Henrietta Vosk and Bartholomew Quince sign?"


def _memo_docs(n_filler: int, at: int, repeat: int = 1) -> list[Document]:
    filler = [
        Document(text=f"Chapter {i}. " + "The grass is green. The sky is blue. Here we go. " * repeat, id_=f"doc-{i}")
        for i in range(n_filler)
    ]
    return [*filler[:at], Document(text=MEMO, id_="memo", metadata={"kind": "memo"}), *filler[at:]]


@pytest.mark.parametrize("mode", ["hybrid", "lexical"])
def test_a_memo_with_rare_names_is_the_first_source_node_when_asked_by_them(tiny_memory, mode):
    engine = ContextMemoryQueryEngine.from_documents(_memo_docs(20, 7), tiny_memory, mode=mode, **SETTINGS)
    sources = engine.retrieve(NAMED_QUESTION)
    first = sources[0]  # a passage of the memo (the tiny tokenizer cuts it into several)
    assert first.node.node_id == "memo" and first.node.text in MEMO and "Vosk" in first.node.text
    assert MEMO[first.node.start_char_idx : first.node.end_char_idx] == first.node.text
    assert first.node.metadata == {"kind": "memo", "memory_channels": first.node.metadata["memory_channels"]}
    assert "lexical" in first.node.metadata["memory_channels"]
    assert [s.node.node_id for s in engine.query(NAMED_QUESTION).source_nodes] == [s.node.node_id for s in sources]
    if mode == "lexical":  # only passages holding a word of the question: pieces of the memo
        assert {s.node.node_id for s in sources} == {"memo"}


@pytest.fixture
def spied(monkeypatch):
    """Record what the memory is searched for and what it is asked to answer."""
    seen = {"searched": [], "streamed": []}
    retrieve, place, stream = ContextMemory.retrieve, ContextMemory.place, ContextMemory.stream

    def spy_retrieve(self, query, *args, **kwargs):
        seen["searched"].append(query)
        return retrieve(self, query, *args, **kwargs)

    def spy_place(self, query, *args, **kwargs):
        seen["searched"].append(query)
        return place(self, query, *args, **kwargs)

    def spy_stream(self, prompt, *args, **kwargs):
        pieces = stream(self, prompt, *args, **kwargs)
        seen["streamed"].append((prompt, kwargs, pieces))
        return pieces

    monkeypatch.setattr(ContextMemory, "retrieve", spy_retrieve)
    monkeypatch.setattr(ContextMemory, "place", spy_place)
    monkeypatch.setattr(ContextMemory, "stream", spy_stream)
    return seen


def test_placed_passages_are_searched_by_the_query_string_not_the_formatted_prompt(tiny_memory, spied):
    # The memo far back (beyond the last ~1k tokens, which the core never places) in a long corpus.
    engine = ContextMemoryQueryEngine.from_documents(_memo_docs(16, 2, repeat=5), tiny_memory, **SETTINGS)
    assert len(tiny_memory) - tiny_memory.entries[2].end > 1024
    before = tiny_memory.token_ids
    formatted = engine.format_prompt(NAMED_QUESTION)
    for chat in (False, True):
        engine.chat = chat
        spied["searched"].clear()
        spied["streamed"].clear()
        response = engine.query(NAMED_QUESTION)
        assert spied["searched"] and set(spied["searched"]) == {NAMED_QUESTION}  # never the formatted prompt
        [(prompt, kwargs, pieces)] = spied["streamed"]
        assert prompt == formatted and kwargs["chat"] is chat and kwargs["recall_query"] == NAMED_QUESTION
        # Pieces of the memo, the best one ("Henrietta Vosk and") first.
        placed = pieces.placed
        assert placed and placed[0].text.rstrip().endswith("Henrietta Vosk and")
        assert any("Quince signed the" in h.text for h in placed)
        assert response.source_nodes[0].node.node_id == "memo"
        assert tiny_memory.token_ids == before  # placed passages are never stored

    spied["streamed"].clear()
    engine.chat, engine.recall = False, 0
    engine.query(NAMED_QUESTION)
    assert spied["streamed"][0][2].placed == []


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
