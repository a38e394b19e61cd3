"""Passkey accuracy, ingest throughput, per-turn latency and peak RSS on the embedded model:
ContextMemory against full attention, truncation and StreamingLLM, plus the model's own ceiling.

Accuracy and timings are separate runs: the accuracy run is long, the timing run (``perf``) short
enough to have the machine to itself. Each (method, history length) runs in its own process so
peak RSS is its own. Histories for
different needle depths and seeds share their filler prefix (checkpoint/rollback), which cuts
the CPU time about in half without changing what each question sees.

    python benchmarks/passkey.py all --lengths 2048 8192 16384 32768 65536 --out benchmarks/results/passkey
    python benchmarks/passkey.py report --out benchmarks/results/passkey
    python benchmarks/passkey.py one --method contextmemory --length 16384 --depths 5 --seeds 2 --set n_local=1024
    python benchmarks/passkey.py sweep --length 16384 --out benchmarks/results/sweep
    python benchmarks/passkey.py perf --out benchmarks/results/perf      # timings: on a quiet machine
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
METHODS = ("contextmemory", "streaming", "truncation", "full", "ceiling")
TURN_MESSAGE_TOKENS = 200
TURN_NEW_TOKENS = 32


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _model_rss_mb(model) -> float:
    """RSS with the model resident: the embedded model loads from a memory-mapped safetensors copy
    (loading.converted_dir), whose pages join RSS only when a forward first reads them; one
    one-token forward reads every weight, so they are not counted as the history's."""
    import torch

    with torch.no_grad():
        model(torch.zeros(1, 1, dtype=torch.long, device=model.device))
    return _rss_mb()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _depths(n: int) -> list[float]:
    return [round(0.05 + 0.9 * i / (n - 1), 3) for i in range(n)] if n > 1 else [0.5]


def _config(overrides: list[str]):
    from memory_plugin import MemoryConfig

    kw = {k: int(v) if v.isdigit() else v for k, v in (o.split("=", 1) for o in overrides)}
    return MemoryConfig(**kw)


def _build(method: str, model, tokenizer, cfg):
    from memory_plugin import ContextMemory
    from memory_plugin.baselines import FullAttention, Truncation

    if method == "contextmemory":
        return ContextMemory(model, tokenizer, cfg)
    if method == "streaming":  # sinks + sliding window over the same attention span, no retrieval
        return ContextMemory(model, tokenizer, cfg.replace(topk=0, n_local=cfg.span - cfg.n_init))
    if method == "truncation":
        return Truncation(model, tokenizer, window=cfg.span)
    if method in ("full", "ceiling"):
        return FullAttention(model, tokenizer)
    raise ValueError(f"unknown method {method!r}; one of {METHODS}")


def _turn_message(tokenizer) -> str:
    from memory_plugin.tasks import FILLER

    words = (FILLER * 40).split()
    n = len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"])
    return "Tool output: " + " ".join(words[: len(words) * TURN_MESSAGE_TOKENS // n])


def _timed(fn, *a, **kw):
    t = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t


def run_one(
    method: str, length: int, n_depths: int, n_seeds: int, overrides: list[str], dtype: str = "float32", partial: Path | None = None
) -> dict:
    """``partial``: rewrite this JSON after every question (``"partial": true``), so a run stopped
    before its last depth still leaves the questions it answered."""
    import torch

    from memory_plugin import load_model
    from memory_plugin.tasks import FILLER, QUESTION, filler_repeats, needle, passkey, passkey_history

    torch.manual_seed(0)
    model, tok = load_model(dtype=getattr(torch, dtype))
    cfg = _config(overrides)
    rss_model = _model_rss_mb(model)
    mem = _build(method, model, tok, cfg)
    depths = _depths(n_depths)
    rows = []
    if method == "ceiling":  # each needle alone in ~1k tokens, full attention
        for di, d in enumerate(depths):
            for s in range(n_seeds):
                key = passkey(1000 * s + di)
                mem.rollback(0)
                mem.add_text(passkey_history(tok, 1000, d, key))
                ans = mem.generate(QUESTION, max_new_tokens=8, chat=False)
                rows.append({"depth": d, "seed": s, "key": key, "answer": ans, "correct": key in ans})
        return _result(method, 1000, cfg, rows, rss_model, dtype)

    n_rep = filler_repeats(tok, length)
    done = 0
    for di, d in sorted(enumerate(depths), key=lambda x: x[1]):
        at = round(d * n_rep)
        if at > done:
            mem.add_text(FILLER * (at - done))
            done = at
        cp = mem.checkpoint()
        for s in range(n_seeds):
            key = passkey(1000 * s + di)
            mem.add_text(needle(key))
            mem.add_text(FILLER * (n_rep - at))
            ans = mem.generate(QUESTION, max_new_tokens=8, chat=False)
            rows.append({"depth": d, "seed": s, "key": key, "answer": ans, "correct": key in ans, "tokens": len(mem)})
            if partial:
                partial.write_text(json.dumps({**_result(method, length, cfg, rows, rss_model, dtype), "partial": True}, indent=1))
            mem.rollback(cp)
    return _result(method, length, cfg, rows, rss_model, dtype)


def perf_one(method: str, lengths: list[int], overrides: list[str], step: int = 2048, dtype: str = "float32") -> dict:
    """Grow one history to each length in turn; at each, the marginal ingest throughput (the last
    ``step`` tokens) and the median per-turn latency. Timings only: run it on a quiet machine."""
    import torch

    from memory_plugin import load_model
    from memory_plugin.tasks import FILLER

    model, tok = load_model(dtype=getattr(torch, dtype))
    cfg = _config(overrides)
    rss_model = _model_rss_mb(model)
    mem = _build(method, model, tok, cfg)
    msg = _turn_message(tok)
    chunk = FILLER * 100  # ~2k tokens
    out = {"method": method, "dtype": dtype, "config": cfg.to_dict(), "rss_model_mb": rss_model, "points": []}
    total_t = 0.0
    for length in sorted(lengths):
        if len(mem) + step > length:
            raise SystemExit(f"lengths must be at least {step} apart and >= {step}")
        while len(mem) < length - step:  # grow to length - step, untimed for the marginal figure
            _, t = _timed(mem.add_text, chunk)
            total_t += t
        ids = tok(chunk * 2, add_special_tokens=False)["input_ids"][: length - len(mem)]
        text = tok.decode(ids)
        n0 = len(mem)
        _, t = _timed(mem.add_text, text)
        total_t += t
        out["points"].append(
            {
                "length": len(mem),
                "marginal_tok_s": (len(mem) - n0) / t,
                "average_tok_s": len(mem) / total_t,
                "turn_seconds": _turn_latency(mem, msg),
                "peak_rss_beyond_model_mb": _peak_rss_mb() - rss_model,
            }
        )
        print(f"{method:>14} {len(mem):>6}: {out['points'][-1]}", flush=True)
    return out


def _turn_latency(mem, msg: str, repeats: int = 3) -> float:
    """Median seconds to add a ~200-token message and generate 32 tokens; the memory is restored."""
    times = []
    for _ in range(repeats):
        cp = mem.checkpoint()
        t = time.perf_counter()
        mem.add_message("user", msg)
        mem.generate("Summarise the tool output.", max_new_tokens=TURN_NEW_TOKENS, min_new_tokens=TURN_NEW_TOKENS)
        times.append(time.perf_counter() - t)
        mem.rollback(cp)
    return statistics.median(times)


def _result(method, length, cfg, rows, rss_model, dtype) -> dict:
    return {
        "method": method,
        "length": length,
        "dtype": dtype,
        "config": cfg.to_dict(),
        "accuracy": sum(r["correct"] for r in rows) / len(rows),
        "n_questions": len(rows),
        "rss_model_mb": rss_model,
        "peak_rss_mb": _peak_rss_mb(),
        "peak_rss_beyond_model_mb": _peak_rss_mb() - rss_model,
        "rows": rows,
    }


def _run_subprocess(method, length, depths, seeds, overrides, path: Path) -> dict:
    cmd = [sys.executable, __file__, "one", "--method", method, "--length", str(length)]
    cmd += ["--depths", str(depths), "--seeds", str(seeds), "--json", str(path)]
    for o in overrides:
        cmd += ["--set", o]
    t = time.time()
    subprocess.run(cmd, check=True)
    res = json.loads(path.read_text())
    print(f"{method:>14} {length:>6}: acc {res['accuracy']:.2f}  ({time.time() - t:.0f}s)", flush=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    one = sub.add_parser("one", help="one method at one history length (one process)")
    one.add_argument("--method", choices=METHODS, required=True)
    one.add_argument("--length", type=int, default=16384)
    one.add_argument("--json", type=Path)
    for sp in (one, allp := sub.add_parser("all", help="every method at every length"), sw := sub.add_parser("sweep")):
        sp.add_argument("--depths", type=int, default=10)
        sp.add_argument("--seeds", type=int, default=2)
        sp.add_argument("--set", action="append", default=[], help="MemoryConfig override, e.g. n_local=1024")
    allp.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384, 32768, 65536])
    allp.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    allp.add_argument("--full-max-length", type=int, default=16384, help="longest history for full attention")
    allp.add_argument("--out", type=Path, default=Path("benchmarks/results/passkey"))
    sw.add_argument("--length", type=int, default=16384)
    sw.add_argument("--grid", nargs="+", required=True, help="configs as 'k=v,k=v' strings")
    sw.add_argument("--out", type=Path, default=Path("benchmarks/results/sweep"))
    perf = sub.add_parser("perf", help="ingest throughput and per-turn latency (timings; run on a quiet machine)")
    perf.add_argument("--methods", nargs="+", default=["contextmemory", "streaming", "truncation", "full"], choices=METHODS)
    perf.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384, 32768, 65536])
    perf.add_argument("--full-max-length", type=int, default=16384)
    perf.add_argument("--set", action="append", default=[])
    perf.add_argument("--out", type=Path, default=Path("benchmarks/results/perf"))
    perf.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    for sp in (one, perf):
        sp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model and KV dtype")
    perf.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    rep = sub.add_parser("report", help="markdown table and plot from an 'all' run")
    rep.add_argument("--out", type=Path, default=Path("benchmarks/results/passkey"))
    rep.add_argument("--sweep", action="store_true", help="the directory holds a sweep")
    rep.add_argument("--perf", type=Path, default=Path("benchmarks/results/perf"), help="timings from 'perf'")
    a = p.parse_args()

    if a.cmd == "one":
        res = run_one(a.method, a.length, a.depths, a.seeds, a.set, a.dtype, a.json)
        text = json.dumps(res, indent=1)
        a.json.write_text(text) if a.json else print(text)
    elif a.cmd == "all":
        a.out.mkdir(parents=True, exist_ok=True)
        for length in a.lengths:
            for m in a.methods:
                if m == "ceiling" and length != a.lengths[0] or m == "full" and length > a.full_max_length:
                    continue
                _run_subprocess(m, length, a.depths, a.seeds, a.set, a.out / f"{m}-{length}.json")
    elif a.cmd == "perf" and a.method:  # one method, in its own process (own peak RSS)
        lengths = [n for n in a.lengths if a.method != "full" or n <= a.full_max_length]
        a.json.write_text(json.dumps(perf_one(a.method, lengths, a.set, dtype=a.dtype), indent=1))
    elif a.cmd == "perf":
        a.out.mkdir(parents=True, exist_ok=True)
        for m in a.methods:
            cmd = [sys.executable, __file__, "perf", "--method", m, "--json", str(a.out / f"{m}.json")]
            cmd += ["--lengths", *map(str, a.lengths), "--full-max-length", str(a.full_max_length), "--dtype", a.dtype]
            for o in a.set:
                cmd += ["--set", o]
            subprocess.run(cmd, check=True)
    elif a.cmd == "sweep":
        a.out.mkdir(parents=True, exist_ok=True)
        for g in a.grid:
            overrides = [*a.set, *(x for x in g.split(",") if x)]
            name = "_".join(overrides) or "default"
            _run_subprocess("contextmemory", a.length, a.depths, a.seeds, overrides, a.out / f"{name}.json")
    elif a.cmd == "report":
        from report import passkey_report, sweep_report  # benchmarks/report.py

        print(sweep_report(a.out) if a.sweep else passkey_report(a.out, a.perf))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
