"""What a worker does for RabbitMQ besides consuming: heartbeats, held tasks, delays.

The RabbitMQ side of :class:`.upkeep.BrokerUpkeep`:

* **Heartbeats.** The worker's connection negotiates ``broker_heartbeat`` seconds and
  :meth:`AmqpUpkeep.start` checks it on the worker's loop four times per interval (a
  heartbeat frame goes out after half an interval of silence; a server silent for two
  intervals raises a connection error, which ends the loop, and the worker reconnects).
  The server does the same on its side: a worker that stops answering (frozen, cut off)
  is dropped 2-3 intervals after its last frame and its unacknowledged tasks go to other
  workers — RabbitMQ's own liveness check, so no record of live workers is kept here.
* **Held tasks** (:mod:`.amqp_hold`): deliveries held longer than ``worker_hold_after``
  are handed over to the worker's held queue so that ``consumer_timeout`` never applies
  to them; a dead worker's held tasks come back within ``worker_lost_timeout``.
* **Delayed delivery** (:mod:`.amqp_delay`): tasks with an ``eta`` wait in the delay
  levels. A worker publishes them on its own connection (confirmed); a client or a tool
  on a connection of this object's own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .. import codec
from .amqp_delay import DelayedPublisher, delay_seconds, peek
from .amqp_hold import HoldableRecord, TaskHold
from .frames import kombu_body
from .upkeep import BrokerUpkeep, ScheduledTask, cancel_timers

if TYPE_CHECKING:
    from ..app import App

logger = logging.getLogger("interactive_tasks.worker")

#: heartbeat checks per heartbeat interval (py-amqp sends a frame after half an interval
#: of silence; checking four times per interval sends each within 3/4 of one)
CHECKS_PER_INTERVAL = 4


class AmqpUpkeep(BrokerUpkeep):
    """RabbitMQ: heartbeats and held tasks on the worker's connection, delayed delivery.

    ``records``: the worker's live map of task records and ``give_back(record)`` its way
    to return a waiting task to its queue (None for clients and tools: no hold).
    ``on_declared_dead()`` is called when the tasks this worker holds may have been given
    to other workers: after a lost connection (the server requeued its deliveries) and
    when a held copy expired while its task still ran here.
    """

    def __init__(self, app: App, incarnation: str, on_declared_dead: Callable[[], None],
                 records: Mapping[str, HoldableRecord] | None = None,
                 give_back: Callable[[Any], None] | None = None) -> None:
        self.app = app
        self.on_declared_dead = on_declared_dead
        conf = app.conf
        self.hold: TaskHold | None = None
        if records is not None and give_back is not None and \
                conf.worker_hold_after is not None:
            self.hold = TaskHold(namespace=conf.namespace, incarnation=incarnation,
                                 task_queue=app.names.task_queue_name,
                                 hold_after=conf.worker_hold_after,
                                 ttl=conf.worker_lost_timeout, records=records,
                                 call_soon=self._call_soon, on_lapsed=on_declared_dead,
                                 give_back=give_back)
        self._connection: Any = None  # the worker's kombu connection
        self._amqp: Any = None  # ... and its py-amqp connection
        self._hub: Any = None
        self._timers: list[Any] = []
        self._starts = 0
        self._lock = threading.Lock()
        self._own: Any = None  # a kombu connection of our own (clients, tools)
        self._delayed: DelayedPublisher | None = None

    # -- the worker's connection ----------
    def start(self, hub: Any, connection: Any = None) -> None:
        """Begin on the worker's loop ``hub`` and its connected kombu ``connection``. A
        connection error in a heartbeat check or a hold step ends the loop (and the
        worker reconnects): it is raised from the loop's next step, not from the timer,
        whose errors the loop only logs."""
        cancel_timers(self._timers)
        if self._starts:
            # A new connection after a lost one: the server requeued every delivery of
            # the old one, so each task running here may be running elsewhere too.
            self.on_declared_dead()
        self._starts += 1
        self._connection, self._hub, self._delayed = connection, hub, None
        if connection is None:
            return
        self._amqp = connection.connection
        heartbeat = getattr(self._amqp, "heartbeat", 0)
        if heartbeat:
            self._timers.append(hub.call_repeatedly(
                heartbeat / CHECKS_PER_INTERVAL, self._guarded, self._heartbeat_check))
        if self.hold is not None:
            self.hold.attach(connection)
            self._timers.append(hub.call_repeatedly(self.app.conf.worker_heartbeat,
                                                    self._renew))

    def possibly_lost(self) -> bool:
        """Whether the server may have dropped this worker: nothing heard from it for two
        heartbeat intervals (it would have closed the connection), or held copies not
        renewed for their TTL."""
        now = time.monotonic()
        heartbeat = getattr(self._amqp, "heartbeat", 0)
        heard = getattr(self._amqp, "last_heartbeat_received", 0)
        if heartbeat and heard and now - heard > 2 * heartbeat:
            return True
        return self.hold is not None and self.hold.lapsing(now)

    def _heartbeat_check(self) -> None:
        self._connection.heartbeat_check(2)

    def _call_soon(self, callback: Callable[[], None]) -> None:
        if self._hub is not None:
            self._hub.call_soon(self._guarded, callback)

    def _renew(self) -> None:
        if self.hold is not None:
            self._guarded(self.hold.renew)

    def _guarded(self, step: Callable[[], None]) -> None:
        """Run a heartbeat check or a hold step from a timer. A channel error (the server
        closed the hold's channel) opens a new channel for the next step; a connection
        error is raised again from the loop's ready queue, which ends the loop."""
        connection, hub = self._connection, self._hub
        if connection is None:
            return
        try:
            step()
        except tuple(connection.channel_errors) as exc:
            logger.warning("held tasks: the server closed the channel (%s); reopening it",
                           exc)
            if self.hold is not None:
                self.hold.attach(connection)
        except tuple(connection.connection_errors) as exc:
            # Drop the socket now, without the closing handshake: on a link gone silent
            # the worker's teardown would wait for the server's answer until TCP gives up.
            try:
                connection.collect()
            except Exception:
                pass
            hub.call_soon(_raise, exc)

    # -- delayed delivery ----------
    def schedule(self, queue: str, task_id: str, envelope: bytes, priority: int | None,
                 eta: float) -> bool:
        """Publish the task in ``envelope`` (kombu's, see ``frames.task_envelope``)
        into the delay levels, to reach ``queue`` at ``eta`` (whole seconds, rounded
        down). A queue cannot give one message back, so a revoke cannot take it out
        (``find`` and ``unschedule`` stay None): workers refuse it when it comes due.
        Raises the connection's errors and ProtocolError for a bad envelope."""
        body, signature = kombu_body(envelope)
        headers = {codec.SIGNATURE_HEADER: signature} if signature else {}
        delay = delay_seconds(eta)
        with self._lock:
            try:
                self._publisher().publish(queue, body, headers, priority, delay)
            except Exception:
                self._drop_publisher()
                if self._connection is not None:
                    raise  # the worker's connection: its loop reconnects
                # our own connection may have gone stale since the last publish: once more
                self._publisher().publish(queue, body, headers, priority, delay)
        return True

    def _publisher(self) -> DelayedPublisher:
        if self._delayed is None:
            connection = self._connection or self._own_connection()
            self._delayed = DelayedPublisher(connection, connection.channel(),
                                             self.app.conf.namespace,
                                             self._declare_task_queue)
        return self._delayed

    def _declare_task_queue(self, channel: Any, name: str) -> None:
        """Declare task queue ``name`` as every worker and client declares it."""
        names = self.app.names
        short = name.removeprefix(names.task_queue_name(""))
        queue = names.task_queue(short)
        if queue.name != name:
            raise ValueError(f"{name!r} is not a task queue of namespace "
                             f"{self.app.conf.namespace!r}")
        queue(channel).declare()

    def _drop_publisher(self) -> None:
        self._delayed = None
        if self._own is not None:
            try:
                self._own.release()
            except Exception:
                pass
            self._own = None

    def _own_connection(self) -> Any:
        if self._own is None:
            conn = self.app.connection()
            conn.ensure_connection(max_retries=3, interval_start=0.2, interval_step=0.5)
            self._own = conn
        return self._own

    def scheduled(self, limit: int = 100) -> list[ScheduledTask]:
        """Tasks waiting in the delay levels, soonest first: up to ``limit`` read from the
        head of each level (left in place), so with more than ``limit`` in one level the
        list is the soonest of those read. Raises the connection's errors."""
        with self._lock:
            conn = self._own_connection()
            try:
                seen = peek(conn.connection, self.app.conf.namespace, limit)
            except Exception:
                self._drop_publisher()
                raise
        names = self.app.names
        out = [ScheduledTask(t.id, t.name, names.task_queue_name(t.queue), t.eta)
               for t in seen if t.eta is not None and t.queue is not None]
        out.sort(key=lambda t: t.eta)
        return out[:limit]

    def close(self, clean: bool) -> None:
        cancel_timers(self._timers)
        if self.hold is not None:
            self.hold.detach()
        self._connection = self._amqp = self._hub = None
        with self._lock:
            self._drop_publisher()


def _raise(exc: BaseException) -> None:
    raise exc
