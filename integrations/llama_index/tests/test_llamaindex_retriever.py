"""ContextMemoryRetriever on the tiny random model: nodes from ContextMemory.retrieve with stable ids
and offsets, inside RetrieverQueryEngine, QueryFusionRetriever and a RetrieverTool (called by a
FunctionAgent on ContextMemoryLLM); memory_tokenizer as Settings.tokenizer."""

from __future__ import annotations

import llama_index.core
import pytest
from llama_index.core import Settings
from llama_index.core.agent.workflow import FunctionAgent, ToolCallResult
from llama_index.core.llms import MockLLM
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.retrievers import QueryFusionRetriever
from llama_index.core.schema import NodeRelationship
from llama_index.core.tools import RetrieverTool

from llama_index_memory_plugin import ContextMemoryLLM, ContextMemoryRetriever, memory_tokenizer

FACT = "My locker code is 4721."
DOC = "The grass is green. " * 30 + "The depot key hangs by the door. " + "The sky is blue. " * 30
MESSAGES = [
    {"role": "user", "content": FACT},
    {"role": "assistant", "content": "Noted, your locker code is stored."},
    *[{"role": ("user", "assistant")[i % 2], "content": f"Small talk {i}: the sun is yellow."} for i in range(4)],
]


@pytest.fixture
def memory(tiny_memory):
    tiny_memory.add_messages(MESSAGES)
    tiny_memory.add_text(DOC)
    return tiny_memory


def test_nodes_are_the_memory_s_hits_with_stable_ids_and_offsets(memory):
    retriever = ContextMemoryRetriever(memory, similarity_top_k=5)
    query = "Where does the depot key hang? And my locker code?"
    nodes = retriever.retrieve(query)
    hits = memory.retrieve(query, k=5)
    assert [(n.node.text, n.score) for n in nodes] == [(h.text, h.score) for h in hits] and len(nodes) == 5
    entries = memory.entries
    for n, h in zip(nodes, hits):
        node, i = n.node, h.message_index
        assert node.metadata == {"role": h.role, "message_index": i, "token_start": h.start, "token_end": h.end}
        assert entries[i].content[node.start_char_idx : node.end_char_idx] == node.text
        assert node.relationships[NodeRelationship.SOURCE].node_id == f"memory-entry-{i}"
        assert node.node_id == f"memory-entry-{i}:{node.start_char_idx}-{node.end_char_idx}"
        assert "message_index" not in node.get_content(metadata_mode="llm")
    # The document is long: its passage is a piece of it, cited where it lies.
    [key] = [n.node for n in nodes if "depot key" in n.node.text]
    assert key.metadata["role"] is None and 0 < key.start_char_idx < key.end_char_idx < len(DOC)
    assert DOC.index("The depot key") >= key.start_char_idx
    # The same passage is the same node (id and hash) for another query.
    again = {n.node.node_id: n.node.hash for n in retriever.retrieve("depot key")}
    assert again[key.node_id] == key.hash


@pytest.mark.asyncio
async def test_async_retrieve_and_bad_settings(memory):
    retriever = ContextMemoryRetriever(memory, similarity_top_k=2, mode="lexical", id_prefix="alice-")
    sync = [(n.node.node_id, n.score) for n in retriever.retrieve("locker code")]
    assert sync and all(i.startswith("alice-") for i, _ in sync)
    assert [(n.node.node_id, n.score) for n in await retriever.aretrieve("locker code")] == sync
    assert retriever.retrieve(" ") == [] and ContextMemoryRetriever(memory, similarity_top_k=0).retrieve("x") == []
    with pytest.raises(TypeError, match="memory must be a ContextMemory"):
        ContextMemoryRetriever(MESSAGES)
    with pytest.raises(ValueError, match="similarity_top_k must be"):
        ContextMemoryRetriever(memory, similarity_top_k=-1)
    with pytest.raises(ValueError, match="mode must be one of"):
        ContextMemoryRetriever(memory, mode="vector")
    reranked = ContextMemoryRetriever(memory, similarity_top_k=2, mode="rerank").retrieve("locker code")
    assert [(n.node.get_content(), n.score) for n in reranked] == [
        (h.text, h.score) for h in memory.retrieve("locker code", k=2, mode="rerank")]


def test_a_retriever_query_engine_answers_from_the_retrieved_passages(memory):
    retriever = ContextMemoryRetriever(memory, similarity_top_k=2)
    engine = RetrieverQueryEngine.from_args(retriever, llm=MockLLM())  # MockLLM answers with its prompt
    response = engine.query("What is my locker code?")
    expected = retriever.retrieve("What is my locker code?")
    assert [n.node.node_id for n in response.source_nodes] == [n.node.node_id for n in expected]
    assert all(n.node.text in response.response for n in expected)  # the passages reached the LLM


def test_a_fusion_retriever_merges_the_same_passage_found_by_two_channels(memory):
    lexical = ContextMemoryRetriever(memory, similarity_top_k=3, mode="lexical")
    attention = ContextMemoryRetriever(memory, similarity_top_k=3, mode="attention")
    fusion = QueryFusionRetriever(
        [lexical, attention], llm=MockLLM(), num_queries=1, mode="reciprocal_rerank", similarity_top_k=6
    )
    query = "What is my locker code?"
    fused = [n.node.node_id for n in fusion.retrieve(query)]
    found = [n.node.node_id for r in (lexical, attention) for n in r.retrieve(query)]
    assert sorted(fused) == sorted(set(found)) and len(found) > len(set(found))  # one node per passage


@pytest.mark.asyncio
async def test_a_function_agent_calls_a_retriever_tool_over_the_memory(memory, tiny_model, tiny_tokenizer):
    retriever = ContextMemoryRetriever(memory, similarity_top_k=2)
    tool = RetrieverTool.from_defaults(retriever, name="search_memory", description="Search the conversation.")
    llm = ContextMemoryLLM(model=tiny_model, tokenizer=tiny_tokenizer, config=memory.config, max_new_tokens=8)
    agent = FunctionAgent(tools=[tool], llm=llm, initial_tool_choice="search_memory")  # a random model: forced
    handler = agent.run(user_msg="What is my locker code?")
    [result] = [ev async for ev in handler.stream_events() if isinstance(ev, ToolCallResult)]
    await handler
    query = f"\ninput is {result.tool_kwargs['input']}\n"  # how RetrieverTool words its query
    expected = retriever.retrieve(query)
    assert [n.node.node_id for n in result.tool_output.raw_output] == [n.node.node_id for n in expected]
    assert expected and all(n.node.text in result.tool_output.content for n in expected)


def test_memory_tokenizer_makes_settings_count_tokens_as_the_memory_s_model(memory, tiny_model, tiny_tokenizer):
    previous = llama_index.core.global_tokenizer
    llm = ContextMemoryLLM(model=tiny_model, tokenizer=tiny_tokenizer)
    try:
        for source in (memory, llm, tiny_tokenizer):
            Settings.tokenizer = memory_tokenizer(source)
            assert Settings.tokenizer(FACT) == tiny_tokenizer(FACT, add_special_tokens=False)["input_ids"]
        Settings.tokenizer = memory.tokenizer  # the one-liner works too (LlamaIndex wraps a tokenizer)
        assert Settings.tokenizer(FACT) == tiny_tokenizer(FACT, add_special_tokens=False)["input_ids"]
    finally:
        llama_index.core.global_tokenizer = previous
    with pytest.raises(TypeError, match="source must be"):
        memory_tokenizer(42)
