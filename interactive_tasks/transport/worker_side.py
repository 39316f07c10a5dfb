"""The worker's intake side of the transport contract: tasks and control, in.

The worker holds one :class:`WorkerIntake` and never asks which broker it talks to
(docs/architecture.md, "The transport contract"). On a fresh connection
:meth:`WorkerIntake.start` declares the task queues and starts taking tasks (at most
``prefetch`` unacknowledged) and control (the worker's own control queue and the broadcast
queue); :meth:`WorkerIntake.pump` runs once per turn of the worker's loop;
:meth:`WorkerIntake.is_control` tells the loop which reader reads control only, to handle
it first in each step;
:meth:`WorkerIntake.stop_tasks` stops taking tasks (warm shutdown; control keeps coming);
:meth:`WorkerIntake.ring_for` wakes idle workers after the worker itself published a task;
:meth:`WorkerIntake.close` drops what the connection used.

* kombu (embedded, SQS …): kombu consumers on the worker's connection.
* RabbitMQ (:class:`.amqp_intake.AmqpIntake`): the queues declared through kombu,
  consumed with py-amqp's own ``basic_consume``; deliveries reach the worker as
  :class:`.amqp_intake.AmqpDelivery` (a kombu message's attributes, ``ack``, ``reject``).
* Redis (:class:`RedisIntake`): tasks through :class:`.redis_fetch.TaskFetcher` (pop and
  record unacknowledged in one script), the control queue as a plain list of raw frames
  read by :class:`.redis_fast.ListReader`; broadcasts still through kombu.

The callbacks: ``on_task(message)`` for each task message (a kombu message, or on RabbitMQ
an :class:`.amqp_intake.AmqpDelivery` with the same attributes: ``ack()``,
``reject(requeue=)``), ``on_garbage(message, reason)`` for what the fetch could not even
take for a message (dead-letter it), ``on_control(message)`` for a control message (the
same kinds), ``on_control_frames(frames)`` for raw frames from a control list.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import is_amqp, is_redis

if TYPE_CHECKING:
    from kombu import Consumer

    from ..app import App
    from .redis_fast import ListReader
    from .redis_fetch import TaskFetcher


class QueueRefused(Exception):
    """The broker refused to declare a task queue that ``add_queue`` was asked for (on
    RabbitMQ: it exists with other arguments, or access is denied); the message says
    why."""


class WorkerIntake:
    """Tasks and control through kombu consumers."""

    def __init__(self, app: App, hostname: str, *, on_task: Callable[[Any], None],
                 on_garbage: Callable[[Any, str], None],
                 on_control: Callable[[Any], None],
                 on_control_frames: Callable[[list[bytes]], None]) -> None:
        self.app = app
        self.hostname = hostname
        self.on_task = on_task
        self.on_garbage = on_garbage
        self.on_control = on_control
        self.on_control_frames = on_control_frames
        self.task_consumer: Consumer | None = None
        self.stopped = False

    def start(self, conn: Any, hub: Any, queues: list[str], prefetch: int,
              take_tasks: bool) -> None:
        """Begin on a connected kombu connection registered on ``hub``; raises the
        broker's connection errors."""
        # kombu here, not at the top: the worker imports this module before its pool
        # processes fork, and they need no kombu (transport.kombu_transports).
        from kombu import Consumer

        names = self.app.names
        task_channel = conn.channel()
        task_queues = [names.task_queue(q) for q in queues]
        self._start_tasks(conn, hub, task_channel, task_queues, prefetch, take_tasks)
        control = Consumer(conn.channel(), queues=self._control_queues(),
                           on_message=self.on_control, accept=None, no_ack=True)
        control.consume()

    def _start_tasks(self, conn: Any, hub: Any, channel: Any, task_queues: list[Any],
                     prefetch: int, take_tasks: bool) -> None:
        from kombu import Consumer

        self.task_consumer = Consumer(channel, queues=task_queues,
                                      on_message=self.on_task, accept=None,
                                      prefetch_count=prefetch)
        if take_tasks and not self.stopped:
            self.task_consumer.consume()

    def _control_queues(self) -> list[Any]:
        names = self.app.names
        return [names.control_queue(self.hostname), names.broadcast_queue(self.hostname)]

    def after_registered(self, hub: Any, take_tasks: bool) -> None:
        """Once the connection is on ``hub``: start what reads outside kombu."""

    def pump(self) -> None:
        """Once per turn of the loop; raises the broker's connection errors."""

    def is_control(self, callback: Any) -> bool:
        """Whether ``callback``, a reader callback on the worker's loop, reads control
        only (the loop handles those first in each step); kombu's consumers share the
        connection with task intake, so none here."""
        return False

    def stop_tasks(self) -> None:
        """Take no more tasks (warm shutdown); control keeps coming."""
        self.stopped = True
        consumer = self.task_consumer
        if consumer is not None and consumer.queues:
            try:
                consumer.cancel()
            except Exception:
                pass

    def ring_for(self, queue: str) -> None:
        """After this worker published to ``queue``: wake a worker waiting on it."""

    def add_queue(self, queue: str) -> None:
        """Take tasks from task queue ``queue`` too (Celery's ``add_consumer``); raises the
        broker's connection errors."""
        consumer = self.task_consumer
        if consumer is None:
            return  # not connected: the next start() consumes the worker's queue names
        consumer.add_queue(self.app.names.task_queue(queue))
        if not self.stopped:
            consumer.consume()  # starts only the queues not consumed yet

    def cancel_queue(self, queue: str) -> None:
        """Take no more tasks from ``queue`` (Celery's ``cancel_consumer``); tasks already
        taken from it still run. Raises the broker's connection errors."""
        consumer = self.task_consumer
        if consumer is not None:
            consumer.cancel_by_queue(self.app.names.task_queue(queue).name)

    def set_prefetch(self, count: int) -> None:
        """Reserve up to ``count`` unacknowledged tasks from now on (the pool was resized);
        raises the broker's connection errors."""
        consumer = self.task_consumer
        if consumer is None:
            return
        consumer.qos(prefetch_count=count)

    def close(self) -> None:
        """Forget the connection's consumers (the connection is released by its owner)."""
        self.task_consumer = None


class RedisIntake(WorkerIntake):
    """Redis: the script fetch for tasks, a plain list for the worker's control queue."""

    def __init__(self, app: App, hostname: str, **callbacks: Any) -> None:
        super().__init__(app, hostname, **callbacks)
        self.fetcher: TaskFetcher | None = None
        self.control_reader: ListReader | None = None
        #: what this process's fetchers handed over (see TaskFetcher.held)
        self.held: dict[str, Any] = {}

    def _start_tasks(self, conn: Any, hub: Any, channel: Any, task_queues: list[Any],
                     prefetch: int, take_tasks: bool) -> None:
        from .redis_fast import ListReader
        from .redis_fetch import TaskFetcher
        from .redis_liveness import redelivered_key

        # Our own fetch: kombu's BRPOP loses a message when the worker dies before
        # recording it unacked (see transport.redis_fetch).
        for queue in task_queues:
            queue.bind(channel).declare()
        channel.basic_qos(0, prefetch, False)
        self.fetcher = TaskFetcher(self.app.broker_url, channel,
                                   [q.name for q in task_queues], self.on_task,
                                   self.on_garbage, redelivered_key(self.app.conf.namespace),
                                   self.held)
        # A plain list of raw frames, read on the loop: no kombu envelope to build and
        # parse on the latency path of every pause, resume and message.
        self.control_reader = ListReader(
            self.app.broker_url, self.app.names.control_queue(self.hostname).name,
            self.on_control_frames, options=self.app.conf.broker_transport_options)

    def _control_queues(self) -> list[Any]:
        return [self.app.names.broadcast_queue(self.hostname)]

    def after_registered(self, hub: Any, take_tasks: bool) -> None:
        if self.control_reader is not None:
            self.control_reader.register(hub)
        if self.fetcher is not None and take_tasks and not self.stopped:
            self.fetcher.register(hub)

    def pump(self) -> None:
        if self.fetcher is not None:
            self.fetcher.pump()

    def is_control(self, callback: Any) -> bool:
        reader = self.control_reader
        return reader is not None and reader.owns(callback)

    def stop_tasks(self) -> None:
        self.stopped = True
        if self.fetcher is not None and not self.fetcher.stopped:
            self.fetcher.stop()

    def ring_for(self, queue: str) -> None:
        if self.fetcher is not None:
            self.fetcher.ring_for(queue)

    def add_queue(self, queue: str) -> None:
        fetcher = self.fetcher
        if fetcher is not None:
            task_queue = self.app.names.task_queue(queue)
            task_queue.bind(fetcher.channel).declare()
            fetcher.set_queues([*fetcher.queues, task_queue.name])

    def cancel_queue(self, queue: str) -> None:
        fetcher = self.fetcher
        if fetcher is not None:
            name = self.app.names.task_queue(queue).name
            fetcher.set_queues([q for q in fetcher.queues if q != name])

    def set_prefetch(self, count: int) -> None:
        fetcher = self.fetcher
        if fetcher is not None:  # the fetch reads its room from the channel's QoS
            fetcher.channel.basic_qos(0, count, False)

    def close(self) -> None:
        super().close()
        fetcher, self.fetcher = self.fetcher, None
        if fetcher is not None:
            fetcher.close()
        reader, self.control_reader = self.control_reader, None
        if reader is not None:
            reader.close()


def intake_for(app: App, hostname: str, **callbacks: Any) -> WorkerIntake:
    """The intake for ``app``'s broker (callbacks as :class:`WorkerIntake` takes them)."""
    if is_redis(app.broker_url):
        return RedisIntake(app, hostname, **callbacks)
    if is_amqp(app.broker_url):
        from .amqp_intake import AmqpIntake

        return AmqpIntake(app, hostname, **callbacks)
    return WorkerIntake(app, hostname, **callbacks)

