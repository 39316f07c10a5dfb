"""Broker URLs, queue names and connections.

The number of broker queues is fixed by routes, workers and clients, never by tasks
(docs/architecture.md, 'Queues and exchanges'): ``<ns>.tasks.<queue>`` per route,
``<ns>.ctl.<worker>`` per worker, ``<ns>.inbox.<client>`` per client process (with an
expiry), one fanout exchange ``<ns>.bcast`` for requests to every worker, and ``<ns>.dead``
for dead letters.
"""

from __future__ import annotations

import operator
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kombu import Exchange, Queue

EMBEDDED_SCHEME = "embedded"
#: one Redis server (``redis``, ``rediss``) or a Redis behind sentinels (``sentinel``,
#: transport/redis_urls.py)
REDIS_SCHEMES = frozenset({"redis", "rediss", "sentinel"})
MEMORY_SCHEME = "memory"
#: the schemes of the brokers this package has its own code for (``kombu_transports``
#: knows them all): a URL with one of them is checked without importing kombu
OWN_SCHEMES = frozenset({EMBEDDED_SCHEME, MEMORY_SCHEME, "amqp", "amqps", "pyamqp",
                         *REDIS_SCHEMES})


def kombu_transports() -> dict[str, str]:
    """kombu's table of transports by URL scheme, with ``embedded://`` and ``memory://``
    (kombu's memory transport with a loop wake-up, liveness and no queues shared with
    kombu's own, transport/memory.py; plain kombu use of memory:// works on it unchanged)
    entered in it.

    kombu (with py-amqp under it, some 13 MB of a process's memory) is imported here, on
    the way to a connection, and not with this package: a worker's pool processes fork
    after the app is imported but before the worker connects, and carry only what was
    imported by then (tests/test_imports.py). Everything of this package that makes a
    kombu connection calls this first (``connection_for``), and so does the Celery bridge
    when imported; importing the package enters nothing in kombu's table. A program that
    makes its own kombu connections to ``embedded://`` or ``memory://`` calls this first
    (before that, kombu's own memory transport answers ``memory://`` and kombu refuses
    ``embedded://`` as an unknown transport).
    """
    from kombu.transport import TRANSPORT_ALIASES

    TRANSPORT_ALIASES.setdefault(
        EMBEDDED_SCHEME, "interactive_tasks.transport.embedded:Transport"
    )
    TRANSPORT_ALIASES[MEMORY_SCHEME] = "interactive_tasks.transport.memory:Transport"
    return TRANSPORT_ALIASES


#: The highest task priority: task queues on RabbitMQ are declared with it as their
#: maximum, and kombu's Redis priority lists cover 0 to it.
MAX_PRIORITY = 9


def check_priority(priority: object) -> None:
    """Raises ValueError unless ``priority`` is an integer from 0 to MAX_PRIORITY: above
    it RabbitMQ would silently treat it as the maximum, and a bool or a float is a
    mistake rather than a priority (an integer type of another library, numpy's, counts
    as an integer)."""
    try:
        number = None if isinstance(priority, bool) else operator.index(priority)  # type: ignore[arg-type]
    except TypeError:
        number = None
    if number is None or not 0 <= number <= MAX_PRIORITY:
        raise ValueError(f"priority must be an integer from 0 to {MAX_PRIORITY}, "
                         f"got {priority!r}")


#: How long an unused client inbox lives on the broker.
INBOX_EXPIRES = 60.0
#: How long a worker's control queue outlives the worker.
CONTROL_QUEUE_EXPIRES = INBOX_EXPIRES * 10


def default_home() -> Path:
    """Per-user directory for the embedded broker and result store.

    ``ITASK_HOME`` overrides it; otherwise ``$XDG_STATE_HOME/interactive_tasks`` or
    ``~/.local/state/interactive_tasks``.
    """
    env = os.environ.get("ITASK_HOME")
    if env:
        return Path(env).expanduser()
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return Path(state) / "interactive_tasks"


def resolve_broker_url(url: str | None) -> str:
    """The broker URL to use: the argument, then ``ITASK_BROKER_URL``, then embedded."""
    url = url or os.environ.get("ITASK_BROKER_URL") or ""
    if not url:
        return f"{EMBEDDED_SCHEME}://"
    return url


def is_embedded(url: str) -> bool:
    return url.split("://", 1)[0] == EMBEDDED_SCHEME


def is_memory(url: str) -> bool:
    """The in-memory broker of this process (``memory://``, transport/memory.py)."""
    return url.split("://", 1)[0] == MEMORY_SCHEME


def is_amqp(url: str) -> bool:
    """RabbitMQ (kombu's py-amqp transport)."""
    return url.split("://", 1)[0] in ("amqp", "amqps", "pyamqp")


def is_redis(url: str) -> bool:
    """A Redis server or a Redis behind sentinels: the Redis fast path applies."""
    return url.split("://", 1)[0].lower() in REDIS_SCHEMES


def embedded_directory(url: str) -> Path:
    """The directory an ``embedded://[/path]`` URL stores its files in."""
    rest = url.split("://", 1)[1] if "://" in url else ""
    if rest.strip("/"):
        return Path("/" + rest.lstrip("/"))
    return default_home() / "broker"


def incarnation(worker: str) -> str:
    """A name for one start of ``worker``: its hostname and a random suffix (its unacked
    keys on Redis, its held queues on RabbitMQ are this start's own)."""
    return f"{worker}/{uuid.uuid4().hex[:8]}"


def held_prefix(namespace: str) -> str:
    """The start of every held queue's name on RabbitMQ (transport/amqp_hold.py)."""
    return f"{namespace}.held."


@dataclass(frozen=True)
class Names:
    """Queue and exchange names for one namespace (``namespace`` setting, default ``it``)."""

    namespace: str = "it"

    def task_queue_name(self, queue: str) -> str:
        return f"{self.namespace}.tasks.{queue}"

    def control_queue_name(self, worker: str) -> str:
        return f"{self.namespace}.ctl.{worker}"

    def inbox_name(self, client_id: str) -> str:
        return f"{self.namespace}.inbox.{client_id}"

    @property
    def dead_letter_name(self) -> str:
        return f"{self.namespace}.dead"

    # kombu's entities are imported when made (see kombu_transports for why).
    @property
    def broadcast_exchange(self) -> Exchange:
        from kombu import Exchange

        return Exchange(f"{self.namespace}.bcast", type="fanout", durable=False,
                        auto_delete=False, delivery_mode=1)

    @property
    def events_exchange(self) -> Exchange:
        """Monitoring stream: worker heartbeats and task events (Celery's ``-E``)."""
        from kombu import Exchange

        return Exchange(f"{self.namespace}.events", type="fanout", durable=False,
                        auto_delete=False, delivery_mode=1)

    def task_queue(self, queue: str) -> Queue:
        name = self.task_queue_name(queue)
        # RabbitMQ honours priority only on queues declared with a maximum (0-9 here,
        # higher first); Redis uses kombu's priority lists; the embedded broker is FIFO.
        from kombu import Queue

        return Queue(name, routing_key=name, durable=True, max_priority=MAX_PRIORITY)

    def control_queue(self, worker: str) -> Queue:
        name = self.control_queue_name(worker)
        from kombu import Queue

        return Queue(name, routing_key=name, durable=False, expires=CONTROL_QUEUE_EXPIRES)

    def broadcast_queue(self, worker: str) -> Queue:
        from kombu import Queue

        return Queue(f"{self.namespace}.bcast.{worker}", self.broadcast_exchange,
                     durable=False, auto_delete=True, expires=INBOX_EXPIRES)

    def inbox_queue(self, client_id: str) -> Queue:
        name = self.inbox_name(client_id)
        from kombu import Queue

        return Queue(name, routing_key=name, durable=False, expires=INBOX_EXPIRES,
                     auto_delete=False)

    def inbox_queue_named(self, inbox: str) -> Queue | None:
        """The inbox queue called ``inbox``, with its expiry, for a publisher to declare
        (so one a late publish re-creates after its client left still goes away); None for
        a name that is not an inbox of this namespace."""
        queue = self.inbox_queue(inbox.rsplit(".", 1)[-1])
        return queue if queue.name == inbox else None

    @property
    def dead_letter_queue(self) -> Queue:
        name = self.dead_letter_name
        from kombu import Queue

        return Queue(name, routing_key=name, durable=True)
