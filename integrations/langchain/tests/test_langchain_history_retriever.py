"""ContextMemoryChatMessageHistory (with RunnableWithMessageHistory) and ContextMemoryRetriever, on
the tiny model."""

from __future__ import annotations

import pytest
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.runnables.history import RunnableWithMessageHistory

from langchain_memory_plugin import (
    ContextMemoryChatMessageHistory,
    ContextMemoryChatModel,
    ContextMemoryHistoryStore,
    ContextMemoryRetriever,
)
from memory_plugin import ContextMemory

# Both are deprecated upstream; the history is a compatibility path for them.
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*BaseChatMessageHistory.*:DeprecationWarning",
    "ignore:.*RunnableWithMessageHistory.*:DeprecationWarning",
    "ignore::langchain_core._api.deprecation.LangChainDeprecationWarning",
)


def test_history_round_trips_messages_through_the_memory(tiny_memory):
    history = ContextMemoryChatMessageHistory(tiny_memory)
    history.add_messages(
        [
            SystemMessage("Be brief."),
            HumanMessage("Weather in Oslo?"),
            AIMessage("", tool_calls=[{"name": "weather", "args": {"city": "Oslo"}, "id": "orig"}]),
            ToolMessage("snow", tool_call_id="orig"),
            AIMessage("It snows."),
        ]
    )
    back = history.messages
    assert [type(m).__name__ for m in back] == [
        "SystemMessage", "HumanMessage", "AIMessage", "ToolMessage", "AIMessage",
    ]
    call = back[2].tool_calls[0]
    assert (call["name"], call["args"]) == ("weather", {"city": "Oslo"})
    assert back[3].tool_call_id == call["id"] and back[3].content == "snow"  # paired by position
    assert len(tiny_memory) > 0 and [m["role"] for m in tiny_memory.messages][-1] == "assistant"
    tiny_memory.add_text("a raw document, not a message")
    assert len(history.messages) == 5
    history.clear()
    assert history.messages == [] and len(tiny_memory) == 0


def test_history_with_runnable_with_message_history_per_session(tiny_model, tiny_tokenizer):
    store = ContextMemoryHistoryStore(tiny_model, tiny_tokenizer, max_sessions=2)
    llm = ContextMemoryChatModel(memory=ContextMemory(tiny_model, tiny_tokenizer), max_tokens=4)
    chain = RunnableWithMessageHistory(llm, store)
    first = chain.invoke("My name is Ann.", config={"configurable": {"session_id": "ann"}})
    chain.invoke("My name is Bob.", config={"configurable": {"session_id": "bob"}})
    second = chain.invoke("What is my name?", config={"configurable": {"session_id": "ann"}})
    ann = store("ann").messages
    assert [m.content for m in ann if isinstance(m, HumanMessage)] == ["My name is Ann.", "What is my name?"]
    assert ann[1].content == first.content.strip() or not first.content.strip()
    # The model saw Ann's history on the second turn: its memory reused the first exchange.
    assert second.usage_metadata["input_token_details"]["cache_read"] > 0
    assert all("Bob" not in m.content for m in ann)
    store("carol")
    assert "bob" not in store and "ann" in store and len(store) == 2  # the least recently used is dropped


def test_store_arguments_are_checked(tiny_model):
    with pytest.raises(ValueError, match="tokenizer"):
        ContextMemoryHistoryStore(tiny_model)


@pytest.fixture
def filled(tiny_memory):
    tiny_memory.add_message("system", "You keep notes.")
    for i in range(12):
        tiny_memory.add_message("user", f"Note {i}: the grass is green and the sky is blue. " * 2)
    tiny_memory.add_message("tool", "The pass key is 12345. Remember it.")
    return tiny_memory


def test_retriever_returns_spans_as_documents_with_their_source(filled):
    docs = ContextMemoryRetriever(memory=filled, k=3).invoke("What is the pass key?")
    assert len(docs) == 3 and all(isinstance(d, Document) for d in docs)
    hits = filled.retrieve("What is the pass key?", k=3)
    for doc, hit in zip(docs, hits):
        assert doc.page_content == hit.text
        assert doc.metadata == {
            "start": hit.start,
            "end": hit.end,
            "score": hit.score,
            "message_index": hit.message_index,
            "role": hit.role,
            "channels": list(hit.channels),
        }
        entry = filled.entries[hit.message_index]
        assert entry.start <= hit.start < hit.end <= entry.end and entry.role == hit.role  # within one message
        assert set(doc.metadata["channels"]) <= {"lexical", "semantic", "attention"} and doc.metadata["channels"]
    assert [d.metadata["score"] for d in docs] == sorted((d.metadata["score"] for d in docs), reverse=True)
    # The tool result is found by its words ("pass", "key"): first, and by the lexical channel.
    assert docs[0].metadata["role"] == "tool" and "lexical" in docs[0].metadata["channels"]
    assert docs[0].page_content == "The pass key is 12345. Remember it."


def test_retriever_mode_field_and_per_call(filled):
    query = "What is the pass key?"
    lexical = ContextMemoryRetriever(memory=filled, k=3, mode="lexical").invoke(query)
    assert [d.page_content for d in lexical] == ["The pass key is 12345. Remember it."]  # only it holds the words
    assert lexical[0].metadata["channels"] == ["lexical"]
    retriever = ContextMemoryRetriever(memory=filled, k=3)
    assert retriever.mode == "hybrid"
    attention = retriever.invoke(query, mode="attention")
    assert [(d.page_content, d.metadata["score"]) for d in attention] == [
        (h.text, h.score) for h in filled.retrieve(query, k=3, mode="attention")
    ]
    assert all(d.metadata["channels"] == ["attention"] for d in attention)
    reranked = retriever.invoke(query, mode="rerank")
    assert [(d.page_content, d.metadata["channels"]) for d in reranked] == [
        (h.text, list(h.channels)) for h in filled.retrieve(query, k=3, mode="rerank")
    ]
    assert any("rerank" in d.metadata["channels"] for d in reranked)
    with pytest.raises(ValueError):
        ContextMemoryRetriever(memory=filled, mode="vector")


async def test_retriever_k_per_call_and_async(filled):
    retriever = ContextMemoryRetriever(memory=filled)
    assert len(retriever.invoke("grass", k=1)) == 1 and len(retriever.invoke("grass")) == 4
    docs = await retriever.ainvoke("pass key", k=2)
    assert [d.page_content for d in docs] == [h.text for h in filled.retrieve("pass key", k=2)]
    docs = await retriever.ainvoke("pass key", k=2, mode="lexical")
    assert [d.metadata["channels"] for d in docs] == [["lexical"]]
    assert ContextMemoryRetriever(memory=ContextMemory(filled.model, filled.tokenizer)).invoke("x") == []
