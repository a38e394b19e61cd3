"""ContextMemoryChatModel on the tiny random model: prefix reuse, diverging conversations, threads,
async concurrency, streaming, tool calls (malformed included), structured output plumbing."""

from __future__ import annotations

import asyncio

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel

from langchain_memory_plugin import ContextMemoryChatModel
from langchain_memory_plugin._format import TOOL_CALL_OPEN, to_core_messages
from memory_plugin import ContextMemory
from memory_plugin.chat import ChatFormat

CONV = [SystemMessage("You are terse."), HumanMessage("The sky is blue. " * 8)]


@pytest.fixture
def llm(tiny_memory):
    return ContextMemoryChatModel(memory=tiny_memory, max_tokens=6, max_conversations=3)


def gen_prompt_tokens(tokenizer) -> int:
    return len(tokenizer(ChatFormat(tokenizer).generation_prompt, add_special_tokens=False)["input_ids"])


def reused(message) -> int:
    return message.usage_metadata["input_token_details"]["cache_read"]


def scripted(monkeypatch, text: str, piece: int = 3):
    """Make every memory 'generate' ``text`` (in pieces), to test how replies are handled."""

    def stream(self, prompt, max_new_tokens=64, *args, **kwargs):
        yield from (text[i : i + piece] for i in range(0, len(text), piece))

    monkeypatch.setattr(ContextMemory, "stream", stream)


def test_a_growing_conversation_encodes_only_its_new_messages(llm, tiny_memory, fresh_tokens):
    first = llm.invoke(CONV)
    assert isinstance(first, AIMessage) and reused(first) == 0
    n_first = len(fresh_tokens(to_core_messages(CONV)))
    assert first.usage_metadata["input_tokens"] == n_first + gen_prompt_tokens(tiny_memory.tokenizer)
    grown = [*CONV, first, HumanMessage("And the grass?")]
    second = llm.invoke(grown)
    assert reused(second) == n_first  # everything the first call encoded is reused
    assert second.usage_metadata["input_tokens"] == len(fresh_tokens(to_core_messages(grown))) + gen_prompt_tokens(
        tiny_memory.tokenizer
    )
    assert second.usage_metadata["total_tokens"] == second.usage_metadata["input_tokens"] + second.usage_metadata[
        "output_tokens"
    ]
    # The memory given to the model serves the conversation and holds exactly its messages.
    assert tiny_memory.token_ids == fresh_tokens(to_core_messages(grown))
    assert second.response_metadata["model_name"] == tiny_memory.model_name


def test_a_diverging_conversation_is_answered_as_if_fresh_and_the_first_is_kept(
    llm, tiny_model, tiny_tokenizer, fresh_tokens
):
    llm.invoke(CONV)
    other = [HumanMessage("Unrelated: what colour is grass?")]
    answer = llm.invoke(other)
    assert reused(answer) == 0
    fresh = ContextMemoryChatModel(memory=ContextMemory(tiny_model, tiny_tokenizer, llm.memory.config), max_tokens=6)
    assert answer.content == fresh.invoke(other).content  # nothing of the first conversation leaked in
    back = llm.invoke([*CONV, HumanMessage("More?")])  # the first conversation's memory was kept
    assert reused(back) == len(fresh_tokens(to_core_messages(CONV)))
    edited = [*CONV, HumanMessage("Less?")]  # an edited last message: everything before it is reused
    again = llm.invoke(edited)
    assert reused(again) == len(fresh_tokens(to_core_messages(CONV)))
    assert llm.memory.token_ids == fresh_tokens(to_core_messages(edited))


def test_thread_ids_from_the_run_config_keep_conversations_apart(llm, tiny_tokenizer):
    a = llm.invoke(CONV, config={"configurable": {"thread_id": "a"}})
    b = llm.invoke(CONV, config={"configurable": {"thread_id": "b"}})
    assert reused(a) == reused(b) == 0  # same messages, different threads: separate memories
    assert a.response_metadata["thread_id"] == "a" and a.content == b.content
    a2 = llm.invoke([*CONV, a, HumanMessage("next")], config={"configurable": {"thread_id": "a"}})
    assert reused(a2) == a.usage_metadata["input_tokens"] - gen_prompt_tokens(tiny_tokenizer)
    # Inside a runnable the config comes from the context (LangGraph nodes, chains).
    from langchain_core.runnables import RunnableLambda

    chain = RunnableLambda(lambda msgs: llm.invoke(msgs))
    b2 = chain.invoke([*CONV, b, HumanMessage("next")], config={"configurable": {"thread_id": "b"}})
    assert b2.response_metadata["thread_id"] == "b" and reused(b2) > 0


async def test_concurrent_async_calls_on_two_threads_do_not_block_the_loop(tiny_model, tiny_tokenizer):
    llm = ContextMemoryChatModel(memory=ContextMemory(tiny_model, tiny_tokenizer), max_tokens=48)
    convs = {t: [HumanMessage(f"Thread {t}: the pass key is {k}.")] for t, k in (("x", 11111), ("y", 22222))}
    expected = {
        t: ContextMemoryChatModel(memory=ContextMemory(tiny_model, tiny_tokenizer), max_tokens=48).invoke(c)
        for t, c in convs.items()
    }
    ticks = 0
    done = asyncio.Event()

    async def ticker():
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.001)

    async def call(t, msgs):
        return await llm.ainvoke(msgs, config={"configurable": {"thread_id": t}})

    tick = asyncio.create_task(ticker())
    results = dict(zip(convs, await asyncio.gather(*(call(t, c) for t, c in convs.items()))))
    done.set()
    await tick
    assert ticks > 2  # the event loop kept running while both generations were in worker threads
    for t in convs:
        assert results[t].content == expected[t].content  # no interference between the two threads
    # Each thread's next turn reuses its own memory, concurrently again, streamed this time.
    grown = {t: [*c, results[t], HumanMessage("again")] for t, c in convs.items()}

    async def stream(t):
        chunks = [c async for c in llm.astream(grown[t], config={"configurable": {"thread_id": t}})]
        return sum(chunks[1:], chunks[0])

    streamed = dict(zip(grown, await asyncio.gather(*(stream(t) for t in grown))))
    for t in grown:
        assert reused(streamed[t]) == results[t].usage_metadata["input_tokens"] - gen_prompt_tokens(tiny_tokenizer)


def test_stream_yields_pieces_that_add_up_to_the_invoke_answer(llm):
    chunks = list(llm.stream(CONV))
    assert len(chunks) >= 2 and chunks[-1].chunk_position == "last"
    full = sum(chunks[1:], chunks[0])
    assert full.content == llm.invoke(CONV).content
    assert [c.usage_metadata is not None for c in chunks].count(True) == 1
    assert full.response_metadata["model_name"] and full.usage_metadata["output_tokens"] > 0


async def test_an_abandoned_async_stream_leaves_the_memory_as_it_was(llm, tiny_memory, fresh_tokens):
    llm.invoke(CONV)
    agen = llm.astream(CONV)
    await agen.__anext__()
    await agen.aclose()  # the worker stops at its next token; the turn ends and the memory is restored
    again = await llm.ainvoke(CONV)  # waits for the memory's lock if the worker still holds it
    assert reused(again) == len(fresh_tokens(to_core_messages(CONV)))
    assert tiny_memory.token_ids == fresh_tokens(to_core_messages(CONV))


def test_max_tokens_temperature_and_stop_are_honoured(llm, monkeypatch):
    assert llm.invoke(CONV, max_tokens=2).usage_metadata["output_tokens"] <= 2
    sampled = {llm.invoke(CONV, temperature=1.0, seed=s, max_tokens=8).content for s in range(4)}
    assert len(sampled) > 1  # sampling with different seeds differs; greedy (the default) does not
    assert llm.invoke(CONV, temperature=1.0, seed=1, max_tokens=8).content == llm.invoke(
        CONV, temperature=1.0, seed=1, max_tokens=8
    ).content
    stop_llm = ContextMemoryChatModel(memory=llm.memory, stop=["STOP"])
    # Stop strings are applied by the memory while it decodes: check they reach it.
    seen = {}

    def spy(self, prompt, max_new_tokens=64, temperature=0.0, stop=None, *a, **kw):
        seen["stop"], seen["max"] = stop, max_new_tokens
        yield "ok"

    monkeypatch.setattr(ContextMemory, "stream", spy)
    stop_llm.invoke(CONV, max_tokens=5)
    assert seen == {"stop": ["STOP"], "max": 5}
    stop_llm.invoke(CONV, stop=["END"])
    assert seen["stop"] == ["END"]


def test_tool_calls_are_parsed_into_the_message(llm, monkeypatch):
    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    reply = 'Adding.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    scripted(monkeypatch, reply)
    result = llm.bind_tools([add]).invoke("What is 1 + 2?", max_tokens=256)
    assert result.content == "Adding."
    [tc] = result.tool_calls
    assert tc["name"] == "add" and tc["args"] == {"a": 1, "b": 2} and tc["id"].startswith("call_")
    assert result.response_metadata["finish_reason"] == "tool_calls"
    full = None
    for chunk in llm.bind_tools([add]).stream("What is 1 + 2?"):
        full = chunk if full is None else full + chunk
    assert [(c["name"], c["args"]) for c in full.tool_calls] == [("add", {"a": 1, "b": 2})]
    # The call and its result go back into the history in the documented format.
    history = [HumanMessage("What is 1 + 2?"), result, ToolMessage("3", tool_call_id=tc["id"])]
    llm.bind_tools([add]).invoke(history)
    stored = llm.memory.messages
    assert stored[-2]["role"] == "assistant" and TOOL_CALL_OPEN in stored[-2]["content"]
    assert stored[-1] == {"role": "tool", "content": "3"}
    assert '"name": "add"' in stored[0]["content"]  # the tools block in the system message


def test_malformed_tool_call_text_becomes_an_invalid_tool_call_not_an_exception(llm, monkeypatch):
    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    reply = 'Sure <tool_call>{"name": "add", "arguments": {a: 1, b: two}}</tool_call> and <tool_call>oops'
    scripted(monkeypatch, reply)
    result = llm.bind_tools([add]).invoke("add")
    assert result.tool_calls == [] and result.content == "Sure and"
    first, second = result.invalid_tool_calls
    assert first["name"] == "add" and "not valid JSON" in first["error"] and first["args"].startswith(TOOL_CALL_OPEN)
    assert second["args"] == "<tool_call>oops"
    full = None
    for chunk in llm.bind_tools([add]).stream("add"):
        full = chunk if full is None else full + chunk
    assert full.tool_calls == [] and [c["args"] for c in full.invalid_tool_calls] == [
        first["args"],
        second["args"],
    ]


def test_a_forced_call_on_a_model_that_writes_garbage_gives_an_invalid_call(llm):
    """The tiny random model writes nonsense for a forced integer argument: reported, not raised."""

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    result = llm.bind_tools([add], tool_choice="add").invoke("add 1 and 2", max_tokens=12)
    assert len(result.tool_calls) + len(result.invalid_tool_calls) == 1
    for bad in result.invalid_tool_calls:
        assert bad["name"] == "add" and bad["args"].startswith('<tool_call>\n{"name": "add", "arguments": {"a": ')
    for good in result.tool_calls:
        assert set(good["args"]) == {"a", "b"}


def test_forced_calls_fill_the_schema_and_name_the_tool(llm):
    @tool
    def lookup(word: str, limit: int = 3) -> str:
        """Look a word up."""
        return word

    @tool
    def ping() -> str:
        """Ping."""
        return "pong"

    result = llm.bind_tools([lookup, ping], tool_choice="lookup").invoke("look up grass", max_tokens=8)
    [tc] = result.tool_calls  # a string value is always valid JSON: the model writes its text
    assert tc["name"] == "lookup" and list(tc["args"]) == ["word"]  # optional arguments are left out
    assert result.usage_metadata["output_tokens"] <= 8
    no_args = llm.bind_tools([lookup, ping], tool_choice={"type": "function", "function": {"name": "ping"}})
    assert no_args.invoke("ping").tool_calls[0]["args"] == {}
    anyone = llm.bind_tools([lookup, ping], tool_choice="any").invoke("ping it", max_tokens=8)
    assert [c["name"] for c in anyone.tool_calls + anyone.invalid_tool_calls][0] in {"lookup", "ping"}
    with pytest.raises(ValueError, match="not one of the bound tools"):
        llm.bind_tools([lookup], tool_choice="nope")


def test_tool_choice_none_keeps_the_tools_listed_but_stops_a_call(llm, monkeypatch):
    @tool
    def ping() -> str:
        """Ping."""
        return "pong"

    seen = {}

    def spy(self, prompt, max_new_tokens=64, temperature=0.0, stop=None, *a, **kw):
        seen["stop"] = stop
        yield "Pong."

    llm.bind_tools([ping]).invoke("hi")
    n = len(llm.memory)
    monkeypatch.setattr(ContextMemory, "stream", spy)
    reply = llm.bind_tools([ping], tool_choice="none").invoke("hi")
    assert reply.content == "Pong." and reply.tool_calls == []
    assert seen["stop"] == [TOOL_CALL_OPEN]  # a call the model starts ends the reply
    assert reply.usage_metadata["input_token_details"]["cache_read"] == n  # same prompt as with "auto"


def test_structured_output_is_a_guided_tool_call_or_json(llm, monkeypatch):
    class Person(BaseModel):
        """A person."""

        name: str
        age: int

    raw = llm.with_structured_output(Person, include_raw=True).invoke("Ann is 31.", max_tokens=10)
    assert len(raw["raw"].tool_calls) + len(raw["raw"].invalid_tool_calls) == 1
    if raw["raw"].tool_calls:  # the random model may write a number or not: either is handled
        assert isinstance(raw["parsed"], Person) or raw["parsing_error"] is not None
    else:
        assert raw["parsed"] is None
    scripted(monkeypatch, '"name": "Ann", "age": 31} trailing')
    assert llm.with_structured_output(Person, method="json_mode").invoke("Ann is 31.") == Person(name="Ann", age=31)
    as_dict = llm.with_structured_output(Person.model_json_schema(), method="json_mode").invoke("Ann")
    assert as_dict == {"name": "Ann", "age": 31}


def test_json_schema_output_writes_keys_and_the_model_fills_values(llm):
    schema = {"title": "T", "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    out = llm.with_structured_output(schema, method="json_schema", include_raw=True).invoke("Paris", max_tokens=5)
    assert out["raw"].content.startswith('{"city": "') and isinstance(out["parsed"]["city"], str)


def test_usage_of_an_existing_memory_and_the_default_model_are_exclusive(tiny_memory):
    with pytest.raises(ValueError, match="either memory"):
        ContextMemoryChatModel(memory=tiny_memory, model="x")
    llm = ContextMemoryChatModel()  # nothing is loaded until the first call
    assert llm._pools == {}
    params = llm._get_ls_params(stop=["x"])
    assert params["ls_provider"] == "memory_plugin" and params["ls_model_name"].startswith("SmolLM2")
    assert llm._get_ls_params(model="other")["ls_model_name"] == "other"


def test_messages_without_text_are_refused_clearly(llm):
    with pytest.raises(ValueError, match="no.*text"):
        llm.invoke([HumanMessage("")])


def test_batch_answers_each_input_as_invoke_does(llm):
    one, two = llm.batch([CONV, [HumanMessage("other")]])
    assert one.content == llm.invoke(CONV).content
    assert two.content == llm.invoke([HumanMessage("other")]).content


def test_continue_final_message_continues_the_assistant_turn(llm, tiny_memory, fresh_tokens, monkeypatch):
    asked = [*CONV, HumanMessage("The sky is")]
    normal = llm.invoke([*asked, AIMessage("blue")])  # a new turn after the assistant message
    assert normal.usage_metadata["input_tokens"] == len(fresh_tokens(to_core_messages([*asked, AIMessage("blue")]))) + (
        gen_prompt_tokens(tiny_memory.tokenizer)
    )
    seen = {}

    def spy(self, prompt, max_new_tokens=64, temperature=0.0, stop=None, *a, chat=True, **kw):
        seen["prompt"], seen["chat"] = prompt, chat
        yield " indeed"

    monkeypatch.setattr(ContextMemory, "stream", spy)
    cont = llm.invoke([*asked, AIMessage("The sky is")], continue_final_message=True)
    assert cont.content == " indeed"  # only the continuation
    assert seen == {"prompt": ChatFormat(tiny_memory.tokenizer).generation_prompt + "The sky is", "chat": False}
    assert tiny_memory.token_ids == fresh_tokens(to_core_messages(asked))  # the prefill is not history
    assert reused(cont) == len(tiny_memory)  # the question before it was already encoded


FACT = "Henrietta Vosk keeps the spare keys of the Kelderwick depot."
LONG = [
    HumanMessage(FACT),
    AIMessage("Noted."),
    *[(HumanMessage, AIMessage)[i % 2](f"Small talk {i}: the grass is green and the sky is blue.") for i in range(70)],
    HumanMessage("Who keeps the spare keys of the Kelderwick depot?"),
]
HIT_KEYS = {"text", "start", "end", "score", "message_index", "role", "channels"}


def _hit_dicts(hits) -> list[dict]:
    # Scores as approx: the pool may encode the conversation in other chunks than add_messages does.
    return [
        {"text": h.text, "start": h.start, "end": h.end, "score": pytest.approx(h.score, rel=1e-3, abs=1e-5),
         "message_index": h.message_index, "role": h.role, "channels": list(h.channels)}
        for h in hits
    ]


def test_explain_puts_the_attended_and_placed_passages_in_response_metadata(llm, tiny_model, tiny_tokenizer):
    assert "memory" not in llm.invoke(LONG).response_metadata  # opt-in
    reference = ContextMemory(tiny_model, tiny_tokenizer, llm.memory.config)
    reference.add_messages(to_core_messages(LONG))
    assert len(reference) > 1100  # the fact lies beyond the last ~1k tokens: it is placed
    expected = reference.generate(None, max_new_tokens=6, min_new_tokens=1, explain=True)
    reply = llm.invoke(LONG, explain=True)
    memory = reply.response_metadata["memory"]
    assert reply.content == expected.text
    assert memory == {"attended": _hit_dicts(expected.attended), "placed": _hit_dicts(expected.placed)}
    first = memory["placed"][0]  # a piece of the fact (the tiny tokenizer cuts it into passages)
    assert first["text"] in FACT and (first["message_index"], first["role"]) == (0, "user")
    assert all(set(h) == HIT_KEYS and h["channels"] == ["placed"] for h in memory["placed"])
    assert memory["attended"] and all(set(h) == HIT_KEYS and h["channels"] == ["attended"] for h in memory["attended"])
    # Streaming: the last chunk carries it; the chunks add up to the same message.
    chunks = list(ContextMemoryChatModel(memory=llm.memory, max_tokens=6, explain=True).stream(LONG))
    assert chunks[-1].chunk_position == "last" and chunks[-1].response_metadata["memory"] == memory
    assert all("memory" not in c.response_metadata for c in chunks[:-1])
    assert sum(chunks[1:], chunks[0]).response_metadata["memory"] == memory
    # recall=0: nothing placed, per call or as the field.
    assert llm.invoke(LONG, explain=True, recall=0).response_metadata["memory"]["placed"] == []
    no_recall = ContextMemoryChatModel(memory=llm.memory, max_tokens=6, recall=0, explain=True)
    assert no_recall.invoke(LONG).response_metadata["memory"]["placed"] == []
    with pytest.raises(ValueError, match="recall"):
        llm.invoke(LONG, recall=-1)


@pytest.fixture
def spied(monkeypatch):
    """Record what the memory is searched for and what it is asked to continue."""
    seen = {"searched": [], "streamed": []}
    retrieve, place, stream = ContextMemory.retrieve, ContextMemory.place, ContextMemory.stream

    def spy_retrieve(self, query, *args, **kwargs):
        seen["searched"].append(query)
        return retrieve(self, query, *args, **kwargs)

    def spy_place(self, query, *args, **kwargs):
        seen["searched"].append(query)
        return place(self, query, *args, **kwargs)

    def spy_stream(self, prompt, *args, **kwargs):
        seen["streamed"].append((prompt, kwargs))
        return stream(self, prompt, *args, **kwargs)

    monkeypatch.setattr(ContextMemory, "retrieve", spy_retrieve)
    monkeypatch.setattr(ContextMemory, "place", spy_place)
    monkeypatch.setattr(ContextMemory, "stream", spy_stream)
    return seen


def test_a_continued_turn_places_what_the_last_message_finds_as_a_chat_turn_does(llm, tiny_memory, spied):
    question = LONG[-1].content
    reply = llm.invoke([*LONG, AIMessage("The keys are kept by")], continue_final_message=True, explain=True)
    # Searched for the question, not for the template text the turn is written as.
    assert spied["searched"] and set(spied["searched"]) == {question}
    [(prompt, kwargs)] = spied["streamed"]
    assert kwargs["recall"] == 0 and kwargs["chat"] is False  # placed here: the core adds nothing more
    placed = reply.response_metadata["memory"]["placed"]
    assert placed and placed[0]["text"] in FACT
    # Written as the core writes them before a chat turn: a system message, then the assistant's turn.
    fmt = ChatFormat(tiny_memory.tokenizer)
    passages = "\n".join(h["text"] for h in reversed(placed))
    header = fmt.message_text("system", f"Earlier in this conversation:\n{passages}", first=False)
    assert prompt == header + fmt.generation_prompt + "The keys are kept by"
    assert reply.usage_metadata["input_tokens"] == len(tiny_memory) + len(
        tiny_memory.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    )
    assert reply.response_metadata["memory"]["attended"]


def test_a_guided_call_places_once_and_explains_what_its_generations_attended(llm, spied):
    @tool
    def lookup(person: str) -> str:
        """Look a person up."""
        return person

    reply = llm.bind_tools([lookup], tool_choice="lookup").invoke(LONG, max_tokens=8, explain=True)
    assert len(reply.tool_calls) + len(reply.invalid_tool_calls) == 1
    assert set(spied["searched"]) == {LONG[-1].content} and len(spied["searched"]) == 1  # searched once
    memory = reply.response_metadata["memory"]
    assert memory["placed"] and memory["placed"][0]["text"] in FACT
    attended = memory["attended"]
    assert 0 < len(attended) <= 4 and all(h["channels"] == ["attended"] for h in attended)
    assert [h["score"] for h in attended] == sorted((h["score"] for h in attended), reverse=True)
