"""The shipped examples as an accuracy benchmark for MemoryConfig defaults: agent histories past the
trained context whose facts are numbers among many similar numbers, which passkey filler is not.

Each example runs unmodified, as a user runs it, in its own process, with the MemoryConfig
defaults replaced by the grid row (the examples build their memory with the default config, so
changing the defaults is the only way to change theirs without editing them):

* ``demo``: examples/demo.py, five facts planted in early tool outputs (score: questions right);
* ``langchain``: examples/langchain_agent.py, one fact 8k tokens back (score: the prefilled answer
  holds it; the open question is reported too);
* ``llama_index``: the LlamaIndex real-model test (a pass key in one of 20 documents, asked
  through the query engine; score: its tests pass).

    python benchmarks/agent_tasks.py --grid "topk=8" "topk=16" "topk=16,n_local=1024" --out benchmarks/results/agent_tasks
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("demo", "langchain", "llama_index")


def _overrides(spec: str) -> dict:
    return {k: int(v) if v.isdigit() else v for k, v in (x.split("=", 1) for x in spec.split(",") if x)}


def _child(task: str, spec: str) -> None:
    """Run one task with the MemoryConfig defaults replaced (explicit arguments still win)."""
    import memory_plugin.config as config

    init, changes = config.MemoryConfig.__init__, _overrides(spec)

    def patched(self, *args, **kwargs):
        init(self, *args, **{**changes, **kwargs})

    config.MemoryConfig.__init__ = patched
    sys.path.insert(0, str(ROOT / "examples"))
    if task == "demo":
        sys.argv = ["demo.py"]
        import demo

        demo.main()
    elif task == "langchain":
        sys.argv = ["langchain_agent.py"]
        import langchain_agent

        langchain_agent.main()
    else:
        import pytest

        test = ROOT / "integrations/llama_index/tests/test_llamaindex_real_model.py"
        raise SystemExit(pytest.main(["-q", "-p", "no:cacheprovider", str(test)]))


def _score(task: str, out: str) -> dict:
    if task == "demo":
        m = re.search(r"correct: ContextMemory (\d+)/(\d+), truncation (\d+)/(\d+)", out)
        return {"right": int(m[1]), "asked": int(m[2]), "truncation_right": int(m[3])}
    if task == "langchain":
        recalled = re.search(r"recalled by: (.*)\.", out)[1]
        answers = dict(re.findall(r"^  (open question|with a prefill) +('.*?')  \(", out, re.M))
        return {"right": int("with a prefill" in recalled), "asked": 1, "recalled_by": recalled, "answers": answers}
    m = re.search(r"(\d+) passed", out)
    failed = re.search(r"(\d+) failed", out)
    return {"right": int(not failed), "asked": 1, "passed": int(m[1]) if m else 0, "failed": int(failed[1]) if failed else 0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", nargs="+", default=["topk=8", "topk=16"], help="configs as 'k=v,k=v' strings")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/agent_tasks"))
    p.add_argument("--child", nargs=2, metavar=("TASK", "CONFIG"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return _child(*a.child)
    a.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    for spec in a.grid:
        rows = {}
        for task in a.tasks:
            t = time.time()
            run = subprocess.run([sys.executable, __file__, "--child", task, spec], capture_output=True, text=True, env=env)
            out = run.stdout + run.stderr
            if run.returncode and task != "llama_index":  # a failing test is a score; a crash is not
                raise SystemExit(f"{task} with {spec!r} exited {run.returncode}:\n{out[-2000:]}")
            rows[task] = {**_score(task, out), "seconds": round(time.time() - t, 1), "output": run.stdout}
            print(f"{spec:>24} {task:>12}: {rows[task]['right']}/{rows[task]['asked']} ({rows[task]['seconds']:.0f}s)", flush=True)
        (a.out / f"{spec.replace(',', '_') or 'default'}.json").write_text(json.dumps({"config": spec, "tasks": rows}, indent=1))


if __name__ == "__main__":
    main()
