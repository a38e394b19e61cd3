"""LangChain's own standard test suites (langchain-tests): the chat model's unit and integration
suites and the retriever's integration suite, on the embedded SmolLM2-135M-Instruct.

Integration tests the 135M model cannot pass for lack of quality (not because of this package) are
marked xfail with the reason; the counts are in ../README.md.
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, HumanMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests, RetrieversIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_memory_plugin import ContextMemoryChatModel, ContextMemoryRetriever, load_shared_model
from memory_plugin import ContextMemory, MemoryConfig
from memory_plugin.model import default_model_path


class TestContextMemoryChatModelUnit(ChatModelUnitTests):
    """Construction, parameters, tool binding and structured-output plumbing (no generation)."""

    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ContextMemoryChatModel

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {}


@pytest.mark.real_model
class TestContextMemoryChatModelIntegration(ChatModelIntegrationTests):
    """Every call runs the embedded model on CPU; replies are kept short to keep the suite quick."""

    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ContextMemoryChatModel

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"max_tokens": 16}

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supported_usage_metadata_details(self) -> dict:
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}

    @property
    def model_override_value(self) -> str:
        # The only model on this machine is the embedded one; named by its file it is another
        # model name for the override (its weights are shared, not loaded twice).
        return str(default_model_path())

    @pytest.mark.xfail(
        run=False,  # not run: a minute of CI for a known failure of the model, not of this package
        reason="json_mode leaves the JSON's shape to the model, and SmolLM2-135M nests the keys wrongly "
        "(e.g. {'setup': {'punchline': ...}}); method='json_schema' and function calling, where the keys "
        "come from the schema, pass test_structured_output"
    )
    def test_json_mode(self, model: BaseChatModel) -> None:
        super().test_json_mode(model)

    @pytest.mark.xfail(
        run=False,
        reason="with tool_choice='auto' SmolLM2-135M answers 'What is the weather in San Francisco?' in "
        "prose instead of calling get_weather; forced calls (tool_choice='any') pass test_tool_calling"
    )
    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    def test_agent_loop(self, model: BaseChatModel) -> None:
        super().test_agent_loop(model)

    def invoke_with_cache_read_input(self, *, stream: bool = False) -> AIMessage:
        """A conversation's second call, which reads the first call's tokens from memory."""
        llm = ContextMemoryChatModel(max_tokens=4)
        first = [HumanMessage("Remember: the code is 4721.")]
        grown = [*first, llm.invoke(first), HumanMessage("What is the code?")]
        if stream:
            chunks = list(llm.stream(grown))
            message = sum(chunks[1:], chunks[0])
        else:
            message = llm.invoke(grown)
        assert message.usage_metadata["input_token_details"]["cache_read"] > 0
        return message


_RETRIEVER_MEMORY: list[ContextMemory] = []


def _retriever_memory() -> ContextMemory:
    """A short history on the embedded model, with a geometry small enough to form memory blocks."""
    if not _RETRIEVER_MEMORY:
        model, tokenizer = load_shared_model()
        config = MemoryConfig(block_size=32, n_init=32, n_local=128, topk=2, repr_topk=4, chunk_size=64)
        mem = ContextMemory(model, tokenizer, config)
        mem.add_message("system", "You are an operations agent. Remember tool results.")
        mem.add_message("tool", "read_config result:\ndatabase_port = 5433\nstatus = ok")
        for service in ("billing", "search", "auth", "mailer"):
            mem.add_message("tool", f"scan_logs({service!r}): 12 workers finished; queues normal; cache warm.")
        mem.add_message("user", "Which port does the database use?")
        _RETRIEVER_MEMORY.append(mem)
    return _RETRIEVER_MEMORY[0]


@pytest.mark.real_model
class TestContextMemoryRetrieverIntegration(RetrieversIntegrationTests):
    @property
    def retriever_constructor(self) -> type[ContextMemoryRetriever]:
        return ContextMemoryRetriever

    @property
    def retriever_constructor_params(self) -> dict:
        return {"memory": _retriever_memory(), "k": 2}

    @property
    def retriever_query_example(self) -> str:
        return "database port"
