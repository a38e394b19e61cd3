"""langchain.agents.create_agent on ContextMemoryChatModel with a SqliteSaver checkpointer (issue 20,
item 2): turns with real tool calls, the process stops, a new one opens the same checkpointer file
and memory directory and continues the thread, encoding only the new messages.

On the tiny model the first part runs in a subprocess that exits, the second in another one; on the
embedded model the second part is a new chat model in the test process. AGENT is the snippet of the README's "Agents" section."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The README's snippet: a tool, a middleware that forces the call a message names (a 135M model does
# not decide that reliably) and lets the model answer a tool result, the agent on a SqliteSaver.
AGENT = '''
import sqlite3

from langchain.agents import create_agent
from langchain.agents.middleware import AgentMiddleware
from langchain_core.messages import HumanMessage
from langchain_core.tools import tool
from langgraph.checkpoint.sqlite import SqliteSaver

from langchain_memory_plugin import ContextMemoryChatModel


@tool
def lookup_vault(name: str) -> str:
    """Look up the code of a vault."""
    return f"The {name} vault code is 4721."


class ForceNamedTool(AgentMiddleware):
    """A message naming a tool gets that call; a tool result (or anything else) is answered in words."""

    def wrap_model_call(self, request, handler):
        last = request.messages[-1]
        named = [t.name for t in request.tools if isinstance(last, HumanMessage) and t.name in last.text]
        return handler(request.override(tool_choice=named[0] if named else "none"))


def build_agent(llm: ContextMemoryChatModel, db: str):
    saver = SqliteSaver(sqlite3.connect(db, check_same_thread=False))
    return create_agent(llm, tools=[lookup_vault], middleware=[ForceNamedTool()], checkpointer=saver)
'''

TINY = '''
from memory_plugin import ContextMemory, testing

tok = testing.tiny_tokenizer()
memory = ContextMemory(testing.tiny_llama(len(tok)), tok, testing.TINY_CONFIG)
llm = ContextMemoryChatModel(memory=memory, memory_dir=MEMORY_DIR, max_tokens=4)
'''

# Runs turns on the thread and prints, per model call, the kind of reply and its token usage.
RUN = '''
import json, sys
DB, MEMORY_DIR, TURNS = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
{agent}
{model}
agent = build_agent(llm, DB)
config = {{"configurable": {{"thread_id": "ops-1"}}}}
for turn in TURNS:
    state = agent.invoke({{"messages": [HumanMessage(turn)]}}, config)
calls = [{{"type": m.type, "tool_calls": len(getattr(m, "tool_calls", [])), "usage": getattr(m, "usage_metadata", None),
          "text": m.text}} for m in state["messages"]]
print("RESULT" + json.dumps(calls))
llm.close()
'''


def run_process(tmp_path, turns: list[str], model: str = TINY) -> list[dict]:
    """Run ``turns`` on thread ops-1 in a new Python process that exits; its messages, as dicts."""
    script = RUN.format(agent=AGENT, model=model)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = [sys.executable, "-c", script, str(tmp_path / "checkpoints.db"), str(tmp_path / "memories"), json.dumps(turns)]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def cache_read(msg: dict) -> int:
    return msg["usage"]["input_token_details"]["cache_read"]


def stored(msg: dict, tokenizer) -> int:
    """Tokens a call left in the memory: its input without the generation prompt."""
    from memory_plugin.chat import ChatFormat

    gen = len(tokenizer(ChatFormat(tokenizer).generation_prompt, add_special_tokens=False)["input_ids"])
    return msg["usage"]["input_tokens"] - gen


def test_create_agent_continues_its_thread_in_a_new_process_encoding_only_new_messages(tmp_path, tiny_tokenizer):
    before = run_process(tmp_path, ["Call lookup_vault for the main vault."])
    assert [m["type"] for m in before] == ["human", "ai", "tool", "ai"]
    assert before[1]["tool_calls"] == 1 and "4721" in before[2]["text"]  # the tool really ran
    answer = before[3]
    assert cache_read(answer) == stored(before[1], tiny_tokenizer)  # the tool result was all it encoded

    after = run_process(tmp_path, ["Call lookup_vault for the spare vault.", "Thanks."])
    assert [m["type"] for m in after] == ["human", "ai", "tool", "ai"] * 2 + ["human", "ai"]  # the thread, continued
    assert after[:4] == before
    first = after[5]  # the new process's first model call: the memory from disk held all before it
    assert first["tool_calls"] == 1 and cache_read(first) == stored(answer, tiny_tokenizer)
    assert after[6]["text"].endswith("vault code is 4721.")  # the tool ran again
    assert cache_read(after[7]) == stored(first, tiny_tokenizer)
    assert after[9]["tool_calls"] == 0 and cache_read(after[9]) == stored(after[7], tiny_tokenizer)


@pytest.mark.real_model
def test_the_embedded_model_answers_a_fact_from_before_the_restart(tmp_path):
    """The restart as a new chat model on the same directory and checkpoint file, in this process:
    the process restart itself is the tiny test's; a subprocess here would load the GGUF again
    (~50 s of CI for no more coverage)."""
    from langchain_core.messages import HumanMessage

    from langchain_memory_plugin._loading import load_shared_model

    namespace: dict = {}
    exec(AGENT, namespace)  # the README's snippet
    config = {"configurable": {"thread_id": "ops-1"}}

    def agent_run(text: str) -> dict:
        llm = namespace["ContextMemoryChatModel"](memory_dir=tmp_path / "memories", max_tokens=12)
        try:
            return namespace["build_agent"](llm, str(tmp_path / "checkpoints.db")).invoke({"messages": [HumanMessage(text)]}, config)
        finally:
            llm.close()  # the memory's final snapshot; its directory released

    before = agent_run("Call lookup_vault for the main vault.")["messages"]
    assert before[1].tool_calls and "4721" in before[2].text  # the tool really ran
    state = agent_run("What is the main vault code?")  # a new model: its memory from disk only
    reply = state["messages"][-1]
    assert len(state["messages"]) == 6
    tokenizer = load_shared_model()[1]  # the model the chat model loaded
    as_dict = {"usage": before[3].usage_metadata}
    assert reply.usage_metadata["input_token_details"]["cache_read"] == stored(as_dict, tokenizer)
    assert "4721" in reply.text


def test_the_readme_shows_the_snippet_these_tests_run():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert AGENT.strip() in readme
