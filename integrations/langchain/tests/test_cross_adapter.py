"""One memory, two front ends: a conversation with a tool call and its result, written through
LangChain and through LlamaIndex, is the same memory (messages and tokens), and each front end reads
the other's memory back with the call intact (tiny random model, no real model needed)."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("llama_index.core")

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage  # noqa: E402
from llama_index.core.base.llms.types import ChatMessage, TextBlock, ToolCallBlock  # noqa: E402

from langchain_memory_plugin import ContextMemoryChatMessageHistory, ContextMemoryChatModel  # noqa: E402
from langchain_memory_plugin._format import from_core_messages, to_core_messages  # noqa: E402
from llama_index_memory_plugin import (  # noqa: E402
    ContextMemoryBlock,
    ContextMemoryLLM,
    to_chat_messages,
    to_memory_messages,
)
from memory_plugin import ContextMemory, testing  # noqa: E402
from memory_plugin.tools import render_message  # noqa: E402

ARGS = {"city": "Paris", "days": 2}

LANGCHAIN = [
    SystemMessage("You are terse."),
    HumanMessage("Weather in Paris?"),
    AIMessage("Let me check.", tool_calls=[{"name": "weather", "args": ARGS, "id": "lc-1"}]),
    ToolMessage("sunny", tool_call_id="lc-1"),
    AIMessage("It is sunny."),
    HumanMessage("And tomorrow?"),
]

LLAMA_INDEX = [
    ChatMessage(role="system", content="You are terse."),
    ChatMessage(role="user", content="Weather in Paris?"),
    ChatMessage(
        role="assistant",
        blocks=[
            TextBlock(text="Let me check."),
            ToolCallBlock(tool_call_id="li-1", tool_name="weather", tool_kwargs=ARGS),
        ],
    ),
    ChatMessage(role="tool", content="sunny", additional_kwargs={"tool_call_id": "li-1"}),
    ChatMessage(role="assistant", content="It is sunny."),
    ChatMessage(role="user", content="And tomorrow?"),
]

# What both front ends store: the core's one format.
STORED = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": render_message("Let me check.", [("weather", ARGS)])},
    {"role": "tool", "content": "sunny"},
    {"role": "assistant", "content": "It is sunny."},
    {"role": "user", "content": "And tomorrow?"},
]


@pytest.fixture
def new_memory(tiny_model, tiny_tokenizer):
    return lambda: ContextMemory(tiny_model, tiny_tokenizer, testing.TINY_CONFIG)


def write_langchain(memory: ContextMemory) -> ContextMemory:
    ContextMemoryChatMessageHistory(memory).add_messages(LANGCHAIN)
    return memory


def write_llama_index(memory: ContextMemory) -> ContextMemory:
    asyncio.run(ContextMemoryBlock(memory=memory).aput(LLAMA_INDEX))
    return memory


def test_both_front_ends_store_the_same_memory(new_memory):
    lc, li = write_langchain(new_memory()), write_llama_index(new_memory())
    assert lc.messages == li.messages == STORED
    assert lc.token_ids == li.token_ids
    assert to_core_messages(LANGCHAIN) == to_memory_messages(LLAMA_INDEX) == STORED


def test_openai_style_tool_calls_are_stored_the_same_too():
    call = {"id": "x", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris", "days": 2}'}}
    legacy = ChatMessage(role="assistant", content="Let me check.", additional_kwargs={"tool_calls": [call]})
    assert to_memory_messages([legacy]) == [STORED[2]]


def test_the_chat_model_and_the_llm_answer_over_the_same_memory(new_memory):
    """Through the conversation pools of both chat front ends (no tools bound: nothing else is added)."""
    lc, li = new_memory(), new_memory()
    ContextMemoryChatModel(memory=lc, max_tokens=4).invoke(LANGCHAIN)
    ContextMemoryLLM(li, max_new_tokens=4).chat(LLAMA_INDEX)
    assert lc.messages == li.messages == STORED
    assert lc.token_ids == li.token_ids


def test_langchain_reads_a_memory_written_through_llama_index(new_memory):
    back = ContextMemoryChatMessageHistory(write_llama_index(new_memory())).messages
    assert [type(m).__name__ for m in back] == [type(m).__name__ for m in LANGCHAIN]
    call = back[2]
    assert call.content == "Let me check."
    assert call.tool_calls == [{"name": "weather", "args": ARGS, "id": "call_2_0", "type": "tool_call"}]
    assert back[3].content == "sunny" and back[3].tool_call_id == "call_2_0"  # paired with its call
    assert to_core_messages(back) == STORED  # written again, the same memory


def test_llama_index_reads_a_memory_written_through_langchain(new_memory):
    back = to_chat_messages(write_langchain(new_memory()).messages)
    assert [m.role.value for m in back] == [m.role.value for m in LLAMA_INDEX]
    call = back[2]
    assert call.content == "Let me check."
    [block] = [b for b in call.blocks if isinstance(b, ToolCallBlock)]
    assert (block.tool_name, block.tool_kwargs, block.tool_call_id) == ("weather", ARGS, "call_2_0")
    [openai] = call.additional_kwargs["tool_calls"]  # as function-calling LLMs carry them
    assert openai["id"] == "call_2_0" and openai["function"]["name"] == "weather"
    assert back[3].content == "sunny" and back[3].additional_kwargs == {"tool_call_id": "call_2_0"}
    assert to_memory_messages(back) == STORED  # the call is counted once, though carried both ways


def test_each_front_end_reads_back_what_the_other_would_write(new_memory):
    assert from_core_messages(to_memory_messages(LLAMA_INDEX)) == from_core_messages(to_core_messages(LANGCHAIN))
    lc_read = to_chat_messages(to_core_messages(LANGCHAIN))
    li_read = to_chat_messages(to_memory_messages(LLAMA_INDEX))
    assert [m.model_dump() for m in lc_read] == [m.model_dump() for m in li_read]
