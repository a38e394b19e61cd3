"""A FunctionAgent on the embedded SmolLM2-135M: a forced tool call whose argument the model writes
from the question, the tool's result, and an answer built on it; the README's "Agents" snippet."""

from __future__ import annotations

import pytest
from llama_index.core.agent.workflow import FunctionAgent, ToolCallResult

from llama_index_memory_plugin import ContextMemoryLLM

pytestmark = pytest.mark.real_model

WEATHER = {"Paris": "sunny, 21 degrees"}


@pytest.mark.asyncio
async def test_a_function_agent_calls_the_forced_tool_with_the_argument_from_the_question(real_model):
    model, tokenizer = real_model
    # --- the README's "Agents" snippet, with the loaded model instead of from_pretrained() ---
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return WEATHER.get(city, "unknown")

    llm = ContextMemoryLLM(model=model, tokenizer=tokenizer, max_new_tokens=24)
    agent = FunctionAgent(tools=[get_weather], llm=llm, initial_tool_choice="get_weather")
    handler = agent.run(user_msg="What is the weather in Paris?")
    results = [ev async for ev in handler.stream_events() if isinstance(ev, ToolCallResult)]
    answer = await handler
    # ---
    [result] = results
    assert result.tool_name == "get_weather" and result.tool_kwargs == {"city": "Paris"}
    assert result.tool_output.content == WEATHER["Paris"]
    assert "21" in answer.response.content  # the answer is built on the tool's result
