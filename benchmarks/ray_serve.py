"""The memory server on Ray Serve (issue 23, item 4): throughput, latency and routing for 1 and 2
replicas over many threads, on a local Ray cluster this script starts on loopback and stops.

Clients take stateful turns (``/v1/responses`` with the thread as ``conversation``, and in Ray's
``serve_multiplexed_model_id`` header): ``--clients`` clients, each owning the threads ``i, i+N, ...``
and taking ``--turns`` turns in each, round-robin, so one thread never has two turns at once and
several threads do. A 409 ``thread_busy`` (a turn that reached a replica not holding its thread,
docs/SCALING.md) is retried after its ``Retry-After``, as clients must, and counted; a turn's
latency includes its retries.

Per replica count: turns/s, p50/p95 turn latency, and the routing: how many turns found their
thread's memory already open on the replica that answered (``x-memory-held: 1``; a thread's first
turn cannot), how many answered on the same replica as the thread's previous turn, and the 409s.
Then every thread is checked: its messages alternate input/reply, its inputs in order.

    python benchmarks/ray_serve.py --replicas 1 2 --threads 24 --turns 3 --clients 8 --json benchmarks/results/ray_serve.json

The model is the tests' random tiny one (``memory_plugin.testing:tiny_pair``): this measures the
serving and routing, not a model. On a 2-core machine, 2 replicas cannot be faster than 1 by more
than the cores allow; the point is correctness and routing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from server_load import percentile  # noqa: E402

MODEL = "memory-plugin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def client(http: httpx.AsyncClient, threads: list[str], turns: int, max_tokens: int) -> list[dict]:
    """Turns in ``threads`` round-robin; one record per turn."""
    from memory_plugin.server.ray_app import HELD_HEADER, REPLICA_HEADER, THREAD_HEADER

    out = []
    for turn in range(turns):
        for t in threads:
            body = {"model": MODEL, "input": f"{t} turn {turn}: note {turn * 7 + 3}.", "conversation": t,
                    "max_output_tokens": max_tokens, "temperature": 0}  # fmt: skip
            start, busy = time.perf_counter(), 0
            while True:
                r = await http.post("/responses", json=body, headers={THREAD_HEADER: t})
                if r.status_code != 409:
                    break
                busy += 1
                await asyncio.sleep(float(r.headers.get("retry-after", "1")))
            r.raise_for_status()
            out.append({"thread": t, "turn": turn, "seconds": time.perf_counter() - start, "busy": busy,
                        "replica": r.headers[REPLICA_HEADER], "held": r.headers[HELD_HEADER] == "1",
                        "tokens": r.json()["usage"]["output_tokens"]})  # fmt: skip
    return out


def check_threads(base: str, names: list[str], turns: int) -> list[str]:
    """Problems: a thread whose messages do not alternate input/reply with its inputs in order."""
    from memory_plugin.server.ray_app import THREAD_HEADER

    problems = []
    with httpx.Client(base_url=base, timeout=600) as http:
        for t in names:
            held = http.get(f"/threads/{t}/messages", headers={THREAD_HEADER: t}).json()["data"]
            roles = [m["role"] for m in held]
            inputs = [m["content"] for m in held if m["role"] == "user"]
            if roles != ["user", "assistant"] * turns or inputs != [f"{t} turn {i}: note {i * 7 + 3}." for i in range(turns)]:
                problems.append(f"{t}: {roles} {inputs}")
    return problems


def warm(base: str, replicas: int, args) -> None:
    """One turn in each of 4 threads per replica, at once: every replica has done a first turn (its
    first memory, its lazy imports) before the measurement; these threads are not measured."""

    async def run():
        async with httpx.AsyncClient(base_url=base, timeout=600) as http:
            await asyncio.gather(*[client(http, [f"warm{replicas}-{i}"], 1, args.max_tokens) for i in range(4 * replicas)])

    asyncio.run(run())


def measure(base: str, replicas: int, args) -> dict:
    names = [f"r{replicas}-t{i}" for i in range(args.threads)]

    async def run():
        limits = httpx.Limits(max_connections=args.clients + 4)
        async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as http:
            return await asyncio.gather(*[client(http, names[i :: args.clients], args.turns, args.max_tokens) for i in range(args.clients)])

    start = time.perf_counter()
    turns = [x for r in asyncio.run(run()) for x in r]
    wall = time.perf_counter() - start
    lat = [t["seconds"] for t in turns]
    later = [t for t in turns if t["turn"] > 0]  # a thread's first turn cannot find it open
    last: dict[str, str] = {}
    same = 0
    for t in sorted(turns, key=lambda t: (t["thread"], t["turn"])):
        same += t["turn"] > 0 and last.get(t["thread"]) == t["replica"]
        last[t["thread"]] = t["replica"]
    per_replica: dict[str, int] = {}
    for t in turns:
        per_replica[t["replica"]] = per_replica.get(t["replica"], 0) + 1
    return {
        "replicas": replicas,
        "threads": args.threads,
        "turns": len(turns),
        "seconds": round(wall, 2),
        "turns_per_s": round(len(turns) / wall, 3),
        "tokens_per_s": round(sum(t["tokens"] for t in turns) / wall, 1),
        "p50_s": round(percentile(lat, 0.5), 3),
        "p95_s": round(percentile(lat, 0.95), 3),
        "mean_s": round(statistics.fmean(lat), 3),
        "held_open_hits": sum(t["held"] for t in later),
        "later_turns": len(later),
        "hit_rate": round(sum(t["held"] for t in later) / len(later), 3) if later else None,
        "same_replica_as_previous_turn": same,
        "first_turns_held": sum(t["held"] for t in turns if t["turn"] == 0),
        "busy_409": sum(t["busy"] for t in turns),
        "turns_with_409": sum(t["busy"] > 0 for t in turns),
        "turns_per_replica": sorted(per_replica.values(), reverse=True),
        "problems": check_threads(base, names, args.turns),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    p.add_argument("--threads", type=int, default=24)
    p.add_argument("--turns", type=int, default=3, help="turns per thread")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (each owns threads i, i+N, ...)")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--max-open", type=int, default=32, help="per replica (Ray's LRU of thread ids; the pool's)")
    p.add_argument("--max-concurrency", type=int, default=2, help="turns generated at once per replica")
    p.add_argument("--num-cpus", type=int, default=2, help="the local Ray cluster's CPUs")
    p.add_argument("--json", help="write the result here")
    args = p.parse_args()

    import ray
    from ray import serve

    from memory_plugin.server.ray_app import deployment

    port = free_port()
    base = f"http://127.0.0.1:{port}/v1"
    results = []
    t0 = time.perf_counter()
    ray.init(address="local", include_dashboard=False, num_cpus=args.num_cpus, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        started = round(time.perf_counter() - t0, 1)
        with tempfile.TemporaryDirectory() as tmp:
            for n in args.replicas:
                app = deployment(
                    str(Path(tmp) / f"memories-{n}"), replicas=n, loader="memory_plugin.testing:tiny_pair",
                    max_open=args.max_open, max_concurrency=args.max_concurrency, lock_wait=1.0,
                    replica_cpus=args.num_cpus / n, torch_threads=1,
                )  # fmt: skip
                serve.run(app, name="memory-plugin", route_prefix="/")
                warm(base, n, args)
                results.append(measure(base, n, args))
                print(json.dumps(results[-1]), flush=True)
                serve.delete("memory-plugin")
    finally:
        serve.shutdown()
        ray.shutdown()
    result = {"model": "tiny (memory_plugin.testing:tiny_pair)", "clients": args.clients, "turns_per_thread": args.turns,
              "max_tokens": args.max_tokens, "max_concurrency": args.max_concurrency, "num_cpus": args.num_cpus,
              "cluster_start_s": started, "runs": results}  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if all(not r["problems"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
