"""The green pools' slot channel: one in-process inbox instead of a socketpair per slot.

A green slot (gevent, eventlet) is a green thread of the worker process, so what it hands
the worker loop needs no socket. Under 5,000 slots each sending progress, a socketpair per
slot cost most of the worker's core in the slots' own writes (gevent's ``sendall`` and the
channel's lock) and in the loop's reads of each ready descriptor. Here every slot of the
pool appends its frames to one :class:`SlotInbox`, and one wake-up descriptor (an eventfd)
is written only when the inbox turns from empty to non-empty; the loop, woken by it, takes
a bounded batch per turn (:meth:`SlotInbox.drain`) so that control from the broker, ranked
first by :class:`..order.ControlFirstHub`, is handled between batches.

Order inside the inbox:

* *urgent* frames (everything but progress: ``ready``, a task's messages, logs and other
  events, receipts ``rc``, ``done``) are handed over before *bulk* ones (progress);
* a slot's progress that the loop has not taken yet is replaced by its next progress of the
  same task (the latest wins, as in the worker's relay) — it keeps its place in the queue;
* a slot's urgent frame first moves that slot's waiting progress, if any, to the urgent
  queue ahead of it, so each slot's frames (and each task's) reach the loop in the order
  they were sent, less superseded progress; nothing else is ever dropped.

Frames are encoded (msgpack, as on a socket) when sent: the task cannot change what it sent
afterwards, and a result that cannot be encoded fails in the slot (``TypeError``), where
:class:`..child.Slot` reports it instead of the result.

The other direction, worker → slot (``run``, ``ctl``, ``stop``), is a queue per slot
(:class:`GreenChannel`) that the slot's reader green thread waits on.

Everything here runs in one OS thread (the green threads and the worker loop share it) and
no method switches green threads between reading and updating the inbox's state, so it
needs no lock.
"""

from __future__ import annotations

import _socket
import os
import queue
from collections import deque
from typing import Any

from interactive_tasks import codec

from ..ipc import MAX_FRAME, ChannelClosed

#: what the inbox hands the loop in place of a frame once a slot's channel closed (its
#: green thread ended)
CLOSED = b""
#: what :meth:`GreenChannel.recv` raises on once the worker side closed the channel
_STOP = object()


class _Waker:
    """A descriptor that is readable once :meth:`set` and until :meth:`clear`: an eventfd
    (Linux), else a pair of sockets. Neither call waits or switches green threads: they
    use ``os.eventfd_read``/``eventfd_write`` and the C socket module, which no monkey
    patching replaces (eventlet's ``os.read`` first waits for the descriptor through its
    hub, which would let green threads run between the inbox's check and its reset)."""

    def __init__(self) -> None:
        self._pair: tuple[Any, Any] | None = None
        if hasattr(os, "eventfd"):
            self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:
            self._pair = _socket.socketpair()
            for end in self._pair:
                end.setblocking(False)
            self.fd = self._pair[0].fileno()

    def set(self) -> None:
        if self.fd < 0:
            return  # closed: a slot still ending after the worker stopped
        if self._pair is None:
            os.eventfd_write(self.fd, 1)
        else:
            self._pair[1].send(b"x")

    def clear(self) -> None:
        if self.fd < 0:
            return
        try:
            if self._pair is None:
                os.eventfd_read(self.fd)
            else:
                self._pair[0].recv(4096)
        except BlockingIOError:
            pass

    def close(self) -> None:
        """Close the descriptor; later calls of every method do nothing (the number may
        already belong to another file)."""
        if self.fd < 0:
            return
        if self._pair is None:
            os.close(self.fd)
        else:
            for end in self._pair:
                end.close()
        self.fd = -1


class SlotInbox:
    """Frames from every green slot of a pool to the worker loop (see the module doc).

    Slots are keys only: the loop gets back the object a slot was registered with.
    """

    def __init__(self) -> None:
        #: [slot, body]; a body of None was moved to the urgent queue
        self._urgent: deque[list[Any]] = deque()
        self._bulk: deque[list[Any]] = deque()
        #: slot -> its progress entry still in the bulk queue: [slot, body, task id]
        self._waiting: dict[Any, list[Any]] = {}
        self._waker = _Waker()
        self._woken = False

    def fileno(self) -> int:
        """The descriptor that is readable while the inbox holds frames."""
        return self._waker.fd

    def __len__(self) -> int:
        """Frames waiting (moved progress counts until the bulk queue passes it)."""
        return len(self._urgent) + len(self._bulk)

    def put(self, slot: Any, body: bytes) -> None:
        """Queue an urgent frame (encoded; ``CLOSED`` once the slot ended), after the
        slot's waiting progress."""
        waiting = self._waiting.pop(slot, None)
        if waiting is not None:
            self._urgent.append([slot, waiting[1]])
            waiting[1] = None
        self._urgent.append([slot, body])
        self._wake()

    def put_progress(self, slot: Any, task_id: Any, body: bytes) -> None:
        """Queue a progress frame of ``task_id``, replacing the slot's progress of the
        same task that the loop has not taken yet."""
        waiting = self._waiting.get(slot)
        if waiting is not None:
            if waiting[2] == task_id:
                waiting[1] = body
                return
            # Another task's progress (a slot runs one task at a time, so not expected):
            # it goes ahead of this one, as an urgent frame would.
            del self._waiting[slot]
            self._urgent.append([slot, waiting[1]])
            waiting[1] = None
        entry = [slot, body, task_id]
        self._bulk.append(entry)
        self._waiting[slot] = entry
        self._wake()

    def drain(self, limit: int) -> list[tuple[Any, bytes]]:
        """Take up to ``limit`` frames, urgent ones first, as ``(slot, body)``; the
        descriptor stays readable while frames remain."""
        taken: list[tuple[Any, bytes]] = []
        urgent, bulk, waiting = self._urgent, self._bulk, self._waiting
        while urgent and len(taken) < limit:
            slot, body = urgent.popleft()
            taken.append((slot, body))
        while bulk and len(taken) < limit:
            entry = bulk.popleft()
            slot, body = entry[0], entry[1]
            if body is None:
                continue  # moved ahead of an urgent frame of its slot
            if waiting.get(slot) is entry:
                del waiting[slot]
            taken.append((slot, body))
        if not urgent and not bulk and self._woken:
            self._waker.clear()
            self._woken = False
        return taken

    def _wake(self) -> None:
        if not self._woken:
            self._woken = True
            self._waker.set()

    def close(self) -> None:
        """Close the descriptor (frames still queued are dropped)."""
        self._waker.close()


def decode(body: bytes) -> Any:
    """A frame the inbox handed over, decoded."""
    return codec.loads(body, MAX_FRAME)


class GreenChannel:
    """Both ends of one green slot's channel: the slot's (``send``, ``send_progress``,
    ``recv``, as :class:`..ipc.BlockingChannel`) and the worker's (``write``, ``pending``,
    ``flush``, as :class:`..ipc.FrameWriter`).

    ``send`` raises TypeError for what cannot be encoded; ``recv`` raises ChannelClosed
    once the worker side closed the channel.
    """

    def __init__(self, inbox: SlotInbox, slot: Any = None) -> None:
        self._inbox = inbox
        #: the key the inbox hands frames back with (the worker's PoolSlot), set once known
        self.slot = slot
        self._incoming: queue.Queue[Any] = queue.Queue()

    # -- the slot's end ----------
    def send(self, obj: Any) -> None:
        self._inbox.put(self.slot, codec.dumps(obj))

    def send_progress(self, obj: Any) -> None:
        """Queue a progress frame (``["ev", task_id, "progress", ...]``); the task's
        previous one, if the loop has not taken it yet, is dropped."""
        self._inbox.put_progress(self.slot, obj[1], codec.dumps(obj))

    def flush_held(self) -> None:
        """Nothing is held back in the slot (the inbox replaces superseded progress)."""

    @property
    def holding(self) -> int:
        return 0

    def recv(self) -> Any:
        frame = self._incoming.get()
        if frame is _STOP:
            self._incoming.put(_STOP)  # every later recv too
            raise ChannelClosed("worker closed the channel")
        return frame

    def closed(self) -> None:
        """The slot ended: the loop gets ``CLOSED`` after everything it sent."""
        self._inbox.put(self.slot, CLOSED)

    # -- the worker's end ----------
    @property
    def pending(self) -> int:
        return 0

    def write(self, obj: Any) -> bool:
        """Hand a frame to the slot (never blocks: the queue is unbounded)."""
        self._incoming.put(obj)
        return True

    def flush(self) -> bool:
        return True

    def close(self) -> None:
        """The worker side closes: the slot's ``recv`` raises ChannelClosed."""
        self._incoming.put(_STOP)
