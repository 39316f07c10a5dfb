"""Liveness and delayed delivery on the in-memory broker (``memory://``).

The same duties as on Redis (:class:`.upkeep.RedisUpkeep`), kept in the process's broker
(:mod:`.memory`): each worker beats into the broker's liveness record every
``worker_heartbeat``; each beat also finds the workers of its namespace silent for
``worker_lost_timeout`` and returns their unacknowledged tasks to their queues; and every
``DUE_INTERVAL`` the tasks whose eta has come move from the broker's delayed set to their
queues.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import memory
from .upkeep import DUE_INTERVAL, StoreUpkeep, cancel_timers

if TYPE_CHECKING:
    from ..app import App

logger = logging.getLogger("interactive_tasks.worker")


class MemoryUpkeep(StoreUpkeep):
    """The in-memory broker's liveness record and delayed set."""

    def __init__(self, app: App, incarnation: str,
                 on_declared_dead: Callable[[], None]) -> None:
        self.app = app
        self.incarnation = incarnation
        self.on_declared_dead = on_declared_dead
        self.namespace = app.conf.namespace
        self._delayed = memory.delayed_of(self.namespace)
        self._timers: list[Any] = []
        self._transport: memory.Transport | None = None
        self._last_beat = time.monotonic()

    def start(self, hub: Any, connection: Any = None) -> None:
        cancel_timers(self._timers)
        transport = getattr(connection, "transport", None)
        # a worker's fresh connection: its entry owns the new connection's deliveries
        self._transport = transport if isinstance(transport, memory.Transport) else None
        self._register()
        self.beat()
        self._timers = [hub.call_repeatedly(self.app.conf.worker_heartbeat, self.beat),
                        hub.call_repeatedly(DUE_INTERVAL, self.move_due)]

    def _register(self) -> None:
        with memory.STATE.lock:
            memory.STATE.workers[self.incarnation] = memory.WorkerEntry(
                self.incarnation.rsplit("/", 1)[0], self.namespace, self._transport)

    def beat(self) -> None:
        """Heartbeat, and return the tasks of workers found dead."""
        with memory.STATE.lock:
            entry = memory.STATE.workers.get(self.incarnation)
            if entry is not None:
                entry.last_beat = time.monotonic()
        if entry is None:
            logger.warning("this worker was taken for dead (no heartbeat for %.0fs): its "
                           "running tasks may have been delivered to another worker",
                           self.app.conf.worker_lost_timeout)
            self.on_declared_dead()
            if self._transport is None or not self._transport.dead:
                self._register()  # alive after all: in the record again, as on Redis
                if self._transport is not None:
                    self._transport.fenced = False
                    self._transport.wake()
        self._last_beat = time.monotonic()
        for name, count in memory.sweep(self.namespace,
                                        self.app.conf.worker_lost_timeout).items():
            logger.warning("worker %s stopped beating (> %.0fs): %d unacknowledged task(s) "
                           "returned to their queues", name,
                           self.app.conf.worker_lost_timeout, count)

    def move_due(self) -> None:
        self._delayed.move_due()

    def possibly_lost(self) -> bool:
        return time.monotonic() - self._last_beat > self.app.conf.worker_lost_timeout

    def close(self, clean: bool) -> None:
        cancel_timers(self._timers)
        with memory.STATE.lock:
            entry = memory.STATE.workers.get(self.incarnation)
            # a killed worker (its connection dead) cannot leave: the liveness check finds it
            dead = entry is not None and entry.transport is not None and entry.transport.dead
            if clean and not dead:
                memory.STATE.workers.pop(self.incarnation, None)
