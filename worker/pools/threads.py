"""The threads pool (and solo): slots are threads of the worker process.

Each slot thread runs the same :class:`..child.Slot` as a prefork child, over its own
socketpair, so relaying, ordering and checkpoints behave identically. What a thread
cannot do: be frozen alone (no hard pause) or be killed; forced cancel raises
``Cancelled`` asynchronously in the thread, which takes effect at its next Python
bytecode (not inside a long C call).
"""

from __future__ import annotations

import ctypes
import os
import threading
import time

from interactive_tasks.app import App
from interactive_tasks.errors import Cancelled

from ..child import Slot
from ..ipc import BlockingChannel, ChannelClosed
from .base import Pool, PoolSlot, use_switch_interval


def _raise_in_thread(thread: threading.Thread, exc_type: type[BaseException]) -> bool:
    ident = thread.ident
    if ident is None or not thread.is_alive():
        return False
    count = ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(ident), ctypes.py_object(exc_type)
    )
    return bool(count == 1)


class ThreadsPool(Pool):
    name = "threads"

    def __init__(self, app: App, concurrency: int, hostname: str,
                 max_tasks_per_child: int | None = None) -> None:
        super().__init__(app, concurrency, hostname, max_tasks_per_child)
        # Tasks share this process (and its interpreter lock) with the worker loop.
        use_switch_interval(app)

    def spawn(self, index: int) -> PoolSlot:
        parent, child = self._socketpair()
        slot_runner = Slot(self.app, BlockingChannel(child), self.hostname,
                           nice=self.app.conf.worker_task_nice)

        def serve() -> None:
            try:
                slot_runner.serve()
            except ChannelClosed:
                pass  # the worker is gone (a worker inside a test process, killed)
            finally:  # a worker inside a test process outlives its slots
                child.close()

        thread = threading.Thread(target=serve, name=f"itask-{self.name}-{index}",
                                  daemon=True)
        thread.start()
        return PoolSlot(index=index, pid=os.getpid(), sock=parent, handle=thread)

    def force_stop(self, slot: PoolSlot, stage: int) -> str:
        done = _raise_in_thread(slot.handle, Cancelled)
        return f"async Cancelled in thread {slot.handle.name}" + ("" if done else " (gone)")

    def stop(self, slots: list[PoolSlot], timeout: float) -> None:
        super().stop(slots, timeout)
        deadline = time.monotonic() + timeout
        for slot in slots:
            slot.handle.join(max(0.0, deadline - time.monotonic()))


class SoloPool(ThreadsPool):
    """One slot in the worker process, no concurrency.

    The task runs in a thread rather than in the worker's main thread so the worker
    loop keeps relaying control and events while it runs (that is what makes a solo
    task interactive).
    """

    name = "solo"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.concurrency = 1
