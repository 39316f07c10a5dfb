"""The in-memory broker: ``memory://``, every duty of the transport contract in one process.

A test double in the manner of Dramatiq's ``StubBroker`` and httpx's ``MockTransport``
(docs/architecture.md, "The transport contract"; docs/testing.md). Clients, workers and
tools of one process share one broker; nothing leaves the process and nothing survives it.

It is kombu's own memory transport (queues, direct and fanout exchanges, ack, reject and
requeue through kombu's virtual channel) with what the project needs on top:

* **Event loop.** A worker's loop is woken through a pipe when a message arrives or a
  delivery is settled (:meth:`Transport.register_with_event_loop`), and a blocking
  ``drain_events`` (a client's inbox) waits on a condition instead of sleeping between
  polls, so a test's round trip takes well under a millisecond of broker time.
* **Liveness.** A worker's unacknowledged deliveries stay with the broker, owned by its
  connection. A connection closed by its owner gives them back (as RabbitMQ does); a
  connection declared dead (:func:`kill_connection`, the harness's stand-in for SIGKILL)
  keeps them — nothing more comes from it or goes to it — until the liveness check
  returns them (:class:`.memory_upkeep.MemoryUpkeep`, :meth:`MemoryBroker.declare_dead`).
  A worker taken for dead while it runs gets its deliveries taken back on its own loop
  and fetches nothing until its next heartbeat.
* **Delayed delivery** waits in the broker (:class:`Delayed`), moved to its queue when due.
* **Dead letters** are the ``<ns>.dead`` queue, readable without consuming
  (:meth:`MemoryBroker.dead_letters`).

Priorities are not kept (first in, first out, as the embedded broker), and queues do not
expire (an inbox lives until its client deletes it or the process ends).
"""

from __future__ import annotations

import base64
import contextlib
import heapq
import itertools
import json
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from queue import Empty
from queue import Queue as FifoQueue
from typing import Any

from kombu.transport import memory as kombu_memory
from kombu.transport import virtual

from .frames import describe_envelope
from .upkeep import ScheduledTask

#: how long a worker's loop may go without looking at its queues when nothing woke it
#: (seconds); a wake-up normally comes at once
FALLBACK_POLL = 0.05
#: a loop turn hands the loop back after delivering for this long (seconds)
_TICK_BUDGET = 0.05


class _State:
    """Everything the process's in-memory broker holds, behind one lock."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.generation = 0
        #: every live connection's transport, woken when a message arrives
        self.transports: weakref.WeakSet[Transport] = weakref.WeakSet()
        #: live workers: incarnation -> entry
        self.workers: dict[str, WorkerEntry] = {}
        #: namespace -> tasks waiting for their eta
        self.delayed: dict[str, Delayed] = {}
        #: namespace -> result records (see results.MemoryResultStore)
        self.results: dict[str, dict[str, Any]] = {}

    def notify(self) -> None:
        """Something changed: wake blocking readers and every registered loop."""
        with self.changed:
            self.generation += 1
            self.changed.notify_all()
        for transport in list(self.transports):
            transport.wake()

    def wait(self, seen: int, timeout: float) -> None:
        """Wait up to ``timeout`` for a change after generation ``seen``."""
        with self.changed:
            if self.generation == seen:
                self.changed.wait(timeout)


STATE = _State()


@dataclass
class WorkerEntry:
    """A worker as the broker's liveness record knows it."""

    hostname: str
    namespace: str
    transport: Transport | None
    last_beat: float = field(default_factory=time.monotonic)


class QoS(virtual.QoS):
    """kombu's prefetch accounting, plus the queue of each unacknowledged delivery, so a
    test can wait until nothing is in flight (:meth:`MemoryBroker.join`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.in_flight: dict[Any, str] = {}

    def append(self, message: Any, delivery_tag: Any) -> None:
        self.in_flight[delivery_tag] = (message.delivery_info or {}).get("routing_key", "")
        super().append(message, delivery_tag)

    def ack(self, delivery_tag: Any) -> None:
        super().ack(delivery_tag)
        self.in_flight.pop(delivery_tag, None)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        super().reject(delivery_tag, requeue=requeue)
        self.in_flight.pop(delivery_tag, None)

    def restore_unacked(self) -> Any:
        # back on their queues before they stop counting as in flight: join() never sees
        # a moment with neither
        errors = super().restore_unacked()
        self.in_flight.clear()
        return errors


class Channel(kombu_memory.Channel):
    """A channel on the in-memory broker."""

    QoS = QoS
    #: this broker's queues (not kombu's own memory transport's)
    queues: dict[str, FifoQueue[Any]] = {}
    do_restore = False  # close() gives unacked messages back itself, without a banner

    connection: Transport

    def __init__(self, connection: Any, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        connection.every_channel.append(self)

    @property
    def dead(self) -> bool:
        return self.connection.dead

    # kombu checks, then sets: two threads declaring one queue at once could each make
    # one and lose what was put in the other
    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        self.queues.setdefault(queue, FifoQueue())

    def _queue_for(self, queue: str) -> FifoQueue[Any]:
        found = self.queues.get(queue)
        return found if found is not None else self.queues.setdefault(queue, FifoQueue())

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        if self.dead or self.connection.fenced:
            raise Empty()
        return super()._get(queue, timeout)

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        if self.dead:
            return  # a dead process publishes nothing
        super()._put(queue, message, **kwargs)
        STATE.notify()

    def _put_fanout(self, exchange: str, message: Any, routing_key: Any = None,
                    **kwargs: Any) -> None:
        if self.dead:
            return
        super()._put_fanout(exchange, message, routing_key, **kwargs)
        STATE.notify()

    def _restore(self, message: Any) -> None:
        # the liveness check restores a dead connection's deliveries: they must go out
        # even though their channel's connection is dead
        delivery_info = message.delivery_info
        raw = message.serializable()
        # kombu's message reads the flag from delivery_info (as RabbitMQ's redelivered)
        properties = dict(raw["properties"])
        properties["delivery_info"] = {**properties.get("delivery_info", {}),
                                       "redelivered": True}
        raw["properties"] = properties
        for queue in self._lookup(delivery_info["exchange"], delivery_info["routing_key"]):
            super()._put(queue, raw)
        STATE.notify()

    def basic_ack(self, delivery_tag: Any, multiple: bool = False) -> None:
        if self.dead:
            return
        super().basic_ack(delivery_tag, multiple)
        STATE.notify()  # prefetch room: the loop may take the next one

    def basic_reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        if self.dead:
            return
        super().basic_reject(delivery_tag, requeue)
        STATE.notify()

    def close(self) -> None:
        if not self.closed and not self.dead and self._qos is not None:
            # A connection closed by its owner gives its deliveries back, as RabbitMQ
            # does; a dead one keeps them for the liveness check.
            self._qos.restore_unacked()
        # not kombu's memory close: it gives the channel an empty dict of queues of its
        # own, and a closed channel of a dead connection still restores into the real ones
        virtual.Channel.close(self)


class Transport(kombu_memory.Transport):
    """The in-memory transport (``memory://`` URLs in an interactive_tasks process)."""

    Channel = Channel
    global_state = virtual.BrokerState()
    polling_interval = FALLBACK_POLL
    driver_type = "memory"
    driver_name = "memory"
    # ``asynchronous``: the worker's Hub drives us (register_with_event_loop), as for the
    # embedded broker.
    implements = virtual.Transport.implements.extend(
        asynchronous=True, exchange_type=frozenset({"direct", "fanout"}), heartbeats=False)

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self.state = self.global_state
        #: declared dead: takes nothing, sends nothing, keeps its deliveries
        self.dead = False
        #: every channel ever opened here, closed ones too (their deliveries may still be
        #: owned by this connection when it is dead)
        self.every_channel: list[Channel] = []
        self._pipe: tuple[int, int] | None = None
        self._restore_requested = False
        #: taken for dead while running: takes nothing until its next heartbeat, as a
        #: frozen or cut-off worker fetches nothing until it is back
        self.fenced = False
        self._loop: Any = None
        self._tref: Any = None
        STATE.transports.add(self)

    def wake(self) -> None:
        """Make this connection's loop look at its queues (any thread)."""
        pipe = self._pipe
        if pipe is not None:
            with contextlib.suppress(OSError):  # full (a wake-up is pending) or closed
                os.write(pipe[1], b"!")

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        """Deliver from the loop when woken, and every ``FALLBACK_POLL`` anyway."""
        self.unregister_from_event_loop(connection, loop)
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        self._pipe = (read_fd, write_fd)
        self._loop = loop
        loop.add_reader(read_fd, self._on_wake)
        self._tref = loop.call_repeatedly(FALLBACK_POLL, self._deliver_ready)

    def unregister_from_event_loop(self, connection: Any, loop: Any) -> None:
        if self._tref is not None:
            self._tref.cancel()
            self._tref = None
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            with contextlib.suppress(Exception):
                self._loop.remove(pipe[0])
            for fd in pipe:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._loop = None

    def _on_wake(self) -> None:
        pipe = self._pipe
        if pipe is not None:
            with contextlib.suppress(OSError):
                while os.read(pipe[0], 4096):
                    pass
        self._deliver_ready()

    def request_restore(self) -> None:
        """Give every unacknowledged delivery back, on this connection's own loop (its
        worker was taken for dead while it runs: only its loop touches its deliveries)."""
        self._restore_requested = True
        self.wake()

    def _deliver_ready(self) -> None:
        # Deliver everything prefetch allows, but hand the loop back after _TICK_BUDGET so
        # a backlog cannot starve the pool's sockets; a wake-up or the timer goes on.
        if self._restore_requested:
            self._restore_requested = False
            restore_unacked_of(self)
        if self.cycle is None or self.dead:
            return
        deadline = time.monotonic() + _TICK_BUDGET
        while time.monotonic() < deadline:
            try:
                self.cycle.get(self._deliver)
            except Empty:
                return
        self.wake()

    # kombu's two transport bases type this differently; this is virtual's signature
    def drain_events(self, connection: Any,  # type: ignore[override]
                     timeout: float | None = None) -> None:
        """Deliver one message, waiting up to ``timeout`` for it; raises TimeoutError
        (socket.timeout)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            seen = STATE.generation
            try:
                assert self.cycle is not None  # set by the first channel
                self.cycle.get(self._deliver)
                return
            except Empty:
                pass
            remaining = FALLBACK_POLL if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError()
            STATE.wait(seen, min(remaining, FALLBACK_POLL))

    def close_connection(self, connection: Any) -> None:
        self.unregister_from_event_loop(connection, self._loop)
        super().close_connection(connection)
        STATE.transports.discard(self)


def kill_connection(transport: Transport) -> None:
    """Treat ``transport``'s process as killed: it takes, sends and acknowledges nothing
    from now on, and its unacknowledged deliveries wait for the liveness check."""
    transport.dead = True
    transport.wake()


def restore_unacked_of(transport: Transport) -> int:
    """Return a connection's unacknowledged deliveries to their queues (marked
    redelivered); how many. Only from the thread that uses the connection, or when it is
    dead (then none does)."""
    count = 0
    for channel in list(transport.every_channel):
        qos = channel._qos
        if qos is None:
            continue
        count += len(qos.in_flight)
        qos.restore_unacked()
    return count


def _raw_queue(name: str) -> FifoQueue[Any] | None:
    return Channel.queues.get(name)


def _in_flight(queue: str) -> int:
    """Deliveries from ``queue`` not yet settled: on live connections, and on dead ones the
    liveness check has not found yet (those found gave theirs back)."""
    owners = [t for t in list(STATE.transports) if not t.dead]
    owners += [e.transport for e in list(STATE.workers.values())
               if e.transport is not None and e.transport.dead]
    count = 0
    for transport in owners:
        for channel in list(transport.every_channel):
            qos = channel._qos
            if qos is not None:
                count += sum(1 for q in list(qos.in_flight.values()) if q == queue)
    return count


class Delayed:
    """Tasks of one namespace waiting in the broker for their ``eta``, soonest first."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str, str, bytes]] = []
        self._counter = itertools.count()

    def schedule(self, queue: str, task_id: str, envelope: bytes, eta: float) -> None:
        with STATE.lock:
            heapq.heappush(self._heap, (eta, next(self._counter), queue, task_id, envelope))

    def take_due(self, now: float) -> list[tuple[str, bytes]]:
        """Remove and return ``(queue, envelope)`` of every task due by ``now``."""
        due = []
        with STATE.lock:
            while self._heap and self._heap[0][0] <= now:
                _, _, queue, _, envelope = heapq.heappop(self._heap)
                due.append((queue, envelope))
        return due

    def move_due(self, now: float | None = None) -> int:
        """Put every task due by ``now`` (default: now) on its queue; how many."""
        due = self.take_due(time.time() if now is None else now)
        for queue, envelope in due:
            put_envelope(queue, envelope)
        return len(due)

    def find(self, task_id: str) -> bytes | None:
        with STATE.lock:
            for entry in self._heap:
                if entry[3] == task_id:
                    return entry[4]
        return None

    def unschedule(self, task_id: str) -> bytes | None:
        with STATE.lock:
            for index, entry in enumerate(self._heap):
                if entry[3] == task_id:
                    self._heap.pop(index)
                    heapq.heapify(self._heap)
                    return entry[4]
        return None

    def listing(self, limit: int = 100) -> list[ScheduledTask]:
        with STATE.lock:
            entries = heapq.nsmallest(limit, self._heap)
        out = []
        for eta, _, queue, _, envelope in entries:
            task_id, name = describe_envelope(envelope)
            out.append(ScheduledTask(task_id, name, queue, eta))
        return out

    def queued_for(self, queue: str) -> int:
        with STATE.lock:
            return sum(1 for entry in self._heap if entry[2] == queue)


def delayed_of(namespace: str) -> Delayed:
    with STATE.lock:
        return STATE.delayed.setdefault(namespace, Delayed())


def put_envelope(queue: str, envelope: bytes) -> None:
    """Put a message in kombu's JSON envelope (``frames.kombu_envelope``) on ``queue``."""
    raw = json.loads(envelope)
    raw["properties"].setdefault("delivery_info", {}).update(exchange="", routing_key=queue)
    Channel.queues.setdefault(queue, FifoQueue()).put(raw)
    STATE.notify()


def sweep(namespace: str, lost_after: float) -> dict[str, int]:
    """The liveness check: every worker of ``namespace`` silent for ``lost_after`` seconds
    is forgotten and its unacknowledged deliveries go back; ``{hostname: count}``."""
    now = time.monotonic()
    with STATE.lock:
        lost = [(key, entry) for key, entry in STATE.workers.items()
                if entry.namespace == namespace and now - entry.last_beat > lost_after]
        for key, _ in lost:
            del STATE.workers[key]
    return {entry.hostname: _declared_dead(entry) for _, entry in lost}


def _declared_dead(entry: WorkerEntry) -> int:
    transport = entry.transport
    if transport is None:
        return 0
    if transport.dead:  # killed: nothing else touches its deliveries
        return restore_unacked_of(transport)
    # Taken for dead while it runs (as a frozen or cut-off worker on Redis): its tasks go
    # back, it keeps running, and learns it at its next heartbeat.
    count = sum(len(c._qos.in_flight) for c in list(transport.every_channel)
                if c._qos is not None)
    transport.fenced = True
    transport.request_restore()
    return count


@dataclass(frozen=True)
class DeadLetter:
    """A message a worker refused, as ``<ns>.dead`` keeps it."""

    body: bytes
    reason: str | None
    worker: str | None
    queue: str | None
    headers: dict[str, Any]


class MemoryBroker:
    """What a test sees of the in-memory broker, for one namespace (``namespace`` setting).

    ``MemoryBroker.for_app(app)`` or ``MemoryBroker("it")``. Every method may be called
    from any thread.
    """

    def __init__(self, namespace: str = "it") -> None:
        from . import Names

        self.namespace = namespace
        self.names = Names(namespace)

    @classmethod
    def for_app(cls, app: Any) -> MemoryBroker:
        return cls(app.conf.namespace)

    def queue_size(self, queue: str = "default") -> int:
        """Messages waiting in task queue ``queue`` (not those delivered)."""
        raw = _raw_queue(self.names.task_queue_name(queue))
        return 0 if raw is None else raw.qsize()

    def in_flight(self, queue: str = "default") -> int:
        """Messages of task queue ``queue`` delivered and not yet acknowledged or rejected
        (a killed worker's count until the liveness check returns them)."""
        return _in_flight(self.names.task_queue_name(queue))

    def join(self, queue: str = "default", timeout: float = 10.0,
             *, delayed: bool = True) -> None:
        """Wait until task queue ``queue`` is empty and none of its messages is delivered
        and unacknowledged (with late acks, the default: every result is stored), and,
        with ``delayed``, none waits for its eta. Raises TimeoutError after ``timeout``."""
        name = self.names.task_queue_name(queue)
        deadline = time.monotonic() + timeout
        while True:
            seen = STATE.generation
            if not self._busy(name, delayed):
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{name}: {self.queue_size(queue)} waiting, "
                                   f"{_in_flight(name)} in flight after {timeout}s")
            STATE.wait(seen, min(remaining, FALLBACK_POLL))

    def _busy(self, name: str, delayed: bool) -> bool:
        raw = _raw_queue(name)
        if raw is not None and raw.qsize():
            return True
        if _in_flight(name):
            return True
        return delayed and delayed_of(self.namespace).queued_for(name) > 0

    def dead_letters(self) -> list[DeadLetter]:
        """Every message on ``<ns>.dead``, oldest first (they stay there)."""
        raw = _raw_queue(self.names.dead_letter_name)
        if raw is None:
            return []
        out = []
        with raw.mutex:
            entries = list(raw.queue)
        for entry in entries:
            properties = entry.get("properties") or {}
            body = entry.get("body")
            if properties.get("body_encoding") == "base64":
                body = base64.b64decode(body)
            headers = dict(entry.get("headers") or {})
            out.append(DeadLetter(body, headers.get("itask-reason"),
                                  headers.get("itask-worker"), headers.get("itask-queue"),
                                  headers))
        return out

    def scheduled(self, limit: int = 100) -> list[ScheduledTask]:
        """Tasks waiting in the broker for their eta, soonest first."""
        return delayed_of(self.namespace).listing(limit)

    def move_due(self, now: float | None = None) -> int:
        """Put every task due by ``now`` (epoch seconds; default: now) on its queue, as a
        worker's timer does every 0.25 s; how many. A later ``now`` moves a task early,
        but its worker still holds it until its eta."""
        return delayed_of(self.namespace).move_due(now)

    def workers(self) -> list[str]:
        """Hostnames of the workers the liveness record holds (alive or not yet found
        dead)."""
        with STATE.lock:
            return sorted(e.hostname for e in STATE.workers.values()
                          if e.namespace == self.namespace)

    def declare_dead(self, hostname: str) -> int:
        """What the liveness check does to a worker silent for ``worker_lost_timeout``, now:
        forget ``hostname`` and return its unacknowledged tasks to their queues (marked
        redelivered); how many. A worker still running (taken for dead, as a frozen one
        would be) takes nothing until its next heartbeat, where it learns the verdict and
        is in the record again; its runs then end as on Redis (``Outcomes.superseded``).
        Raises KeyError for a worker the record does not hold."""
        with STATE.lock:
            keys = [k for k, e in STATE.workers.items()
                    if e.hostname == hostname and e.namespace == self.namespace]
            if not keys:
                raise KeyError(f"no worker {hostname!r} in namespace {self.namespace!r}")
            entries = [STATE.workers.pop(k) for k in keys]
        return sum(_declared_dead(entry) for entry in entries)

    @staticmethod
    def reset() -> None:
        """Empty the broker: every queue, binding, delayed task, liveness record and result
        of every namespace (between tests; no worker may be running)."""
        with STATE.lock:
            Channel.queues.clear()
            Transport.global_state.clear()
            STATE.workers.clear()
            STATE.delayed.clear()
            STATE.results.clear()
        STATE.notify()
