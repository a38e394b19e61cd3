"""Durable memory with bounded RAM on the embedded model: a long history ingested into
``ContextMemory.open(dir)`` with ``max_resident_bytes``, against the same history all in RAM.

Each mode runs in its own process (its own RSS). Reported per mode: peak RSS beyond the model
(sampled every 20 ms while the history is ingested and questions are answered), the passkey answer,
whether greedy answers to a few prompts equal the all-in-RAM float32 ones, per-turn latency, bytes
on disk per token and where they go (:func:`account`), save and load time. A mode is
``<place>[_<kv>]``: ``ram``, ``open`` (a durable directory, no budget) or ``budget``, with
``float32``, ``bf16`` or ``int8`` block KV (none given: the config's default).

    python benchmarks/persistence.py --tokens 262144 --budget-mb 1024 --modes ram budget   # the issue's setting
    python benchmarks/persistence.py --tokens 32768 --budget-mb 700        # quick: most blocks on disk
    python benchmarks/persistence.py --tokens 16384 --modes ram_float32 ram_int8 open_int8 budget_int8
    python benchmarks/persistence.py --account DIR                         # where a directory's bytes go

The budget must exceed the fixed part (local window and init tokens of every layer, a second window
set for compaction, one gathered selection, one shard being written: about 600 MB with the default
geometry on the embedded model); the rest holds representative keys and an LRU of blocks.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from passkey import _model_rss_mb, _rss_mb, _turn_latency, _turn_message  # noqa: E402

PLACES = ("ram", "open", "budget")  # all in RAM; ContextMemory.open(dir) without a budget; with one
KV = {"": None, "_float32": "none", "_bf16": "bf16", "_int8": "int8"}  # "": the config's default
MODES = tuple(p + k for p in PLACES for k in KV)
"""``<place>[_<kv>]``: where the memory lives, and its ``kv_quantization`` (none given: the default)."""


def _place_kv(mode: str) -> tuple[str, str | None]:
    place, _, kv = mode.partition("_")
    return place, KV[f"_{kv}" if kv else ""]
PROMPTS = ("\nThe first thing the history says is", "\nSummary of the history so far:", "\nThe grass is")


class PeakRSS:
    """Highest resident set size seen by a sampling thread (ru_maxrss would include the model load's
    transient peak, which is not the history's); ``read``: another measure of it, in MiB."""

    def __init__(self, every: float = 0.02, read=_rss_mb):
        self.read = read
        self.peak, self._stop = read(), threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self.peak = max(self.peak, self.read())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.read())


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _safetensors_parts(path: Path, kinds) -> dict[str, int]:
    """Bytes of a safetensors file by kind of tensor (``kinds(name)``), plus its header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    out = {"header": 8 + n}
    for name, meta in header.items():
        if name != "__metadata__":
            lo, hi = meta["data_offsets"]
            out[kinds(name)] = out.get(kinds(name), 0) + hi - lo
    return out


def _with_wal(path: Path) -> int:
    """Bytes of a SQLite database with its ``-wal`` and ``-shm`` files."""
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists())


def _sqlite_query(path: Path, sql: str) -> list[tuple]:
    """``sql`` on a copy of the database and its WAL (reading the directory's own files would let
    SQLite create or checkpoint them: the accounting must not change what it measures)."""
    with tempfile.TemporaryDirectory() as tmp:
        for suffix in ("", "-wal"):
            if Path(f"{path}{suffix}").exists():
                shutil.copyfile(f"{path}{suffix}", Path(tmp) / f"db{suffix}")
        db = sqlite3.connect(Path(tmp) / "db")
        try:
            return db.execute(sql).fetchall()
        finally:
            db.close()


def _sqlite_tables(path: Path) -> dict[str, int]:
    """Bytes of a SQLite database by table or index (``dbstat``), FTS5 shadow tables folded into their table."""
    out: dict[str, int] = {}
    for name, size in _sqlite_query(path, "SELECT name, sum(pgsize) FROM dbstat GROUP BY name"):
        key = "passages_fts" if name.startswith("passages_fts") else name
        out[key] = out.get(key, 0) + size
    return out


def account(directory: Path) -> dict[str, int]:
    """Every byte of a memory directory, by what it holds: shard tensors (``kv``, ``scale``, ``repr``,
    their headers, and the tails of shards a rollback cut), the snapshot state (window, init, masses),
    the log (token ids, the rest of its rows and SQLite pages, its WAL), the lexical index by table
    (passages with their semantic vectors, the FTS5 text index), manifest and lock. The parts sum to
    the directory's size."""
    directory = Path(directory)
    size_before = _dir_bytes(directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    live = {s["file"]: s for s in manifest["shards"]}
    out: dict[str, int] = {}

    def add(key: str, n: int) -> None:
        out[key] = out.get(key, 0) + n

    for f in sorted(directory.iterdir()):
        size = f.stat().st_size
        if f.name.startswith("blocks-"):
            parts = _safetensors_parts(f, lambda name: name.split(".")[0])
            s = live.get(f.name)
            if s is None:
                add("shard files not in the manifest", size)
                continue
            held = s["n"] / int(_st_meta(f)["n"])  # a rollback may have cut the shard's tail
            for k, v in parts.items():
                add(f"shard {k}", round(v * held) if k != "header" else v)
                if k != "header":
                    add("shard tails cut by a rollback", v - round(v * held))
        elif f.name.startswith("state-"):
            if f.name != manifest["state"]["file"]:
                add("state files not in the manifest", size)
                continue
            kinds = {"win_k": "window KV", "win_v": "window KV", "init_k": "init KV", "init_v": "init KV"}
            for k, v in _safetensors_parts(f, lambda name: kinds.get(name.split(".")[0], name.split(".")[0])).items():
                add(f"state {k}", v)
        elif f.name == manifest["log"]:  # with its WAL: rows not yet checkpointed are counted as rows
            size = _with_wal(f)
            ids = _sqlite_query(f, "SELECT coalesce(sum(length(token_ids)), 0) FROM entries")[0][0]
            add("log token ids", ids)
            add("log text, rows and SQLite pages", size - ids)
        elif f.name == "index.sqlite":
            size = _with_wal(f)
            tables = _sqlite_tables(f)
            for table, n in tables.items():
                add(f"index {table}", n)
            add("index free pages, WAL", size - sum(tables.values()))
        elif f.name.endswith(("-wal", "-shm")) and f.name[: -4] in (manifest["log"], "index.sqlite"):
            continue  # counted with its database
        else:
            add(f.name, size)
    assert sum(out.values()) == size_before == _dir_bytes(directory), "a byte was missed, or the directory changed"
    return out


def _st_meta(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))["__metadata__"]


def account_table(parts: dict[str, int], tokens: int) -> str:
    """Markdown rows: what, bytes, bytes per token, share."""
    total = sum(parts.values())
    rows = ["| what | bytes | bytes / token | share |", "|---|---|---|---|"]
    for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
        rows.append(f"| {k} | {v:,} | {v / tokens:,.1f} | {100 * v / total:.2f}% |")
    rows.append(f"| **total** | {total:,} | **{total / tokens:,.1f}** | 100% |")
    return "\n".join(rows)


def run_mode(mode: str, tokens: int, budget_mb: int, depth: float, workdir: Path, tune_allocator: bool = False, timed: bool = True) -> dict:
    from memory_plugin import ContextMemory, MemoryConfig, load_model
    from memory_plugin.blocks import return_freed_memory_to_os
    from memory_plugin.tasks import FILLER, QUESTION, filler_repeats, needle, passkey

    model, tok = load_model()
    if tune_allocator:  # what a RAM budget does to the allocator, here without a budget
        return_freed_memory_to_os()
    rss_model = _model_rss_mb(model)
    cfg = MemoryConfig()
    place, kv = _place_kv(mode)
    if place == "budget":
        cfg = cfg.replace(max_resident_bytes=budget_mb * 2**20)
    if kv is not None:
        cfg = cfg.replace(kv_quantization=kv)
    store = workdir / mode
    peak = PeakRSS()
    mem = ContextMemory(model, tok, cfg) if place == "ram" else ContextMemory.open(store, model, tokenizer=tok, config=cfg)
    n_rep, key = filler_repeats(tok, tokens), passkey(4242)
    at, step = round(depth * n_rep), 100  # ~2k tokens per add, as an agent's tool outputs would come
    t = time.perf_counter()
    for i in range(0, n_rep, step):
        if i <= at < i + step:
            mem.add_text(FILLER * (at - i) + needle(key) + FILLER * (min(n_rep, i + step) - at))
        else:
            mem.add_text(FILLER * (min(n_rep, i + step) - i))
    ingest_s = time.perf_counter() - t
    answer = mem.generate(QUESTION, max_new_tokens=8, chat=False)
    answers = [mem.generate(p, max_new_tokens=12, chat=False) for p in PROMPTS]
    turn = _turn_latency(mem, _turn_message(tok)) if timed else float("nan")
    out = {
        "mode": mode,
        "tokens": len(mem),
        "budget_mb": budget_mb if place == "budget" else None,
        "kv_quantization": cfg.kv_quantization,
        "ingest_tok_s": len(mem) / ingest_s,
        "turn_seconds": turn,
        "key": key,
        "answer": answer,
        "correct": key in answer,
        "answers": answers,
        "stats_bytes": mem.stats().bytes,
        "blocks_by_tier": mem.stats().blocks_by_tier,
    }
    out["peak_rss_beyond_model_mb"] = peak.stop() - rss_model
    if place != "ram":
        mem.close()
        out["disk_bytes_per_token"] = _dir_bytes(store) / out["tokens"]
        out["disk_parts"] = account(store)
        t = time.perf_counter()
        loaded = ContextMemory.load(store, model, tokenizer=tok, max_resident_bytes=cfg.max_resident_bytes)
        out["load_seconds"] = time.perf_counter() - t
        out["answer_after_load"] = loaded.generate(QUESTION, max_new_tokens=8, chat=False)
        if timed:
            t = time.perf_counter()
            loaded.save(workdir / f"{mode}-copy")
            out["save_seconds"] = time.perf_counter() - t
    return out


# ----------------------------------------------------------------------------------- --grown (issue 24)
GROWN_DEPTHS = (0.05, 0.35, 0.65, 0.95)


def _cpu_turn(mem, msg: str) -> tuple[float, float]:
    """One turn as ``passkey.py perf`` (a ~200-token message added, 32 tokens generated), the
    memory restored: (CPU seconds of this process, wall seconds)."""
    from passkey import TURN_NEW_TOKENS

    cp = mem.checkpoint()
    c, t = time.process_time(), time.perf_counter()
    mem.add_message("user", msg)
    mem.generate("Summarise the tool output.", max_new_tokens=TURN_NEW_TOKENS, min_new_tokens=TURN_NEW_TOKENS)
    out = time.process_time() - c, time.perf_counter() - t
    mem.rollback(cp)
    return out


def grown_build(a) -> None:
    """``--grown N``: one real ingest of ``--base-tokens`` of filler, saved; then per needle depth a
    history of N tokens built from it (:func:`decode_cost.grow_history`: copies of the base's
    blocks up to the depth, the needle and ``--after-tokens`` of filler ingested for real there,
    copies again up to N), saved as a memory directory, measured by a fresh process opening it
    with the RAM budget (:func:`grown_eval`), then deleted (one directory on disk at a time) unless
    ``--keep``. The
    ``--ram-tokens`` history is built the same way once, kept, and loaded all in RAM for the turn
    ratio. The model's ceiling (each needle alone in ~1k tokens, full attention) runs here first."""
    import gc

    import torch

    torch.set_num_threads(1)
    from decode_cost import grow_history
    from passkey import _config

    from memory_plugin import ContextMemory, load_model
    from memory_plugin.baselines import FullAttention
    from memory_plugin.tasks import FILLER, QUESTION, needle, passkey, passkey_history

    a.out.mkdir(parents=True, exist_ok=True)
    work = a.workdir
    work.mkdir(parents=True, exist_ok=True)
    model, tok = load_model()
    keys = [passkey(di) for di in range(len(a.needle_depths))]  # passkey.py's keys for seed 0
    full, ceiling = FullAttention(model, tok), []
    for d, key in zip(a.needle_depths, keys):
        full.rollback(0)
        full.add_text(passkey_history(tok, 1000, d, key))
        ans = full.generate(QUESTION, max_new_tokens=8, chat=False)
        ceiling.append({"depth": d, "key": key, "answer": ans, "correct": key in ans})
    del full
    summary = {"grown_tokens": a.grown, "budget_mb": a.budget_mb, "ceiling": ceiling, "code": _code_version()}
    print(json.dumps({"ceiling": ceiling}), flush=True)
    base = work / "-".join(["base", *a.set])  # a base ingested with other overrides is not reused
    if not (base / "manifest.json").exists():
        mem = ContextMemory(model, tok, _config(a.set))
        c, t = time.process_time(), time.perf_counter()
        while len(mem) < a.base_tokens:
            mem.add_text(FILLER * 100)  # ~2.4k tokens per add, as an agent's tool outputs would come
        summary["base_ingest"] = {"tokens": len(mem), "cpu_tok_s": len(mem) / (time.process_time() - c), "wall_tok_s": len(mem) / (time.perf_counter() - t)}
        mem.save(base)
        del mem
    per = len(tok(FILLER, add_special_tokens=False)["input_ids"])
    after = FILLER * (a.after_tokens // per + 1)

    def build(n_tokens: int, depth: float, key: str, path: Path) -> dict:
        mem = ContextMemory.load(base, model, tokenizer=tok)
        sources = list(range(len(mem._engine.ctx.store)))  # benchmark only: the base's own blocks
        c = time.process_time()
        copied = grow_history(mem, round(depth * n_tokens), sources)
        at = len(mem)
        mem.add_text(needle(key) + after)  # ingested for real, with the grown history as its far context
        real = len(mem) - at
        copied += grow_history(mem, n_tokens, sources)
        info = {"tokens": len(mem), "blocks": mem.stats().blocks, "needle_at": at, "needle_depth": at / len(mem),
                "real_tokens": real, "copied_blocks": copied, "build_cpu_s": time.process_time() - c}
        t = time.perf_counter()
        mem.save(path)
        info["save_s"] = time.perf_counter() - t
        info["saved_bytes"] = _dir_bytes(path)
        del mem
        gc.collect()
        return info

    ram_dir = work / f"ram-{a.ram_tokens}"
    summary["ram_history"] = build(a.ram_tokens, a.ram_depth, passkey(99), ram_dir)
    print(json.dumps({"ram_history": summary["ram_history"]}), flush=True)
    common = ["--workdir", str(work), "--out", str(a.out), "--budget-mb", str(a.budget_mb), "--rounds", str(a.rounds)]
    common += [] if a.mmap_threshold is None else ["--mmap-threshold", str(a.mmap_threshold)]
    common += [arg for o in a.set for arg in ("--set", o)]
    ev = [sys.executable, __file__, "--grown-eval", str(ram_dir), "--key", passkey(99), "--ram-copy", "none", *common]
    subprocess.run(ev + ["--name", "ram-alone"], check=True)  # the all-in-RAM turn with glibc's defaults, alone
    summary["needles"] = []
    for i, (d, key) in enumerate(zip(a.needle_depths, keys)):
        path = work / f"grown-{i}"
        info = build(a.grown, d, key, path)
        print(json.dumps({"needle": i, **info}), flush=True)
        ev = [sys.executable, __file__, "--grown-eval", str(path), "--key", key, "--name", f"needle-{i}", *common]
        ev += ["--ram-copy", str(ram_dir) if i < a.turn_evals else "none"] + ([] if i < a.turn_evals else ["--rounds", "0"])
        subprocess.run(ev, check=True)
        info["eval"] = json.loads((a.out / f"needle-{i}.json").read_text())
        summary["needles"].append(info)
        if not a.keep:
            shutil.rmtree(path, ignore_errors=True)
        (a.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(grown_report(summary))


def grown_eval(a) -> None:
    """A fresh process: open ``--grown-eval DIR`` with the RAM budget (or load it all in RAM with
    ``--ram-copy none`` and no budget: the reference), RSS sampled from before it opens; the
    needle's question, turns; then with ``--ram-copy DIR`` that history loaded all in RAM in this
    process and turns of both interleaved (CPU time). Peak RSS is taken before the copy loads."""
    import torch

    torch.set_num_threads(1)
    from passkey import _config, _turn_message

    from memory_plugin import ContextMemory, blocks, load_model
    from memory_plugin.tasks import QUESTION

    if a.mmap_threshold is not None:
        blocks.ALLOC_MMAP_THRESHOLD = a.mmap_threshold  # read when the budget memory sets it
    model, tok = load_model()
    rss_model = _model_rss_mb(model)
    msg = _turn_message(tok)
    alone = a.name == "ram-alone"
    peak = PeakRSS()
    c, t = time.process_time(), time.perf_counter()
    if alone:
        mem = ContextMemory.load(a.grown_eval, model, tokenizer=tok)
    else:
        mem = ContextMemory.open(a.grown_eval, model, tokenizer=tok, config=_config(a.set).replace(max_resident_bytes=a.budget_mb * 2**20))
    out = {"name": a.name, "dir": str(a.grown_eval), "tokens": len(mem), "budget_mb": None if alone else a.budget_mb,
           "open_cpu_s": time.process_time() - c, "open_wall_s": time.perf_counter() - t, "rss_model_mb": rss_model}
    print(json.dumps(out), flush=True)
    c = time.process_time()
    ans = mem.generate(QUESTION, max_new_tokens=8, chat=False)
    out.update(key=a.key, answer=ans, correct=a.key in ans, question_cpu_s=time.process_time() - c)
    print(json.dumps({"answer": ans, "correct": out["correct"]}), flush=True)
    turns = [_cpu_turn(mem, msg) for _ in range(a.rounds)]
    out["turns"] = turns
    out["turn_cpu_s"] = statistics.median(x[0] for x in turns) if turns else None
    out["peak_rss_beyond_model_mb"] = max(peak.peak, _rss_mb()) - rss_model
    out["rss_now_beyond_model_mb"] = _rss_mb() - rss_model
    st = mem.stats()
    out["stats_bytes"], out["blocks_by_tier"], out["blocks"] = st.bytes, st.blocks_by_tier, st.blocks
    out["accounted_mb"] = (st.bytes["host"] + st.bytes["device"]) / 2**20
    ctx = mem._engine.ctx  # benchmark only: how the budget is split
    out["repr_bytes"] = ctx.store.repr_nbytes()
    if not alone:
        out["block_budget_bytes"] = ctx._block_budget()
    print(json.dumps({k: out[k] for k in ("peak_rss_beyond_model_mb", "turn_cpu_s", "accounted_mb", "blocks_by_tier")}), flush=True)
    if a.ram_copy != "none" and a.rounds:
        ram = ContextMemory.load(a.ram_copy, model, tokenizer=tok)
        rounds = []
        for r in range(a.rounds):
            rounds.append({"budget": _cpu_turn(mem, msg), "ram": _cpu_turn(ram, msg)})
            print(json.dumps({"round": r, **rounds[-1]}), flush=True)
        out["interleaved"] = rounds
        out["ram_copy_tokens"] = len(ram)
        out["ratio_cpu_interleaved"] = statistics.median(x["budget"][0] / x["ram"][0] for x in rounds)
        out["ram_turn_cpu_s_same_process"] = statistics.median(x["ram"][0] for x in rounds)
        out["budget_turn_cpu_s_interleaved"] = statistics.median(x["budget"][0] for x in rounds)
    peak.stop()
    if not alone:
        mem.close()
        out["disk_bytes"] = _dir_bytes(a.grown_eval)
        out["disk_bytes_per_token"] = out["disk_bytes"] / out["tokens"]
        out["disk_parts"] = account(a.grown_eval)
    (a.out / f"{a.name}.json").write_text(json.dumps(out, indent=1))


def _code_version() -> str:
    import subprocess as sp

    import memory_plugin

    root = Path(memory_plugin.__file__).parent
    head = sp.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return f"{root} (repo HEAD {head})"


def grown_report(summary: dict) -> str:
    """Markdown: per needle, the ceiling's and the 1M memory's answers, open time and peak RSS."""
    rows = ["| depth | key | ceiling | answer | open s | peak RSS beyond model | turn CPU s | budget / RAM (interleaved) |", "|---|---|---|---|---|---|---|---|"]
    for c, n in zip(summary["ceiling"], summary.get("needles", [])):
        e = n["eval"]
        turn = f"{e['turn_cpu_s']:.2f}" if e.get("turn_cpu_s") else "—"
        ratio = f"{e['ratio_cpu_interleaved']:.2f}x" if "ratio_cpu_interleaved" in e else "—"
        rows.append(f"| {n['needle_depth']:.3f} | {c['key']} | {'✓' if c['correct'] else '✗'} {c['answer'].strip()!r} "
                    f"| {'✓' if e['correct'] else '✗'} {e['answer'].strip()!r} | {e['open_wall_s']:.0f} "
                    f"| {e['peak_rss_beyond_model_mb']:.0f} MiB | {turn} | {ratio} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=262144)
    p.add_argument("--budget-mb", type=int, default=1024)
    p.add_argument("--depth", type=float, default=0.3, help="where the passkey sits in the history")
    p.add_argument("--modes", nargs="+", default=["ram", "budget"], choices=MODES)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/persistence"))
    p.add_argument("--tune-allocator", action="store_true", help="set the allocator as a RAM budget does, in every mode")
    p.add_argument("--untimed", action="store_true", help="answers and bytes only: no turn timing, no save (a busy machine)")
    p.add_argument("--account", type=Path, metavar="DIR", help="only print where the bytes of a memory directory go")
    p.add_argument("--grown", type=int, help="issue 24 at 1M: histories of this many tokens grown from a real base ingest (see grown_build)")
    p.add_argument("--base-tokens", type=int, default=16384, help="with --grown: tokens of filler ingested for real and copied")
    p.add_argument("--after-tokens", type=int, default=3072, help="with --grown: filler ingested for real after each needle")
    p.add_argument("--needle-depths", type=float, nargs="+", default=list(GROWN_DEPTHS), help="with --grown: one history per depth")
    p.add_argument("--ram-tokens", type=int, default=65536, help="with --grown: the all-in-RAM history the turn is compared with")
    p.add_argument("--ram-depth", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=3, help="with --grown: turns per memory (interleaved with the all-in-RAM one)")
    p.add_argument("--turn-evals", type=int, default=2, help="with --grown: how many needle histories also time turns")
    p.add_argument("--mmap-threshold", type=int, help="with --grown: the allocator threshold a budget sets (default: the library's)")
    p.add_argument("--keep", action="store_true", help="with --grown: keep each grown directory (12.5 GB at 1M) to measure again")
    p.add_argument("--set", action="append", default=[], help="with --grown: MemoryConfig override, e.g. repr_heads=kv")
    p.add_argument("--grown-eval", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--key", help=argparse.SUPPRESS)
    p.add_argument("--name", help=argparse.SUPPRESS)
    p.add_argument("--ram-copy", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.account:
        n = json.loads((a.account / "manifest.json").read_text())["n_tokens"]
        print(account_table(account(a.account), n))
        return
    if a.grown_eval:
        return grown_eval(a)
    if a.grown:
        a.workdir = a.workdir or Path(tempfile.mkdtemp(prefix="mp-grown-"))
        return grown_build(a)
    if a.mode:
        res = run_mode(a.mode, a.tokens, a.budget_mb, a.depth, a.workdir, a.tune_allocator, not a.untimed)
        (a.out / f"{a.mode}-{a.tokens}.json").write_text(json.dumps(res, indent=1))
        return
    a.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mp-persist-"))
    try:
        for m in a.modes:
            cmd = [sys.executable, __file__, "--mode", m, "--workdir", str(work), "--out", str(a.out)]
            cmd += ["--tokens", str(a.tokens), "--budget-mb", str(a.budget_mb), "--depth", str(a.depth)]
            cmd += ["--tune-allocator"] if a.tune_allocator else []
            cmd += ["--untimed"] if a.untimed else []
            subprocess.run(cmd, check=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(report(a.out, a.tokens))


def report(out: Path, tokens: int) -> str:
    """The modes' table, answers and turns against the all-in-RAM float32 run (else the all-in-RAM
    default one); then, per mode with a directory, where its bytes went."""
    runs = {m: json.loads((out / f"{m}-{tokens}.json").read_text()) for m in MODES if (out / f"{m}-{tokens}.json").exists()}
    base_name = next((m for m in ("ram_float32", "ram") if m in runs), None)
    base = runs.get(base_name)
    lines = [
        f"| mode | kv | tokens | budget | peak RSS beyond model | passkey | answers = {base_name} | turn s (ratio) | ingest tok/s "
        "| disk B/token | save s | load s | answer after load = before |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in runs.items():
        same = "—" if m == base_name or base is None else ("yes" if r["answers"] == base["answers"] and r["answer"] == base["answer"] else "no")
        ratio = f" ({r['turn_seconds'] / base['turn_seconds']:.2f}x)" if base else ""
        budget = f"{r['budget_mb']} MiB" if r["budget_mb"] else "—"
        disk = f"{r['disk_bytes_per_token']:.0f}" if "disk_bytes_per_token" in r else "—"
        after = "—" if "answer_after_load" not in r else ("yes" if r["answer_after_load"] == r["answer"] else "no")
        lines.append(
            f"| {m} | {r['kv_quantization']} | {r['tokens']} | {budget} | {r['peak_rss_beyond_model_mb']:.0f} MiB "
            f"| {'✓' if r['correct'] else '✗'} {r['answer'].strip()!r} "
            f"| {same} | {r['turn_seconds']:.2f}{ratio} | {r['ingest_tok_s']:.0f} | {disk} "
            f"| {r.get('save_seconds', float('nan')):.1f} | {r.get('load_seconds', float('nan')):.1f} | {after} |"
        )
    for m, r in runs.items():
        if "disk_parts" in r:
            lines += ["", f"**{m}** ({r['kv_quantization']}, {r['tokens']} tokens): where the directory's bytes go", ""]
            lines.append(account_table(r["disk_parts"], r["tokens"]))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
