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


def passkey_report(out: Path) -> str:
    """Markdown tables of a ``passkey.py all`` run, and ``passkey.png`` beside the JSON files."""
    runs = _load(out)
    ceiling = next((r for r in runs if r["method"] == "ceiling"), None)
    lengths = sorted({r["length"] for r in runs if r["method"] != "ceiling"})
    by = {(r["method"], r["length"]): r for r in runs}
    lines = []
    if ceiling:
        lines.append(
            f"Model ceiling (each needle alone in ~1k tokens, full attention): "
            f"**{ceiling['accuracy']:.0%}** of {ceiling['n_questions']} questions.\n"
        )
    header = "| method | " + " | ".join(f"{n // 1024}k" for n in lengths) + " |"
    sep = "|---|" + "---|" * len(lengths)

    def table(title, fmt, key):
        rows = [f"**{title}**\n", header, sep]
        for m, label in LABELS.items():
            cells = [fmt(by[m, n][key]) if (m, n) in by and key in by[m, n] else "not run" for n in lengths]
            if any(c != "not run" for c in cells):
                rows.append(f"| {label} | " + " | ".join(cells) + " |")
        return "\n".join(rows) + "\n"

    lines.append(table("Passkey accuracy", lambda v: f"{v:.0%}", "accuracy"))
    lines.append(table("Ingest throughput (tokens/s, whole history from scratch)", lambda v: f"{v:,.0f}", "ingest_tok_s"))
    lines.append(table("Per-turn latency (s): add a 200-token message + generate 32 tokens", lambda v: f"{v:.2f}", "turn_seconds"))
    lines.append(table("Peak RSS beyond the loaded model (MiB)", lambda v: f"{v:,.0f}", "peak_rss_beyond_model_mb"))
    cm = [by.get(("contextmemory", n)) for n in lengths]
    if cm[0] and cm[-1]:
        lines.append(
            f"ContextMemory, {lengths[-1] // 1024}k vs {lengths[0] // 1024}k: ingest throughput "
            f"{cm[-1]['ingest_tok_s'] / cm[0]['ingest_tok_s']:.2f}x, per-turn latency "
            f"{cm[-1]['turn_seconds'] / cm[0]['turn_seconds']:.2f}x.\n"
        )
    _plot(out / "passkey.png", by, lengths, ceiling)
    return "\n".join(lines)


def _plot(path: Path, by: dict, lengths: list[int], ceiling: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for m, label in LABELS.items():
        xs = [n for n in lengths if (m, n) in by]
        if not xs:
            continue
        ax1.plot(xs, [100 * by[m, n]["accuracy"] for n in xs], "o-", label=label)
        ax2.plot(xs, [by[m, n]["turn_seconds"] for n in xs if "turn_seconds" in by[m, n]], "o-", label=label)
    if ceiling:
        ax1.axhline(100 * ceiling["accuracy"], color="grey", ls="--", label="model ceiling (~1k tokens)")
    ax1.axvline(8192, color="grey", ls=":", lw=1)
    ax1.text(8192, 3, " trained context", color="grey", fontsize=8)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{n // 1024}k" for n in lengths])
        ax.set_xlabel("history length (tokens)")
    ax1.set_ylabel("passkey accuracy (%)")
    ax1.set_ylim(-5, 105)
    ax2.set_ylabel("per-turn latency (s, log)")
    ax2.set_yscale("log")
    ax1.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M-Instruct on 2 CPU cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def sweep_report(out: Path) -> str:
    """Markdown table of a ``passkey.py sweep`` run."""
    rows = ["| config | accuracy | ingest tok/s | per-turn s | peak RSS beyond model (MiB) |", "|---|---|---|---|---|"]
    for r in sorted(_load(out), key=lambda r: -r["accuracy"]):
        c = r["config"]
        name = f"n_local={c['n_local']} topk={c['topk']} block={c['block_size']} repr={c['repr_topk']} stride={c['mass_stride']}"
        rows.append(
            f"| {name} | {r['accuracy']:.0%} ({r['n_questions']}) | {r['ingest_tok_s']:.0f} | "
            f"{r['turn_seconds']:.2f} | {r['peak_rss_beyond_model_mb']:.0f} |"
        )
    return "\n".join(rows)
