"""A LangChain 1.x agent (langchain.agents.create_agent) on the embedded SmolLM2-135M whose thread
survives a restart: a tool turn in one process, then a new process on the same SqliteSaver file
and memory directory continues the thread and answers from what the tool returned before.

ContextMemoryChatModel(memory_dir=...) keeps each thread's memory in a directory; the checkpointer
keeps the thread's messages. After the restart, the agent resends the whole thread and the chat
model reopens its memory from disk: `cache_read` (usage_metadata's input_token_details) shows that
only the new messages were encoded.

A 135M model does not decide reliably when to call a tool, so a small middleware forces the call
that a user message names (tool_choice=<name>) and lets the model answer a tool result in words.

    python examples/langchain_create_agent.py [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import sqlite3
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from langchain.agents import create_agent  # noqa: E402
from langchain.agents.middleware import AgentMiddleware  # noqa: E402
from langchain_core.messages import HumanMessage  # noqa: E402
from langchain_core.tools import tool  # noqa: E402
from langgraph.checkpoint.sqlite import SqliteSaver  # noqa: E402

from langchain_memory_plugin import ContextMemoryChatModel  # noqa: E402

THREAD = {"configurable": {"thread_id": "ops-1"}}
BEFORE = ["Call lookup_vault for the main vault."]
AFTER = ["What is the main vault code?"]


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


def run_phase(directory: str, turns: list[str]) -> None:
    """One process's part: run ``turns`` on the thread and print every model call of this process."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the GGUF's de-quantization bar
    t = time.perf_counter()
    llm = ContextMemoryChatModel(memory_dir=os.path.join(directory, "memories"), max_tokens=24)
    agent = build_agent(llm, os.path.join(directory, "checkpoints.db"))
    seen = len(agent.get_state(THREAD).values.get("messages", []))
    print(f"  process {os.getpid()}: the checkpoint holds {seen} messages of thread ops-1")
    for turn in turns:
        state = agent.invoke({"messages": [HumanMessage(turn)]}, THREAD)
    for m in state["messages"][seen:]:
        if m.type == "ai":
            u = m.usage_metadata
            what = ", ".join(f"{c['name']}({c['args']})" for c in m.tool_calls) or repr(m.text)
            print(f"  model call: {u['input_tokens']:>4} input tokens, cache_read {u['input_token_details']['cache_read']:>4}"
                  f" -> {what}")
        else:
            print(f"  {m.type:>5}: {m.text!r}")
    llm.close()
    print(f"  ({time.perf_counter() - t:.0f}s with loading the model)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", help="where the checkpoint file and memories go (default: a new temporary directory)")
    p.add_argument("--phase", choices=["before", "after"], help=argparse.SUPPRESS)  # the child processes
    args = p.parse_args()
    if args.phase:
        run_phase(args.dir, BEFORE if args.phase == "before" else AFTER)
        return
    directory = args.dir or tempfile.mkdtemp(prefix="create-agent-")
    for phase in ("before", "after"):
        print(f"{'First' if phase == 'before' else 'After the restart, a new'} process:")
        subprocess.run([sys.executable, __file__, "--dir", directory, "--phase", phase], check=True)
    print(f"\nCheckpoints and memories are in {directory}; run again with --dir to continue the thread.")


if __name__ == "__main__":
    main()
