"""Which result store a broker URL or ``result_backend`` URL gets (docs/architecture.md,
"Queues and exchanges": where results live on each broker)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError
from ..results import (
    FileResultStore,
    MemoryResultStore,
    NullResultStore,
    RedisResultStore,
    ResultStore,
)
from . import default_home, is_embedded, is_memory, is_redis
from .connections import beside_broker

__all__ = ["check_result_backend", "result_store_for"]


def result_store_for(
    broker_url: str, backend_url: str | None, namespace: str, expires: float,
    broker_options: Mapping[str, Any] | None = None,
    backend_options: Mapping[str, Any] | None = None,
) -> ResultStore:
    """Pick the store: the ``result_backend`` URL (with ``backend_options``), else one
    matching the broker (with ``broker_options``).

    Raises ConfigurationError for a ``result_backend`` URL no store takes.
    """
    if backend_url:
        check_result_backend(backend_url)
    url = backend_url or broker_url
    options = backend_options if backend_url else broker_options
    scheme = url.split("://", 1)[0]
    if is_redis(url):
        return RedisResultStore(url, namespace, expires, options)
    if is_memory(url):
        return MemoryResultStore(namespace, expires)
    fsync = bool((options or {}).get("fsync"))
    beside = beside_broker(url, "-results")
    if beside is not None:
        return FileResultStore(beside, namespace, expires, fsync)
    if scheme == "file":
        return FileResultStore(Path(url.split("://", 1)[1] or default_home()), namespace,
                               expires, fsync)
    return NullResultStore(namespace, expires)


def check_result_backend(url: str) -> None:
    """Raises ConfigurationError for a ``result_backend`` URL no store takes (Redis or
    its sentinels, a ``file://`` directory, the embedded or the in-memory broker's)."""
    if not (is_redis(url) or is_memory(url) or is_embedded(url) or
            url.split("://", 1)[0] == "file"):
        raise ConfigurationError(
            f"unsupported result_backend {url!r}; use redis://, sentinel://, file://, "
            "embedded://, memory:// or rpc:// (results to the caller)")
