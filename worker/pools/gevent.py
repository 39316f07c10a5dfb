"""The gevent pool: thousands of I/O-bound tasks in one worker process.

Slots are greenlets, each running the same slot runtime as every other pool (its frames
reach the worker loop through the pool's one in-process inbox: :mod:`.green_channel`),
so interactive tasks work unchanged: progress and messages flow, pause and cancel take
effect at checkpoints (and at any cooperative wait). Forced cancel raises ``Cancelled`` in
the slot's greenlet at its next cooperative switch; a CPU-bound task that never yields
blocks the whole worker, so this pool is for I/O-bound work only. There is no hard pause.

The worker must be monkey-patched before anything else is imported: ``itask worker
--pool gevent`` does that (see ``interactive_tasks._gevent``). The eventlet pool
(:mod:`.eventlet`) is the same design.

The worker loop (kombu's Hub) waits on :class:`GeventEpoll`: a real epoll whose own
descriptor is waited on through one gevent watcher. gevent's cooperative ``poll()`` starts
and stops a watcher for every registered descriptor on every call, so each step of the
loop cost time in proportion to the pool's size, idle slots included (a message to the
one running task of a ``-c 3010`` worker took ten times as long as with ``-c 10``); an
epoll costs in proportion to what is ready.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from interactive_tasks.errors import Cancelled

from .base import PoolSlot
from .gevent_condition import GeventCondition
from .green import CooperativeEpoll, GreenPool


class GeventEpoll(CooperativeEpoll):
    """kombu's poller interface (``register``, ``unregister``, ``poll``, ``close``) on a
    real epoll whose descriptor is waited on cooperatively by one gevent watcher (see the
    module doc). The watcher has the loop's highest priority: when it and task greenlets
    are due in the same turn of gevent's loop, the worker loop (control, replies) runs
    first."""

    def __init__(self) -> None:
        from gevent import get_hub
        from gevent.monkey import get_original

        self._epoll = get_original("select", "epoll")()
        self._hub = get_hub()
        loop = self._hub.loop
        self._watcher = loop.io(self._epoll.fileno(), 1)  # 1: readable
        self._watcher.priority = loop.MAXPRI

    def poll(self, timeout: float | None) -> list[tuple[int, int]]:
        from gevent import Timeout

        ready = self._epoll.poll(0)
        if ready or timeout == 0:
            return ready
        with Timeout(timeout, False):
            self._hub.wait(self._watcher)
        return self._epoll.poll(0)

    def close(self) -> None:
        self._watcher.close()
        super().close()


class GeventPool(GreenPool):
    name = "gevent"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        # kombu's Hub uses select() under greenlets, which stops at fd 1024, and gevent's
        # poll() costs in proportion to the registered descriptors: a real epoll (above).
        from kombu.utils import eventio

        eventio._get_poller = lambda: GeventEpoll

    def make_condition(self) -> Any:
        """A timed wait on one timer instead of a patched lock and a ``Timeout``
        (see :mod:`.gevent_condition`)."""
        return GeventCondition()

    def start_green(self, serve: Callable[[], None]) -> Any:
        import gevent

        return gevent.spawn(serve)

    def force_stop(self, slot: PoolSlot, stage: int) -> str:
        greenlet = slot.handle
        if greenlet.dead:
            return "greenlet already finished"
        # Cancelled lands in the running task; the slot reports it like any cancel.
        greenlet.kill(Cancelled, block=False)
        return f"Cancelled raised in greenlet of slot {slot.index}"

    def stop(self, slots: list[PoolSlot], timeout: float) -> None:
        import gevent

        super().stop(slots, timeout)
        gevent.joinall([s.handle for s in slots], timeout=timeout)
