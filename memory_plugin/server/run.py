"""``memory-plugin serve``: load the model, open the pool, run the app with uvicorn.

uvicorn handles SIGINT and SIGTERM: it stops accepting requests, lets those in progress finish,
then runs the app's shutdown, which closes the pool (every open memory writes its final snapshot).
"""

from __future__ import annotations

import ipaddress
import sys

from .tenants import KEYS_ENV, load_keys

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    """``host`` only reachable from this machine (127.0.0.0/8, ::1, localhost)."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    host: str,
    port: int,
    memory_dir: str,
    *,
    api_keys: str | None = None,
    max_concurrency: int = 2,
    max_open: int = 8,
    max_resident_mb: float | None = None,
    model: str | None = None,
    model_name: str = "memory-plugin",
    log_level: str = "info",
) -> None:
    """Serve the memories under ``memory_dir`` on ``host:port`` until SIGINT or SIGTERM.

    Without API keys (``api_keys`` file, or the :data:`~memory_plugin.server.tenants.KEYS_ENV`
    environment variable) anyone who reaches the port reads every memory, so only a loopback
    ``host`` is accepted then.
    """
    import uvicorn

    from ..loading import load_model
    from ..pool import MemoryPool
    from .app import create_app

    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"--port must be 0 to 65535, got {port!r}")
    keys = load_keys(api_keys)
    if not keys and not is_loopback(host):
        raise ValueError(
            f"--host {host}: without API keys (--api-keys FILE or {KEYS_ENV}) the server listens on loopback "
            "only (127.0.0.1); give keys to serve other machines"
        )
    if not keys:
        print(f"no API keys: listening on {host} only, every request is tenant 'default'", file=sys.stderr)
    else:
        print(f"{len(keys)} API keys for {len(set(keys.values()))} tenants", file=sys.stderr)
    budget = None if max_resident_mb is None else int(max_resident_mb * 2**20)
    hf_model, tokenizer = load_model(model)
    pool = MemoryPool(memory_dir, hf_model, tokenizer, max_open=max_open, max_resident_bytes=budget)
    app = create_app(pool, keys, model_name=model_name, max_concurrency=max_concurrency)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30)
