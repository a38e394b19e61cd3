"""Real clients against the memory server on a loopback port: the ``openai`` package (sync, async,
streaming, tools, responses), LangChain's ``ChatOpenAI`` (chat completions, and the responses API
with previous response ids) and LlamaIndex's ``OpenAILike``; one question on the embedded model."""

from __future__ import annotations

import asyncio

import pytest

openai = pytest.importorskip("openai")

from memory_plugin import MemoryPool, testing  # noqa: E402
from memory_plugin.server import create_app  # noqa: E402
from .test_server import MODEL, running, serve  # noqa: E402, F401

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_openai_sync_async_and_streaming(serve):
    with serve() as (url, _):
        client = openai.OpenAI(base_url=url, api_key="unused")
        assert [m.id for m in client.models.list()] == [MODEL]
        msgs = [{"role": "user", "content": "Where is the blue folder?"}]
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=msgs, max_tokens=3, seed=1, temperature=0.8, top_p=0.9)
        first = raw.parse()
        thread = raw.headers["x-thread-id"]
        assert first.usage.prompt_tokens_details.cached_tokens == 0 and first.usage.completion_tokens <= 3
        msgs += [{"role": "assistant", "content": first.choices[0].message.content or "ok"}, {"role": "user", "content": "Sure?"}]

        async def run_async():
            aclient = openai.AsyncOpenAI(base_url=url, api_key="unused")
            reply = await aclient.chat.completions.create(model=MODEL, messages=msgs, max_tokens=3, extra_headers={"X-Thread-Id": thread})
            stream = await aclient.chat.completions.create(
                model=MODEL, messages=msgs, max_tokens=3, stream=True, stream_options={"include_usage": True},
                prompt_cache_key=thread,
            )  # fmt: skip
            chunks = [c async for c in stream]
            return reply, chunks

        reply, chunks = asyncio.run(run_async())
        assert reply.usage.prompt_tokens_details.cached_tokens > 0
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert isinstance(text, str) and chunks[-2].choices[0].finish_reason in ("stop", "length")

        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=0)
        assert e.value.body["param"] == "max_tokens"
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])


def test_openai_tools_round_trip(serve):
    with serve() as (url, _):
        client = openai.OpenAI(base_url=url, api_key="unused")
        msgs = [{"role": "user", "content": "Weather in Paris?"}]
        forced = client.chat.completions.create(
            model=MODEL, messages=msgs, tools=[WEATHER], max_tokens=8,
            tool_choice={"type": "function", "function": {"name": "get_weather"}}, extra_headers={"X-Thread-Id": "tools"},
        )  # fmt: skip
        choice = forced.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls[0].function.name == "get_weather"
        # A streamed forced call arrives as a tool-call delta.
        stream = client.chat.completions.create(
            model=MODEL, messages=msgs, tools=[WEATHER], max_tokens=8, tool_choice="required", stream=True,
            extra_headers={"X-Thread-Id": "tools"},
        )  # fmt: skip
        deltas = [c.choices[0].delta.tool_calls for c in stream if c.choices and c.choices[0].delta.tool_calls]
        assert deltas and deltas[0][0].function.name == "get_weather"
        # The client runs the tool and sends the call and its result back: stored in the core's format.
        call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        msgs += [{"role": "assistant", "content": None, "tool_calls": [call]},
                 {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"}]  # fmt: skip
        after = client.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], tool_choice="none", max_tokens=3,
                                               extra_headers={"X-Thread-Id": "tools"})  # fmt: skip
        assert after.choices[0].message.tool_calls is None
        assert after.usage.prompt_tokens_details.cached_tokens > 0  # the tool offer and question were reused
        import httpx

        held = httpx.get(f"{url}/threads/tools/messages").json()["data"]
        assert [m["role"] for m in held] == ["system", "user", "assistant", "tool"]
        assert "get_weather" in held[0]["content"]
        assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in held[2]["content"]


def test_openai_responses_stream_and_previous_id(serve):
    with serve() as (url, _):
        client = openai.OpenAI(base_url=url, api_key="unused")
        first = client.responses.create(model=MODEL, input="My name is Ada.", instructions="Be brief.", max_output_tokens=3)
        with client.responses.stream(model=MODEL, input="What is my name?", previous_response_id=first.id,
                                     max_output_tokens=3) as stream:  # fmt: skip
            kinds = [event.type for event in stream]
            final = stream.get_final_response()
        assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
        assert final.conversation.id == first.conversation.id
        assert final.usage.input_tokens_details.cached_tokens > 0
        tool = {"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}}
        called = client.responses.create(model=MODEL, input="Look it up.", previous_response_id=final.id, tools=[tool],
                                         tool_choice={"type": "function", "name": "lookup"}, max_output_tokens=6)  # fmt: skip
        call = next(item for item in called.output if item.type == "function_call")
        assert call.name == "lookup"
        done = client.responses.create(
            model=MODEL, previous_response_id=called.id, max_output_tokens=3,
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Ada Lovelace"}],
        )  # fmt: skip
        assert done.usage.input_tokens_details.cached_tokens > called.usage.input_tokens_details.cached_tokens


def test_langchain_chat_openai(serve):
    lc = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage

    with serve() as (url, _):
        llm = lc.ChatOpenAI(base_url=url, api_key="unused", model=MODEL, max_tokens=3, default_headers={"X-Thread-Id": "lc"})
        first = llm.invoke([HumanMessage("Remember: the port is 5432.")])
        second = llm.invoke([HumanMessage("Remember: the port is 5432."), first, HumanMessage("Which port?")])
        assert second.usage_metadata["input_token_details"]["cache_read"] > 0
        chunks = list(llm.stream("Hello"))
        assert chunks and all(isinstance(c.content, str) for c in chunks)

        stateful = lc.ChatOpenAI(base_url=url, api_key="unused", model=MODEL, max_tokens=3,
                                 use_responses_api=True, use_previous_response_id=True)  # fmt: skip
        history = [HumanMessage("The cat is called Tom.")]
        reply = stateful.invoke(history)
        assert reply.response_metadata["id"].startswith("resp_")
        history += [reply, HumanMessage("What is the cat called?")]
        again = stateful.invoke(history)  # sends only the last message, with the previous response id
        assert again.usage_metadata["input_token_details"]["cache_read"] > 0


def test_llama_index_openai_like(serve):
    oai_like = pytest.importorskip("llama_index.llms.openai_like")
    from llama_index.core.llms import ChatMessage

    with serve() as (url, _):
        llm = oai_like.OpenAILike(model=MODEL, api_base=url, api_key="unused", is_chat_model=True, max_tokens=3,
                                  default_headers={"X-Thread-Id": "li"})  # fmt: skip
        msgs = [ChatMessage(role="user", content="The key is under the mat.")]
        first = llm.chat(msgs)
        msgs += [first.message if first.message.content else ChatMessage(role="assistant", content="ok"),
                 ChatMessage(role="user", content="Where is the key?")]  # fmt: skip
        second = llm.chat(msgs)
        assert second.raw.usage.prompt_tokens_details.cached_tokens > 0
        assert isinstance("".join(r.delta or "" for r in llm.stream_chat(msgs)), str)
        assert isinstance(llm.complete("Hello").text, str)


@pytest.mark.real_model
def test_embedded_model_answers_over_http(tmp_path, real_model):
    model, tokenizer = real_model
    pool = MemoryPool(tmp_path, model, tokenizer)
    with running(create_app(pool, model_name="smollm2")) as url:
        client = openai.OpenAI(base_url=url, api_key="unused")
        reply = client.chat.completions.create(
            model="smollm2", max_tokens=12,
            messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        )  # fmt: skip
    assert "paris" in reply.choices[0].message.content.lower()
