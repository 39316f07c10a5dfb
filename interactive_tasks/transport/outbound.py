"""The worker's outbound side of the transport contract: results, acks, inbox messages
and the monitoring stream, out.

The worker's relay numbers and batches what its tasks report, once per loop step, and
hands each batch to one :class:`Outbound` (chosen by :func:`outbound_for`); it never asks
which broker it talks to (docs/architecture.md, "The transport contract"). An outbound
sends what it is given **results first, then acks, then inbox messages**, keeps that
order across a failure and a reconnect, and retries what failed:

* :meth:`Outbound.send` takes one step's results, acks and inbox messages;
  :meth:`Outbound.inbox` one message to a client inbox (a reply, a snapshot, a heartbeat)
  that must not overtake what was sent before it; :meth:`Outbound.monitor` a message on
  the fanout ``<ns>.events`` (dropped when it cannot go: nobody is owed it);
* :meth:`Outbound.connected` after every (re)connect, :meth:`Outbound.detach` before the
  loop goes away, :meth:`Outbound.drain` to wait until the broker has everything sent so
  far, :meth:`Outbound.tick` every second;
* :attr:`Outbound.busy` asks the relay to hold its next batch (back-pressure: progress
  coalesces meanwhile), and ``wake(delay)`` is how the outbound asks for a flush: at once
  when it holds something (``delay`` 0), or after ``delay`` seconds to retry.

Two implementations:

* :class:`KombuOutbound` (RabbitMQ, embedded, SQS …): results through the app's result
  store, acks through kombu, inbox messages published by the worker's kombu producer as
  they come (on RabbitMQ past the producer, on its channel: :mod:`.amqp_fast`, after
  the first to each inbox, which declares it); one that fails while the connection is
  down is kept, in order, and sent after the reconnect.
* :class:`RedisOutbound`: results (when the result store is the broker's own Redis), acks
  and inbox frames in one packet per loop step (:class:`.redis_fast.WorkerPipeline`),
  whose answer the loop reads when it arrives; at most :data:`MAX_IN_FLIGHT` packets wait
  for an answer.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import codec
from ..errors import ConfigurationError
from ..results import RedisResultStore
from . import is_amqp, is_redis
from .frames import encode_frame

if TYPE_CHECKING:
    from kombu import Producer

    from ..app import App
    from .amqp_fast import FastPublisher
    from .redis_fast import WorkerPipeline

__all__ = ["MAX_IN_FLIGHT", "UNSENT_KEPT", "KombuOutbound", "Outbound", "RedisOutbound",
           "outbound_for"]

logger = logging.getLogger("interactive_tasks.worker")

#: inbox messages kept for resending while the broker is unreachable (oldest dropped past)
UNSENT_KEPT = 100_000
#: Redis: packets sent and not answered before the next flush waits for an answer. The
#: back-pressure that makes progress coalesce when the broker or a watcher is slow.
MAX_IN_FLIGHT = 2
#: seconds before a batch the broker or the result store failed is tried again
RETRY_AFTER = 0.5

#: one result: task id and its final record (a TaskSnapshot in wire form)
Result = tuple[str, dict[str, Any]]
#: one inbox message: the inbox's name and the message
InboxMessage = tuple[str, dict[str, Any]]


class Outbound:
    """What every broker does alike: the monitoring stream through the kombu producer.

    ``producer`` returns the worker's kombu producer (None while disconnected); ``wake``
    is called as ``wake(delay)`` (see the module doc).
    """

    def __init__(self, app: App, producer: Callable[[], Producer | None],
                 wake: Callable[[float], None]) -> None:
        self.app = app
        self._producer = producer
        self._wake = wake

    @property
    def busy(self) -> bool:
        """Whether the next batch should wait (the broker has not answered enough)."""
        return False

    @property
    def pending(self) -> bool:
        """Whether this holds something for the next :meth:`send`."""
        return False

    def connected(self, hub: Any) -> None:
        """After a (re)connect, with the worker's loop: resend what could not go."""

    def detach(self) -> None:
        """Before the worker's loop goes away: wait for what is in flight."""

    def drain(self) -> None:
        """Return once the broker has everything sent so far (what fails is kept)."""

    def tick(self) -> None:
        """Every second: notice a broker that stopped answering."""

    def inbox(self, inbox: str, payload: dict[str, Any]) -> None:
        """One message to a client's inbox, after everything handed over before it."""
        raise NotImplementedError

    def send(self, results: list[Result], acks: list[Any],
             messages: list[InboxMessage]) -> bool:
        """Store ``results``, then ack the kombu messages ``acks``, then publish
        ``messages`` (what fails is kept and retried). False when nothing could go this
        time (the result store failed): the caller keeps anything that must follow."""
        raise NotImplementedError

    def monitor(self, payload: dict[str, Any]) -> None:
        """Publish on the fanout ``<ns>.events`` exchange (dropped when nobody listens,
        and when the connection is down)."""
        producer = self._producer()
        if producer is None:
            return
        body = codec.dumps(payload)
        headers = {}
        secret = self.app.secret
        if secret is not None:
            headers[codec.SIGNATURE_HEADER] = codec.sign(secret, body)
        exchange = self.app.names.events_exchange
        try:
            producer.publish(body, routing_key="", exchange=exchange,
                             content_type=codec.CONTENT_TYPE, content_encoding="binary",
                             headers=headers, declare=[exchange])
        except Exception as exc:
            logger.warning("could not publish monitoring events: %s", exc)

    def _store(self, results: list[Result]) -> bool:
        """Put ``results`` into the app's result store; False when it failed and retrying
        can help (a refusal is logged and dropped: retrying cannot help)."""
        try:
            self.app.results.put_many(results)
        except ConfigurationError as exc:
            logger.error("result store refused %d result(s): %s", len(results), exc)
        except Exception as exc:
            logger.error("result store failed (%s); retrying", exc)
            return False
        return True


class KombuOutbound(Outbound):
    """Result store, kombu acks, and the worker's kombu producer for inboxes."""

    def __init__(self, app: App, producer: Callable[[], Producer | None],
                 wake: Callable[[float], None]) -> None:
        super().__init__(app, producer, wake)
        #: RabbitMQ: inbox messages past kombu's producer (imported for RabbitMQ only: a
        #: worker loads its own broker's code, tests/test_imports.py)
        self._fast: FastPublisher | None = None
        if is_amqp(app.broker_url):
            from .amqp_fast import FastPublisher

            self._fast = FastPublisher()
        self._declared: set[str] = set()
        #: inbox messages that failed while the broker connection went down
        self._unsent: collections.deque[InboxMessage] = collections.deque(maxlen=UNSENT_KEPT)
        #: a batch whose results the store did not take, to go before the next one
        self._results: list[Result] = []
        self._acks: list[Any] = []
        self._messages: list[InboxMessage] = []

    @property
    def pending(self) -> bool:
        return bool(self._results or self._acks or self._messages)

    def connected(self, hub: Any) -> None:
        self._declared.clear()
        if self._unsent:
            pending, self._unsent = self._unsent, collections.deque(maxlen=UNSENT_KEPT)
            logger.info("resending %d inbox message(s) held while disconnected", len(pending))
            for inbox, payload in pending:
                self.inbox(inbox, payload)

    def send(self, results: list[Result], acks: list[Any],
             messages: list[InboxMessage]) -> bool:
        if self._results or self._acks or self._messages:
            results, acks, messages = (self._results + results, self._acks + acks,
                                       self._messages + messages)
            self._results, self._acks, self._messages = [], [], []
        if results and not self._store(results):
            self._results, self._acks, self._messages = results, acks, messages
            self._wake(RETRY_AFTER)
            return False
        for message in acks:
            try:
                message.ack()
            except Exception as exc:
                logger.warning("ack failed (%s); the broker may deliver it again", exc)
        for inbox, payload in messages:
            self.inbox(inbox, payload)
        return True

    def inbox(self, inbox: str, payload: dict[str, Any]) -> None:
        producer = self._producer()
        if producer is None or self._unsent:  # reconnecting: keep the order
            self._unsent.append((inbox, payload))
            return
        app = self.app
        body = codec.dumps(payload)
        headers = {}
        if app.secret is not None:
            headers[codec.SIGNATURE_HEADER] = codec.sign(app.secret, body)
        declare = []
        if inbox not in self._declared:
            queue = app.names.inbox_queue_named(inbox)
            if queue is not None:
                declare = [queue]
            self._declared.add(inbox)
        try:
            if self._fast is not None and not declare:
                self._fast.publish(producer.channel, inbox, body,
                                   headers.get(codec.SIGNATURE_HEADER))
                return
            producer.publish(body, routing_key=inbox, exchange="",
                             content_type=codec.CONTENT_TYPE, content_encoding="binary",
                             headers=headers, declare=declare)
        except Exception as exc:
            # The broker connection is going down: keep it, in order, for the reconnect.
            logger.warning("could not publish to %s (%s); will resend after reconnecting",
                           inbox, exc)
            self._declared.discard(inbox)
            self._unsent.append((inbox, payload))


class RedisOutbound(Outbound):
    """Results, acks and inbox frames in one pipelined packet per loop step."""

    def __init__(self, app: App, producer: Callable[[], Producer | None],
                 wake: Callable[[float], None]) -> None:
        super().__init__(app, producer, wake)
        #: opened at the first connect (it connects at once), kept across reconnects
        self._pipeline: WorkerPipeline | None = None
        #: waiting for the next packet: what failed comes back first, in order
        self._results: list[Result] = []
        self._acks: list[Any] = []
        self._frames: list[tuple[str, bytes]] = []

    @property
    def busy(self) -> bool:
        return self._pipeline is not None and self._pipeline.in_flight >= MAX_IN_FLIGHT

    @property
    def pending(self) -> bool:
        return bool(self._results or self._acks or self._frames)

    def connected(self, hub: Any) -> None:
        """Raises redis-py's connection errors when the first connection fails."""
        if self._pipeline is None:
            from .redis_fast import WorkerPipeline

            self._pipeline = WorkerPipeline(self.app.broker_url, self._failed,
                                            self._answered,
                                            self.app.conf.broker_transport_options)
        self._pipeline.attach(hub)
        self._wake(0.0)  # what failed while the connection was down

    def detach(self) -> None:
        if self._pipeline is not None:
            self._pipeline.attach(None)
            self._pipeline.drain()

    def drain(self) -> None:
        if self._pipeline is not None:
            self._pipeline.drain()

    def tick(self) -> None:
        if self._pipeline is not None:
            self._pipeline.check_stalled()

    def inbox(self, inbox: str, payload: dict[str, Any]) -> None:
        self._frames.append((inbox, self._frame(payload)))
        self._wake(0.0)

    def send(self, results: list[Result], acks: list[Any],
             messages: list[InboxMessage]) -> bool:
        frames = self._frames
        for inbox, payload in messages:
            frames.append((inbox, self._frame(payload)))
        results, acks = self._results + results, self._acks + acks
        self._results, self._acks, self._frames = [], [], []
        if self._pipeline is None:  # not connected yet: kept for the first connect
            self._results, self._acks, self._frames = results, acks, frames
            return False
        store = self.app.results
        result_key, expire_at = None, 0
        packed: list[tuple[str, bytes]] = []
        if results:
            if isinstance(store, RedisResultStore) and store.url == self.app.broker_url:
                result_key, expire_at = store.current_bucket()
                packed = [(task_id, codec.dumps(record)) for task_id, record in results]
            elif not self._store(results):
                self._retry_later(results, acks, frames)
                return False
        self._pipeline.submit(results=packed, result_key=result_key,
                              result_expire_at=expire_at, acks=acks, frames=frames,
                              context=(results if packed else [], acks, frames))
        return True

    def _frame(self, payload: dict[str, Any]) -> bytes:
        return encode_frame(codec.dumps(payload), self.app.secret)

    def _answered(self) -> None:
        self._wake(0.0)

    def _failed(self, contexts: list[Any]) -> None:
        results: list[Result] = []
        acks: list[Any] = []
        frames: list[tuple[str, bytes]] = []
        for context_results, context_acks, context_frames in contexts:
            results += context_results
            acks += context_acks
            frames += context_frames
        self._retry_later(results, acks, frames)

    def _retry_later(self, results: list[Result], acks: list[Any],
                     frames: list[tuple[str, bytes]]) -> None:
        self._results[:0] = results
        self._acks[:0] = acks
        self._frames[:0] = frames
        self._wake(RETRY_AFTER)


def outbound_for(app: App, producer: Callable[[], Producer | None],
                 wake: Callable[[float], None]) -> Outbound:
    """The outbound for ``app``'s broker (arguments as :class:`Outbound` takes them)."""
    if is_redis(app.broker_url):
        return RedisOutbound(app, producer, wake)
    return KombuOutbound(app, producer, wake)
