"""A condition variable for gevent slots whose timed wait costs one timer, not a lock and
a Timeout.

:class:`..child.SlotRuntime` waits on a condition in ``receive``, ``ask`` and while paused.
With monkey patching, ``threading.Condition.wait(timeout)`` allocates a gevent lock per
call, acquires it under a new ``gevent.Timeout`` and takes the patched RLock around it;
under 5,000 tasks each calling ``receive(timeout=0.25)`` four times a second that was the
largest single cost in the worker's profile. :class:`GeventCondition` is what that code
needs of a condition and no more: a wait is a hub ``Waiter`` switched either by
:meth:`notify_all` (through a loop callback) or by a timer of the loop.

It has no lock: a gevent slot and the reader green thread that calls ``control`` run in
the worker's one OS thread, and ``SlotRuntime`` never switches green threads while it
holds the condition except inside :meth:`wait` (sending a frame on a
:class:`.green_channel.GreenChannel` does not switch). So ``acquire``/``release`` are
no-ops kept for the runtime's ``with`` blocks. It must only be used from green threads
of one hub (not from OS threads); the eventlet pool keeps ``threading.Condition``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

#: the priority of a timed wait's timer (gevent.Timeout's default)
TIMER_PRIORITY = -1


class GeventCondition:
    """``threading.Condition``'s ``with``/``acquire``/``release``/``wait``/``wait_for``/
    ``notify_all`` for green threads of one gevent hub (see the module doc). Waits may
    return early (a wake-up meant for an earlier wait), as the ``threading`` ones may;
    callers re-check their predicate. Nothing here raises, save what ``wait`` is
    interrupted with (``GreenletExit``, a forced cancel's ``Cancelled``)."""

    def __init__(self) -> None:
        from gevent import get_hub
        from gevent.hub import Waiter

        self._waiter = Waiter
        self._hub = get_hub()
        self._loop = self._hub.loop
        #: the Waiter of each green thread blocked in wait(), in arrival order
        self._waiters: list[Any] = []

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return True

    def release(self) -> None:
        return None

    def __enter__(self) -> bool:
        return True

    def __exit__(self, *exc: object) -> None:
        return None

    def wait(self, timeout: float | None = None) -> bool:
        """Block this green thread until :meth:`notify_all` or ``timeout`` seconds;
        returns False if the time ran out."""
        # A fresh Waiter per wait: a wake-up scheduled for an earlier wait that ended
        # another way (timer and notify in the same loop turn) lands on the old one.
        waiter = self._waiter(self._hub)
        self._waiters.append(waiter)
        timer = None
        if timeout is not None:
            # Priority -1, as gevent.Timeout's timers: in a turn of the loop where
            # thousands of these fall due, the worker loop's watchers go first.
            timer = self._loop.timer(max(timeout, 0.0), priority=TIMER_PRIORITY)
            # update=True, as gevent.Timeout: the timer counts from now, not from the
            # start of this turn of the loop (which, waking thousands of tasks, can be
            # long ago: the tasks would fall due together again, in bursts).
            timer.start(waiter.switch, False, update=True)
        try:
            return bool(waiter.get())
        finally:
            if timer is not None:
                timer.close()
            try:
                self._waiters.remove(waiter)
            except ValueError:
                pass  # notify_all took it

    def wait_for(self, predicate: Callable[[], Any], timeout: float | None = None) -> Any:
        """Wait until ``predicate()`` is true or ``timeout`` passes; returns its last
        value."""
        deadline = None if timeout is None else time.monotonic() + timeout
        result = predicate()
        while not result:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            self.wait(remaining)
            result = predicate()
        return result

    def notify_all(self) -> None:
        """Wake every green thread waiting now (they run at the hub's next turn)."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            self._loop.run_callback(waiter.switch, True)

    notifyAll = notify_all
