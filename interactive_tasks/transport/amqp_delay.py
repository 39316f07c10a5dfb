"""Delayed delivery on RabbitMQ: countdown / eta tasks wait in the broker, not in a worker.

RabbitMQ has no "deliver at" (without a plugin), but a queue with a fixed
``x-message-ttl`` and a dead-letter exchange releases its messages in order, each after
exactly that TTL. So a delay is spelt in binary over :data:`LEVELS` such queues (the
scheme NServiceBus uses on RabbitMQ): level ``L`` holds a message for ``2**L`` seconds.

* The routing key of a delayed message is its delay in seconds as :data:`LEVELS` bits,
  most significant first, one word each, then the task queue's name:
  ``0.0.….1.0.1.<ns>.tasks.default`` for 5 s.
* Topic exchange ``<ns>.delay.L`` sends a message whose bit ``L`` is 1 to queue
  ``<ns>.delay.L`` and one whose bit is 0 straight on to exchange ``<ns>.delay.(L-1)``
  (an exchange-to-exchange binding); below level 0 comes ``<ns>.delay.deliver``.
* Queue ``<ns>.delay.L`` (TTL ``2**L`` s) dead-letters to exchange ``<ns>.delay.(L-1)``
  with the routing key unchanged, so the message goes on down the bits.
* ``<ns>.delay.deliver`` routes on the key's tail to the task queue (each task queue is
  bound with :data:`LEVELS` ``*`` words and its own name, so names with dots stay exact).

A message is published to the top exchange and waits in one queue per set bit: every
queue holds messages of one TTL only, so none waits behind a later one (no head-of-line
blocking), and the number of queues is fixed (``LEVELS`` per namespace, never one per
task). The delay is whole seconds, rounded down: the task arrives up to one second early
and the worker that takes it holds it for the rest (its ``eta`` is in the message).

Queues are durable, lazy (messages on disk, not in the broker's memory) and messages
persistent, so a delayed task survives every worker's death and a broker restart.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import codec

#: delay levels: the longest delay is ``2**LEVELS - 1`` seconds (8.5 years)
LEVELS = 28
MAX_DELAY = 2 ** LEVELS - 1


def level_name(namespace: str, level: int) -> str:
    """The exchange and the queue of delay level ``level`` (``2**level`` seconds)."""
    return f"{namespace}.delay.{level:02d}"


def deliver_exchange(namespace: str) -> str:
    """The exchange below level 0, which routes each message to its task queue."""
    return f"{namespace}.delay.deliver"


def complete_marker(namespace: str) -> str:
    """An exchange without bindings, declared after every level: its existence says the
    topology (for this number of levels) is complete."""
    return f"{namespace}.delay.complete-{LEVELS}"


def routing_key(delay: int, queue: str) -> str:
    """The routing key that spells ``delay`` (whole seconds) for task queue ``queue``.

    Raises ValueError for a delay outside 0 .. :data:`MAX_DELAY`.
    """
    if not 0 <= delay <= MAX_DELAY:
        raise ValueError(f"a delay of {delay}s is outside 0..{MAX_DELAY}s "
                         f"(about {MAX_DELAY // (365 * 86400)} years)")
    return ".".join(format(delay, f"0{LEVELS}b")) + "." + queue


def _bit_pattern(level: int, bit: str) -> str:
    """The topic pattern that matches keys whose bit ``level`` is ``bit``."""
    return "*." * (LEVELS - 1 - level) + bit + ".#"


def queue_pattern(queue: str) -> str:
    """The deliver exchange's binding for task queue ``queue``: any bits, then its name."""
    return "*." * LEVELS + queue


def delay_seconds(eta: float, now: float | None = None) -> int:
    """Whole seconds to wait for ``eta`` (rounded down; 0 when it is past)."""
    remaining = eta - (time.time() if now is None else now)
    return min(MAX_DELAY, max(0, int(remaining)))


class DelayedPublisher:
    """Publishes delayed task messages on one channel (``channel``, of ``connection``:
    py-amqp's or kombu's), with publisher confirms; declares the delay topology on first
    use, unless its marker exchange shows it is complete, and each task queue
    (``declare_queue(channel, name)``, with the task queue's own arguments) and its
    binding once. Every method raises the channel's errors; after one, drop this object
    and make a new one on a new channel.
    """

    def __init__(self, connection: Any, channel: Any, namespace: str,
                 declare_queue: Callable[[Any, str], None]) -> None:
        self.connection = connection
        self.channel = channel
        self.namespace = namespace
        self.declare_queue = declare_queue
        self._declared = False
        self._bound: set[str] = set()

    def declare(self) -> None:
        """The exchanges, queues and bindings of every level, unless the marker exchange
        declared after them exists (the first delayed publish of a namespace declares
        about 110 objects: 0.3 s here; later connections look once)."""
        import amqp  # see publish

        ch, ns = self.channel, self.namespace
        probe = self.connection.channel()
        try:
            probe.exchange_declare(complete_marker(ns), "fanout", passive=True)
        except amqp.exceptions.NotFound:
            pass  # the server closed the probe
        else:
            probe.close()
            self._declared = True
            return
        below = deliver_exchange(ns)
        ch.exchange_declare(below, "topic", durable=True, auto_delete=False)
        for level in range(LEVELS):
            name = level_name(ns, level)
            ch.exchange_declare(name, "topic", durable=True, auto_delete=False)
            ch.queue_declare(name, durable=True, auto_delete=False, arguments={
                "x-message-ttl": (2 ** level) * 1000,
                "x-dead-letter-exchange": below,
                "x-queue-mode": "lazy",
            })
            ch.queue_bind(name, name, _bit_pattern(level, "1"))
            ch.exchange_bind(below, name, _bit_pattern(level, "0"))
            below = name
        ch.exchange_declare(complete_marker(ns), "fanout", durable=True, auto_delete=False)
        self._declared = True

    def bind(self, queue: str) -> None:
        """Declare task queue ``queue`` and let it receive delayed messages."""
        if queue not in self._bound:
            self.declare_queue(self.channel, queue)
            self.channel.queue_bind(queue, deliver_exchange(self.namespace),
                                    queue_pattern(queue))
            self._bound.add(queue)

    def publish(self, queue: str, body: bytes, headers: dict[str, Any],
                priority: int | None, delay: int) -> None:
        """Publish a task message for ``queue`` to arrive there in ``delay`` seconds.

        Raises ValueError for a delay over :data:`MAX_DELAY`.
        """
        key = routing_key(delay, queue)
        if not self._declared:
            self.declare()
        self.bind(queue)
        props: dict[str, Any] = {"content_type": codec.CONTENT_TYPE,
                                 "content_encoding": "binary",
                                 "application_headers": headers, "delivery_mode": 2}
        if priority is not None:
            props["priority"] = priority
        # confirmed: the task is stored (persistent, in a durable queue) on return
        # py-amqp here, not at the top: the worker imports this module before its pool
        # processes fork, and they need no broker client (transport.kombu_transports).
        import amqp

        self.channel.basic_publish_confirm(amqp.Message(body, **props),
                                           exchange=level_name(self.namespace, LEVELS - 1),
                                           routing_key=key)


def level_counts(channel: Any, namespace: str) -> dict[int, int]:
    """Messages waiting in each delay level (levels that hold none are left out).

    A channel error (a level not declared yet) closes ``channel``; use a fresh channel
    for each call. Raises the channel's connection errors.
    """
    import amqp  # see DelayedPublisher.publish

    counts: dict[int, int] = {}
    for level in range(LEVELS):
        try:
            declared = channel.queue_declare(level_name(namespace, level), passive=True)
        except amqp.exceptions.NotFound:
            return counts  # the topology is declared whole: none were ever delayed
        if declared.message_count:
            counts[level] = declared.message_count
    return counts


@dataclass(frozen=True)
class PeekedTask:
    """A delayed task seen in its level queue (the message stays where it was)."""

    id: str | None
    name: str | None
    queue: str | None
    eta: float | None
    level: int


def peek(connection: Any, namespace: str, per_level: int) -> list[PeekedTask]:
    """Up to ``per_level`` tasks from the head of each delay level, without taking them:
    they are read unacknowledged on a channel of ``connection`` (a py-amqp connection)
    that is then closed, which returns them to their places with their expiry kept.

    Raises the connection's errors.
    """
    counting = connection.channel()
    try:
        counts = level_counts(counting, namespace)
    finally:
        if counting.is_open:
            counting.close()
    channel = connection.channel()
    seen: list[PeekedTask] = []
    try:
        for level, count in counts.items():
            for _ in range(min(count, per_level)):
                message = channel.basic_get(level_name(namespace, level), no_ack=False)
                if message is None:
                    break
                seen.append(_describe(message, level))
    finally:
        channel.close()
    return seen


def _describe(message: Any, level: int) -> PeekedTask:
    try:
        wire = codec.loads(message.body)
    except Exception:
        wire = None
    if not isinstance(wire, dict):
        return PeekedTask(None, None, None, None, level)
    task_id, name, queue, eta = (wire.get(k) for k in ("id", "task", "queue", "eta"))
    return PeekedTask(task_id if isinstance(task_id, str) else None,
                      name if isinstance(name, str) else None,
                      queue if isinstance(queue, str) else None,
                      float(eta) if isinstance(eta, (int, float)) else None, level)
