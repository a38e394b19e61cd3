"""ContextMemoryBlock: flushed messages go into a real ContextMemory (tiny model), reads return retrieved history;
and the block inside a LlamaIndex agent loop (FunctionAgent driven by a scripted LLM)."""

from __future__ import annotations

import pytest
from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.base.llms.types import ChatMessage, ToolCallBlock
from llama_index.core.llms import MockFunctionCallingLLM
from llama_index.core.memory import Memory
from llama_index.core.storage.chat_store.sql import MessageStatus
from llama_index.core.tools import FunctionTool

from llama_index_memory_plugin import ContextMemoryBlock

FACT = "My locker code is 4721."
HISTORY = [
    ChatMessage(role="user", content=FACT),
    ChatMessage(role="assistant", content="Noted, your locker code is stored."),
    *[
        ChatMessage(role=role, content=f"{role} small talk {i}: the grass is green and the sky is blue today.")
        for i in range(6)
        for role in ("user", "assistant")
    ],
]


@pytest.mark.asyncio
async def test_put_encodes_the_messages_and_get_returns_the_retrieved_ones(tiny_memory):
    block = ContextMemoryBlock(memory=tiny_memory, similarity_top_k=2)
    assert await block.aget([ChatMessage(role="user", content="anything")]) == ""  # nothing stored yet
    await block.aput(HISTORY, from_short_term_memory=True, session_id="s")
    assert tiny_memory.messages == [{"role": m.role.value, "content": m.content} for m in HISTORY]
    query = [ChatMessage(role="user", content="What is my locker code?")]
    text = await block.aget(query)
    hits = tiny_memory.retrieve("What is my locker code?", k=2)
    expected = sorted({h.message_index for h in hits})  # a passage lies in one message
    entries = tiny_memory.entries
    lines = [line for line in text.split("\n") if line != "..."]
    assert lines == [f"{entries[i].role}: {entries[i].content}" for i in expected]
    assert await block.aget([]) == ""


@pytest.mark.asyncio
async def test_long_messages_come_back_as_the_retrieved_part_only(tiny_memory):
    long = "The grass is green. " * 60 + "The pass key is 12345. " + "The sky is blue. " * 60
    block = ContextMemoryBlock(memory=tiny_memory, similarity_top_k=1, whole_message_tokens=0)
    await block.aput([ChatMessage(role="tool", content=long)])
    text = await block.aget([ChatMessage(role="user", content="What is the pass key?")])
    assert text.startswith("tool: ") and len(text) < len(long) / 4
    hit = tiny_memory.retrieve("What is the pass key?", k=1)[0]
    assert text == f"tool: ... {hit.text} ..." and hit.text in long  # a passage of the message, cut at sentences


@pytest.mark.asyncio
async def test_the_hybrid_search_finds_a_fact_by_its_words_and_mode_is_passed_on(tiny_memory):
    block = ContextMemoryBlock(memory=tiny_memory, similarity_top_k=1)
    await block.aput(HISTORY)
    query = [ChatMessage(role="user", content="Which locker code did I give you?")]
    [hit] = tiny_memory.retrieve("Which locker code did I give you?", k=1)
    assert hit.message_index in (0, 1) and "lexical" in hit.channels  # "locker", "code": said only there
    assert await block.aget(query) == f"{hit.role}: {HISTORY[hit.message_index].content}"
    lexical = ContextMemoryBlock(memory=tiny_memory, similarity_top_k=5, mode="lexical")
    lines = (await lexical.aget(query)).split("\n")
    assert lines == [f"user: {FACT}", "assistant: Noted, your locker code is stored."]  # only those hold its words
    with pytest.raises(ValueError):
        ContextMemoryBlock(memory=tiny_memory, mode="vector")


@pytest.mark.asyncio
async def test_a_function_agent_reads_history_flushed_into_the_block(tiny_memory):
    block = ContextMemoryBlock(memory=tiny_memory, similarity_top_k=50)  # the tiny model's relevance is random
    memory = Memory.from_defaults(session_id="agent-test", token_limit=120, token_flush_size=40, memory_blocks=[block])
    await memory.aput_messages(HISTORY)
    active = await memory.aget_all(status=MessageStatus.ACTIVE)
    assert FACT not in [m.content for m in active]  # flushed out of the short-term queue ...
    assert {"role": "user", "content": FACT} in tiny_memory.messages  # ... into the block's memory
    n_before = len(tiny_memory.entries)

    seen: list[list[ChatMessage]] = []

    def script(messages, **kwargs):
        seen.append(list(messages))
        if len(seen) == 1:
            return ChatMessage(
                role="assistant",
                blocks=[ToolCallBlock(tool_call_id="call-1", tool_name="lookup", tool_kwargs={"topic": "locker"})],
            )
        return ChatMessage(role="assistant", content="Your locker code is 4721.")

    def lookup(topic: str) -> str:
        """Look a topic up in the building's records."""
        return f"The records about {topic} are kept in the long-term memory of this agent. " * 3

    llm = MockFunctionCallingLLM(response_generator=script)
    agent = FunctionAgent(tools=[FunctionTool.from_defaults(lookup)], llm=llm)
    result = await agent.run(user_msg="What is my locker code?", memory=memory)

    assert "4721" in str(result) and len(seen) == 2
    for messages in seen:  # every LLM call saw the block's retrieved history in its system message
        system = next(m for m in messages if m.role.value == "system")
        assert "<long_term_memory>" in system.content and f"user: {FACT}" in system.content
    # The agent's own turn overflowed the queue too: its messages were flushed into the block.
    assert len(tiny_memory.entries) > n_before
