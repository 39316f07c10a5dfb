"""The client's side of the transport contract: publish tasks and control, read an inbox.

A :class:`~interactive_tasks.client.Client` holds one :class:`ClientSide` and never asks
which broker it talks to (docs/architecture.md, "The transport contract"):

* :meth:`ClientSide.publish_task` — a task message body onto its queue.
* :meth:`ClientSide.publish_control` — a control message body onto one worker's control
  queue (broadcasts go through the client's kombu producer on every broker).
* :meth:`ClientSide.open_inbox` — an :class:`InboxSession` that yields the bodies that
  arrive in the client's inbox, signatures already checked.

:class:`RedisClientSide` is the fast path (hand-packed ``LPUSH`` of kombu's envelope and a
bell for idle workers; the control queue and the inbox are plain lists of raw frames, see
:mod:`.redis_fast`); :class:`ClientSide` serves every other broker through kombu — on
RabbitMQ the client's publisher sends task and control messages past kombu's producer
(:mod:`.amqp_fast`) and :class:`AmqpInbox` reads the inbox on py-amqp's channel.
Every method raises :class:`~interactive_tasks.errors.TransportError` when the broker
cannot be reached.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from kombu import Consumer, Queue

from .. import codec
from ..errors import ProtocolError, TransportError
from . import CONTROL_QUEUE_EXPIRES, is_amqp, is_redis
from .frames import decode_frame, encode_frame, task_envelope

if TYPE_CHECKING:
    from ..app import App
    from .redis_fast import TaskPublisher

logger = logging.getLogger("interactive_tasks.client")

#: a control list's expiry on Redis, as kombu's x-expires would set it
CONTROL_QUEUE_EXPIRES_MS = int(CONTROL_QUEUE_EXPIRES * 1000)

#: ``publish_raw(body, routing_key=, exchange=, declare=, priority=)``: the client's kombu
#: publisher (its producer, lock, signature and retries)
KombuPublish = Callable[..., None]


class InboxSession(Protocol):
    """One connection's worth of reading an inbox."""

    def read(self, timeout: float) -> list[bytes]:
        """Bodies that arrived, waiting up to ``timeout`` for the first; raises the
        broker client's connection errors."""
        ...

    def check(self) -> None:
        """Called about once a second: raises TransportError when this connection should
        be given up for a new one."""
        ...

    def close(self, delete: bool) -> None:
        """Disconnect; ``delete`` the inbox too (the client is closing)."""
        ...


class ClientSide:
    """Every broker through kombu (RabbitMQ, the embedded broker, SQS …)."""

    def __init__(self, app: App, kombu_publish: KombuPublish) -> None:
        self.app = app
        self.kombu_publish = kombu_publish

    def publish_task(self, queue: Queue, body: bytes, priority: int | None) -> None:
        self.kombu_publish(body, routing_key=queue.routing_key, exchange=queue.exchange,
                           declare=[queue], priority=priority)

    def publish_control(self, worker: str, body: bytes, settle: bool = True) -> None:
        """``settle=False`` (a stream of ``send(wait=False)``) lets a broker that can
        return before the broker confirmed the message, raising a failure at a later
        call; kombu here always waits for its publish."""
        queue = self.app.names.control_queue(worker)
        self.kombu_publish(body, routing_key=queue.routing_key, exchange=queue.exchange,
                           declare=[queue])

    def open_inbox(self, inbox: Queue) -> InboxSession:
        if is_amqp(self.app.broker_url):
            return AmqpInbox(self.app, inbox)
        return KombuInbox(self.app, inbox)

    def close(self) -> None:
        """Close what this object opened (the kombu publisher is the client's)."""


class KombuInbox:
    """An inbox consumed through kombu without acks; unsigned messages are dropped when
    the app has a secret.

    Heartbeats on (RabbitMQ): :meth:`read` is called at least every 0.5 s and answers
    them, and a broker that went silent (a cut link) is noticed within two intervals, so
    the inbox reconnects instead of waiting on a dead socket for TCP to notice.
    """

    def __init__(self, app: App, inbox: Queue) -> None:
        self.app = app
        self.inbox = inbox
        self._arrived: list[bytes] = []
        self._conn = app.connection(heartbeat=True)
        try:
            self._conn.ensure_connection(max_retries=1, interval_start=0, timeout=10)
            self._channel = self._conn.channel()
            self._consume()
        except Exception:
            self._conn.release()
            raise

    def _consume(self) -> None:
        self._consumer: Consumer | None = Consumer(
            self._channel, queues=[self.inbox], no_ack=True, on_message=self._on_message,
            accept=None)
        self._consumer.consume()

    def _on_message(self, message: Any) -> None:
        self._take(message.body, message.headers)

    def _take(self, body: bytes, headers: dict[str, Any] | None) -> None:
        secret = self.app.secret
        if secret is not None and not codec.verify(
                secret, body, (headers or {}).get(codec.SIGNATURE_HEADER)):
            logger.warning("dropped a reply that was unsigned or wrongly signed: %s",
                           _NO_SECRET)
            return
        self._arrived.append(body)

    def _cancel(self) -> None:
        if self._consumer is not None:
            self._consumer.cancel()

    def read(self, timeout: float) -> list[bytes]:
        try:
            self._conn.drain_events(timeout=timeout)
        except TimeoutError:
            pass
        self._conn.heartbeat_check(2)
        arrived, self._arrived = self._arrived, []
        return arrived

    def check(self) -> None:
        """Nothing to check: heartbeats (:meth:`read`) notice a dead broker."""

    def close(self, delete: bool) -> None:
        if not delete:
            # After an error: drop the socket without the closing handshake, which would
            # wait for the server's answer forever on a link gone silent.
            try:
                self._conn.collect()
            except Exception:
                pass
            return
        try:
            # Cancel first: deleting a queue under its own consumer makes the broker
            # cancel it mid-close and leaks the socket (py-amqp).
            self._cancel()
            self._channel.queue_delete(self.inbox.name)
        except Exception:
            pass
        finally:
            try:
                self._conn.release()
            except Exception:
                pass


class AmqpInbox(KombuInbox):
    """RabbitMQ: the inbox declared through kombu, then consumed on the py-amqp channel
    itself: a delivery reaches :meth:`_take` from py-amqp's dispatch, without a kombu
    ``Message`` and its consumer's callbacks built and run per message."""

    def _consume(self) -> None:
        self._consumer = None
        self.inbox.bind(self._channel).declare()
        self._tag = self._channel.basic_consume(self.inbox.name, no_ack=True,
                                                callback=self._on_delivery)

    def _on_delivery(self, message: Any) -> None:
        self._take(message.body, message.properties.get("application_headers"))

    def _cancel(self) -> None:
        self._channel.basic_cancel(self._tag)


class RedisClientSide(ClientSide):
    """Redis: raw ``LPUSH``es on one connection of the client's own, plain-list inboxes."""

    def __init__(self, app: App, kombu_publish: KombuPublish) -> None:
        super().__init__(app, kombu_publish)
        self._publisher: TaskPublisher | None = None
        self._lock = threading.Lock()

    @property
    def publisher(self) -> TaskPublisher:
        """One connection for every thread of the process (it serialises its sends)."""
        if self._publisher is None:
            with self._lock:
                if self._publisher is None:
                    from .redis_fast import TaskPublisher

                    self._publisher = TaskPublisher(self.app.broker_url,
                                                    self.app.conf.broker_transport_options)
        return self._publisher

    def publish_task(self, queue: Queue, body: bytes, priority: int | None) -> None:
        if priority is not None:
            # kombu knows the priority lists; ring the bell after it (kombu rings none)
            super().publish_task(queue, body, priority)
            self._send(lambda: self.publisher.publish(queue.name, None, bell=True))
            return
        envelope = task_envelope(body, queue.name, self.app.secret)
        self._send(lambda: self.publisher.publish(queue.name, envelope, bell=True))

    def publish_control(self, worker: str, body: bytes, settle: bool = True) -> None:
        # x-expires as kombu would set it: the list of a worker gone for good
        # disappears instead of collecting control messages.
        frame = encode_frame(body, self.app.secret)
        name = self.app.names.control_queue_name(worker)
        self._send(lambda: self.publisher.push(name, frame, CONTROL_QUEUE_EXPIRES_MS,
                                               settle=settle))

    def _send(self, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception as exc:
            raise TransportError(
                f"cannot publish to the broker at {self.app.broker_url_display}: {exc}"
            ) from exc

    def open_inbox(self, inbox: Queue) -> InboxSession:
        return RedisInbox(self.app, inbox.name)

    def close(self) -> None:
        if self._publisher is not None:
            self._publisher.close()
            self._publisher = None


class RedisInbox:
    """An inbox list read with ``BLMPOP``; frames with a bad signature are dropped."""

    def __init__(self, app: App, name: str) -> None:
        from .redis_fast import InboxReader

        self.secret = app.secret
        # connects at once (one connection of its own)
        self._reader = InboxReader(app.broker_url, name, app.conf.broker_transport_options)
        try:
            self._reader.ping()
        except Exception:
            self._reader.close(delete=False)
            raise

    def read(self, timeout: float) -> list[bytes]:
        bodies = []
        for raw in self._reader.read(timeout):
            try:
                bodies.append(decode_frame(raw, self.secret))
            except ProtocolError as exc:
                logger.warning("dropped a reply %s", _why_dropped(raw, exc))
        return bodies

    def check(self) -> None:
        """Behind sentinels: reconnect when they name another primary or fail this one
        over (see ``redis_urls.primary_in_doubt``)."""
        if self._reader.primary_in_doubt():
            raise TransportError("the sentinels name another primary or fail this one over")

    def close(self, delete: bool) -> None:
        self._reader.close(delete=delete)


_NO_SECRET = "the workers have no secret or a different one (ITASK_SECRET)"


def _why_dropped(raw: bytes, exc: ProtocolError) -> str:
    """What an inbox frame :func:`decode_frame` refused means, for the person reading it:
    with a secret on this side, an unsigned or wrongly signed one is nearly always a worker
    started with no secret or another one."""
    if raw[:1] == b"0":
        return "that was unsigned: " + _NO_SECRET
    if raw[:1] == b"1":
        return "with a wrong signature: " + _NO_SECRET
    return f"that was malformed: {exc}"


def client_side_for(app: App, kombu_publish: KombuPublish) -> ClientSide:
    """The client side of ``app``'s broker."""
    if is_redis(app.broker_url):
        return RedisClientSide(app, kombu_publish)
    return ClientSide(app, kombu_publish)
