"""Tables and plots from benchmark JSON files (written by benchmarks/passkey.py)."""

from __future__ import annotations

import json
from pathlib import Path

LABELS = {
    "contextmemory": "ContextMemory",
    "streaming": "StreamingLLM (sinks + window)",
    "truncation": "truncation (last W tokens)",
    "full": "full attention (transformers)",
}


def _load(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]


def passkey_report(out: Path, perf: Path | None = None) -> str:
    """Markdown tables of a ``passkey.py all`` run (accuracy) and a ``perf`` run (timings), and
    ``passkey.png`` beside the accuracy JSON files."""
    runs = _load(out)
    ceiling = next((r for r in runs if r["method"] == "ceiling"), None)
    lengths = sorted({r["length"] for r in runs if r["method"] != "ceiling"})
    acc = {(r["method"], r["length"]): r for r in runs}
    timing = {}
    if perf is not None and perf.exists():
        for r in _load(perf):
            for pt in r["points"]:
                timing[r["method"], pt["length"]] = pt
    t_lengths = sorted({n for _, n in timing})
    lines = []
    if ceiling:
        lines.append(
            f"Model ceiling (each needle alone in ~1k tokens, full attention): "
            f"**{ceiling['accuracy']:.0%}** of {ceiling['n_questions']} questions.\n"
        )

    def table(title, data, lens, fmt, key, skip=()):
        rows = [f"**{title}**\n", "| method | " + " | ".join(f"{n // 1024}k" for n in lens) + " |", "|---|" + "---|" * len(lens)]
        for m, label in LABELS.items():
            if m in skip:
                continue
            cells = [fmt(data[m, n][key]) if (m, n) in data else "not run" for n in lens]
            if any(c != "not run" for c in cells):
                rows.append(f"| {label} | " + " | ".join(cells) + " |")
        return "\n".join(rows) + "\n"

    lines.append(table("Passkey accuracy", acc, lengths, lambda v: f"{v:.0%}", "accuracy"))
    lines.append(table("Peak RSS beyond the loaded model, accuracy run (MiB)", acc, lengths, lambda v: f"{v:,.0f}", "peak_rss_beyond_model_mb"))
    if timing:
        # Truncation only stores token ids when text arrives; it encodes its window at each question.
        lines.append(table("Ingest throughput at that history length (tokens/s, the last 2k tokens)", timing, t_lengths, lambda v: f"{v:,.0f}", "marginal_tok_s", skip=("truncation",)))
        lines.append(table("Per-turn latency (s): add a 200-token message + generate 32 tokens", timing, t_lengths, lambda v: f"{v:.2f}", "turn_seconds"))
        cm = [timing.get(("contextmemory", n)) for n in t_lengths]
        if cm[0] and cm[-1]:
            lines.append(
                f"ContextMemory at {t_lengths[-1] // 1024}k vs {t_lengths[0] // 1024}k: ingest throughput "
                f"{cm[-1]['marginal_tok_s'] / cm[0]['marginal_tok_s']:.2f}x, per-turn latency "
                f"{cm[-1]['turn_seconds'] / cm[0]['turn_seconds']:.2f}x.\n"
            )
    _plot(out / "passkey.png", acc, lengths, timing, t_lengths, ceiling)
    return "\n".join(lines)


def _plot(path: Path, acc: dict, lengths: list[int], timing: dict, t_lengths: list[int], ceiling: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for m, label in LABELS.items():
        xs = [n for n in lengths if (m, n) in acc]
        if xs:
            ax1.plot(xs, [100 * acc[m, n]["accuracy"] for n in xs], "o-", label=label)
        xs = [n for n in t_lengths if (m, n) in timing]
        if xs:
            ax2.plot(xs, [timing[m, n]["turn_seconds"] for n in xs], "o-", label=label)
    if ceiling:
        ax1.axhline(100 * ceiling["accuracy"], color="grey", ls="--", label="model ceiling (~1k tokens)")
    for ax, lens in ((ax1, lengths), (ax2, t_lengths or lengths)):
        ax.axvline(8192, color="grey", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lens, [f"{n // 1024}k" for n in lens])
        ax.set_xlabel("history length (tokens); dotted: trained context")
    ax1.set_ylabel("passkey accuracy (%)")
    ax1.set_ylim(-5, 105)
    ax2.set_ylabel("per-turn latency (s, log)")
    ax2.set_yscale("log")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M-Instruct on 2 CPU cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def sweep_report(out: Path) -> str:
    """Markdown table of a ``passkey.py sweep`` run."""
    rows = ["| config | span | accuracy |", "|---|---|---|"]
    for r in sorted(_load(out), key=lambda r: -r["accuracy"]):
        c = r["config"]
        name = (
            f"n_local={c['n_local']} topk={c['topk']} block_size={c['block_size']} repr_topk={c['repr_topk']} "
            f"mass_stride={c['mass_stride']} positions={c.get('block_positions', 'fixed')} "
            f"far_distance={c.get('far_distance')} relevance={c.get('relevance', 'dot')}"  # files older than a field lack it
        )
        span = c["n_init"] + c["n_local"] + c["topk"] * c["block_size"]
        rows.append(f"| {name} | {span} | {r['accuracy']:.0%} of {r['n_questions']} |")
    return "\n".join(rows)
