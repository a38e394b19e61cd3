"""The OpenAI-compatible memory server (``memory-plugin serve``): FastAPI over one
:class:`~memory_plugin.pool.MemoryPool`. See :mod:`memory_plugin.server.app` for the endpoints."""

from .app import create_app
from .tenants import KEYS_ENV, load_keys

__all__ = ["KEYS_ENV", "create_app", "load_keys"]
