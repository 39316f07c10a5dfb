"""The eventlet pool: thousands of I/O-bound tasks in one worker process.

The same design as the gevent pool (:mod:`.gevent`): slots are green threads, each
running the slot runtime every pool runs over the pool's one in-process inbox
(:mod:`.green_channel`), so interactive tasks work unchanged: progress and messages flow,
pause and cancel take effect at checkpoints (and at any cooperative wait). Forced cancel
raises ``Cancelled`` in the slot's green thread (at once if it waits, else at its next
cooperative switch); a CPU-bound task that never yields blocks the whole worker, so this
pool is for I/O-bound work only. There is no hard pause.

The worker must be monkey-patched before anything else is imported: ``itask worker
--pool eventlet`` does that (see ``interactive_tasks._eventlet``).

The worker loop (kombu's Hub) waits on a poller. Eventlet's patched ``select`` has no
``poll``/``epoll`` (kombu would fall back to ``select()``, which stops at fd 1024 and, in
eventlet, reports one ready descriptor per call), so the loop gets :class:`GreenEpoll`:
a real epoll whose own descriptor the loop waits on through eventlet's hub. Waiting
yields to the green threads; the epoll descriptor turns readable when any registered one
is ready, and one non-blocking ``epoll.poll(0)`` then collects them all.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from interactive_tasks.errors import Cancelled

from .base import PoolSlot
from .green import CooperativeEpoll, GreenPool


class GreenEpoll(CooperativeEpoll):
    """kombu's poller interface (``register``, ``unregister``, ``poll``, ``close``) on a
    real epoll that is waited on cooperatively (see the module doc)."""

    def __init__(self) -> None:
        from eventlet import patcher

        select = patcher.original("select")
        self._epoll = select.epoll()

    def poll(self, timeout: float | None) -> list[tuple[int, int]]:
        from eventlet.hubs import trampoline

        ready = self._epoll.poll(0)
        if ready or timeout == 0:
            return ready
        try:
            trampoline(self._epoll.fileno(), read=True, timeout=timeout,
                       timeout_exc=TimeoutError)
        except TimeoutError:
            return []
        except OSError as exc:
            if exc.errno == errno.EINTR:
                return []
            raise
        return self._epoll.poll(0)


class EventletPool(GreenPool):
    name = "eventlet"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        from kombu.utils import eventio

        eventio._get_poller = lambda: GreenEpoll

    def start_green(self, serve: Callable[[], None]) -> Any:
        import eventlet

        return eventlet.spawn(serve)

    def force_stop(self, slot: PoolSlot, stage: int) -> str:
        thread = slot.handle
        if thread.dead:
            return "green thread already finished"
        # Cancelled lands in the running task; the slot reports it like any cancel.
        thread.kill(Cancelled)
        return f"Cancelled raised in green thread of slot {slot.index}"

    def stop(self, slots: list[PoolSlot], timeout: float) -> None:
        import eventlet

        super().stop(slots, timeout)
        with eventlet.Timeout(timeout, False):
            for slot in slots:
                slot.handle.wait()
