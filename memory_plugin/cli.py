"""Command line: ``memory-plugin info | ask | chat``.

    memory-plugin ask --file notes.txt "What did we decide about the schema?"
    memory-plugin chat --file manual.txt
    memory-plugin info
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _config(args):
    from .config import MemoryConfig

    fields = {k: getattr(args, k) for k in ("block_size", "n_init", "n_local", "topk") if getattr(args, k) is not None}
    return MemoryConfig(**fields)


def _memory(args):
    from .memory import ContextMemory

    t = time.perf_counter()
    mem = ContextMemory.from_pretrained(args.model, config=_config(args), device=args.device)
    print(f"loaded {mem.model_name} in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    for f in args.file or []:
        text = Path(f).read_text(encoding="utf-8", errors="replace")
        t = time.perf_counter()
        n = mem.add_text(text)
        print(f"remembered {f}: {n} tokens in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    return mem


def _ask(args) -> int:
    mem = _memory(args)
    for piece in mem.stream(args.question, max_new_tokens=args.max_new_tokens, chat=not args.completion):
        print(piece, end="", flush=True)
    print()
    if args.show_sources:
        for hit in mem.retrieve(args.question, k=3):
            print(f"[{hit.start}:{hit.end}] score {hit.score:.2f}: {hit.text[:100]!r}", file=sys.stderr)
    return 0


def _chat(args) -> int:
    mem = _memory(args)
    print("Type a message (empty line or Ctrl-D to quit).", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        for piece in mem.stream(line, max_new_tokens=args.max_new_tokens, remember=True):
            print(piece, end="", flush=True)
        print(f"\n  ({len(mem)} tokens in memory)", file=sys.stderr)
    return 0


def _info(args) -> int:
    from . import __version__
    from .config import MemoryConfig
    from .model import SUPPORTED_ARCHITECTURES, ModelNotFoundError, default_model_path

    print(f"memory_plugin {__version__}")
    try:
        print(f"default model: {default_model_path()}")
    except ModelNotFoundError as e:
        print(f"default model: not installed ({e})")
    print(f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}")
    print(f"default config: {MemoryConfig()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(prog="memory-plugin", description="Long-term memory inside a local model's attention.")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="version, default model, supported architectures")
    for name, help_ in (("ask", "remember files, answer one question"), ("chat", "interactive chat with memory")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--model", help="local directory, .gguf file or cached hub id (default: embedded SmolLM2)")
        sp.add_argument("--device", help="cpu (default) or cuda")
        sp.add_argument("--file", action="append", help="text file to remember first (repeatable)")
        sp.add_argument("--max-new-tokens", type=int, default=128)
        for field in ("block_size", "n_init", "n_local", "topk"):
            sp.add_argument(f"--{field.replace('_', '-')}", dest=field, type=int)
    ask = sub.choices["ask"]
    ask.add_argument("question")
    ask.add_argument("--completion", action="store_true", help="continue the question as raw text (no chat turn)")
    ask.add_argument("--show-sources", action="store_true", help="print the memory spans most relevant to it")
    args = p.parse_args(argv)
    try:
        return {"info": _info, "ask": _ask, "chat": _chat}[args.cmd](args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
