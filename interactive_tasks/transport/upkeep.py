"""What a worker does for its broker besides consuming: liveness and delayed delivery.

Part of the transport contract (docs/architecture.md, "The transport contract"): each
broker says how a worker proves it is alive, how a dead worker's unacknowledged tasks come
back, and where a task waits for its ``eta``. The worker (and a client, for ``schedule``)
calls the same methods on every broker; :func:`upkeep_for` picks the implementation.

* :meth:`BrokerUpkeep.start` — on a fresh connection, before any task is fetched;
  registers its timers on the worker's loop.
* :meth:`BrokerUpkeep.schedule` — keep a task until its ``eta`` in the broker; ``False``
  when this broker cannot (the worker then holds it in memory, as before).
* :meth:`BrokerUpkeep.find` / :meth:`BrokerUpkeep.unschedule` — a waiting task's message,
  and taking it out (a revoke ends it at once instead of at its eta).
* :meth:`BrokerUpkeep.scheduled` — what waits in the broker, soonest first.
* :meth:`BrokerUpkeep.close` — ``clean`` after a warm shutdown that settled every task.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from . import is_amqp, is_embedded, is_memory, is_redis

if TYPE_CHECKING:
    from ..app import App

logger = logging.getLogger("interactive_tasks.worker")

#: A task due later than this (seconds) waits in the broker where the broker can keep it;
#: one due sooner goes to its queue and the worker that takes it holds it for the rest.
SCHEDULE_AHEAD = 0.5
#: how often a worker moves due tasks onto their queues (seconds)
DUE_INTERVAL = 0.25


@dataclass(frozen=True)
class ScheduledTask:
    """One task waiting in the broker for its ``eta``."""

    id: str | None
    name: str | None
    queue: str
    eta: float


def cancel_timers(timers: list[Any]) -> None:
    """Cancel the loop's timer entries ``timers`` and forget them."""
    for timer in timers:
        try:
            timer.cancel()
        except Exception:
            pass
    timers.clear()


class BrokerUpkeep:
    """The default: nothing kept in the broker (kombu's own redelivery applies)."""

    @property
    def transport_options(self) -> dict[str, Any]:
        """Extra kombu transport options for the worker's connection."""
        return {}

    def start(self, hub: Any, connection: Any = None) -> None:
        """Begin on ``hub`` (a kombu Hub) and the worker's connected kombu ``connection``;
        raises the broker's connection errors."""

    def schedule(self, queue: str, task_id: str, envelope: bytes, priority: int | None,
                 eta: float) -> bool:
        return False

    def scheduled(self, limit: int = 100) -> list[ScheduledTask]:
        return []

    def find(self, task_id: str) -> bytes | None:
        """The message (kombu's envelope) of ``task_id`` if it waits in the broker."""
        return None

    def unschedule(self, task_id: str) -> bytes | None:
        """Take ``task_id`` out of the broker's wait; its message, or None if it was not
        there (never scheduled, already due, or taken out by another worker)."""
        return None

    def possibly_lost(self) -> bool:
        """Whether other workers may take this one for dead right now (its last
        heartbeat in the broker is older than the liveness timeout)."""
        return False

    def close(self, clean: bool) -> None:
        """Stop the timers; ``clean``: leave the broker's record of live workers."""


class RedisUpkeep(BrokerUpkeep):
    """Redis: heartbeat + restore of dead workers' tasks, and the delayed set.

    ``on_declared_dead()`` is called when this worker learns that others took it for
    dead (it was frozen or cut off for longer than ``worker_lost_timeout``): its running
    tasks may have been delivered again elsewhere.
    """

    def __init__(self, app: App, incarnation: str,
                 on_declared_dead: Callable[[], None]) -> None:
        self.app = app
        self.incarnation = incarnation
        self.on_declared_dead = on_declared_dead
        self._client: Any = None
        self._liveness: Any = None
        self._delayed: Any = None
        self._timers: list[Any] = []
        self._commands: list[Any] = []
        self._last_beat = time.monotonic()

    @property
    def transport_options(self) -> dict[str, Any]:
        # Read when the worker connects, after its prefork pool forked: the Redis modules
        # (redis_liveness and what it imports) stay out of the pool processes.
        from .redis_liveness import unacked_keys

        # kombu's own restore (visibility timeout) must never run on this worker's keys:
        # the liveness check alone decides when a task comes back.
        return {**unacked_keys(self.app.conf.namespace, self.incarnation),
                "visibility_timeout": 10 * 365 * 24 * 3600}

    def _connect(self) -> None:
        from .redis_delay import DelayedTasks
        from .redis_liveness import WorkerLiveness
        from .redis_urls import redis_client

        if self._client is None:
            self._client = redis_client(self.app.broker_url,
                                        self.app.conf.broker_transport_options,
                                        socket_connect_timeout=5, socket_timeout=10)
            ns = self.app.conf.namespace
            self._liveness = WorkerLiveness(self._client, ns, self.incarnation,
                                            self.app.conf.worker_lost_timeout)
            self._delayed = DelayedTasks(self._client, ns)

    def start(self, hub: Any, connection: Any = None) -> None:
        """The first beat waits for its answer (nothing may be fetched before it); later
        beats and the moves of due tasks are sent on connections of their own whose
        replies the loop reads when they arrive: a control message never waits behind
        them (a synchronous call every quarter second showed in the control round trip's
        p99)."""
        from .redis_fast import HubCommand

        self._connect()
        self._cancel_timers()
        self.beat()  # registered before the first fetch: nothing it takes is unowned
        options = self.app.conf.broker_transport_options
        for command in self._commands:
            command.close()
        self._commands = [HubCommand(self.app.broker_url, self._on_beat_reply, options),
                          HubCommand(self.app.broker_url, self._on_due_reply, options)]
        for command in self._commands:
            command.attach(hub)
        self._timers = [hub.call_repeatedly(self.app.conf.worker_heartbeat, self._send_beat),
                        hub.call_repeatedly(DUE_INTERVAL, self._send_move_due)]

    def beat(self) -> None:
        """Heartbeat, and restore the tasks of dead workers; raises connection errors."""
        self._after_beat(*self._liveness.beat())

    def _after_beat(self, known: bool, dead: dict[str, int]) -> None:
        self._last_beat = time.monotonic()
        for name, count in dead.items():
            logger.warning("worker %s stopped beating (> %.0fs): %d unacknowledged task(s) "
                           "returned to their queues", name,
                           self.app.conf.worker_lost_timeout, count)
        if not known:
            logger.warning("this worker was taken for dead (no heartbeat for %.0fs): its "
                           "running tasks may have been delivered to another worker",
                           self.app.conf.worker_lost_timeout)
            self.on_declared_dead()

    def _send(self, index: int, command: tuple[Any, ...]) -> None:
        hub_command = self._commands[index]
        if hub_command.in_flight:
            return  # the last one is still on its way: a late beat, not two
        try:
            hub_command.send(*command)
        except Exception as exc:  # the fetcher's connection notices and reconnects
            logger.debug("could not reach Redis for the worker's upkeep: %s", exc)

    def _send_beat(self) -> None:
        self._send(0, self._liveness.beat_command())

    def _send_move_due(self) -> None:
        self._send(1, self._delayed.move_due_command())

    def _failed(self, reply: Exception, load: Callable[[], None]) -> None:
        if "NOSCRIPT" in str(reply):  # Redis restarted (or failed over): load it again
            try:
                load()
            except Exception as exc:
                logger.debug("could not load the upkeep scripts: %s", exc)
        else:
            logger.warning("worker upkeep on Redis failed: %s", reply)

    def _on_beat_reply(self, reply: Any) -> None:
        if isinstance(reply, Exception):
            self._failed(reply, self._liveness.load)
            return
        self._after_beat(*self._liveness.read_beat(reply))

    def _on_due_reply(self, reply: Any) -> None:
        from .redis_delay import DUE_BATCH

        if isinstance(reply, Exception):
            self._failed(reply, self._delayed.load)
        elif int(reply) >= DUE_BATCH:
            self._send_move_due()  # more are due: the next batch at once

    def schedule(self, queue: str, task_id: str, envelope: bytes, priority: int | None,
                 eta: float) -> bool:
        from .redis_liveness import priority_list

        self._connect()
        self._delayed.schedule(priority_list(queue, priority), task_id, envelope, eta)
        return True

    def scheduled(self, limit: int = 100) -> list[ScheduledTask]:
        self._connect()
        return list(self._delayed.listing(limit))

    def find(self, task_id: str) -> bytes | None:
        self._connect()
        return self._delayed.find(task_id)

    def unschedule(self, task_id: str) -> bytes | None:
        self._connect()
        return self._delayed.unschedule(task_id)

    def possibly_lost(self) -> bool:
        return time.monotonic() - self._last_beat > self.app.conf.worker_lost_timeout

    def _cancel_timers(self) -> None:
        cancel_timers(self._timers)

    def close(self, clean: bool) -> None:
        self._cancel_timers()
        for command in self._commands:
            command.close()
        self._commands = []
        if self._client is None:
            return
        if clean:
            try:
                self._liveness.leave()
            except Exception as exc:
                logger.debug("could not leave the worker registry: %s", exc)
        try:
            self._client.close()
        except Exception:
            pass
        self._client = None


class DelayedStore(Protocol):
    """Where a broker without a server-side script keeps delayed tasks (the embedded
    broker's ``scheduled/`` directory, the in-memory broker's heap)."""

    def schedule(self, queue: str, task_id: str, message: bytes, eta: float) -> None: ...

    def move_due(self, now: float | None = None) -> int: ...

    def listing(self, limit: int = 100) -> list[ScheduledTask]: ...

    def find(self, task_id: str) -> bytes | None: ...

    def unschedule(self, task_id: str) -> bytes | None: ...


class StoreUpkeep(BrokerUpkeep):
    """Delayed delivery through a :class:`DelayedStore` (``self._delayed``)."""

    _delayed: DelayedStore

    def schedule(self, queue: str, task_id: str, envelope: bytes, priority: int | None,
                 eta: float) -> bool:
        self._delayed.schedule(queue, task_id, envelope, eta)
        return True

    def scheduled(self, limit: int = 100) -> list[ScheduledTask]:
        return self._delayed.listing(limit)

    def find(self, task_id: str) -> bytes | None:
        return self._delayed.find(task_id)

    def unschedule(self, task_id: str) -> bytes | None:
        return self._delayed.unschedule(task_id)


class EmbeddedUpkeep(StoreUpkeep):
    """The embedded broker: the queues' leases already return a dead process's messages;
    delayed tasks wait in its ``scheduled/`` directory (:mod:`.embedded_delay`)."""

    def __init__(self, app: App) -> None:
        from . import embedded_directory
        from .embedded_delay import EmbeddedDelayed
        from .embedded_store import store_for

        self.app = app
        fsync = bool(app.conf.broker_transport_options.get("fsync"))
        self._delayed = EmbeddedDelayed(store_for(str(embedded_directory(app.broker_url)),
                                                  fsync=fsync))
        self._timer: Any = None

    def start(self, hub: Any, connection: Any = None) -> None:
        self.close(clean=False)
        self._move_due_soft()
        self._timer = hub.call_repeatedly(DUE_INTERVAL, self._move_due_soft)

    def _move_due_soft(self) -> None:
        try:
            self._delayed.move_due()
        except OSError as exc:
            logger.warning("moving due tasks failed: %s", exc)

    def close(self, clean: bool) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def upkeep_for(app: App, incarnation: str, on_declared_dead: Callable[[], None],
               records: Mapping[str, Any] | None = None,
               give_back: Callable[[Any], None] | None = None) -> BrokerUpkeep:
    """The upkeep for ``app``'s broker; ``records``: a worker's live map of its task
    records, ``give_back(record)``: its way to return a task that has not started to the
    end of its queue (both None for clients and tools)."""
    if is_redis(app.broker_url):
        return RedisUpkeep(app, incarnation, on_declared_dead)
    if is_embedded(app.broker_url):
        return EmbeddedUpkeep(app)
    if is_memory(app.broker_url):
        from .memory_upkeep import MemoryUpkeep

        return MemoryUpkeep(app, incarnation, on_declared_dead)
    if is_amqp(app.broker_url):
        from .amqp_upkeep import AmqpUpkeep

        return AmqpUpkeep(app, incarnation, on_declared_dead, records, give_back)
    return BrokerUpkeep()
