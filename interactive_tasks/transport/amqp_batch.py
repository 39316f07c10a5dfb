"""Many AMQP frames in one socket write: :func:`one_write`.

py-amqp writes every method it sends (a publish, an ack) with its own ``sendall``. The
worker's outbound sends one loop step's acks and inbox messages together; gathering their
frames and writing them at once saves a system call per message and lets the broker read
them in one segment. The frames are the ones py-amqp builds (its own ``frame_writer``,
fed a collector instead of the socket), in the order they were sent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from amqp.method_framing import frame_writer

__all__ = ["one_write"]


class _Collector:
    """Stands for the transport while a batch is gathered: keeps copies of the frames
    (py-amqp hands over a view of a buffer it reuses)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, data: Any) -> None:
        self.chunks.append(bytes(data))


@contextlib.contextmanager
def one_write(connection: Any) -> Iterator[None]:
    """Within the block, methods sent on any channel of ``connection`` (a py-amqp
    connection, used by this thread only) are gathered; on the way out they go to the
    socket in one write, also when the block raised. Raises the transport's errors (the
    frames are then lost: the connection is going down)."""
    batch = getattr(connection, "_itask_batch", None)
    if batch is None or batch[0] is not connection.transport:
        collector = _Collector()
        # one writer per transport: a reconnect gets a new one with the new frame size
        batch = (connection.transport, collector, frame_writer(connection, collector))
        connection._itask_batch = batch
    transport, collector, writer = batch
    own = connection.frame_writer
    connection.frame_writer = writer
    try:
        yield
    finally:
        connection.frame_writer = own
        chunks, collector.chunks = collector.chunks, []
        if chunks:
            transport.write(b"".join(chunks))
