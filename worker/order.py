"""The order of one step of the worker's loop: control first, pool slots last.

kombu's :class:`~kombu.asynchronous.Hub` calls the callback of every ready descriptor in
the order its poller returns them, which is the kernel's. Under load that put a control
message (pause, resume, cancel, a message or an answer for a running task) behind the
progress of every busy pool slot that turned readable in the same step.
:class:`ControlFirstHub` ranks each step's ready descriptors by what reads them: control
sources first (``is_control``: the worker's control list on Redis), then the other broker
sockets (task intake, the broker's answers, the broadcast consumer), then the pool slots'
channels (``is_slot``), which carry progress and logs in bulk. Within a rank the kernel's
order stays. The cost is one dictionary lookup per ready descriptor, never per slot.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kombu.asynchronous import Hub

#: the ranks of a ready descriptor, in the order a step handles them
CONTROL, BROKER, SLOT = 0, 1, 2


class ControlFirstPoller:
    """Wraps a kombu poller: :meth:`poll` returns the ready descriptors ranked by
    ``rank(fd)`` (stable within a rank)."""

    def __init__(self, poller: Any, rank: Callable[[int], int]) -> None:
        self._poller = poller
        self._rank = rank

    def register(self, fd: Any, events: int) -> Any:
        return self._poller.register(fd, events)

    def unregister(self, fd: Any) -> Any:
        return self._poller.unregister(fd)

    def close(self) -> None:
        self._poller.close()

    def poll(self, timeout: float | None) -> Any:
        events = self._poller.poll(timeout)
        if not events or len(events) == 1:
            return events
        rank = self._rank
        ranked: tuple[list[Any], list[Any], list[Any]] = ([], [], [])
        for event in events:
            ranked[rank(event[0])].append(event)
        first, middle, last = ranked
        if not first and not middle:
            return last
        return first + middle + last


class ControlFirstHub(Hub):
    """A kombu Hub whose steps handle control, then the broker, then pool slots (see the
    module doc). ``is_control(callback)`` and ``is_slot(callback)`` tell a reader's
    callback apart."""

    def __init__(self, is_control: Callable[[Any], bool],
                 is_slot: Callable[[Any], bool]) -> None:
        self._is_control = is_control
        self._is_slot = is_slot
        super().__init__()

    def _create_poller(self) -> None:
        super()._create_poller()
        self._poller = ControlFirstPoller(self._poller, self.rank)
        self._register_fd = self._poller.register
        self._unregister_fd = self._poller.unregister

    def rank(self, fd: int) -> int:
        entry = self.readers.get(fd)
        if entry is None:
            return BROKER  # a writer, or the waker
        callback = entry[0]
        if self._is_slot(callback):
            return SLOT
        if self._is_control(callback):
            return CONTROL
        return BROKER
