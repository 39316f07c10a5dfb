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
as it arrived. Cancelling, adding and dropping task queues and reconnecting (``start``
on a fresh connection) work as kombu's consumer does them on RabbitMQ; two differences
there: a new prefetch window adds or cancels consumers instead of restarting them all
(restarted ones would not count what they hold already: see
:meth:`AmqpIntake.set_prefetch`), and a queue added later is declared on a channel of its
own, so that a declaration the server refuses cannot close the task channel. And a body
with kombu's ``compression`` header (nothing of this package sends one) is not
decompressed, so it fails decoding and goes to the dead letters.

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
    the control and broadcast queues on another (no acks).

    RabbitMQ applies a prefetch window per consumer, fixed when the consumer starts
    (``basic_qos`` with ``global=False``; the per-channel kind is deprecated and not
    supported by quorum queues). A task queue is consumed by one consumer with the window
    at start, plus one consumer per later growth of the window (see :meth:`set_prefetch`).
    """

    def __init__(self, app: App, hostname: str, **callbacks: Any) -> None:
        super().__init__(app, hostname, **callbacks)
        self.channel: Any = None
        #: task queue name → its consumers now, as (consumer tag, window), oldest first
        self.tags: dict[str, list[tuple[str, int]]] = {}
        #: the task queues to take from (consumed unless stopped)
        self.queues: list[str] = []
        #: the window asked for last: consumers started from now on take it
        self.prefetch = 0
        self._qos = 0  # the window set on the channel now (for the next basic_consume)

    def start(self, conn: Any, hub: Any, queues: list[str], prefetch: int,
              take_tasks: bool) -> None:
        names = self.app.names
        channel = self.channel = conn.channel()
        self.tags = {}
        self.queues = []
        self._qos = 0
        self.prefetch = prefetch
        for name in queues:
            queue = names.task_queue(name)
            queue.bind(channel).declare()
            self.queues.append(queue.name)
        if take_tasks and not self.stopped:
            for name in self.queues:
                self._consume(name, prefetch)
        control = conn.channel()
        for queue in self._control_queues():
            queue.bind(control).declare()
            control.basic_consume(queue.name, no_ack=True, callback=self._on_control)

    def _consume(self, name: str, window: int) -> None:
        if self._qos != window:
            self.channel.basic_qos(0, window, False)
            self._qos = window
        tag = self.channel.basic_consume(name, callback=self._on_task)
        self.tags.setdefault(name, []).append((tag, window))

    def _on_task(self, message: Any) -> None:
        self.on_task(AmqpDelivery(message))

    def _on_control(self, message: Any) -> None:
        self.on_control(AmqpDelivery(message))

    def _cancel_all(self) -> None:
        tags, self.tags = self.tags, {}
        for consumers in tags.values():
            for tag, _ in consumers:
                self.channel.basic_cancel(tag)

    def stop_tasks(self) -> None:
        self.stopped = True
        if self.channel is not None and self.tags:
            try:
                self._cancel_all()
            except Exception:
                pass

    def add_queue(self, queue: str) -> None:
        """Take tasks from ``queue`` too. Raises :class:`.worker_side.QueueRefused` when
        the broker refuses to declare it (it exists with other arguments, or access is
        denied), and the broker's connection errors."""
        if self.channel is None:
            return  # not connected: the next start() consumes the worker's queue names
        task_queue = self.app.names.task_queue(queue)
        if task_queue.name in self.queues:
            return
        self._declare_apart(task_queue)
        self.queues.append(task_queue.name)
        if not self.stopped:
            self._consume(task_queue.name, self.prefetch)

    def _declare_apart(self, task_queue: Any) -> None:
        """Declare ``task_queue`` on a channel of its own: a refused declaration closes
        the channel it was made on (py-amqp then reopens that channel object without its
        consumers), which must not be the one the tasks come on."""
        import amqp.exceptions

        from .worker_side import QueueRefused

        channel = self.channel.connection.channel()
        refused: amqp.exceptions.ChannelError | None = None
        try:
            task_queue.bind(channel).declare()
        except amqp.exceptions.ChannelError as exc:
            refused = exc
        finally:
            channel.close()
        if refused is not None:
            reason = getattr(refused, "reply_text", "") or str(refused)
            raise QueueRefused(f"the broker refused to declare queue {task_queue.name}: "
                               f"{reason}") from refused

    def cancel_queue(self, queue: str) -> None:
        if self.channel is None:
            return
        name = self.app.names.task_queue_name(queue)
        if name in self.queues:
            self.queues.remove(name)
        for tag, _ in self.tags.pop(name, []):
            self.channel.basic_cancel(tag)

    def set_prefetch(self, count: int) -> None:
        """Take up to ``count`` unacknowledged tasks per task queue from now on; raises the
        broker's connection errors.

        A consumer's window is fixed when it starts, and a restarted consumer's window
        does not count the deliveries its previous run still holds, so restarting to
        apply a new window would let ``held + count`` through. Instead, per task queue
        (``window`` being the sum of its consumers' windows):

        * growing (``count > window``): one more consumer with window ``count - window``;
          the queue's consumers together then hold at most ``count``, at once.
        * shrinking: the consumers added for earlier growths are cancelled, newest
          first, as long as the ones left still have a window of at least ``count``
          (their held deliveries still settle normally). The rest keep their windows,
          which RabbitMQ cannot change, until they are started again (the next
          connection, which starts them with ``count``); what is held never exceeds the
          old window and comes down to the remaining one as deliveries are settled.

        So the unacknowledged never exceed ``max(old, new)`` windows, and a grow gives
        the new window at once. Queues added later (``add_queue``) start with ``count``.
        """
        if self.channel is None:
            return
        self.prefetch = count
        if self.stopped:
            return
        for name, consumers in self.tags.items():
            window = sum(w for _, w in consumers)
            if count > window:
                self._consume(name, count - window)
                continue
            while len(consumers) > 1 and window - consumers[-1][1] >= count:
                tag, last = consumers.pop()
                self.channel.basic_cancel(tag)
                window -= last

    def close(self) -> None:
        super().close()
        self.channel = None
        self.tags = {}
