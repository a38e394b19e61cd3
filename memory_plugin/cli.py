"""Command line: ``memory-plugin info | ask | chat | serve``.

    memory-plugin ask --file notes.txt "What did we decide about the schema?"
    memory-plugin ask --file notes.txt --explain --recall 2 "Who signed the accord?"
    memory-plugin ask --file notes.txt --show-sources --mode lexical "Kelderwick"
    memory-plugin chat --file manual.txt
    memory-plugin info
    memory-plugin serve --port 8000 --memory-dir memories --api-keys keys.txt
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .recall import SEARCH_MODES


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


def _hit_line(hit) -> str:
    """One line for a passage: token span, score, where it is, what found it, its text."""
    where = f"message {hit.message_index}" + (f" ({hit.role})" if hit.role else "")
    found = "+".join(hit.channels) or "-"
    return f"  [{hit.start}:{hit.end}] score {hit.score:.3f} {where} {found}: {hit.text[:100]!r}"


def _answer(mem, prompt: str, args, **kw) -> None:
    """Stream the answer to stdout; with --explain, then the placed and attended passages to stderr."""
    pieces = mem.stream(prompt, max_new_tokens=args.max_new_tokens, recall=args.recall, explain=args.explain, **kw)
    for piece in pieces:
        print(piece, end="", flush=True)
    print()
    if args.explain and pieces.explanation is not None:
        answer = pieces.explanation
        for title, hits in (("placed before the question", answer.placed), ("attended most", answer.attended)):
            print(f"{title}: {len(hits) or 'none'}", file=sys.stderr)
            for hit in hits:
                print(_hit_line(hit), file=sys.stderr)


def _ask(args) -> int:
    mem = _memory(args)
    _answer(mem, args.question, args, chat=not args.completion)
    if args.show_sources:
        hits = mem.retrieve(args.question, k=args.k, mode=args.mode)
        print(f"sources ({args.mode}): {len(hits) or 'none'}", file=sys.stderr)
        for hit in hits:
            print(_hit_line(hit), file=sys.stderr)
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
        _answer(mem, line, args, remember=True)
        print(f"  ({len(mem)} tokens in memory)", file=sys.stderr)
    return 0


def _info(args) -> int:
    from . import __version__
    from .config import MemoryConfig
    from .loading import SUPPORTED_ARCHITECTURES, ModelNotFoundError, default_model_path

    print(f"memory_plugin {__version__}")
    try:
        print(f"default model: {default_model_path()}")
    except ModelNotFoundError as e:
        print(f"default model: not installed ({e})")
    print(f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}")
    print(f"default config: {MemoryConfig()}")
    return 0


def _serve(args) -> int:
    from .server.run import serve

    # the same model and budgets for one process or per Ray replica
    budgets = dict(max_concurrency=args.max_concurrency, max_open=args.max_open, max_resident_mb=args.max_resident_mb,
                   model=args.model, model_name=args.model_name)
    if args.ray:
        from .server.ray_app import serve_ray
        from .server.run import is_loopback
        from .server.tenants import KEYS_ENV, load_keys

        if args.replicas < 1:
            raise ValueError(f"--replicas must be at least 1, got {args.replicas}")
        keys = load_keys(args.api_keys)
        if not keys and not is_loopback(args.host):
            raise ValueError(f"--host {args.host}: without API keys (--api-keys FILE or {KEYS_ENV}) only loopback is served")
        serve_ray(args.host, args.port, args.memory_dir, replicas=args.replicas, address=args.ray_address, keys=keys,
                  lock_wait=args.lock_wait, **budgets)
        return 0
    serve(args.host, args.port, args.memory_dir, api_keys=args.api_keys, **budgets)
    return 0


def _serve_parser(sub) -> None:
    sp = sub.add_parser("serve", help="OpenAI-compatible server over durable memories per tenant and thread")
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on (non-loopback needs API keys)")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--memory-dir", required=True, help="directory holding every tenant's threads (created)")
    sp.add_argument("--api-keys", metavar="FILE", help="one 'key tenant' per line (also: $MEMORY_PLUGIN_API_KEYS)")
    sp.add_argument("--max-concurrency", type=int, default=2, help="answers generated at once (default 2)")
    sp.add_argument("--max-open", type=int, default=8, help="memories kept open in RAM (default 8)")
    sp.add_argument("--max-resident-mb", type=float, help="RAM for all open memories together")
    sp.add_argument("--model", help="local directory, .gguf file or cached hub id (default: embedded SmolLM2)")
    sp.add_argument("--model-name", default="memory-plugin", help="the model id clients name (default memory-plugin)")
    sp.add_argument("--ray", action="store_true", help="run on Ray Serve (pip install memory-plugin[ray]); budgets are per replica")
    sp.add_argument("--replicas", type=int, default=2, help="with --ray: replicas, each with the model and a pool (default 2)")
    sp.add_argument("--ray-address", help="with --ray: join this cluster ('auto': the one running here); default: start a local one")
    sp.add_argument("--lock-wait", type=float, default=5.0, help="with --ray: seconds a replica waits for a thread open in another (default 5)")


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
        sp.add_argument(
            "--recall",
            type=int,
            metavar="N",
            help="passages the memory's search finds for the question, placed before it "
            "(default: the config's recall_k, 3; 0: none)",
        )
        sp.add_argument(
            "--explain", action="store_true", help="after the answer, print the passages placed and those attended most"
        )
        for field in ("block_size", "n_init", "n_local", "topk"):
            sp.add_argument(f"--{field.replace('_', '-')}", dest=field, type=int)
    ask = sub.choices["ask"]
    ask.add_argument("question")
    ask.add_argument("--completion", action="store_true", help="continue the question as raw text (no chat turn)")
    ask.add_argument(
        "--show-sources", action="store_true", help="print the memory passages the search finds for the question"
    )
    ask.add_argument(
        "--mode",
        choices=SEARCH_MODES,
        default="hybrid",
        help="how --show-sources searches: the channels fused (default), one of them, or rerank (the model rescores the hybrid's best)",
    )
    ask.add_argument("-k", type=int, default=3, help="passages --show-sources prints (default 3)")
    _serve_parser(sub)
    args = p.parse_args(argv)
    try:
        return {"info": _info, "ask": _ask, "chat": _chat, "serve": _serve}[args.cmd](args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
