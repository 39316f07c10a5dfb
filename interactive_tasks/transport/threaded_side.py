"""The broker side of a worker that talks to the broker on connections of its own, not a Hub.

The Celery bridge's relay lives inside a Celery worker, its control reads on threads and
its pool channels on a thread or on Celery's hub (docs/celery-bridge.md), and speaks
the itask worker's protocol; it holds one :class:`ThreadedSide` (chosen by
:func:`threaded_side_for`) and never asks which broker it talks to:

* :meth:`ThreadedSide.publish_inbox` and :meth:`ThreadedSide.publish_monitor` send one
  message, from any thread (one lock), and raise the broker's errors (the next call
  starts on a fresh connection);
* :attr:`ThreadedSide.control_queues` are the kombu queues to consume for control;
* :meth:`ThreadedSide.read_control_list` reads the worker's control list where the broker
  keeps one outside kombu (Redis), until ``stop`` is set; elsewhere it returns at once
  (:attr:`ThreadedSide.has_control_list` says which).

* kombu (RabbitMQ, embedded, SQS, memory …): a kombu producer on a connection of its own;
  the worker's control queue and the broadcast queue through kombu.
* :class:`RedisThreadedSide`: inboxes as plain lists (``LPUSH`` of a raw frame, as the
  itask worker's pipeline writes them), the control queue as a plain list read with
  ``BRPOP``; broadcasts still through kombu.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kombu import Queue

from .. import codec
from ..errors import ProtocolError
from . import is_redis
from .frames import control_frame, encode_frame

if TYPE_CHECKING:
    from ..app import App
    from .redis_fast import TaskPublisher

__all__ = ["RedisThreadedSide", "ThreadedSide", "threaded_side_for"]

logger = logging.getLogger("interactive_tasks.worker")

#: seconds a control list read waits before it looks at ``stop`` again
LIST_WAIT = 1


class ThreadedSide:
    """kombu: a producer on a connection of its own; control through kombu consumers."""

    #: whether :meth:`read_control_list` has a list to read
    has_control_list = False

    def __init__(self, app: App, hostname: str) -> None:
        self.app = app
        self.hostname = hostname
        self._lock = threading.Lock()
        self._producer: Any = None
        self._conn: Any = None
        self._declared: set[str] = set()

    @property
    def control_queues(self) -> list[Queue]:
        """The broadcast queue and (off Redis) the worker's control queue."""
        names = self.app.names
        return [names.broadcast_queue(self.hostname), names.control_queue(self.hostname)]

    def read_control_list(self, stop: threading.Event,
                          on_body: Callable[[bytes, bool], None]) -> None:
        """Until ``stop`` is set: ``on_body(body, signed)`` for each control message of
        the worker's control list (none here)."""

    def publish_inbox(self, inbox: str, payload: dict[str, Any]) -> None:
        """Send ``payload`` to the client inbox ``inbox``; raises the broker's errors."""
        body = codec.dumps(payload)
        with self._lock:
            try:
                self._publish_inbox(inbox, body)
            except Exception:
                self._forget()
                raise

    def publish_monitor(self, payload: dict[str, Any]) -> None:
        """Publish on the fanout ``<ns>.events`` exchange (dropped when nobody listens);
        raises the broker's errors."""
        body = codec.dumps(payload)
        exchange = self.app.names.events_exchange
        with self._lock:
            try:
                self._kombu_producer().publish(
                    body, routing_key="", exchange=exchange, content_type=codec.CONTENT_TYPE,
                    content_encoding="binary", headers=self._headers(body),
                    declare=[exchange])
            except Exception:
                self._forget()
                raise

    def close(self) -> None:
        """Release the connections (idempotent)."""
        with self._lock:
            conn, self._conn, self._producer = self._conn, None, None
            if conn is not None:
                try:
                    conn.release()
                except Exception:
                    pass

    def _publish_inbox(self, inbox: str, body: bytes) -> None:
        producer = self._kombu_producer()
        declare = []
        if inbox not in self._declared:
            queue = self.app.names.inbox_queue_named(inbox)
            if queue is not None:
                declare = [queue]
        producer.publish(body, routing_key=inbox, exchange="",
                         content_type=codec.CONTENT_TYPE, content_encoding="binary",
                         headers=self._headers(body), declare=declare)
        self._declared.add(inbox)

    def _headers(self, body: bytes) -> dict[str, Any]:
        secret = self.app.secret
        return {} if secret is None else {codec.SIGNATURE_HEADER: codec.sign(secret, body)}

    def _kombu_producer(self) -> Any:
        """The producer, made on first use (the caller holds the lock)."""
        from kombu import Producer

        if self._producer is None:
            if self._conn is not None:
                try:
                    self._conn.release()
                except Exception:
                    pass
            conn = self.app.connection()
            conn.ensure_connection(max_retries=3)
            self._conn = conn
            self._producer = Producer(conn.default_channel)
        return self._producer

    def _forget(self) -> None:
        """After a failure: start the next publish on a fresh connection."""
        self._producer = None
        self._declared.clear()


class RedisThreadedSide(ThreadedSide):
    """Redis: inboxes and the control queue as plain lists of raw frames."""

    has_control_list = True

    def __init__(self, app: App, hostname: str) -> None:
        super().__init__(app, hostname)
        self._publisher: TaskPublisher | None = None

    @property
    def control_queues(self) -> list[Queue]:
        return [self.app.names.broadcast_queue(self.hostname)]

    def read_control_list(self, stop: threading.Event,
                          on_body: Callable[[bytes, bool], None]) -> None:
        from .redis_urls import redis_client

        key = self.app.names.control_queue_name(self.hostname)
        secret = self.app.secret
        while not stop.is_set():
            client = redis_client(self.app.broker_url, self.app.conf.broker_transport_options,
                                  socket_timeout=5)
            try:
                while not stop.is_set():
                    item = client.brpop([key], timeout=LIST_WAIT)
                    if not item:
                        continue
                    raw = item[1] if isinstance(item[1], bytes) else str(item[1]).encode()
                    try:
                        body, signed = control_frame(raw, secret)
                    except ProtocolError as exc:
                        logger.warning("refused control message: %s", exc.reason)
                        continue
                    on_body(body, signed)
            except Exception as exc:
                logger.warning("control list lost (%s); retrying", exc)
                stop.wait(1.0)
            finally:
                client.close()

    def _publish_inbox(self, inbox: str, body: bytes) -> None:
        from .redis_fast import INBOX_EXPIRES_MS, TaskPublisher

        if self._publisher is None:
            self._publisher = TaskPublisher(self.app.broker_url,
                                            self.app.conf.broker_transport_options)
        self._publisher.push(inbox, encode_frame(body, self.app.secret), INBOX_EXPIRES_MS)

    def close(self) -> None:
        with self._lock:
            publisher, self._publisher = self._publisher, None
        if publisher is not None:
            publisher.close()
        super().close()


def threaded_side_for(app: App, hostname: str) -> ThreadedSide:
    """The threaded side for ``app``'s broker."""
    if is_redis(app.broker_url):
        return RedisThreadedSide(app, hostname)
    return ThreadedSide(app, hostname)
