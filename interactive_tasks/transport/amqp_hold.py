"""RabbitMQ: a long task outlives the server's ``consumer_timeout`` and still comes back
when its worker dies.

RabbitMQ closes the channel of a consumer that keeps a delivery unacknowledged longer
than ``consumer_timeout`` (30 min by default, checked once per channel tick), and every
delivery of that channel goes back to its queue: a long task runs twice. RabbitMQ 3.10
has no per-queue or per-consumer timeout, so the worker stops holding long deliveries:

* The delivery of a task that is running after ``worker_hold_after`` seconds is **handed
  over**: the worker publishes a copy of the message to its own *held queue*,
  ``<ns>.held.<incarnation>.<queue>``, declared with ``x-message-ttl`` =
  ``worker_lost_timeout``, ``x-dead-letter-exchange`` "" and ``x-dead-letter-routing-key``
  = the task queue, then acknowledges the delivery. Shorter tasks never get here: the
  fast path (unacknowledged delivery, ack at the end) is untouched.
* A delivery that has *waited* that long without starting (every pool slot busy, a rate
  limit) is **given back** instead (``give_back(record)``: the worker publishes it to the
  end of its queue and acknowledges it), so that an idle worker can take it. Handing
  waiting tasks over would let the worker take ever more: an acknowledged delivery no
  longer counts against its prefetch window, so it would be sent the next one, and so on
  through the queue. Handing over only running tasks keeps a worker at its window plus
  one held task per pool slot.
* While the worker lives it **renews** its copies every ``worker_heartbeat``: it takes
  every message of its held queue (``basic.get``), publishes a fresh copy of each task it
  still holds and acknowledges what it took, in one AMQP transaction on that one queue
  (atomic there: a crash leaves either the old copies or the new ones, never both nor
  neither). A task that ended (its result stored) is dropped at once, by the same step.
* When the worker dies, nobody renews: within ``worker_lost_timeout`` the server
  dead-letters each copy back to its task queue, with an ``x-death`` header naming the
  held queue, and another worker runs it as a redelivery (:func:`.frames.redeliveries`).

The incarnation (the worker's name and a random suffix per start) keeps a restarted worker
of the same name from taking its predecessor's copies for its own. Each held queue has an
``x-expires`` well above the TTL, so a dead worker's empty held queues go away by
themselves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import held_prefix
from .frames import settle_quietly

logger = logging.getLogger("interactive_tasks.worker")

#: a dead worker's empty held queue is deleted after this many TTLs without use
EXPIRES_TTLS = 6
#: ... but never sooner than this (seconds)
MIN_EXPIRES = 60.0


def held_queue_name(namespace: str, incarnation: str, queue: str) -> str:
    """The held queue of one worker process for one task queue (``queue``: its short name)."""
    return f"{held_prefix(namespace)}{incarnation}.{queue}"


def came_on(message: Any, connection: Any) -> bool:
    """Whether a kombu message was delivered on ``connection`` (a py-amqp connection; None:
    none is open). RabbitMQ requeues a delivery when its connection closes; the worker's
    copy of the message does not know it (py-amqp leaves a dead connection's channels
    looking open), so deliveries are matched to the live connection instead."""
    channel = getattr(message, "channel", None)
    return channel is None or (connection is not None and channel.connection is connection)


class HoldableRecord(Protocol):
    """What the hold needs of the worker's record of a task."""

    @property
    def id(self) -> str: ...

    @property
    def is_final(self) -> bool: ...

    kombu_message: Any
    duplicates: list[Any]
    received: float
    #: when the task started (None: it has not)
    started: float | None
    message: Any  # TaskMessage: its ``queue`` is the task queue's short name


@dataclass
class HeldCopy:
    """What the hold publishes for one task: the delivery's body and properties."""

    task_id: str
    queue: str  # short name of the task queue
    body: bytes
    properties: dict[str, Any]
    #: the copy vanished from the held queue (dead-lettered: this worker was taken for
    #: dead): the task may run elsewhere now; it is no longer renewed
    given_away: bool = False
    #: the task ended here: its copy is dropped at the next renewal (scheduled at once)
    released: bool = False


def copy_of(task_id: str, queue: str, message: Any) -> HeldCopy:
    """A persistent copy of a kombu (pyamqp) message, its properties and headers kept."""
    props = dict(getattr(message, "properties", None) or {})
    headers = dict(getattr(message, "headers", None) or {})
    kept = {k: props[k] for k in ("priority", "correlation_id", "reply_to", "expiration",
                                  "timestamp", "type", "user_id", "app_id") if props.get(k)
            is not None}
    kept.pop("expiration", None)  # a per-message TTL would cut the copy's life short
    kept.update(content_type=message.content_type or "application/octet-stream",
                content_encoding=message.content_encoding or "binary",
                application_headers=headers, delivery_mode=2, message_id=task_id)
    return HeldCopy(task_id, queue, bytes(message.body), kept)


class HeldDelivery:
    """Takes the place of a handed-over delivery in the worker's record.

    The worker settles it like any delivery: :meth:`ack` once the task's end is recorded
    drops the held copy; :meth:`reject` with ``requeue`` gives the task back to its queue
    (a warm shutdown). Body, headers and properties are the original message's.
    """

    def __init__(self, hold: TaskHold, copy: HeldCopy, original: Any) -> None:
        self._hold = hold
        self._copy = copy
        self.body = original.body
        self.headers = original.headers
        self.properties = original.properties
        self.content_type = original.content_type
        self.content_encoding = original.content_encoding
        self.delivery_info = original.delivery_info

    @property
    def given_away(self) -> bool:
        """Its held copy expired while the task ran here (this worker was taken for dead):
        the task went back to its queue."""
        return self._copy.given_away

    def ack(self) -> None:
        self._hold.release(self._copy.task_id)

    def reject(self, requeue: bool = False) -> None:
        if requeue:
            self._hold.give_back(self._copy.task_id)
        else:
            self._hold.release(self._copy.task_id)


@dataclass
class _QueueState:
    name: str
    queue: str  # short name of the task queue
    declared: bool = False
    #: the queue may hold copies this worker does not know of (a transaction whose
    #: outcome is unknown): drain it at the next renewal even if no task is held
    unsure: bool = False
    #: tasks whose copy the queue holds (as of the last committed renewal)
    copies: dict[str, HeldCopy] = field(default_factory=dict)
    #: when the last renewal committed (monotonic)
    renewed_at: float = 0.0


class TaskHold:
    """A worker's held queues: hand-over of long deliveries and renewal of their copies.

    One per worker process; :meth:`attach` it to each new connection. ``records`` is the
    worker's live map of task records (read at each renewal). ``call_soon`` schedules a
    callback on the worker's loop; ``task_queue`` maps a queue's short name to the name
    of its broker queue; ``on_lapsed()`` is called when a copy expired while its task
    still ran here (this worker was taken for dead: the task may run elsewhere too);
    ``give_back(record)`` returns a task that waited ``hold_after`` without starting to
    the end of its queue (publish a copy, acknowledge the delivery, forget the record).
    """

    def __init__(self, *, namespace: str, incarnation: str,
                 task_queue: Callable[[str], str], hold_after: float, ttl: float,
                 records: Mapping[str, HoldableRecord],
                 call_soon: Callable[[Callable[[], None]], Any],
                 on_lapsed: Callable[[], None],
                 give_back: Callable[[HoldableRecord], None]) -> None:
        self.namespace = namespace
        self.incarnation = incarnation
        self.task_queue = task_queue
        self.hold_after = hold_after
        self.ttl = ttl
        self.records = records
        self.call_soon = call_soon
        self.on_lapsed = on_lapsed
        self.give_back_record = give_back
        self.queues: dict[str, _QueueState] = {}
        self.channel: Any = None
        self.connection: Any = None
        self._renew_scheduled = False

    # -- the worker's connection ----------
    def attach(self, connection: Any) -> None:
        """Open the hold's transactional channel on a fresh kombu connection (raises the
        connection's errors). Queues are declared again, and drained, on next use."""
        self.connection = connection.connection
        self.channel = connection.channel()
        self.channel.tx_select()
        self._renew_scheduled = False
        for state in self.queues.values():
            state.declared = False
            state.unsure = True

    def detach(self) -> None:
        self.channel = self.connection = None
        self._renew_scheduled = False

    # -- settling, from the worker's records ----------
    def release(self, task_id: str) -> None:
        """The task ended here (its result is stored): drop its copy now."""
        for state in self.queues.values():
            copy = state.copies.get(task_id)
            if copy is not None:
                copy.released = True
                self._renew_soon()

    def give_back(self, task_id: str) -> None:
        """Put the task back in its queue now (warm shutdown), then drop its copy. Raises
        the connection's errors (the copy then comes back by itself within the TTL)."""
        for state in self.queues.values():
            copy = state.copies.get(task_id)
            if copy is not None and not copy.given_away and self.channel is not None:
                self._publish(self.task_queue(copy.queue), copy)
                self.channel.tx_commit()
                copy.released = True
                self._renew_soon()

    def _renew_soon(self) -> None:
        if not self._renew_scheduled and self.channel is not None:
            self._renew_scheduled = True
            self.call_soon(self.renew)

    # -- the periodic step ----------
    def renew(self) -> None:
        """Hand over deliveries held for ``hold_after`` seconds, renew the copies of tasks
        still held, drop the rest. Raises the connection's errors (the worker reconnects;
        copies not renewed come back to their queues by themselves)."""
        self._renew_scheduled = False
        if self.channel is None:
            return
        due: dict[str, list[HoldableRecord]] = {}
        for record in self._held_too_long():
            if record.started is None:
                logger.info("task %s waited %.0fs without starting: back to its queue",
                            record.id, time.time() - record.received)
                self.give_back_record(record)
            else:
                due.setdefault(record.message.queue, []).append(record)
        for queue in set(self.queues) | set(due):
            state = self._state(queue)
            records = due.get(queue, [])
            if state.copies or state.unsure or records:
                self._renew_queue(state, records)
        for record in list(self.records.values()):
            delivery = record.kombu_message
            if not (isinstance(delivery, HeldDelivery) and record.duplicates):
                continue
            if delivery.given_away:
                # Its copy expired and came back to this very worker, which still runs
                # the task: that delivery stands for the task now (handed over again
                # at the next step). Acknowledging it would leave the task nowhere.
                record.kombu_message = record.duplicates.pop(0)
                continue
            # another delivery of a task held here: the copy stands for it
            for message in record.duplicates:
                settle_quietly(message, record.id)
            record.duplicates.clear()

    def lapsing(self, now: float) -> bool:
        """Whether copies held here went unrenewed for their TTL (they may be gone)."""
        return any(state.copies and now - state.renewed_at > self.ttl
                   for state in self.queues.values())

    def _held_too_long(self) -> list[HoldableRecord]:
        """Records whose live delivery has been held for ``hold_after`` seconds."""
        due_before = time.time() - self.hold_after
        due = []
        for record in list(self.records.values()):
            message = record.kombu_message
            if message is None or isinstance(message, HeldDelivery) or record.is_final:
                continue
            if record.received > due_before:
                continue
            if not came_on(message, self.connection):
                continue  # its connection is gone: the server requeued it already
            due.append(record)
        return due

    def _state(self, queue: str) -> _QueueState:
        state = self.queues.get(queue)
        if state is None:
            name = held_queue_name(self.namespace, self.incarnation, queue)
            state = self.queues[queue] = _QueueState(name, queue)
        return state

    def _declare(self, state: _QueueState) -> None:
        self.channel.queue_declare(state.name, durable=True, auto_delete=False, arguments={
            "x-message-ttl": int(self.ttl * 1000),
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": self.task_queue(state.queue),
            "x-expires": int(max(MIN_EXPIRES, EXPIRES_TTLS * self.ttl) * 1000),
        })
        state.declared = True

    def _renew_queue(self, state: _QueueState, records: list[HoldableRecord]) -> None:
        """One transaction on one held queue: take every copy, publish those of the tasks
        still held and of ``records`` (handed over now), acknowledge what was taken. Then
        acknowledge the handed-over deliveries."""
        channel = self.channel
        added = [copy_of(r.id, state.queue, r.kombu_message) for r in records]
        try:
            if not state.declared:
                self._declare(state)
            taken: list[Any] = []
            while True:
                got = channel.basic_get(state.name, no_ack=False)
                if got is None:
                    break
                taken.append(got)
            present = {m.properties.get("message_id") for m in taken}
            kept: list[HeldCopy] = []
            lapsed: list[HeldCopy] = []
            for copy in state.copies.values():
                if copy.released or copy.given_away:
                    continue
                (kept if copy.task_id in present else lapsed).append(copy)
            for copy in kept + added:
                self._publish(state.name, copy)
            for message in taken:
                channel.basic_ack(message.delivery_tag)
            channel.tx_commit()
        except BaseException:
            state.unsure = True
            raise
        state.unsure = False
        state.renewed_at = time.monotonic()
        state.copies = {copy.task_id: copy for copy in kept + added}
        for copy in lapsed:
            copy.given_away = True
            logger.warning(
                "task %s: its held copy expired (this worker was taken for dead for more "
                "than %.0fs); it may be running on another worker now", copy.task_id,
                self.ttl)
        if lapsed:
            self.on_lapsed()
        # Committed: the copies exist, so the deliveries can go. A crash between the
        # commit and these acks delivers the task twice (the delivery is requeued when
        # the connection closes, and the copy comes back after its TTL).
        for record, copy in zip(records, added, strict=True):
            original = record.kombu_message
            record.kombu_message = HeldDelivery(self, copy, original)
            settle_quietly(original, record.id)
            for message in record.duplicates:
                settle_quietly(message, record.id)
            record.duplicates.clear()
            logger.info("task %s held for %.0fs: handed over to %s", record.id,
                        time.time() - record.received, state.name)

    def _publish(self, routing_key: str, copy: HeldCopy) -> None:
        # py-amqp here, not at the top: the worker imports this module before its pool
        # processes fork, and they need no broker client (transport.kombu_transports).
        import amqp

        self.channel.basic_publish(amqp.Message(copy.body, **copy.properties), exchange="",
                                   routing_key=routing_key)
