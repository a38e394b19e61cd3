"""ContextMemoryLLM as a FunctionCallingLLM on the tiny random model: tools offered in the core's
format, calls read whole and streamed, forced calls, and FunctionAgent / AgentWorkflow running a real
tool round trip (forced: a random model writes no call of its own)."""

from __future__ import annotations

import pytest
from llama_index.core.agent.workflow import AgentOutput, AgentWorkflow, FunctionAgent, ToolCallResult
from llama_index.core.base.llms.types import ChatMessage, ToolCallBlock
from llama_index.core.bridge.pydantic import BaseModel
from llama_index.core.prompts import PromptTemplate
from llama_index.core.tools import FunctionTool

from llama_index_memory_plugin import ContextMemoryLLM
from memory_plugin.tools import render_tool_call, tools_system

NOTE = "The sky over Kelderwick is violet."
SYSTEM = "You answer from your notes."
QUESTION = "What colour is the sky over Kelderwick?"


def lookup(query: str) -> str:
    """Look something up in the notes."""
    return NOTE


def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


@pytest.fixture
def llm(tiny_memory):
    return ContextMemoryLLM(model=tiny_memory.model, tokenizer=tiny_memory.tokenizer, config=tiny_memory.config,
                            max_new_tokens=8)


def _recording(calls: list) -> FunctionTool:
    def lookup(query: str) -> str:
        """Look something up in the notes."""
        calls.append(query)
        return NOTE

    return FunctionTool.from_defaults(fn=lookup)


def _scripted(monkeypatch, memory, pieces: list[str], seen: dict | None = None) -> None:
    """The memory's next turns stream ``pieces`` instead of generating (to test what the LLM reads
    out of a reply the tiny random model would never write)."""

    class Stream:
        explanation = None

        def __init__(self):
            self._it = iter(pieces)

        def __iter__(self):
            return self

        def __next__(self):
            return next(self._it)

        def close(self):
            pass

    def stream(prompt, **kwargs):
        if seen is not None:
            seen.update(kwargs)
        return Stream()

    monkeypatch.setattr(memory, "stream", stream)


def test_metadata_says_function_calling_and_workflow_picks_a_function_agent(llm):
    assert llm.metadata.is_function_calling_model
    workflow = AgentWorkflow.from_tools_or_functions([lookup], llm=llm, system_prompt=SYSTEM)
    assert [type(a) for a in workflow.agents.values()] == [FunctionAgent]  # not the ReAct fallback


def test_tools_are_offered_in_the_first_system_message_and_the_prefix_is_reused(llm, tiny_memory):
    tool = FunctionTool.from_defaults(fn=lookup)
    history = [ChatMessage(role="system", content=SYSTEM), ChatMessage(role="user", content=QUESTION)]
    first = llm.chat_with_tools([tool], chat_history=list(history))
    offered = tools_system(tiny_memory.tokenizer, [tool.metadata.to_openai_tool()["function"]], SYSTEM)
    assert "lookup" in offered and SYSTEM in offered
    expected = [{"role": "system", "content": offered}, {"role": "user", "content": QUESTION}]
    with llm.pool.conversation(expected) as conv:
        assert conv.new_tokens == 0  # what the call stored: the tools listed in the system message
    # The same tools again, one message more: only that message is encoded.
    history += [first.message, ChatMessage(role="user", content="And the grass?")]
    second = llm.chat_with_tools([tool], chat_history=history)
    assert second.additional_kwargs["reused_tokens"] >= first.additional_kwargs["memory_tokens"] > 0
    assert len(llm.pool) == 1
    # No system message: the tools become one.
    llm.chat_with_tools([tool], user_msg=QUESTION, thread_id="bare")
    with llm.pool.conversation(
        [{"role": "system", "content": tools_system(tiny_memory.tokenizer, [tool.metadata.to_openai_tool()["function"]],
                                                    None)},
         {"role": "user", "content": QUESTION}], thread_id="bare"
    ) as conv:
        assert conv.new_tokens == 0


def test_a_call_the_model_writes_is_read_whole_and_while_streaming(monkeypatch, tiny_memory):
    llm = ContextMemoryLLM(tiny_memory, max_new_tokens=8)
    call = render_tool_call("lookup", {"query": "sky"})
    pieces = ["Let me check. <tool_", call[len("<tool_"):40], call[40:], "\n<tool_call>\nnot json\n</tool_call>"]
    tool = FunctionTool.from_defaults(fn=lookup)
    history = [ChatMessage(role="user", content="hello")]

    _scripted(monkeypatch, tiny_memory, pieces)
    whole = llm.chat_with_tools([tool], chat_history=list(history), allow_parallel_tool_calls=True)
    [selection] = llm.get_tool_calls_from_response(whole)
    assert (selection.tool_name, selection.tool_kwargs) == ("lookup", {"query": "sky"}) and selection.tool_id
    # The block that is not a call stays in the text as the model wrote it.
    assert whole.message.content == "Let me check.\n<tool_call>\nnot json\n</tool_call>"

    _scripted(monkeypatch, tiny_memory, pieces)
    chunks = list(llm.stream_chat_with_tools([tool], chat_history=list(history)))
    assert chunks[0].delta == "Let me check." and chunks[0].message.content == "Let me check."
    assert [len(llm.get_tool_calls_from_response(c, error_on_no_tool_call=False)) for c in chunks] == [0, 1, 1]
    assert chunks[-1].message.content == whole.message.content
    assert "".join(c.delta for c in chunks) == whole.message.content

    # No call in the reply: an error, unless asked for none.
    _scripted(monkeypatch, tiny_memory, ["Just text."])
    plain = llm.chat_with_tools([tool], chat_history=list(history))
    with pytest.raises(ValueError, match="tool call"):
        llm.get_tool_calls_from_response(plain)
    assert llm.get_tool_calls_from_response(plain, error_on_no_tool_call=False) == []


def test_only_the_first_call_is_kept_without_parallel_calls(monkeypatch, tiny_memory):
    llm = ContextMemoryLLM(tiny_memory, max_new_tokens=8)
    tool = FunctionTool.from_defaults(fn=lookup)
    two = render_tool_call("lookup", {"query": "a"}) + "\n" + render_tool_call("lookup", {"query": "b"})
    _scripted(monkeypatch, tiny_memory, [two])
    single = llm.chat_with_tools([tool], user_msg="hello")
    assert [s.tool_kwargs for s in llm.get_tool_calls_from_response(single)] == [{"query": "a"}]
    _scripted(monkeypatch, tiny_memory, [two])
    both = llm.chat_with_tools([tool], user_msg="hello", allow_parallel_tool_calls=True)
    assert [s.tool_kwargs for s in llm.get_tool_calls_from_response(both)] == [{"query": "a"}, {"query": "b"}]


def test_tool_choice_none_stops_a_call_from_beginning(monkeypatch, tiny_memory):
    llm = ContextMemoryLLM(tiny_memory, max_new_tokens=8, stop=["END"])
    seen: dict = {}
    _scripted(monkeypatch, tiny_memory, ["fine"], seen)
    reply = llm.chat_with_tools([FunctionTool.from_defaults(fn=lookup)], user_msg="hello", tool_choice="none")
    assert seen["stop"] == ["END", "<tool_call>"] and reply.message.content == "fine"


def test_forced_calls_are_valid_calls_of_the_tool_asked_for(llm):
    tools = [FunctionTool.from_defaults(fn=lookup), FunctionTool.from_defaults(fn=add)]
    for kwargs in ({"tool_required": True}, {"tool_choice": "lookup"},
                   {"tool_choice": {"type": "function", "function": {"name": "lookup"}}}):
        response = llm.chat_with_tools(tools[:1], user_msg=QUESTION, **kwargs)
        [selection] = llm.get_tool_calls_from_response(response)
        assert selection.tool_name == "lookup" and list(selection.tool_kwargs) == ["query"], kwargs
        assert isinstance(selection.tool_kwargs["query"], str)
    # Several tools and tool_required: the model names one, the closest offered name is taken.
    response = llm.chat_with_tools(tools, user_msg=QUESTION, tool_required=True)
    assert response.message.blocks and isinstance(response.message.blocks[-1], ToolCallBlock)
    assert response.message.blocks[-1].tool_name in ("lookup", "add")
    # Streamed, a forced call comes whole in the last response; explained, with what it attended.
    chunks = list(llm.stream_chat_with_tools(tools[:1], user_msg=QUESTION, tool_choice="lookup", explain=True))
    assert [s.tool_name for s in llm.get_tool_calls_from_response(chunks[-1])] == ["lookup"]
    memory = chunks[-1].additional_kwargs["memory"]
    assert memory["placed"] == [] and memory["attended"]  # a short conversation: nothing to place
    assert all(h["channels"] == ["attended"] for h in memory["attended"])


class Note(BaseModel):
    title: str
    body: str


def test_structured_predict_goes_through_a_forced_call_and_gives_the_object(llm):
    # LlamaIndex's function-calling program forces a call of a tool built from the class: the keys
    # come from its schema, so even the random model's values make a valid object.
    note = llm.structured_predict(Note, PromptTemplate("Write a note about {topic}."), topic="the sky")
    assert isinstance(note, Note) and isinstance(note.title, str) and isinstance(note.body, str)


def test_bad_tools_and_tool_choices_fail_naming_the_argument(llm):
    tool = FunctionTool.from_defaults(fn=lookup)
    with pytest.raises(ValueError, match="tool_choice 'search' is not one of the tools"):
        llm.chat_with_tools([tool], user_msg=QUESTION, tool_choice="search")
    with pytest.raises(TypeError, match="tool_choice must be"):
        llm.chat_with_tools([tool], user_msg=QUESTION, tool_choice=3)
    with pytest.raises(TypeError, match=r"tools\[0\] must be"):
        llm.chat([ChatMessage(role="user", content=QUESTION)], tools=[{"description": "no name"}])
    with pytest.raises(TypeError, match="tools must be a list"):
        llm.chat([ChatMessage(role="user", content=QUESTION)], tools=tool.metadata.to_openai_tool())


async def _run(agent, question: str) -> tuple[AgentOutput, list[ToolCallResult]]:
    handler = agent.run(user_msg=question)
    results = [ev async for ev in handler.stream_events() if isinstance(ev, ToolCallResult)]
    return await handler, results


@pytest.mark.asyncio
@pytest.mark.parametrize("streaming", [True, False])
async def test_a_function_agent_runs_a_tool_round_trip(llm, tiny_memory, streaming):
    calls: list[str] = []
    tool = _recording(calls)
    agent = FunctionAgent(tools=[tool], llm=llm, system_prompt=SYSTEM, initial_tool_choice="lookup",
                          streaming=streaming)
    output, results = await _run(agent, QUESTION)
    assert len(calls) == 1 and isinstance(calls[0], str)  # the tool ran once, with the argument it needs
    [result] = results
    assert (result.tool_name, result.tool_kwargs, result.tool_output.content) == ("lookup", {"query": calls[0]}, NOTE)
    # Then the model answered (no call in its message); the output lists the round trip's results.
    assert isinstance(output, AgentOutput) and not any(isinstance(b, ToolCallBlock) for b in output.response.blocks)
    assert [r.tool_output.content for r in output.tool_calls] == [NOTE]
    # The answer's call extended the first call's conversation: one memory, holding the round trip.
    assert len(llm.pool) == 1
    offered = tools_system(tiny_memory.tokenizer, [tool.metadata.to_openai_tool()["function"]], SYSTEM)
    round_trip = [
        {"role": "system", "content": offered},
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": render_tool_call("lookup", {"query": calls[0]})},
        {"role": "tool", "content": NOTE},
    ]
    with llm.pool.conversation(round_trip) as conv:
        assert conv.new_tokens == 0 and conv.reused_tokens > 0


@pytest.mark.asyncio
async def test_an_agent_workflow_from_tools_runs_the_round_trip_on_a_function_agent(llm):
    calls: list[str] = []
    workflow = AgentWorkflow.from_tools_or_functions([_recording(calls)], llm=llm, system_prompt=SYSTEM)
    [agent] = workflow.agents.values()
    assert isinstance(agent, FunctionAgent)
    agent.initial_tool_choice = "lookup"  # the tiny random model writes no call of its own
    output, results = await _run(workflow, QUESTION)
    assert len(calls) == 1 and [r.tool_output.content for r in results] == [NOTE]
    assert isinstance(output, AgentOutput) and not any(isinstance(b, ToolCallBlock) for b in output.response.blocks)
