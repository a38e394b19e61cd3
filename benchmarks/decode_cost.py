"""What one decoded token and a short prefill cost as the history grows: ContextMemory on the
embedded model, grown with filler to each length in turn.

    python benchmarks/decode_cost.py --lengths 2048 16384 65536 --out benchmarks/results/decode_cost.json

Per length: seconds to prefill the question and produce one token (``generate`` with 1 new
token), ms per further decoded token ((generate N+1) - (generate 1)) / N, both the median of
``--repeats``, and their ratio to the first length. Timings only: run it on a quiet machine.

Issue 24 (a saved history, grown by replicated blocks, against plain transformers)::

    python benchmarks/decode_cost.py --load /tmp/mem24/h8k --grow 65536 262144 1048576 --out benchmarks/results/decode_cost_issue24.json

loads a memory saved with ``ContextMemory.save`` (building one takes minutes; build it once), and
at its own length and at each ``--grow`` length measures: ms of one decoded token (the forward
pass of one token, median of ``--tokens``), the turn (a 200-token message and 32 decoded tokens,
median of ``--repeats``, as ``passkey.py perf``) and the per-token figure of ``generate``. Lengths
beyond the saved one are reached by appending **references to the saved blocks** (KV shared, each
copy's representative keys with a little noise so top-k ties break) to every layer's block list:
the selection scans as many representative keys as a real history of that length, the attention
reads as many keys as ever; nothing else of a longer history (its RAM, its disk) is there. Plain
transformers (a ``DynamicCache`` holding as many tokens as the memory's attention span, decoding
one token) runs in the same process, in the same dtype.

With ``--ingest TOKENS`` (issue 24, target 3) it times ingest instead of decoding: one loaded copy
per length (the saved one, then each ``--grow`` length), and in each of ``--rounds`` interleaved
rounds adds ``TOKENS`` of filler to every copy with one ``add_text`` call (the engine prefills it in
``chunk_size`` pieces), rolled back after; tokens per second and the ratio to the saved copy, the
medians of the rounds. Replicated blocks share KV, so this is the per-token cost of ingest as the
history grows (selection over more representative keys, block appends, indexing), not the RAM or
disk of a real history of that length.

(At commit c1b340f this script also compared copying only the changed blocks into the gathered
selection against gathering all of them: 1.3% at 66k tokens, so that path was taken out again;
``benchmarks/results/decode_cost_swap.json``.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
QUESTION = "Summarise the history in one sentence."


def _generate_seconds(mem, n: int) -> float:
    cp = mem.checkpoint()
    t = time.perf_counter()
    mem.generate(QUESTION, max_new_tokens=n, min_new_tokens=n)
    dt = time.perf_counter() - t
    mem.rollback(cp)
    return dt


CLOCK = time.perf_counter  # --cpu-time: time.process_time, the CPU time of this process (with --threads 1
# torch runs its work on this thread), which a machine shared with other jobs disturbs far less than wall time


def _forward_ms(forward, n: int) -> float:
    """Median ms of ``n`` one-token forward passes (``forward(token) -> logits``), greedy tokens."""
    import torch

    times, tok = [], 42
    with torch.inference_mode():
        for _ in range(n + 2):
            t = CLOCK()
            tok = int(forward(tok).argmax())
            times.append(CLOCK() - t)
    return statistics.median(times[2:]) * 1000


def _turn_s(mem, msg: str, repeats: int) -> float:
    """Median seconds (of CLOCK) to add a ~200-token message and generate 32 tokens, as
    ``passkey.py perf``; the memory is restored."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from passkey import TURN_NEW_TOKENS

    times = []
    for _ in range(repeats):
        cp = mem.checkpoint()
        t = CLOCK()
        mem.add_message("user", msg)
        mem.generate("Summarise the tool output.", max_new_tokens=TURN_NEW_TOKENS, min_new_tokens=TURN_NEW_TOKENS)
        times.append(CLOCK() - t)
        mem.rollback(cp)
    return statistics.median(times)


def _ingest_s(mem, text: str) -> tuple[float, int]:
    """Seconds (of CLOCK) to add ``text`` with ``add_text``, and the tokens it added; the memory is restored."""
    cp = mem.checkpoint()
    t = CLOCK()
    n = mem.add_text(text)
    dt = CLOCK() - t
    mem.rollback(cp)
    return dt, n


def ingest24(a, mem) -> dict:
    """``--ingest``: tokens per second of ``add_text`` on a copy of ``a.load`` per length, interleaved rounds."""
    from memory_plugin import ContextMemory
    from memory_plugin.tasks import FILLER

    tok = mem.tokenizer
    text = tok.decode(tok(FILLER * (a.ingest // 8 + 1), add_special_tokens=False)["input_ids"][: a.ingest])
    copies = [mem]
    for length in a.grow:  # each copy loaded fresh, sharing the model object
        copies.append(ContextMemory.load(a.load, mem.model, tokenizer=tok))
        replicate_blocks(copies[-1], length)
    rounds = []
    for r in range(a.rounds):
        rounds.append([_ingest_s(c, text) for c in copies])
        print(json.dumps({"round": r, "seconds": [s for s, _ in rounds[-1]]}), flush=True)
    points = []
    for i, (length, c) in enumerate(zip([len(mem), *a.grow], copies)):
        tokens = rounds[0][i][1]
        points.append({
            "length": length, "blocks": len(c._engine.ctx.store), "ingest_tokens": tokens,
            "ingest_s": statistics.median(rd[i][0] for rd in rounds),
            "tokens_per_s": statistics.median(tokens / rd[i][0] for rd in rounds),
            "rate_vs_first": statistics.median(rd[0][0] / rd[i][0] for rd in rounds),
            "rounds_s": [rd[i][0] for rd in rounds],
        })
    return {"points": points}


def _memory_decode_ms(mem, n: int) -> float:
    import torch

    engine = mem._engine  # benchmark only: the forward pass without a turn around it
    cp = engine.ctx.checkpoint()
    try:
        return _forward_ms(lambda tok: engine.forward(torch.tensor([tok]), engine.ctx), n)
    finally:
        engine.ctx.rollback(cp)


def _plain_decoder(model, tok, span: int):
    """Plain transformers: a DynamicCache holding ``span`` tokens of filler; returns ``step(token)
    -> logits``, one token decoded against those ``span`` tokens (the cache is cropped back)."""
    import torch
    from transformers import DynamicCache

    from memory_plugin.tasks import FILLER

    ids = tok(FILLER * (span // 8), add_special_tokens=False)["input_ids"][:span]
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        for s in range(0, span, 512):
            model(input_ids=torch.tensor([ids[s : s + 512]]), past_key_values=cache, use_cache=True, logits_to_keep=1)

    def step(t):
        out = model(input_ids=torch.tensor([[t]]), past_key_values=cache, use_cache=True).logits[0, -1]
        cache.crop(-1)  # back to the span: every token decodes against the same context
        return out

    return step


def replicate_blocks(mem, n_tokens: int, noise: float = 0.01, seed: int = 0, exclude: set[int] = frozenset()) -> int:
    """Grow ``mem``'s block lists to as many blocks as ``n_tokens`` of history would have, by
    appending references to its own blocks (KV shared, not copied) whose representative keys get
    ``noise`` times their standard deviation of Gaussian noise; blocks in ``exclude`` (a needle's)
    are not copied. Returns the blocks added. For timing and measuring selection only: the grown
    memory is not a real history (and must not be saved)."""
    import torch

    ctx = mem._engine.ctx  # benchmark only
    cfg = ctx.cfg
    have = len(ctx.store)
    # the blocks of the saved history's own length, plus one per block_size tokens beyond it
    want = ctx.layout.n_evicted_blocks + max(0, n_tokens - len(mem)) // cfg.block_size
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():  # after a turn the reprs are inference tensors
        _replicate(ctx.store.layers, have, want, noise, gen, [b for b in range(have) if b not in exclude])
    return max(0, want - have)


def _replicate(layers, have: int, want: int, noise: float, gen, sources: list[int]) -> None:
    import torch

    for layer in layers:
        reprs = layer.reprs[:have].clone()
        scale = noise * reprs.std()
        for b in range(have, want):
            src = sources[b % len(sources)]
            layer.append(layer.kv[src], reprs[src] + scale * torch.randn(reprs[src].shape, generator=gen))


def grow_history(mem, n_tokens: int, sources: list[int], noise: float = 0.01, entry_blocks: int = 16) -> int:
    """Make ``mem`` (all in RAM) a history of about ``n_tokens`` tokens that can be **saved**: blocks
    copied from ``sources`` (KV shared until saved; each copy's representative keys get ``noise``
    times their standard deviation of Gaussian noise, seeded by the copy's block index, then rounded
    as the store keeps reprs) are inserted where the local window begins, and so are their tokens
    (each copy's are its source block's) as ``add_text`` entries of ``entry_blocks`` blocks; the
    window, and the entry it cuts, move up. Layout, token ids, history and block lists stay
    consistent, so ``save`` writes a memory that ``load``/``open`` accept as a history of that
    length (the lexical index is rebuilt on opening: this leaves the in-RAM one stale). A benchmark
    helper reaching into the engine: not part of the package. Returns the blocks added."""
    import torch

    from memory_plugin.history import Entry

    engine = mem._engine  # benchmark only
    ctx, cfg, tok = engine.ctx, mem.config, mem.tokenizer
    lay, bs, store = ctx.layout, cfg.block_size, ctx.store
    add = max(0, n_tokens - len(mem)) // bs
    if add == 0:
        return 0
    cut = cfg.n_init + lay.n_evicted_blocks * bs  # the first token of the window
    assert lay.init_len == cfg.n_init and lay.n_evicted_blocks == len(store) and ctx.window_range[0] == cut
    have = len(store)
    ids = []
    with torch.inference_mode():
        for i, layer in enumerate(store.layers):
            reprs = layer.reprs[:have]  # decoded once: a compact table decodes every block per access
            scale = noise * reprs.float().std()
            for b in range(have, have + add):
                src = sources[b % len(sources)]
                gen = torch.Generator().manual_seed(b * 1009 + i)
                r = reprs[src] + scale * torch.randn(reprs[src].shape, generator=gen)
                layer.append(layer.kv[src], store.codec.round_reprs(r[None])[0].to(reprs.dtype))
                store.ram.hold((i, b), layer.kv[src])
    for b in range(have, have + add):
        s = cfg.n_init + sources[b % len(sources)] * bs
        ids += ctx.tokens[s : s + bs]
    n = add * bs
    ctx.tokens[cut:cut] = ids
    lay.n_evicted_blocks += add
    lay.n_tokens += n
    lay.base += n
    # entries: the one the window's first token belongs to is cut in two around the inserted ones
    hist = engine.history._entries  # benchmark only
    out = []
    for e in hist:
        if e.end <= cut:
            out.append(e)
        elif e.start >= cut:
            out.append(Entry(e.role, e.content, e.start + n, e.end + n))
        else:
            assert e.role is None, "only add_text entries are cut"
            head, tail = ctx.tokens[e.start : cut], ctx.tokens[cut + n : e.end + n]
            out.append(Entry(None, tok.decode(head), e.start, cut))
            out.append(Entry(None, tok.decode(tail), cut + n, e.end + n))
    new = []
    for a in range(0, n, entry_blocks * bs):
        part = ids[a : a + entry_blocks * bs]
        new.append(Entry(None, tok.decode(part), cut + a, cut + a + len(part)))
    at = next(j for j, e in enumerate(out) if e.start >= cut + n) if any(e.start >= cut + n for e in out) else len(out)
    engine.history._entries = out[:at] + new + out[at:]
    assert sum(e.end - e.start for e in engine.history) == len(ctx.tokens) == lay.n_tokens
    return add


def _code_version() -> str:
    """Where memory_plugin was imported from (a before/after run may point PYTHONPATH at an older copy)."""
    import memory_plugin

    return str(Path(memory_plugin.__file__).parent)


def _import_copy(path: Path, name: str = "memory_plugin_before"):
    """An older copy of the package (``git archive <commit> memory_plugin | tar -x -C PATH``),
    imported under another name beside the current one (its imports are relative)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path / "memory_plugin" / "__init__.py", submodule_search_locations=[str(path / "memory_plugin")])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def issue24(a) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from passkey import TURN_NEW_TOKENS, _turn_message

    from memory_plugin import ContextMemory

    mem = ContextMemory.load(a.load)
    cfg = mem.config
    span = cfg.n_init + cfg.n_local + cfg.topk * cfg.block_size
    model, tok = mem.model, mem.tokenizer  # the memory's own model object: same dtype
    msg = _turn_message(tok)
    out = {"config": cfg.to_dict(), "span": span, "threads": torch.get_num_threads(), "clock": CLOCK.__name__, "code": _code_version(), "points": []}
    if a.ingest:
        out.update(ingest24(a, mem), rounds=a.rounds, load_average=os.getloadavg())
        return _write(a, out)
    plain_step = _plain_decoder(model, tok, span)
    plain = _forward_ms(plain_step, a.tokens)
    out["plain_decode_ms"] = plain
    print(json.dumps({"plain_decode_ms_at_span": plain}), flush=True)
    before = None
    if a.before:  # the same saved history under the older code, sharing the model object
        before = _import_copy(a.before).ContextMemory.load(a.load, model, tokenizer=tok)
        out["before_code"] = str(a.before)
    for length in [len(mem), *a.grow]:
        added = replicate_blocks(mem, length) if length > len(mem) else 0
        if before is not None and length > len(before):
            replicate_blocks(before, length)
        point = {"length": length, "blocks": len(mem._engine.ctx.store), "replicated_blocks": added}
        if before is not None:  # interleaved rounds: plain, before, after; medians of the rounds
            rounds = [(_forward_ms(plain_step, a.tokens), _memory_decode_ms(before, a.tokens), _memory_decode_ms(mem, a.tokens)) for _ in range(a.rounds)]
            point["rounds"] = rounds
            point["plain_ms"] = statistics.median(r[0] for r in rounds)
            point["before_decode_ms"] = statistics.median(r[1] for r in rounds)
            point["before_vs_plain"] = statistics.median(r[1] / r[0] for r in rounds)
            point["decode_ms"] = statistics.median(r[2] for r in rounds)
            point["decode_vs_plain"] = statistics.median(r[2] / r[0] for r in rounds)
            point["after_vs_before"] = statistics.median(r[2] / r[1] for r in rounds)
        else:
            point["decode_ms"] = _memory_decode_ms(mem, a.tokens)
            point["decode_vs_plain"] = point["decode_ms"] / plain
        if a.turn_repeats:
            point["turn_s"] = _turn_s(mem, msg, a.turn_repeats)
            point["turn_new_tokens"] = TURN_NEW_TOKENS
        print(json.dumps(point), flush=True)
        out["points"].append(point)
    out["plain_decode_ms_after"] = _forward_ms(plain_step, a.tokens)
    for pt in out["points"]:
        pt["decode_vs_first"] = pt["decode_ms"] / out["points"][0]["decode_ms"]
        if "turn_s" in pt:
            pt["turn_vs_first"] = pt["turn_s"] / out["points"][0]["turn_s"]
    _write(a, out)


def _write(a, out: dict) -> None:
    text = json.dumps(out, indent=1)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
    print(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", type=Path, help="a saved memory to measure (issue 24 mode)")
    p.add_argument("--grow", type=int, nargs="*", default=[], help="with --load: lengths reached by replicated blocks")
    p.add_argument("--before", type=Path, help="with --load: a folder holding an older memory_plugin to compare, interleaved")
    p.add_argument("--rounds", type=int, default=3, help="with --before or --ingest: interleaved rounds per length")
    p.add_argument("--ingest", type=int, default=0, help="with --load: time adding this many tokens of filler instead of decoding (0: off)")
    p.add_argument("--turn-repeats", type=int, default=3, help="with --load: turns timed per length (0: none)")
    p.add_argument("--cpu-time", action="store_true", help="time with the process's CPU time (use with --threads 1)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 16384, 65536])
    p.add_argument("--tokens", type=int, default=32, help="decoded tokens timed per turn")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    if a.cpu_time:
        global CLOCK
        CLOCK = time.process_time
    if a.load:
        return issue24(a)

    from memory_plugin import ContextMemory
    from memory_plugin.tasks import FILLER

    mem = ContextMemory.from_pretrained()
    points = []
    for length in sorted(a.lengths):
        while len(mem) < length:
            mem.add_text(FILLER * 20)
        point = {"length": len(mem), "blocks": mem.stats().blocks}
        prefill, decode = [], []
        for _ in range(a.repeats):
            full = _generate_seconds(mem, a.tokens + 1)
            first = _generate_seconds(mem, 1)
            prefill.append(first)
            decode.append((full - first) / a.tokens * 1000)
        point.update(prefill_s=statistics.median(prefill), ms_per_token=statistics.median(decode))
        print(json.dumps(point), flush=True)
        points.append(point)
    base = points[0]
    for pt in points:
        pt["prefill_vs_first_length"] = pt["prefill_s"] / base["prefill_s"]
        pt["ms_per_token_vs_first_length"] = pt["ms_per_token"] / base["ms_per_token"]
    out = {"config": mem.config.to_dict(), "tokens": a.tokens, "repeats": a.repeats, "points": points}
    text = json.dumps(out, indent=1)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
