"""The query engine on the embedded SmolLM2-135M over a corpus longer than its 8192-token context,
with the fact in one document far outside the local window: the answer and the cited node."""

from __future__ import annotations

import pytest
from llama_index.core.schema import Document

from llama_index_memory_plugin import ContextMemoryQueryEngine
from memory_plugin import ContextMemory, MemoryConfig
from memory_plugin.tasks import FILLER, filler_repeats, needle

pytestmark = pytest.mark.real_model

KEY = "48213"
N_DOCS, FACT_DOC = 20, 13  # the fact ~2.9k tokens before the question: beyond the local window
QUESTION = "What is the pass key? The pass key is"  # completion-style: what a 135M model answers
# Half the default window and selection (the passkey benchmark's topk=8): the ~9k-token ingest is
# bound by attention over the span, and the test is about the query engine, not the geometry.
CONFIG = MemoryConfig(n_local=1024, topk=8)


def _corpus(tokenizer) -> list[Document]:
    per = filler_repeats(tokenizer, 8600) // N_DOCS
    docs = []
    for i in range(N_DOCS):
        text = FILLER * per
        if i == FACT_DOC:
            text = FILLER * (per // 2) + needle(KEY) + FILLER * (per - per // 2)
        docs.append(Document(text=text, id_=f"doc-{i}"))
    return docs


@pytest.fixture(scope="module")
def engine(real_model):
    model, tokenizer = real_model
    memory = ContextMemory(model, tokenizer, CONFIG)
    return ContextMemoryQueryEngine.from_documents(
        _corpus(tokenizer), memory, prompt_template="\n{query_str}", max_new_tokens=8, stop=["\n"], show_progress=False
    )


@pytest.fixture(scope="module")
def answer(engine):
    return engine.query(QUESTION)


def test_the_corpus_is_longer_than_the_trained_context_and_the_fact_lies_outside_the_window(engine):
    mem = engine.memory
    assert len(mem) > mem.model.config.max_position_embeddings
    fact = mem.entries[FACT_DOC]
    assert len(mem) - fact.end > mem.config.n_local  # only the memory blocks can bring it back


def test_the_answer_holds_the_fact_and_cites_its_document(engine, answer):
    assert KEY in answer.response
    cited = [s for s in answer.source_nodes if s.node.node_id == f"doc-{FACT_DOC}"]
    assert cited, [s.node.node_id for s in answer.source_nodes]
    fact_doc = engine.nodes[FACT_DOC]
    for s in cited:
        assert fact_doc.get_content()[s.node.start_char_idx : s.node.end_char_idx] == s.node.text
    assert any(KEY in s.node.text for s in cited)  # the cited block is the one holding the key


def test_streaming_pieces_join_to_the_full_answer(engine, answer):
    engine.streaming = True
    try:
        streamed = engine.query(QUESTION)
        pieces = list(streamed.response_gen)
    finally:
        engine.streaming = False
    assert len(pieces) > 1 and "".join(pieces) == answer.response
    assert [s.node.node_id for s in streamed.source_nodes] == [s.node.node_id for s in answer.source_nodes]


@pytest.mark.asyncio
async def test_async_query_gives_the_same_answer(engine, answer):
    response = await engine.aquery(QUESTION)
    assert response.response == answer.response
    assert [(s.node.node_id, s.score) for s in response.source_nodes] == [
        (s.node.node_id, s.score) for s in answer.source_nodes
    ]
