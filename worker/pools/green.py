"""What the gevent and eventlet pools share: slots that are green threads of the worker.

Each slot runs the slot runtime every pool runs, on its own socketpair, in a green thread
the concrete pool starts (:meth:`GreenPool.start_green`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ..child import Slot
from ..ipc import BlockingChannel
from .base import Pool, PoolSlot


class GreenPool(Pool):
    """A pool of green-thread slots; subclasses say how a green thread is started."""

    def start_green(self, serve: Callable[[], None]) -> Any:
        """Start ``serve`` in a green thread; returns its handle (kept as the slot's)."""
        raise NotImplementedError

    def spawn(self, index: int) -> PoolSlot:
        parent, child = self._socketpair()
        runner = Slot(self.app, BlockingChannel(child), self.hostname)

        def serve() -> None:
            try:
                runner.serve()
            finally:  # the worker sees the channel close (a slot stopped to shrink)
                child.close()

        return PoolSlot(index=index, pid=os.getpid(), sock=parent,
                        handle=self.start_green(serve))
