"""Redis fast path for the traffic kombu does not need to carry.

A client's inbox is private to it and needs neither acks nor routing, so on Redis it is a
plain list: workers ``LPUSH`` raw frames (and ``PEXPIRE`` it, so the list of a client that
died disappears), the client ``BRPOP``\\ s and drains. A worker also writes, in one
pipeline per loop step, everything a finished batch of tasks needs: results, the acks of
their messages (kombu's unacked index and hash, exactly as kombu's own ack does) and the
inbox frames. Measured here: five round trips per task became two (see benchmarks/).

Frame format: ``b"0" + msgpack`` unsigned, ``b"1" + hmac(32 bytes) + msgpack`` signed.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Any

from .. import codec
from ..errors import ProtocolError

INBOX_EXPIRES_MS = 60_000


def is_redis(url: str) -> bool:
    return url.split("://", 1)[0] in ("redis", "rediss")


def encode_frame(body: bytes, secret: bytes | None) -> bytes:
    if secret is None:
        return b"0" + body
    return b"1" + hmac.new(secret, body, hashlib.sha256).digest() + body


def decode_frame(raw: bytes, secret: bytes | None) -> bytes:
    """The msgpack body of an inbox frame; raises ProtocolError for a bad or unsigned one."""
    if raw[:1] == b"1":
        body = raw[33:]
        if secret is not None and not hmac.compare_digest(
                hmac.new(secret, body, hashlib.sha256).digest(), raw[1:33]):
            raise ProtocolError("inbox frame has a wrong signature")
        return body
    if raw[:1] == b"0":
        if secret is not None:
            raise ProtocolError("inbox frame is unsigned but the app has a secret")
        return raw[1:]
    raise ProtocolError("inbox frame has an unknown format")


def kombu_envelope(body: bytes, queue: str, content_type: str,
                   headers: dict[str, Any]) -> bytes:
    """A message exactly as kombu's Redis transport stores it, so kombu consumers read it."""
    import base64
    import json
    import uuid

    return json.dumps({
        "body": base64.b64encode(body).decode(),
        "content-encoding": "binary",
        "content-type": content_type,
        "headers": headers,
        "properties": {
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
            "delivery_mode": 2,
        },
    }).encode()


def kombu_body(raw: bytes) -> tuple[bytes, Any]:
    """``(body, signature header)`` of a message in kombu's Redis envelope.

    Raises ProtocolError for anything else.
    """
    import base64
    import binascii
    import json

    try:
        envelope = json.loads(raw)
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            data = base64.b64decode(body)
        else:
            data = body.encode() if isinstance(body, str) else bytes(body)
        headers = envelope.get("headers") or {}
        return data, headers.get(codec.SIGNATURE_HEADER)
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        raise ProtocolError(f"not a kombu message: {exc}") from exc


class HubCommand:
    """One blocking Redis command at a time on its own connection, its reply read by the
    worker's event loop (kombu's Hub) when the socket turns readable — how kombu runs its
    own ``BRPOP``.

    ``on_reply(reply)`` gets each reply, or the ``redis.ResponseError`` the server sent
    instead. The socket stays watched while the callback sends the next command at once;
    otherwise it is let go until the next :meth:`send`. Connection errors propagate from
    the loop's reader callback.
    """

    def __init__(self, url: str, on_reply: Callable[[Any], None]) -> None:
        import redis

        self._redis = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=None,
                                           single_connection_client=True,
                                           health_check_interval=0)
        self._on_reply = on_reply
        self._hub: Any = None
        self._fd: int | None = None
        #: a command was sent and its reply is not read yet
        self.in_flight = False
        self.closed = False

    def attach(self, hub: Any) -> None:
        self._hub = hub

    def send(self, *args: Any) -> None:
        conn = self._redis.connection
        assert conn is not None and self._hub is not None
        conn.send_command(*args)
        self.in_flight = True
        sock = conn._sock
        assert sock is not None
        if self._fd != sock.fileno():
            self._unwatch()
            self._fd = sock.fileno()
            self._hub.add_reader(self._fd, self._on_readable)

    def _on_readable(self) -> None:
        import redis

        conn = self._redis.connection
        assert conn is not None
        self.in_flight = False
        try:
            try:
                reply: Any = conn.read_response()
            except redis.ResponseError as exc:
                reply = exc
            self._on_reply(reply)
        finally:
            if not self.in_flight:
                self._unwatch()

    def abandon(self) -> None:
        """Stop watching; a reply still due is dropped with the connection (it would be
        read as the next command's)."""
        self._unwatch()
        if self.in_flight:
            self.in_flight = False
            conn = self._redis.connection
            if conn is not None:
                conn.disconnect()

    def close(self) -> None:
        self.abandon()
        self.closed = True
        self._hub = None
        try:
            self._redis.close()
        except Exception:
            pass

    def _unwatch(self) -> None:
        if self._fd is not None and self._hub is not None:
            try:
                self._hub.remove_reader(self._fd)
            except Exception:
                pass
        self._fd = None


class ListReader:
    """Reads a Redis list on the worker's event loop (kombu's Hub), without blocking it.

    ``BLMPOP`` (Redis 7; ``BRPOP`` before) is kept in flight on a :class:`HubCommand`;
    ``on_items(frames)`` gets everything popped, oldest first. For lists whose items
    need no acknowledgement (control messages). Errors of the connection propagate
    from the loop's reader callback.
    """

    def __init__(self, url: str, key: str, on_items: Callable[[list[bytes]], None],
                 wait: float = 1.0) -> None:
        self.key = key
        self.on_items = on_items
        self.wait = wait
        self._blmpop = True
        self._command = HubCommand(url, self._on_reply)

    def register(self, hub: Any) -> None:
        self._command.attach(hub)
        self._send()

    def _send(self) -> None:
        if self._blmpop:
            self._command.send("BLMPOP", self.wait, 1, self.key, "RIGHT", "COUNT", 256)
        else:
            self._command.send("BRPOP", self.key, self.wait)

    def _on_reply(self, reply: Any) -> None:
        try:
            if isinstance(reply, Exception):
                if not self._blmpop:
                    raise reply
                self._blmpop = False  # a server before Redis 7
            elif reply:  # BLMPOP: [key, [items]]; BRPOP: [key, item]
                items = reply[1] if self._blmpop else [reply[1]]
                self.on_items([bytes(item) for item in items])
        finally:
            if not self._command.closed:
                self._send()

    def close(self) -> None:
        self._command.close()


class TaskPublisher:
    """The client side of publishing to task and control queues: one ``LPUSH``."""

    def __init__(self, url: str) -> None:
        import threading

        import redis

        self._redis = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10,
                                           single_connection_client=True)
        self._lock = threading.Lock()

    def publish(self, queue: str, envelope: bytes | None, expire_ms: int | None = None,
                bell: bool = False) -> None:
        """``LPUSH`` (and ``PEXPIRE`` for queues declared with an expiry); with ``bell``,
        ring the task queue's bell for idle workers (``redis_fetch``). ``envelope`` None
        only rings.

        Raises ``redis.RedisError``.
        """
        import redis

        with self._lock:
            try:
                self._push(queue, envelope, expire_ms, bell)
            except (redis.ConnectionError, redis.TimeoutError):
                # The server dropped this idle connection (a restart, a CLIENT KILL):
                # LPUSH is safe to repeat once on a fresh connection.
                self._redis.connection.disconnect()  # type: ignore[union-attr]
                self._push(queue, envelope, expire_ms, bell)

    def _push(self, queue: str, envelope: bytes | None, expire_ms: int | None,
              bell: bool) -> None:
        if expire_ms is None and not bell and envelope is not None:
            self._redis.lpush(queue, envelope)
            return
        from .redis_fetch import ring

        pipe = self._redis.pipeline(transaction=False)
        if envelope is not None:
            pipe.lpush(queue, envelope)
        if expire_ms is not None:
            pipe.pexpire(queue, expire_ms)
        if bell:
            ring(pipe, queue)
        pipe.execute()

    def close(self) -> None:
        self._redis.close()


class InboxReader:
    """The client side: blocking reads of one inbox list."""

    def __init__(self, url: str, key: str) -> None:
        import redis

        self.key = key
        self._blmpop = True
        self._redis = redis.Redis.from_url(url, socket_connect_timeout=5,
                                           socket_timeout=None, health_check_interval=0)

    def read(self, timeout: float) -> list[bytes]:
        """Frames in arrival order; empty after ``timeout`` seconds without one."""
        import redis

        wait = max(timeout, 0.01)
        if self._blmpop:
            # BLMPOP (Redis >= 7): a wake-up and everything queued behind it, one round trip
            try:
                got: Any = self._redis.blmpop(wait, 1, self.key, direction="RIGHT", count=256)
                return [bytes(m) for m in got[1]] if got else []
            except redis.ResponseError:
                self._blmpop = False  # an older server
        popped: Any = self._redis.brpop([self.key], timeout=wait)
        if not popped:
            return []
        frames = [bytes(popped[1])]
        more: Any = self._redis.rpop(self.key, 256)
        frames.extend(bytes(m) for m in more or ())
        return frames

    def ping(self) -> None:
        self._redis.ping()

    def close(self, delete: bool = True) -> None:
        try:
            if delete:
                self._redis.delete(self.key)
        finally:
            self._redis.close()


class WorkerPipeline:
    """The worker side: results, acks and inbox frames in one round trip."""

    def __init__(self, url: str) -> None:
        import redis

        self._redis = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10)

    def execute(self, *, results: list[tuple[str, bytes]], result_key: str | None,
                result_expire_at: int, acks: list[Any],
                frames: list[tuple[str, bytes]]) -> None:
        """Raises ``redis.RedisError`` (nothing is marked acked in kombu then)."""
        pipe = self._redis.pipeline(transaction=False)
        if results and result_key:
            for task_id, record in results:
                pipe.hset(result_key, task_id, record)
            pipe.expireat(result_key, result_expire_at)
        for message in acks:
            qos = message.channel.qos
            tag = message.delivery_tag
            pipe.zrem(qos.unacked_index_key, tag)
            pipe.hdel(qos.unacked_key, tag)
        touched: set[str] = set()
        for key, frame in frames:
            pipe.lpush(key, frame)
            touched.add(key)
        for key in touched:
            pipe.pexpire(key, INBOX_EXPIRES_MS)
        pipe.execute()
        from kombu.transport import virtual

        for message in acks:
            # What kombu's redis QoS.ack does after the broker side: mark it locally.
            virtual.QoS.ack(message.channel.qos, message.delivery_tag)
            message._state = "ACK"

    def close(self) -> None:
        self._redis.close()
