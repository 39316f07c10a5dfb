"""Publishing to RabbitMQ past kombu's producer and py-amqp's generic serialization.

kombu's ``Producer.publish`` builds a message through its generic layers on every call
(entities to declare, a retry wrapper, a properties dict, py-amqp's ``Message``), and
py-amqp's ``basic_publish`` then reads the socket without blocking before every publish
(to see a ``connection.blocked`` notice) and serializes the method's arguments and the
message's properties field by field. For the messages on this package's hot paths — a
client's task and control messages, a worker's messages to a client inbox — all of that
is the same from one message to the next but the body and its signature: this module
keeps the ``basic.publish`` arguments per routing key and writes the content header's
property block with one ``struct`` layout, then hands both to the connection's own frame
writer (which splits large bodies into frames, counts the bytes sent for heartbeats and,
in py-amqp releases that have one, holds its write lock; the callers serialise their
publishes per connection in any case). What the broker receives is what kombu sent: content type,
content encoding ``binary``, the signature header (an empty header table without a
secret), delivery mode 2 (persistent) and the priority when one is given
(tests/test_amqp_fast.py compares them).

Only publishes to the default exchange go this way (a queue named by the routing key):
RabbitMQ drops such a message when the queue does not exist and never closes the channel
for it, so there is no asynchronous error the skipped read could have seen. Broadcasts,
the monitoring stream and publisher-confirmed publishes (held and delayed tasks) stay on
kombu and py-amqp's own calls. py-amqp's read before a publish is kept where it can find
something: when the socket has bytes waiting (a ``connection.blocked`` notice, a closing
handshake, the end of a connection the broker dropped — which must fail this publish so
that the caller reconnects and sends again, not write into a dead socket) or the
transport holds some already; a ``poll`` without waiting tells, for a few µs instead of
two ``settimeout`` calls and a read that raises. (benchmarks/HISTORY.md, "Where a
RabbitMQ task round trip and throughput go", for the cost this removes; "RabbitMQ
publishes past kombu" for the A/B.)
"""

from __future__ import annotations

import functools
import select
import struct
import sys
from typing import Any

from .. import codec

__all__ = ["FastPublisher", "properties", "publish_args"]

#: Basic.Publish (class 60, method 40)
_BASIC_PUBLISH = (60, 40)
_CONTENT_TYPE = codec.CONTENT_TYPE.encode()
_CONTENT_ENCODING = b"binary"
#: content-type, content-encoding, headers, delivery-mode; priority adds 0x0800
_FLAGS = 0x8000 | 0x4000 | 0x2000 | 0x1000
_PRIORITY_FLAG = 0x0800
_PERSISTENT = 2
_SIG_KEY = codec.SIGNATURE_HEADER.encode()
#: the property block before the header table: flags, content type and encoding
_HEAD = {
    flags: struct.pack(">H", flags) + bytes([len(_CONTENT_TYPE)]) + _CONTENT_TYPE
    + bytes([len(_CONTENT_ENCODING)]) + _CONTENT_ENCODING
    for flags in (_FLAGS, _FLAGS | _PRIORITY_FLAG)
}
#: an empty header table (no secret)
_NO_HEADERS = struct.pack(">I", 0)


def publish_args(exchange: str, routing_key: str) -> bytes:
    """``basic.publish``'s arguments: reserved, exchange, routing key, and neither
    mandatory nor immediate. Raises ValueError for a name over 255 bytes."""
    ex, rk = exchange.encode(), routing_key.encode()
    if len(ex) > 255 or len(rk) > 255:
        raise ValueError("an AMQP exchange or routing key is at most 255 bytes")
    return struct.pack(">HB", 0, len(ex)) + ex + bytes([len(rk)]) + rk + b"\x00"


def properties(signature: str | None, priority: int | None) -> bytes:
    """The content header's property block: what kombu's producer sends for a message of
    this package (see the module doc)."""
    head = _HEAD[_FLAGS if priority is None else _FLAGS | _PRIORITY_FLAG]
    if signature is None:
        table = _NO_HEADERS
    else:
        value = signature.encode()
        entry = (bytes([len(_SIG_KEY)]) + _SIG_KEY + b"S" + struct.pack(">I", len(value))
                 + value)
        table = struct.pack(">I", len(entry)) + entry
    tail = bytes([_PERSISTENT]) if priority is None else bytes([_PERSISTENT, priority])
    return head + table + tail


class _Content:
    """What py-amqp's frame writer reads of a message: its body and property block."""

    __slots__ = ("_properties", "body")

    def __init__(self, body: bytes, block: bytes) -> None:
        self.body = body
        self._properties = block

    def _serialize_properties(self) -> bytes:
        return self._properties


class FastPublisher:
    """Publishes to the default exchange on a py-amqp channel (kombu's
    ``connection.default_channel`` on RabbitMQ is one), keeping ``basic.publish``'s
    arguments per routing key. The caller serialises its calls per connection, as it
    would for kombu's producer."""

    def __init__(self) -> None:
        self._args: dict[str, bytes] = {}

    def publish(self, channel: Any, routing_key: str, body: bytes, signature: str | None,
                priority: int | None = None) -> None:
        """Publish ``body`` to the queue ``routing_key`` on ``channel``. Raises py-amqp's
        connection errors (``RecoverableConnectionError`` for a closed channel or
        connection, the socket's ``OSError``) and ValueError for a routing key over 255
        bytes."""
        args = self._args.get(routing_key)
        if args is None:
            if len(self._args) > 10_000:  # one per queue and inbox: forget the departed
                self._args.clear()
            args = self._args[routing_key] = publish_args("", routing_key)
        conn = channel.connection
        if conn is None or not channel.is_open:
            from amqp.exceptions import RecoverableConnectionError

            raise RecoverableConnectionError("channel closed")
        if priority is not None:
            # out of 0–255 raises ValueError below, as kombu's publish raises for it
            priority = int(priority)
        _read_waiting(conn)
        try:
            conn.frame_writer(1, channel.channel_id, _BASIC_PUBLISH, args,
                              _Content(body, properties(signature, priority)))
        except StopIteration:  # py-amqp's own send_method guards its writer the same way
            from amqp.exceptions import RecoverableConnectionError

            raise RecoverableConnectionError("connection already closed") from None


@functools.cache  # looked up on every publish; whenever the first call comes, before
# or after patching, what it finds is the C library's own function, and stays so
def _unpatched_poll() -> Any:
    """``select.poll`` as the C library has it: gevent's and eventlet's monkey patching
    replace ``select`` with versions that wait through their hub (eventlet's even with a
    zero timeout, switching green threads in the middle of a publish), and
    ``select.select`` fails for descriptors from 1024 on (a worker with thousands of
    connections)."""
    gevent_monkey = sys.modules.get("gevent.monkey")
    if gevent_monkey is not None and gevent_monkey.is_module_patched("select"):
        return gevent_monkey.get_original("select", "poll")
    eventlet_patcher = sys.modules.get("eventlet.patcher")
    if eventlet_patcher is not None and eventlet_patcher.is_monkey_patched("select"):
        return eventlet_patcher.original("select").poll
    return select.poll


def _read_waiting(conn: Any) -> None:
    """What py-amqp's ``basic_publish`` does first, when there is something to read:
    handle what the broker sent (raising the connection's errors for a closed or dropped
    connection)."""
    capabilities = conn.client_properties.get("capabilities", {})
    if not capabilities.get("connection.blocked", False):
        return
    transport = conn.transport
    sock = getattr(transport, "sock", None)
    if (sock is not None and not transport._read_buffer
            and not hasattr(sock, "pending")):  # TLS keeps decrypted bytes of its own
        try:
            poller = _unpatched_poll()()
            poller.register(sock.fileno(), select.POLLIN)
            readable = poller.poll(0)
        except (OSError, ValueError):
            readable = [sock]  # a closed socket: let the read below raise
        if not readable:
            return
    try:
        conn.drain_events(timeout=0)
    except TimeoutError:
        pass
