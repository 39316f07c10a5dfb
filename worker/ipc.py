"""Framing for the worker ↔ pool-slot channel: 4-byte big-endian length + msgpack.

Each pool slot (a prefork child, or a thread in the threads/solo pools) has its own
``socketpair`` (docs/architecture.md, 'Pools'). The slot side writes blocking frames; the
worker side is non-blocking: :class:`FrameReader` parses whatever a ``recv`` returned into
whole frames, and :class:`FrameWriter` keeps unsent bytes so a stopped child cannot block
the worker.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import termios
import threading
import time
from typing import Any

from interactive_tasks import codec

_HEADER = struct.Struct(">I")
#: A frame larger than this is a bug or an attack; the channel is dropped.
MAX_FRAME = 256 * 1024 * 1024


class ChannelClosed(EOFError):
    """The other end of the channel went away."""


def ctl_frame(task_id: str, verb: str, data: Any, receipt: Any = None) -> list[Any]:
    """``["ctl", task_id, verb, data]`` for a slot; a message whose sender wants a receipt
    carries it as a fifth element, which the slot hands back as ``["rc", task_id,
    receipt]`` once the task has taken the message."""
    if receipt is None:
        return ["ctl", task_id, verb, data]
    return ["ctl", task_id, verb, data, receipt]


def encode_frame(obj: Any) -> bytes:
    body = codec.dumps(obj)
    return _HEADER.pack(len(body)) + body


class FrameReader:
    """Accumulates bytes and yields complete decoded frames."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        """The frames ``data`` completes (decoded); raises ChannelClosed for a frame over
        :data:`MAX_FRAME` and ProtocolError for one that is not msgpack."""
        buf = self._buf
        if not buf and len(data) >= 4:
            # One whole frame and nothing buffered (a control message, most reads): decoded
            # from ``data`` without going through the buffer.
            (size,) = _HEADER.unpack_from(data)
            if len(data) == 4 + size <= 4 + MAX_FRAME:
                return [codec.loads(data[4:], MAX_FRAME)]
        buf += data
        frames: list[Any] = []
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            (size,) = _HEADER.unpack_from(buf, pos)
            if size > MAX_FRAME:
                raise ChannelClosed(f"frame of {size} bytes on a pool channel")
            if end - pos - 4 < size:
                break
            frames.append(codec.loads(bytes(buf[pos + 4 : pos + 4 + size]), MAX_FRAME))
            pos += 4 + size
        if pos:
            del buf[:pos]
        return frames


class FrameWriter:
    """Non-blocking writes with an overflow buffer (worker side)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._pending = bytearray()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def write(self, obj: Any) -> bool:
        """Queue a frame and try to send; True when everything went out."""
        self._pending += encode_frame(obj)
        return self.flush()

    def flush(self) -> bool:
        while self._pending:
            try:
                sent = self.sock.send(self._pending)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:
                raise ChannelClosed(str(exc)) from exc
            del self._pending[:sent]
        return True


#: Progress is held back while this many bytes sent on a slot channel are still unread by
#: the worker (it is behind); below it every progress event goes out at once.
BEHIND_BYTES = 4096
#: A held-back progress event goes out at the latest this long after it was first held.
HOLD_S = 0.05

#: SIOCOUTQ: bytes sent on a socket that the peer has not read yet (Linux); None elsewhere
_OUTQ: int | None = getattr(termios, "TIOCOUTQ", None)


class BlockingChannel:
    """The slot side: blocking frame I/O, writes serialised by a lock.

    Progress adapts to load: while the worker has not yet read what this slot sent before
    (``BEHIND_BYTES``), a task's progress event replaces the one of the same task held
    back instead of queueing behind it — the latest wins, as in the worker's own batching.
    Held events go out before any later frame on the channel (so before a task's next
    event, ``paused``, its end, a receipt), or at the latest ``HOLD_S`` after they were
    first held. Held back per task: the Celery bridge runs several tasks over one channel.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setblocking(True)
        self._reader = FrameReader()
        self._frames: list[Any] = []
        self._write_lock = threading.Lock()
        #: task id -> its held progress frame (encoded), in the order first held
        self._held: dict[Any, bytes] = {}
        #: when the oldest of ``_held`` was held (``time.monotonic()``), None: nothing is
        self._held_since: float | None = None
        self._outq: int | None = _OUTQ

    def send(self, obj: Any) -> None:
        data = encode_frame(obj)
        with self._write_lock:
            if self._held:
                data = self._take_held() + data
            self._sendall(data)

    def send_progress(self, obj: Any) -> None:
        """Send a progress frame (``["ev", task_id, "progress", ...]``) now, or hold it,
        replacing the task's held one, while the worker is behind on this channel."""
        data = encode_frame(obj)
        task_id = obj[1]
        with self._write_lock:
            if self._behind():
                if not self._held:
                    self._held_since = time.monotonic()
                    _flusher.hold(self, self._held_since + HOLD_S)
                self._held.pop(task_id, None)  # keep the order in which tasks were held
                self._held[task_id] = data
                return
            self._held.pop(task_id, None)  # this one is newer
            if self._held:
                data = self._take_held() + data
            self._sendall(data)

    def flush_due(self, now: float) -> float | None:
        """Send the held progress frames if they were first held ``HOLD_S`` before
        ``now``; else when they will be (None: nothing is held). Raises
        :class:`ChannelClosed`."""
        with self._write_lock:
            if self._held_since is None:
                return None
            due = self._held_since + HOLD_S
            if due > now:
                return due
            self._sendall(self._take_held())
            return None

    @property
    def holding(self) -> int:
        """How many progress frames are held back."""
        return len(self._held)

    def _take_held(self) -> bytes:
        data = b"".join(self._held.values())
        self._held.clear()
        self._held_since = None
        return data

    def _behind(self) -> bool:
        if self._outq is None:
            return False
        try:
            unread = struct.unpack("i", fcntl.ioctl(self.sock.fileno(), self._outq,
                                                    b"\0\0\0\0"))[0]
        except OSError:
            self._outq = None  # not supported here: never hold
            return False
        return bool(unread >= BEHIND_BYTES)

    def _sendall(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise ChannelClosed(str(exc)) from exc

    def recv(self) -> Any:
        while not self._frames:
            try:
                data = self.sock.recv(65536)
            except OSError as exc:
                raise ChannelClosed(str(exc)) from exc
            if not data:
                raise ChannelClosed("worker closed the channel")
            self._frames.extend(self._reader.feed(data))
        return self._frames.pop(0)


class _Flusher:
    """Sends held progress frames ``HOLD_S`` after they were first held (one thread per
    process, started on first use; a greenlet under gevent/eventlet patching).

    One entry per channel, with the time its held frames fall due: a channel that holds
    again after its task thread sent what it held keeps its entry, and the thread, woken
    then, looks at the channel's current hold instead. A saturated worker makes a busy
    channel hold, send and hold again hundreds of times a second; an entry and a wake-up
    for each would wake this thread as often, each time taking the interpreter lock from
    the task's thread (benchmarks/HISTORY.md, "A stall of control round trips on a
    saturated prefork worker").
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        #: channel -> when its held frames fall due (``time.monotonic()``)
        self._due: dict[BlockingChannel, float] = {}
        self._pid = 0

    def forked(self) -> None:
        """In a forked child: the parent's thread is not here, and it may have held the
        condition's lock when the process forked."""
        self._cond = threading.Condition()
        self._due = {}
        self._pid = 0

    def hold(self, channel: BlockingChannel, due: float) -> None:
        """``channel`` holds frames that fall due at ``due``."""
        with self._cond:
            known = self._due.get(channel)
            if known is not None and known <= due:
                return  # the thread wakes for it by then and looks at its current hold
            wake = not self._due or due < min(self._due.values())
            self._due[channel] = due
            if self._pid != os.getpid():  # not started yet, or started before a fork
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="itask-progress-flush",
                                 daemon=True).start()
            elif wake:  # it sleeps longer than that
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._due:
                    self._cond.wait()
                channel, due = min(self._due.items(), key=lambda item: item[1])
                now = time.monotonic()
                if due > now:
                    self._cond.wait(due - now)
                    continue
                del self._due[channel]
            try:
                later = channel.flush_due(now)
            except ChannelClosed:
                continue
            if later is not None:  # sent and held again since it was registered
                self.hold(channel, later)


_flusher = _Flusher()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_flusher.forked)
