"""RabbitMQ: the worker takes tasks and control on py-amqp's channels, past kombu's
``Consumer`` and ``Message``.

kombu's consumer on RabbitMQ is py-amqp's ``basic_consume`` with a callback that wraps
each py-amqp message in a kombu ``Message`` (its compression check, error list and
acknowledgement state) before the worker's callback sees it, and acknowledges through
that wrapper. :class:`AmqpIntake` declares the same queues through kombu's entities (so
with the same arguments: ``x-max-priority`` 9 on task queues, ``x-expires`` on the
control and broadcast queues, the broadcast binding), then consumes them with py-amqp's
own ``basic_consume`` on the worker's connection and hands the worker an
:class:`AmqpDelivery`: what the worker reads of a kombu message, from py-amqp's message
as it arrived. Prefetch, cancelling, adding and dropping task queues and reconnecting
(``start`` on a fresh connection) work as kombu's consumer does them on RabbitMQ. One
difference: a body with kombu's ``compression`` header (nothing of this package sends
one) is not decompressed, so it fails decoding and goes to the dead letters.

Control arrives on the same socket as tasks (one AMQP connection), so the worker's loop
cannot read it first: :meth:`AmqpIntake.is_control` stays False, as for kombu's consumer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .worker_side import WorkerIntake

if TYPE_CHECKING:
    from ..app import App

__all__ = ["AmqpDelivery", "AmqpIntake"]


class AmqpDelivery:
    """A delivery as the worker reads it (a kombu message's attributes and ``ack`` /
    ``reject``), made from py-amqp's message. ``ack`` and ``reject`` raise kombu's
    ``MessageStateError`` for a delivery settled already, and py-amqp's connection errors
    when the channel is gone."""

    __slots__ = ("_state", "body", "channel", "content_encoding", "content_type",
                 "delivery_info", "delivery_tag", "headers", "properties")

    def __init__(self, message: Any) -> None:
        props = message.properties
        self.body: bytes = message.body
        self.properties: dict[str, Any] = props
        self.headers: dict[str, Any] = props.get("application_headers") or {}
        self.content_type: str | None = props.get("content_type")
        self.content_encoding: str | None = props.get("content_encoding")
        #: consumer_tag, delivery_tag, redelivered, exchange, routing_key
        self.delivery_info: dict[str, Any] = message.delivery_info
        self.delivery_tag: int = self.delivery_info["delivery_tag"]
        #: the py-amqp channel it came on (``channel.connection``: see amqp_hold.came_on)
        self.channel = message.channel
        self._state: str | None = None

    @property
    def acknowledged(self) -> bool:
        """Whether it was acknowledged or rejected."""
        return self._state is not None

    def ack(self) -> None:
        self._unsettled()
        self.channel.basic_ack(self.delivery_tag)
        self._state = "ACK"

    def reject(self, requeue: bool = False) -> None:
        self._unsettled()
        self.channel.basic_reject(self.delivery_tag, requeue)
        self._state = "REQUEUED" if requeue else "REJECTED"

    def _unsettled(self) -> None:
        if self._state is not None:
            from kombu.exceptions import MessageStateError

            raise MessageStateError(f"delivery already settled: {self._state}")


class AmqpIntake(WorkerIntake):
    """Task queues on one channel (prefetch per consumer, as kombu's consumer sets it),
    the control and broadcast queues on another (no acks)."""

    def __init__(self, app: App, hostname: str, **callbacks: Any) -> None:
        super().__init__(app, hostname, **callbacks)
        self.channel: Any = None
        #: task queue name → consumer tag, for the queues consumed now
        self.tags: dict[str, str] = {}
        #: the task queues to take from (consumed unless stopped)
        self.queues: list[str] = []

    def start(self, conn: Any, hub: Any, queues: list[str], prefetch: int,
              take_tasks: bool) -> None:
        names = self.app.names
        channel = self.channel = conn.channel()
        self.tags = {}
        self.queues = []
        for name in queues:
            queue = names.task_queue(name)
            queue.bind(channel).declare()
            self.queues.append(queue.name)
        channel.basic_qos(0, prefetch, False)
        if take_tasks and not self.stopped:
            for name in self.queues:
                self._consume(name)
        control = conn.channel()
        for queue in self._control_queues():
            queue.bind(control).declare()
            control.basic_consume(queue.name, no_ack=True, callback=self._on_control)

    def _consume(self, name: str) -> None:
        self.tags[name] = self.channel.basic_consume(name, callback=self._on_task)

    def _on_task(self, message: Any) -> None:
        self.on_task(AmqpDelivery(message))

    def _on_control(self, message: Any) -> None:
        self.on_control(AmqpDelivery(message))

    def _cancel_all(self) -> None:
        tags, self.tags = self.tags, {}
        for tag in tags.values():
            self.channel.basic_cancel(tag)

    def stop_tasks(self) -> None:
        self.stopped = True
        if self.channel is not None and self.tags:
            try:
                self._cancel_all()
            except Exception:
                pass

    def add_queue(self, queue: str) -> None:
        if self.channel is None:
            return  # not connected: the next start() consumes the worker's queue names
        task_queue = self.app.names.task_queue(queue)
        if task_queue.name in self.queues:
            return
        task_queue.bind(self.channel).declare()
        self.queues.append(task_queue.name)
        if not self.stopped:
            self._consume(task_queue.name)

    def cancel_queue(self, queue: str) -> None:
        if self.channel is None:
            return
        name = self.app.names.task_queue_name(queue)
        if name in self.queues:
            self.queues.remove(name)
        tag = self.tags.pop(name, None)
        if tag is not None:
            self.channel.basic_cancel(tag)

    def set_prefetch(self, count: int) -> None:
        if self.channel is None:
            return
        self.channel.basic_qos(0, count, False)
        if not self.stopped and self.tags:
            # RabbitMQ applies a per-consumer prefetch to consumers started after it: start
            # them again. Deliveries made meanwhile still reach on_task (or are requeued).
            consumed = list(self.tags)
            self._cancel_all()
            for name in consumed:
                self._consume(name)

    def close(self) -> None:
        super().close()
        self.channel = None
        self.tags = {}
