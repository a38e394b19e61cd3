"""The memory server on Ray Serve: N replicas of the same app over one shared memory directory.

Each replica loads the model once and keeps its own :class:`~memory_plugin.pool.MemoryPool`. A
thread's turns go to the replica that holds it open through Ray Serve's *model multiplexing*: the
client sends the thread id in the ``serve_multiplexed_model_id`` header (as well as ``X-Thread-Id``),
Ray's router prefers a replica that already "loaded" that id, and each replica keeps an LRU of at
most ``max_open`` ids; evicting one closes that thread's memories here, which releases its directory.

No lock of our own: a thread's directory is held by an ``flock`` (``persistence.DirLock``) while a
replica has it open, so a second replica waits up to ``lock_wait`` seconds and then answers 409
``thread_busy``; a replica that dies loses its flock with its process, so another reopens the thread
from its durable directory. ``ray`` is imported here only, lazily: the core does not need it.
"""

from __future__ import annotations

import importlib
import os
import signal
import threading

THREAD_HEADER = "serve_multiplexed_model_id"  # Ray Serve's routing header (the "model id")
REPLICA_HEADER = "x-memory-replica"  # which replica answered (tests, benchmark)
HELD_HEADER = "x-memory-held"  # "1": the thread's memory was already open on that replica (a routing hit)


def load(loader: str | None, model: str | None):
    """The ``(model, tokenizer)`` a replica serves: ``loader`` ("module:function" returning the pair,
    e.g. the tests' tiny model) or :func:`memory_plugin.loading.load_model` on ``model``."""
    if loader is None:
        from ..loading import load_model

        return load_model(model)
    module, _, name = loader.partition(":")
    if not module or not name:
        raise ValueError(f"loader must be 'module:function', got {loader!r}")
    return getattr(importlib.import_module(module), name)()


class _Held:
    """A thread a replica has "loaded" for Ray's multiplexing; Ray calls ``__del__`` when its LRU
    evicts the id, which closes the thread's idle memories here (a memory mid-turn stays open and
    the pool's own LRU closes it later)."""

    def __init__(self, pool, thread: str):
        self.pool, self.thread = pool, thread

    def __del__(self):
        self.pool.release(self.thread)


def deployment(
    memory_dir: str,
    *,
    replicas: int = 2,
    keys: dict[str, str] | None = None,
    max_concurrency: int = 2,
    max_open: int = 8,
    max_resident_mb: float | None = None,
    model: str | None = None,
    loader: str | None = None,
    model_name: str = "memory-plugin",
    lock_wait: float = 5.0,
    replica_cpus: float = 1.0,
    torch_threads: int | None = None,
):
    """The bound Ray Serve application (pass it to ``serve.run``). Budgets are per replica."""
    from ray import serve

    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas must be a positive int, got {replicas!r}")
    if isinstance(max_open, bool) or not isinstance(max_open, int) or max_open < 1:
        raise ValueError(f"max_open must be a positive int, got {max_open!r}")
    keys = dict(keys or {})

    @serve.deployment(
        num_replicas=replicas,
        ray_actor_options={"num_cpus": replica_cpus},
        # A thread's queued turns wait on the replica that holds it rather than spill to another
        # (which would have to wait for the directory's lock): allow a deep queue per replica.
        max_ongoing_requests=64,
        health_check_period_s=2,
        health_check_timeout_s=30,
        graceful_shutdown_timeout_s=30,
    )
    @serve.ingress()
    class MemoryServer:
        def __init__(self):
            from ..pool import MemoryPool
            from .app import create_app

            if torch_threads:
                import torch

                torch.set_num_threads(torch_threads)
            hf_model, tokenizer = load(loader, model)
            budget = None if max_resident_mb is None else int(max_resident_mb * 2**20)
            # the pool may hold one more than Ray's LRU: Ray evicts first, closing the memory
            self.pool = MemoryPool(
                memory_dir, hf_model, tokenizer, max_open=max_open + 1, max_resident_bytes=budget, lock_wait=lock_wait
            )
            self.name = f"{serve.get_replica_context().replica_id.unique_id}:{os.getpid()}"
            self.asgi = create_app(self.pool, keys, model_name=model_name, max_concurrency=max_concurrency)
            self.asgi.add_middleware(_Route, server=self)

        def __serve_build_asgi_app__(self):
            return self.asgi

        @serve.multiplexed(max_num_models_per_replica=max_open)
        async def hold(self, thread: str) -> _Held:
            return _Held(self.pool, thread)

        def check_health(self):
            if self.pool is None:
                raise RuntimeError("the memory pool is closed")

    return MemoryServer.bind()


class _Route:
    """Registers the request's thread with Ray's multiplexing LRU (so the router sends its next
    turns here) and names the replica in a response header, with whether the thread's memory was
    already open here when the request came (a turn that found its thread open, the routing's hit)."""

    def __init__(self, app, server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from ray import serve

        thread = serve.get_multiplexed_model_id()
        held = b"1" if thread and self.server.pool.holds(thread) else b"0"
        if thread:
            await self.server.hold(thread)
        name = self.server.name.encode()

        async def named(message):
            if message["type"] == "http.response.start":
                extra = [(REPLICA_HEADER.encode(), name), (HELD_HEADER.encode(), held)]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, named)


def serve_ray(
    host: str,
    port: int,
    memory_dir: str,
    *,
    replicas: int,
    address: str | None = None,
    num_cpus: int | None = None,
    stop: threading.Event | None = None,
    **options,
) -> None:
    """Start (or join, with ``address``) a Ray cluster, run the app on ``host:port`` until SIGINT or
    SIGTERM (or ``stop``), then shut Serve down: each replica's app closes its pool."""
    import ray
    from ray import serve

    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    ray.init(address=address or "local", include_dashboard=False, num_cpus=num_cpus)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(deployment(memory_dir, replicas=replicas, **options), name="memory-plugin", route_prefix="/")
        print(f"serving on http://{host}:{port} with {replicas} Ray Serve replicas", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
