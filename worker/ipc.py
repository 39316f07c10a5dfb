"""Framing for the worker ↔ pool-slot channel: 4-byte big-endian length + msgpack.

Each pool slot (a prefork child, or a thread in the threads/solo pools) has its own
``socketpair`` (docs/architecture.md, 'Pools'). The slot side writes blocking frames; the
worker side is non-blocking: :class:`FrameReader` parses whatever a ``recv`` returned into
whole frames, and :class:`FrameWriter` keeps unsent bytes so a stopped child cannot block
the worker.
"""

from __future__ import annotations

import socket
import struct
import threading
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
        buf = self._buf
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


class BlockingChannel:
    """The slot side: blocking frame I/O, writes serialised by a lock."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setblocking(True)
        self._reader = FrameReader()
        self._frames: list[Any] = []
        self._write_lock = threading.Lock()

    def send(self, obj: Any) -> None:
        data = encode_frame(obj)
        with self._write_lock:
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
