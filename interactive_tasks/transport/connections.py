"""What differs between brokers when a process connects: connection options, the
operator secret the broker keeps, and files kept beside it.

:func:`connection_for` is the one place that sets a kombu connection up per broker;
``App.connection`` calls it and looks no further at the URL.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import default_home, embedded_directory, is_embedded, is_redis, kombu_transports

if TYPE_CHECKING:
    from kombu import Connection

__all__ = ["beside_broker", "broker_directory", "broker_secret", "connection_for"]

#: how often the embedded broker's consumers look at their queues (seconds)
EMBEDDED_POLLING_INTERVAL = 0.01


def connection_for(url: str, options: Mapping[str, Any], *, namespace: str,
                   heartbeat: float = 0) -> Connection:
    """A new kombu connection to ``url`` (not yet connected) with the transport
    ``options``, set up for this broker.

    ``heartbeat``: seconds between AMQP heartbeats on RabbitMQ (0: off; the caller must
    then answer them, see ``App.connection``); other brokers have none.

    Raises ConfigurationError for a sentinel:// URL without its ``master_name``.
    """
    kombu_transports()  # kombu is imported on the way to a connection, not before
    from kombu import Connection

    options = dict(options)
    if is_embedded(url):
        options.setdefault("polling_interval", EMBEDDED_POLLING_INTERVAL)
    if is_redis(url):
        from .redis_urls import check_url

        check_url(url, options)
        # kombu keeps unacked messages in server-wide keys by default: another project
        # on the same Redis, with a shorter visibility_timeout, would redeliver ours.
        options.setdefault("unacked_key", f"{namespace}.unacked")
        options.setdefault("unacked_index_key", f"{namespace}.unacked_index")
        options.setdefault("unacked_mutex_key", f"{namespace}.unacked_mutex")
    kwargs: dict[str, Any] = {"transport_options": options, "connect_timeout": 5}
    if url.startswith(("amqp", "pyamqp")):  # amqps, pyamqps too
        kwargs["heartbeat"] = heartbeat
    return Connection(url, **kwargs)


def broker_secret(url: str) -> bytes | None:
    """The operator secret the broker keeps for its users, when it keeps one: the embedded
    broker, one per user in ``$ITASK_HOME/secret`` (mode 0600, created on first use; the
    first writer wins). Raises OSError when that file cannot be read or made."""
    if not is_embedded(url):
        return None
    home = default_home()
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = home / "secret"
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    import secrets  # here only: it imports hmac and hashlib (libcrypto)

    value = secrets.token_hex(32).encode()
    tmp = home / f".secret.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(value)
    try:
        os.link(tmp, path)  # first writer wins; others read its value
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    return path.read_bytes().strip()


def broker_directory(url: str) -> Path | None:
    """Where the broker keeps its files (embedded), None for a broker on a server."""
    return embedded_directory(url) if is_embedded(url) else None


def beside_broker(url: str, suffix: str) -> Path | None:
    """For a broker that keeps files (embedded): the directory ``<its directory><suffix>``
    next to them, for what belongs with that broker but is not its own (results, beat);
    never inside it, where the broker owns every entry. None for other brokers."""
    broker_dir = broker_directory(url)
    return None if broker_dir is None else broker_dir.with_name(broker_dir.name + suffix)
