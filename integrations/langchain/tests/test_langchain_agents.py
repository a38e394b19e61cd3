"""ContextMemoryChatModel for agents (issue 20), on the tiny random model: durable thread memories
keyed by thread and LangGraph namespace, thread_memory, the model profile that middleware reads,
its id and identifying parameters, cancelled async calls; ContextMemoryMiddleware for an agent on
another model."""

from __future__ import annotations

import asyncio
import time

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import SummarizationMiddleware
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langgraph.checkpoint.memory import InMemorySaver
from pydantic import Field

from langchain_memory_plugin import ContextMemoryChatModel, ContextMemoryMiddleware
from langchain_memory_plugin._format import to_core_messages
from langchain_memory_plugin.chat_models import MEASURED_INPUT_TOKENS
from memory_plugin import ContextMemory, MemoryConfig, testing
from memory_plugin.chat import ChatFormat
from memory_plugin.model import default_model_path

CONV = [SystemMessage("You are terse."), HumanMessage("The vault code is 4721. " + "The sky is blue. " * 6)]


def cfg(thread: str, checkpoint_ns: str | None = None) -> dict:
    configurable = {"thread_id": thread}
    if checkpoint_ns is not None:
        configurable["checkpoint_ns"] = checkpoint_ns
    return {"configurable": configurable}


def reused(message) -> int:
    return message.usage_metadata["input_token_details"]["cache_read"]


def encoded(message, tokenizer) -> int:
    """Tokens of the call's messages (its input without the generation prompt)."""
    gen = len(tokenizer(ChatFormat(tokenizer).generation_prompt, add_special_tokens=False)["input_ids"])
    return message.usage_metadata["input_tokens"] - gen


@pytest.fixture
def make_llm(tmp_path, tiny_model, tiny_tokenizer):
    """Chat models on the tiny model; ``durable=True`` keeps threads under one directory."""
    made = []

    def make(durable: bool = True, **kw):
        memory = ContextMemory(tiny_model, tiny_tokenizer, testing.TINY_CONFIG)
        llm = ContextMemoryChatModel(
            memory=memory, memory_dir=tmp_path / "memories" if durable else None, max_tokens=4, **kw
        )
        made.append(llm)
        return llm

    yield make
    for llm in made:
        llm.close()


def test_a_durable_thread_outlives_eviction_and_its_model_without_re_encoding(make_llm, tiny_tokenizer):
    llm = make_llm(max_conversations=1)
    first = llm.invoke(CONV, config=cfg("a"))
    llm.invoke(CONV, config=cfg("b"))  # one memory open at most: "a" is closed
    grown = [*CONV, first, HumanMessage("What is the vault code?")]
    second = llm.invoke(grown, config=cfg("a"))
    assert reused(second) == encoded(first, tiny_tokenizer)  # reopened from disk, nothing encoded again
    llm.close()
    again = make_llm()  # another model on the directory, as in a new process
    third = again.invoke([*grown, second, HumanMessage("Thanks.")], config=cfg("a"))
    assert reused(third) == encoded(second, tiny_tokenizer)
    with again.thread_memory("a") as mem:
        assert mem.messages == to_core_messages([*grown, second, HumanMessage("Thanks.")])


@pytest.mark.parametrize("durable", [True, False])
def test_other_graph_nodes_in_the_thread_do_not_reset_its_memory(make_llm, tiny_tokenizer, durable):
    llm = make_llm(durable=durable)
    main = llm.invoke(CONV, config=cfg("t", "model:1f0e"))
    assert main.response_metadata["thread_id"] == "t" and main.response_metadata["namespace"] == "model"
    llm.invoke([HumanMessage("Summarise the talk.")], config=cfg("t", "summarize:77aa"))  # another node
    llm.invoke([HumanMessage("Route this.")], config=cfg("t", "tools:5b|model:c2"))  # an agent inside a tool
    grown = [*CONV, main, HumanMessage("next")]
    again = llm.invoke(grown, config=cfg("t", "model:9ab2"))  # the next step: another task id, same node
    assert reused(again) == encoded(main, tiny_tokenizer)
    if durable:
        assert llm.namespaces("t") == ["model", "tools|model", "summarize"]  # most recent first


def test_thread_memory_searches_the_agents_memory_and_delete_thread_removes_it(make_llm, tmp_path):
    llm = make_llm()
    llm.invoke(CONV, config=cfg("alice", "model:1"))
    llm.invoke([HumanMessage("Other.")], config=cfg("alice"))
    with llm.thread_memory("alice", namespace="model") as mem:
        assert mem.messages == to_core_messages(CONV)
        hit = mem.retrieve("vault code", k=1)[0]
        assert hit.message_index == 1 and "vault code" in hit.text
        mem.save(tmp_path / "copy")  # a copy, e.g. for another process
    assert ContextMemory.load(tmp_path / "copy", mem.model, tokenizer=mem.tokenizer).messages == to_core_messages(CONV)
    assert llm.delete_thread("alice") == 2 and llm.namespaces("alice") == []
    assert not any((tmp_path / "memories").rglob("*alice*"))


def test_thread_memory_arguments_are_checked(make_llm):
    with pytest.raises(ValueError, match="memory_dir"):
        with make_llm(durable=False).thread_memory("a"):
            pass
    llm = make_llm()
    with pytest.raises(ValueError, match="thread_id"):
        with llm.thread_memory(""):
            pass
    with pytest.raises(TypeError, match="namespace"):
        with llm.thread_memory("a", namespace=3):
            pass
    with pytest.raises(ValueError, match="thread_id and namespace are too long"):
        llm.invoke(CONV, config=cfg("a" * 150, "b" * 60))


def test_the_profile_lets_summarization_middleware_use_fractional_limits(tiny_model, tiny_tokenizer):
    llm = ContextMemoryChatModel(memory=ContextMemory(tiny_model, tiny_tokenizer, testing.TINY_CONFIG), max_tokens=4)
    profile = llm.profile
    assert profile["max_input_tokens"] == MEASURED_INPUT_TOKENS and profile["tool_calling"] and profile["tool_choice"]
    assert profile["structured_output"] is False  # create_agent asks for a forced tool call instead
    SummarizationMiddleware(model=llm, trigger=("fraction", 0.8))  # raised "profile information is required"
    # A smaller limit (LangChain's own override) makes the fraction trigger on a short conversation.
    small = ContextMemoryChatModel(
        memory=ContextMemory(tiny_model, tiny_tokenizer, testing.TINY_CONFIG),
        max_tokens=4,
        profile={**profile, "max_input_tokens": 120},
    )
    summarise = SummarizationMiddleware(
        model=small, trigger=("fraction", 0.5), keep=("messages", 2), summarizer=lambda msgs: "SUMMARY-OF-EARLIER"
    )
    agent = create_agent(small, middleware=[summarise], checkpointer=InMemorySaver())
    for i in range(3):
        state = agent.invoke({"messages": [HumanMessage(f"Note {i}: " + "the sky is blue today. " * 4)]}, cfg("s"))
    texts = [m.text for m in state["messages"]]
    assert any("SUMMARY-OF-EARLIER" in t for t in texts) and not any("Note 0" in t for t in texts)


def test_ls_model_name_is_an_id_and_identifying_params_hold_the_memory(tmp_path):
    default = ContextMemoryChatModel()  # nothing is loaded to describe it
    assert default._get_ls_params()["ls_model_name"] == "SmolLM2-135M-Instruct.Q4_1"
    assert default._get_ls_params(model=str(default_model_path()))["ls_model_name"] == "SmolLM2-135M-Instruct.Q4_1"
    assert default._identifying_params["memory_config"] == MemoryConfig().to_dict()
    other = ContextMemoryChatModel(memory_config=MemoryConfig(topk=8), memory_dir=tmp_path)
    assert other._identifying_params["memory_config"]["topk"] == 8
    assert other._identifying_params["memory_dir"] == str(tmp_path)
    assert default._get_llm_string() != other._get_llm_string()  # LangChain's cache keys tell them apart


@pytest.mark.parametrize("how", ["ainvoke", "astream"])
async def test_a_cancelled_async_call_stops_and_releases_its_thread(make_llm, tiny_tokenizer, how):
    llm = make_llm()
    first = await llm.ainvoke(CONV, config=cfg("c"))
    started = asyncio.Event()

    async def long_call():  # 2000 tokens: many seconds on the tiny model if not stopped
        if how == "ainvoke":
            started.set()
            return await llm.ainvoke(CONV, config=cfg("c"), max_tokens=2000, min_new_tokens=2000)
        async for _ in llm.astream(CONV, config=cfg("c"), max_tokens=2000, min_new_tokens=2000):
            started.set()

    task = asyncio.create_task(long_call())
    await started.wait()
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    t0 = time.monotonic()
    again = await llm.ainvoke(CONV, config=cfg("c"), max_tokens=1)  # waits for the thread if still held
    assert time.monotonic() - t0 < 3.0
    assert reused(again) == encoded(first, tiny_tokenizer)  # the cancelled turn left the memory as it was


# ---------------------------------------------------------------------------- middleware
class RecordingChatModel(GenericFakeChatModel):
    """A stand-in for a hosted model: answers from a script and records what it was sent."""

    sent: list = Field(default_factory=list)

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        self.sent.append(list(messages))
        return super()._generate(messages, stop=stop, run_manager=run_manager, **kwargs)


def test_the_middleware_sends_the_last_messages_and_what_memory_finds_among_the_rest(
    tiny_model, tiny_tokenizer, tmp_path
):
    hosted = RecordingChatModel(messages=iter([AIMessage(f"Reply {i}.") for i in range(8)]))
    # Passages of up to 64 tokens: a message of the tiny tokenizer's is one passage, not pieces of it.
    tiny = ContextMemory(tiny_model, tiny_tokenizer, testing.TINY_CONFIG.replace(block_size=64))
    memory = ContextMemoryMiddleware(keep_last=3, k=2, memory=tiny, memory_dir=tmp_path)
    agent = create_agent(hosted, system_prompt="You are a helpful agent.", middleware=[memory], checkpointer=InMemorySaver())
    turns = [
        "The vault code is 4721, keep it safe.",
        "Lunch is at noon on Fridays.",
        "The printer on floor two is broken.",
        "My cat is called Miso.",
        "Which vault code did I give you?",
    ]
    for text in turns:
        state = agent.invoke({"messages": [HumanMessage(text)]}, cfg("u"))
    assert len(hosted.sent[0]) == 2  # the first call: system prompt and the only message, unchanged
    last = hosted.sent[-1]
    system, sent = last[0], last[1:]
    assert isinstance(system, SystemMessage) and system.text.startswith("You are a helpful agent.")
    assert [m.text for m in sent] == [m.text for m in state["messages"][-4:-1]]  # the last 3 messages
    assert not any("4721" in m.text for m in sent)  # the fact's message is not among them...
    assert "Earlier in this conversation:" in system.text and "[user] The vault code is 4721" in system.text
    assert "Miso" not in system.text.split("Earlier in this conversation:")[1]  # ...kept messages are not repeated
    # The conversation, final answer included, is in the thread's memory (the agent's namespace).
    with memory.thread_memory("u") as mem:
        assert mem.messages == to_core_messages(state["messages"])
    memory.close()


def test_the_middleware_keeps_a_tool_result_with_its_call_and_checks_its_arguments():
    from langchain_core.messages import ToolMessage

    from langchain_memory_plugin.middleware import _kept_start

    call = AIMessage("", tool_calls=[{"name": "f", "args": {}, "id": "c1"}])
    msgs = [HumanMessage("a"), AIMessage("b"), HumanMessage("c"), call, ToolMessage("r", tool_call_id="c1")]
    assert _kept_start(msgs, 1) == 3 and _kept_start(msgs, 3) == 2 and _kept_start(msgs, 9) == 0
    with pytest.raises(ValueError, match="keep_last"):
        ContextMemoryMiddleware(keep_last=0)
    with pytest.raises(ValueError, match="k must"):
        ContextMemoryMiddleware(k=-1)
