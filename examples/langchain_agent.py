"""A LangGraph agent on the embedded SmolLM2-135M whose history grows past 8k tokens (the model's
trained context), then answers from a fact that only its first tool result contained.

The agent is a LangGraph graph (agent -> tools) over ContextMemoryChatModel with three small
deterministic tools, checkpointed per thread: each user step is one model call and one tool call.
LangGraph resends the whole conversation on every model call; the chat model keeps it in a
ContextMemory keyed by the thread_id, so each call encodes only the new messages: the table shows
per-call latency and how many tokens were reused.

A 135M model neither decides reliably when to call a tool nor which one, so when a step names a
tool the agent forces that call (tool_choice=<name>) and the model writes the arguments (guided by
the tool's schema); questions are answered in words (tool_choice="none"), openly and then with a
completion-style start of the answer that the model continues (continue_final_message=True).

    python examples/langchain_agent.py [--steps 11]
"""

from __future__ import annotations

import argparse
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from langchain_core.messages import AIMessage, HumanMessage, ToolMessage  # noqa: E402
from langchain_core.tools import tool  # noqa: E402
from langgraph.checkpoint.memory import InMemorySaver  # noqa: E402
from langgraph.graph import END, START, MessagesState, StateGraph  # noqa: E402
from langgraph.prebuilt import ToolNode, tools_condition  # noqa: E402

from langchain_memory_plugin import ContextMemoryChatModel  # noqa: E402

SERVICES = ["billing", "search", "auth", "storage", "mailer", "scheduler", "gateway"]
CONFIGS = {"billing": "database_port = 5433\nreplicas = 3", "search": "index_shards = 12\nreplicas = 2"}


def _service(name: str) -> str:
    """'Billing', 'billing_service' and 'the billing service' all name the billing service."""
    words = name.lower().replace("_", " ").replace("-", " ").split()
    return " ".join(w for w in words if w not in ("the", "service")) or name


@tool
def read_config(service: str) -> str:
    """Read the configuration file of a service."""
    body = CONFIGS.get(_service(service), "replicas = 1")
    return f"read_config({service!r}) result:\n{body}\nstatus = ok"


@tool
def scan_logs(service: str, hour: int) -> str:
    """Scan one hour of a service's logs."""
    rng = random.Random(f"{service}:{hour}")
    lines = [f"scan_logs({service!r}, hour={hour}) returned 16 lines:"]
    for i in range(16):
        lines.append(
            f"{hour:02d}:{rng.randrange(60):02d} worker {rng.choice('abcdefg')}{rng.randrange(9)} finished job "
            f"{rng.randrange(10000)}-{i}: {rng.choice(['ok', 'ok', 'retried', 'slow'])}, queue "
            f"{rng.choice(['low', 'normal', 'high'])}, cache {rng.choice(['warm', 'cold'])}, "
            f"latency {rng.randrange(5, 900)} ms, host node-{rng.randrange(40)}."
        )
    return "\n".join(lines)


@tool
def disk_usage(host: str) -> str:
    """Disk usage of a host, in percent."""
    return f"disk_usage({host!r}) = {random.Random(host).randrange(20, 95)}%"


TOOLS = [read_config, scan_logs, disk_usage]


def build_agent(llm: ContextMemoryChatModel, calls: list[dict]):
    def agent(state: MessagesState) -> dict:
        last = state["messages"][-1]
        step = isinstance(last, HumanMessage) and last.content.startswith("Step")
        named = [t.name for t in TOOLS if t.name in last.content] if step else []
        # A step that names a tool gets that call; anything else is answered in words (the tools stay
        # listed, so the prompt, and the memory, are the same as for the steps).
        if len(named) == 1:
            model = llm.bind_tools(TOOLS, tool_choice=named[0])
        else:
            model = llm.bind_tools(TOOLS, tool_choice="none", max_tokens=16)
        t = time.perf_counter()
        reply = model.invoke(state["messages"])
        usage = reply.usage_metadata
        calls.append(
            {
                "kind": "tool call" if reply.tool_calls else ("invalid call" if reply.invalid_tool_calls else "reply"),
                "seconds": time.perf_counter() - t,
                "input": usage["input_tokens"],
                "reused": usage["input_token_details"]["cache_read"],
                "what": _describe(reply),
            }
        )
        return {"messages": [reply]}

    graph = StateGraph(MessagesState)
    graph.add_node("agent", agent)
    graph.add_node("tools", ToolNode(TOOLS, handle_tool_errors=True))
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", tools_condition, {"tools": "tools", END: END})
    graph.add_edge("tools", END)  # the step is done; the next one comes from the user
    return graph.compile(checkpointer=InMemorySaver())


def _describe(reply) -> str:
    if reply.tool_calls:
        calls = [f"{c['name']}({', '.join(f'{k}={v!r}' for k, v in c['args'].items())})" for c in reply.tool_calls]
        return ", ".join(calls)
    if reply.invalid_tool_calls:
        return "invalid: " + reply.invalid_tool_calls[0]["args"][:50].replace("\n", " ")
    return repr(reply.content[:50])


def tasks(steps: int) -> list[str]:
    out = ["Step 0: call read_config for the billing service."]
    for i in range(1, steps + 1):
        out.append(f"Step {i}: call scan_logs for the {SERVICES[i % len(SERVICES)]} service, hour {i}.")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=11, help="log scans after the first config read (~740 tokens each)")
    args = p.parse_args()

    system = "You are an operations agent. Use the tools to do each step."
    llm = ContextMemoryChatModel(max_tokens=48)
    t = time.perf_counter()
    llm.get_token_ids("load")  # load the model now, not inside the first call's timing
    print(f"Loaded the embedded model in {time.perf_counter() - t:.0f}s; trained context 8192 tokens.\n")
    calls: list[dict] = []
    agent = build_agent(llm, calls)
    config = {"configurable": {"thread_id": "ops-1"}}

    print(f"{'#':>3} {'call':<12} {'seconds':>7} {'input tok':>9} {'reused':>7}  what")
    t0 = time.perf_counter()
    for i, task in enumerate(tasks(args.steps)):
        new = [("system", system), HumanMessage(task)] if i == 0 else [HumanMessage(task)]
        n = len(calls)
        agent.invoke({"messages": new}, config)
        for j, c in enumerate(calls[n:], start=n):
            print(f"{j:>3} {c['kind']:<12} {c['seconds']:>7.1f} {c['input']:>9} {c['reused']:>7}  {c['what']}")
    # Asked openly, a 135M model answers in its own words and gets numbers wrong; started like the
    # line it should recall (an assistant prefill, continued by the model), it completes it.
    question = "Question: what database_port did the billing config report?"
    prefill = "The billing config reported database_port ="
    n = len(calls)
    state = agent.invoke({"messages": [HumanMessage(question)]}, config)
    results = [("open question", state["messages"][-1].content, calls[n])]
    # The same question on the same thread (its memory is reused), the answer started for the model.
    # Sent to the model directly, so the open answer above is not part of this conversation.
    asked = [*state["messages"][:-1], AIMessage(prefill)]
    t = time.perf_counter()
    reply = llm.bind_tools(TOOLS, tool_choice="none", max_tokens=8, continue_final_message=True).invoke(asked, config)
    usage = reply.usage_metadata
    results.append(
        ("with a prefill", reply.content, {"seconds": time.perf_counter() - t, "input": usage["input_tokens"],
                                           "reused": usage["input_token_details"]["cache_read"]})
    )
    tool_results = [m for m in state["messages"] if isinstance(m, ToolMessage)]
    history = results[0][2]["input"]
    print(f"\nHistory: {history} tokens, {len(tool_results)} tool results ({time.perf_counter() - t0:.0f}s in all).")
    print(question)
    for label, answer, c in results:
        shown = answer if label == "open question" else f"{prefill}{answer}"
        print(f"  {label:<15} {shown!r}  ({c['seconds']:.1f}s; {c['reused']} of {c['input']} input tokens reused)")
    first = tool_results[0].content.splitlines()[1]
    back = history - calls[1]["input"]  # everything after the first tool result
    recalled = [label for label, answer, _ in results if "5433" in answer]
    print(f"\nThe fact ({first!r}) was only in the first tool result, over {back} tokens back; "
          f"recalled by: {', '.join(recalled) or 'neither'}.")

if __name__ == "__main__":
    main()
