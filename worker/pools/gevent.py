"""The gevent pool: thousands of I/O-bound tasks in one worker process.

Slots are greenlets, each with its own socketpair and the same slot runtime as every
other pool, so interactive tasks work unchanged: progress and messages flow, pause and
cancel take effect at checkpoints (and at any cooperative wait). Forced cancel raises
``Cancelled`` in the slot's greenlet at its next cooperative switch; a CPU-bound task that
never yields blocks the whole worker, so this pool is for I/O-bound work only. There is no
hard pause.

The worker must be monkey-patched before anything else is imported: ``itask worker
--pool gevent`` does that (see ``interactive_tasks._gevent``). The eventlet pool
(:mod:`.eventlet`) is the same design.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from interactive_tasks.errors import Cancelled

from .base import PoolSlot
from .green import GreenPool


class GeventPool(GreenPool):
    name = "gevent"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        # kombu's Hub uses select() under greenlets, which stops at fd 1024: with one
        # socketpair per slot, a thousand slots need gevent's (cooperative) poll().
        from kombu.utils import eventio

        eventio._get_poller = lambda: eventio._poll

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
