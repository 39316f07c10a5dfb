"""Redis URLs: which URLs are Redis, and a redis-py client for the current primary.

``redis://`` and ``rediss://`` name one server. ``sentinel://`` names Redis Sentinels, read
as kombu's Redis transport reads them, so one URL serves kombu and the fast path alike::

    sentinel://[[user]:password@]host[:port][/db];sentinel://host2[:port];…

with the primary's name in the transport options (``broker_transport_options`` for the
broker, ``result_backend_transport_options`` for a ``result_backend``)::

    {"master_name": "mymaster",                 # required
     "sentinel_kwargs": {"password": "…"},      # for the sentinels themselves (optional)
     "min_other_sentinels": 0}                  # as in redis-py (optional)

The user, password and database of the first URL are the primary's; the port defaults to
26379.

A client from :func:`redis_client` for a ``sentinel://`` URL asks the sentinels where the
primary is each time it opens a connection, so code that reconnects after a connection
error follows a failover without more ado. A demoted primary keeps the connections it had:
its ``READONLY`` and ``UNBLOCKED`` error replies mean what a broken connection means
(:func:`primary_moved`); redis-py turns them into ``ConnectionError`` for its own commands.

Redis replicates asynchronously: a primary that dies may have acknowledged writes its
replicas never got (seen here: a task pushed and answered, then the primary SIGKILLed at
once, was missing on the promoted replica). And after ``SENTINEL FAILOVER`` the old
primary goes on taking writes on the connections it has until the sentinel turns it into
a replica (~10 s here), then drops them for the new primary's data. The ``wait_replicas``
transport option (``{"wait_replicas": 1, "wait_replicas_timeout": 1.0}``) makes the fast
path's writes that decide a task's fate — the client's publish, the worker's fetch, and
the worker's packet of acks, results and events — wait (``WAIT``) until that many replicas
have them. One that comes back short is checked against the sentinels
(:func:`stays_written`): if they name another primary or are failing this one over, it
may have gone to a primary on its way out, and is made again once they name one.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from ..errors import ConfigurationError
from . import is_redis

if TYPE_CHECKING:
    import redis

logger = logging.getLogger(__name__)

SENTINEL_SCHEME = "sentinel"
SENTINEL_PORT = 26379
#: Seconds a sentinel may take to connect and to answer, unless ``sentinel_kwargs`` say.
SENTINEL_TIMEOUT = 5.0
#: Seconds between two warnings about writes that replicas did not acknowledge.
WARN_EVERY = 10.0
_warned: dict[str, float] = {}
#: How a demoted primary answers a write (``READONLY``) and a client blocked in BLMPOP or
#: BRPOP when it turns into a replica (``UNBLOCKED``).
_MOVED_PREFIXES = ("READONLY ", "UNBLOCKED ")


def scheme_of(url: str) -> str:
    return url.split("://", 1)[0].lower()


def is_sentinel(url: str) -> bool:
    return scheme_of(url) == SENTINEL_SCHEME


@dataclass(frozen=True)
class SentinelTarget:
    """The sentinels to ask and the primary to ask them for."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_kwargs: Mapping[str, Any] | None = None
    min_other_sentinels: int = 0


def parse_sentinel_url(url: str, options: Mapping[str, Any] | None) -> SentinelTarget:
    """The :class:`SentinelTarget` of a ``sentinel://`` URL and its transport options.

    Raises ConfigurationError for a URL that is not all ``sentinel://`` parts, a bad port
    or database, or options without ``master_name``.
    """
    options = options or {}
    master_name = options.get("master_name")
    if not isinstance(master_name, str) or not master_name:
        raise ConfigurationError(
            "a sentinel:// URL needs the primary's name in the transport options: "
            "broker_transport_options={'master_name': ...} (result_backend_transport_options "
            "for a result_backend)")
    sentinels: list[tuple[str, int]] = []
    first: Any = None
    for part in url.split(";"):
        part = part.strip()
        if not part:
            continue
        if not is_sentinel(part):
            raise ConfigurationError(
                f"every part of a sentinel URL must be sentinel://host:port, not {part!r}")
        try:
            split = urlsplit(part)
            port = split.port or SENTINEL_PORT
        except ValueError as exc:
            raise ConfigurationError(f"bad sentinel URL {part!r}: {exc}") from None
        sentinels.append((split.hostname or "localhost", port))
        if first is None:
            first = split
    if first is None:
        raise ConfigurationError(f"no sentinel address in {url!r}")
    path = first.path.strip("/")
    if path and not path.isdigit():
        raise ConfigurationError(f"bad database {path!r} in sentinel URL: a number is needed")
    sentinel_kwargs = options.get("sentinel_kwargs")
    return SentinelTarget(
        sentinels=tuple(sentinels),
        master_name=master_name,
        db=int(path or 0),
        username=unquote(first.username) if first.username else None,
        password=unquote(first.password) if first.password else None,
        sentinel_kwargs=dict(sentinel_kwargs) if sentinel_kwargs else None,
        min_other_sentinels=int(options.get("min_other_sentinels") or 0),
    )


def check_url(url: str, options: Mapping[str, Any] | None) -> None:
    """Raises ConfigurationError when a sentinel URL or the Redis options cannot work."""
    if is_sentinel(url):
        parse_sentinel_url(url, options)
    if is_redis(url):
        replica_wait(options)


def redis_client(url: str, options: Mapping[str, Any] | None = None, *,
                 single_connection: bool = False, **connection_kwargs: Any) -> redis.Redis:
    """A redis-py client of the server ``url`` names (for ``sentinel://``: of whichever
    server is the primary when a connection opens).

    ``options``: the transport options (only sentinel URLs read them); ``connection_kwargs``
    go to each connection (``socket_timeout`` …); ``single_connection``: one connection,
    opened now (redis-py's ``single_connection_client``).

    Raises ConfigurationError for a sentinel URL without its options, and redis-py's
    errors (``redis.ConnectionError``, ``MasterNotFoundError``) for a connection opened now.
    """
    import redis

    if not is_sentinel(url):
        return redis.Redis.from_url(url, single_connection_client=single_connection,
                                    **connection_kwargs)
    from redis.sentinel import Sentinel, SentinelConnectionPool

    target = parse_sentinel_url(url, options)
    primary_kwargs = {**connection_kwargs, "db": target.db, "username": target.username,
                      "password": target.password}
    manager = Sentinel(
        target.sentinels, min_other_sentinels=target.min_other_sentinels,
        sentinel_kwargs={"socket_connect_timeout": SENTINEL_TIMEOUT,
                         "socket_timeout": SENTINEL_TIMEOUT, **(target.sentinel_kwargs or {})},
        **primary_kwargs)
    pool = SentinelConnectionPool(target.master_name, manager, **primary_kwargs)
    client = _primary_client_class()(connection_pool=pool,
                                     single_connection_client=single_connection)
    client.auto_close_connection_pool = True  # close() closes what this client opened
    return client


def replica_wait(options: Mapping[str, Any] | None) -> tuple[int, int] | None:
    """``(replicas, timeout in ms)`` for ``WAIT`` from the ``wait_replicas`` and
    ``wait_replicas_timeout`` (seconds, default 1) transport options; None when off.

    Raises ConfigurationError for values that are not a count and a positive time.
    """
    options = options or {}
    replicas = options.get("wait_replicas") or 0
    timeout = options.get("wait_replicas_timeout", 1.0)
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
        raise ConfigurationError(f"wait_replicas must be a number of replicas, not {replicas!r}")
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
        raise ConfigurationError(
            f"wait_replicas_timeout must be a positive number of seconds, not {timeout!r}")
    return (replicas, max(1, int(timeout * 1000))) if replicas else None


def stays_written(acknowledged: Any, wait: tuple[int, int], client: redis.Redis,
                  what: str) -> bool:
    """After a write that ended with ``WAIT`` (``acknowledged``: its reply) on ``client``:
    False when fewer replicas than asked for have it *and* the primary it went to is in
    doubt (:func:`primary_in_doubt`): the write is to be made again after reconnecting.
    True otherwise; when replicas are missing but the primary stands, so does the write,
    and a warning says a failover now could lose it (at most one per :data:`WARN_EVERY`
    seconds; Redis's ``min-replicas-to-write`` makes the primary refuse writes instead).
    """
    if isinstance(acknowledged, int) and acknowledged >= wait[0]:
        return True
    if primary_in_doubt(client):
        return False
    now = time.monotonic()
    if now >= _warned.get(what, 0.0):
        _warned[what] = now + WARN_EVERY
        logger.warning("%s: %s of %d replica(s) acknowledged within %d ms; a failover now "
                       "could lose it", what, acknowledged, wait[0], wait[1])
    return True


def primary_in_doubt(client: redis.Redis) -> bool:
    """Behind sentinels: may the primary ``client`` last connected to be on its way out
    — the sentinels name another one or none, or they are failing it over? (From
    ``SENTINEL FAILOVER`` until they announce the new primary, ~1 s here, both servers
    take writes and the sentinels still name the old one.) Always False for a client of
    a ``redis://`` URL."""
    import redis

    pool: Any = client.connection_pool
    if not hasattr(pool, "get_master_address"):
        return False
    before = pool.master_address
    try:
        now = pool.get_master_address()  # asks the sentinels; the one that answered first
        state = pool.sentinel_manager.sentinels[0].sentinel_master(pool.service_name)
    except redis.RedisError:  # no sentinel answers, or none knows a primary
        return True
    if before is not None and tuple(now) != tuple(before):
        return True
    flags = state.get("flags", "")
    return "failover_in_progress" in (flags if isinstance(flags, set) else str(flags).split(","))


def primary_moved(reply: Any) -> bool:
    """Is this error reply a demoted primary's (see the module docstring)?"""
    import redis

    return isinstance(reply, redis.ResponseError) and str(reply).startswith(_MOVED_PREFIXES)


@functools.cache
def _primary_client_class() -> type[redis.Redis]:
    import redis

    class PrimaryClient(redis.Redis):
        """A client of a sentinel-managed pool that also closes its sentinel connections."""

        def close(self) -> None:
            try:
                super().close()
            finally:
                manager: Any = getattr(self.connection_pool, "sentinel_manager", None)
                for sentinel in manager.sentinels if manager is not None else ():
                    sentinel.close()

    return PrimaryClient
