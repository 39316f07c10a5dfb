"""What the gevent and eventlet pools share: slots that are green threads of the worker.

Each slot runs the slot runtime every pool runs, in a green thread the concrete pool
starts (:meth:`GreenPool.start_green`). Its frames reach the worker loop through the
pool's one in-process inbox and the worker's reach it through a queue of its own
(:mod:`.green_channel`), not a socketpair per slot.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from interactive_tasks.app import App

from ..child import Slot
from .base import Pool, PoolSlot
from .green_channel import GreenChannel, SlotInbox


class CooperativeEpoll:
    """The part of kombu's poller interface (``register``, ``unregister``, ``close``)
    that the green pools' pollers share: a real epoll (``self._epoll``, the unpatched
    one) whose own descriptor each subclass's ``poll`` waits on through its green hub."""

    _epoll: Any

    def register(self, fd: Any, events: int) -> int:
        from kombu.utils import fileno

        fd = fileno(fd)
        try:
            self._epoll.register(fd, events)
        except FileExistsError:
            self._epoll.modify(fd, events)
        return fd

    def unregister(self, fd: Any) -> None:
        from kombu.utils import fileno

        try:
            self._epoll.unregister(fileno(fd))
        except (OSError, ValueError, KeyError):
            pass  # closed already: the kernel dropped it from the set

    def close(self) -> None:
        self._epoll.close()


class GreenPool(Pool):
    """A pool of green-thread slots; subclasses say how a green thread is started and
    may give the task runtimes a cheaper condition variable (:meth:`make_condition`)."""

    def __init__(self, app: App, concurrency: int, hostname: str,
                 max_tasks_per_child: int | None = None) -> None:
        super().__init__(app, concurrency, hostname, max_tasks_per_child)
        self.inbox = SlotInbox()

    def start_green(self, serve: Callable[[], None]) -> Any:
        """Start ``serve`` in a green thread; returns its handle (kept as the slot's)."""
        raise NotImplementedError

    def make_condition(self) -> Any:
        """A condition variable for one task's runtime; the (patched)
        ``threading.Condition`` unless a subclass has a cheaper one."""
        return threading.Condition()

    def spawn(self, index: int) -> PoolSlot:
        assert self.inbox is not None
        channel = GreenChannel(self.inbox)
        slot = PoolSlot(index=index, pid=os.getpid(), sock=None, writer=channel)
        channel.slot = slot
        runner = Slot(self.app, channel, self.hostname, condition=self.make_condition)

        def serve() -> None:
            try:
                runner.serve()
            finally:  # the worker sees the channel close (a slot stopped to shrink)
                channel.closed()
                # and the slot's reader green thread, waiting for the worker's next
                # frame, ends too (a slot that ended without a "stop" frame: a forced
                # stop between jobs, an error in serve)
                channel.close()

        # The green thread first runs when the worker loop next waits: after this.
        slot.handle = self.start_green(serve)
        return slot
