"""What a process holds against what the memory accounts for, all in RAM (issue 24, target 4's
second half), with and without handing freed heap pages back (``blocks.release_free_memory``).

Memory is anonymous RSS (``RssAnon``): the embedded model loads from its kept safetensors copy,
memory-mapped, so its weight pages join RSS (as file pages) only when a forward first reads them.

    python benchmarks/heap.py build --tokens 65536 --dir /tmp/m64k      # the passkey history, saved
    python benchmarks/heap.py compare --dir /tmp/m64k --turns 3 --out benchmarks/results/heap/64k.json
    python benchmarks/heap.py compare --dir /tmp/m64k --turns 3 --budget-mb 1024 --mmap-thresholds 65536 1048576 0 \
        --out benchmarks/results/heap/64k-budget.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # passkey.py, persistence.py: the turn they time

def anon_mib() -> float:
    line = next(ln for ln in open("/proc/self/status") if ln.startswith("RssAnon"))
    return int(line.split()[1]) / 1024


def build(tokens: int, directory: Path, overrides: list[str] = ()) -> None:
    import torch

    torch.set_num_threads(1)
    from passkey import _config

    from memory_plugin import ContextMemory, load_model
    from memory_plugin.tasks import passkey_history

    model, tok = load_model()
    mem = ContextMemory(model, tokenizer=tok, config=_config(list(overrides)))
    mem.add_text(passkey_history(tok, tokens, 0.5, "62950"))
    mem.save(directory)
    print(json.dumps({"tokens": len(mem), "dir": str(directory)}))


def measure(
    directory: Path, turns: int, release: bool, budget_mb: int | None = None, mallopt: int | None = None
) -> dict:
    """One process: load (all in RAM, or with a RAM budget of ``budget_mb``), answer, ``turns``
    turns as ``persistence.py`` times them (a ~200-token message, 32 tokens decoded, rolled back);
    anonymous RSS beyond the model and the memory's accounted bytes after each, and the peak.
    ``mallopt``: under a budget, the mmap threshold the memory sets (None: the library's
    ``blocks.ALLOC_MMAP_THRESHOLD``; 0: none set, glibc's dynamic threshold)."""
    import torch

    torch.set_num_threads(1)
    from passkey import _turn_message
    from persistence import PeakRSS, _cpu_turn

    from memory_plugin import ContextMemory, blocks, engine, load_model, memory, persistence, turns as turns_mod
    from memory_plugin.tasks import QUESTION

    if mallopt is not None:
        blocks.ALLOC_MMAP_THRESHOLD = mallopt  # read when the memory sets it
        if mallopt == 0:
            memory.return_freed_memory_to_os = lambda: False

    trims = []

    def timed(min_interval_s=blocks.TRIM_INTERVAL_S):
        t = time.perf_counter()
        ran = real(min_interval_s)
        if ran:
            trims.append(time.perf_counter() - t)
        return ran

    real = blocks.release_free_memory
    for mod in (engine, turns_mod, persistence):
        mod.release_free_memory = timed if release else (lambda *a: False)
    model, tok = load_model()
    base = anon_mib()
    peak = PeakRSS(read=anon_mib)
    mem = ContextMemory.load(directory, model, tokenizer=tok, max_resident_bytes=budget_mb and budget_mb * 2**20)

    def point(name: str) -> dict:
        st = mem.stats()
        accounted = (st.bytes["host"] + st.bytes["device"]) / 2**20
        held = anon_mib() - base
        return {"at": name, "held_mib": held, "accounted_mib": accounted, "ratio": held / accounted}

    rows = [point("loaded")]
    answer = mem.generate(QUESTION, max_new_tokens=8, chat=False)
    rows.append(point("answered"))
    msg, cpu = _turn_message(tok), []
    for i in range(turns):
        cpu.append(_cpu_turn(mem, msg)[0])
        rows.append(point(f"turn {i + 1}"))
    return {
        "release": release, "budget_mb": budget_mb, "mallopt": mallopt, "tokens": len(mem), "answer": answer,
        "points": rows, "peak_beyond_model_mib": peak.peak - base, "turn_cpu_s": cpu,
        "turn_cpu_median_s": statistics.median(cpu) if cpu else None, "trim_ms": [t * 1e3 for t in trims],
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--tokens", type=int, default=65536)
    b.add_argument("--dir", type=Path, required=True)
    b.add_argument("--set", action="append", default=[], help="MemoryConfig override, e.g. repr_heads=kv")
    m = sub.add_parser("measure")
    m.add_argument("--dir", type=Path, required=True)
    m.add_argument("--turns", type=int, default=3)
    m.add_argument("--no-release", action="store_true")
    m.add_argument("--budget-mb", type=int)
    m.add_argument("--mmap-threshold", type=int, help="under a budget (default: the library's; 0: none set)")
    c = sub.add_parser("compare", help="measure in fresh processes: all in RAM, release off then on; "
                       "with --budget-mb, each --mmap-thresholds (release on)")  # fmt: skip
    c.add_argument("--dir", type=Path, required=True)
    c.add_argument("--turns", type=int, default=3)
    c.add_argument("--budget-mb", type=int)
    c.add_argument("--mmap-thresholds", type=int, nargs="+", default=[65536, 0])
    c.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    if a.cmd == "build":
        build(a.tokens, a.dir, a.set)
    elif a.cmd == "measure":
        print(json.dumps(measure(a.dir, a.turns, not a.no_release, a.budget_mb, a.mmap_threshold)))
    else:
        runs = []
        arms = [["--no-release"], []]
        if a.budget_mb is not None:
            arms = [["--budget-mb", str(a.budget_mb), "--mmap-threshold", str(t)] for t in a.mmap_thresholds]
        for flag in arms:
            cmd = [sys.executable, __file__, "measure", "--dir", str(a.dir), "--turns", str(a.turns), *flag]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
            r = runs[-1]
            points = [(x["at"], round(x["held_mib"]), round(x["ratio"], 3)) for x in r["points"]]
            summary = {"release": r["release"], "mallopt": r["mallopt"], "peak": round(r["peak_beyond_model_mib"])}
            print(json.dumps({**summary, "turn_cpu_median_s": r["turn_cpu_median_s"], "points": points}), flush=True)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
