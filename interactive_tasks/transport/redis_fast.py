"""Redis fast path for the traffic kombu does not need to carry.

A client's inbox is private to it and needs neither acks nor routing, so on Redis it is a
plain list: workers ``LPUSH`` raw frames (and ``PEXPIRE`` it, so the list of a client that
died disappears), the client ``BRPOP``\\ s and drains. A worker also writes, in one
pipeline per loop step, everything a finished batch of tasks needs: results, the acks of
their messages (kombu's unacked index and hash, exactly as kombu's own ack does) and the
inbox frames. Measured here: five round trips per task became two (see benchmarks/).
The worker does not wait for that packet's answer with its loop stopped: it reads it
when the socket turns readable (:class:`WorkerPipeline`).

Every command here is packed by hand (:func:`pack_commands`) and sent as one packet: on
this machine a cold pass through redis-py's pipeline object cost more than the round trip.

The frames and kombu's envelope themselves are broker-neutral (:mod:`.frames`).
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from .redis_urls import (
    is_sentinel,
    primary_in_doubt,
    primary_moved,
    redis_client,
    replica_wait,
    stays_written,
)

__all__ = ["HubCommand", "InboxReader", "ListReader", "RespConnection", "TaskPublisher",
           "WorkerPipeline", "pack_commands", "read_replies", "send_packed"]

logger = logging.getLogger("interactive_tasks.worker")

INBOX_EXPIRES_MS = 60_000


class RespConnection:
    """One Redis connection whose replies we parse ourselves.

    redis-py opens it (the URL's address — for ``sentinel://``, the primary's, asked of the
    sentinels at each connect — TLS, ``AUTH`` and ``SELECT``); after that,
    packets go out with one ``sendall`` and replies come back through a ``hiredis.Reader``
    fed straight from the socket. On a cold CPU here redis-py's reply path cost 35–60 µs
    per read in isolation; from the worker's pipeline to a client's inbox, ~20 µs less per
    hop in a paired before/after. The redis-py client stays usable for ordinary commands
    between replies (:attr:`redis`); if it reconnected meanwhile, the next :meth:`send`
    notices the new socket.

    Raises ``redis.ConnectionError`` (``redis.TimeoutError`` after ``socket_timeout``)
    for a connection that failed, and returns an error reply as a ``redis.ResponseError``
    (see :meth:`read_reply`). ``options``: the transport options (a sentinel URL's
    ``master_name`` …, see ``redis_urls``).
    """

    def __init__(self, url: str, socket_timeout: float | None,
                 options: Mapping[str, Any] | None = None) -> None:
        self.redis = redis_client(url, options, single_connection=True,
                                  socket_connect_timeout=5, socket_timeout=socket_timeout,
                                  health_check_interval=0)
        #: a demoted primary's refusals mean "reconnect" (sentinel URLs only)
        self._follows_primary = is_sentinel(url)
        self._sock: Any = None
        self._reader: Any = None
        self._buffer = bytearray(65536)

    @property
    def fileno(self) -> int | None:
        """The socket's descriptor, None while not connected."""
        return self._sock.fileno() if self._sock is not None else None

    def send(self, packet: bytes) -> None:
        """Send ``packet`` (:func:`pack_commands`), connecting first if needed."""
        import redis

        conn = self.redis.connection
        assert conn is not None
        if conn._sock is None:
            conn.connect()
        sock: Any = conn._sock
        if sock is not self._sock:  # a new connection: nothing of the old is due
            import hiredis

            self._sock = sock
            self._reader = hiredis.Reader(replyError=redis.ResponseError,
                                          protocolError=redis.ConnectionError)
        try:
            sock.sendall(packet)
        except OSError as exc:
            self.disconnect()
            raise redis.ConnectionError(f"error sending to redis: {exc}") from exc

    def read_reply(self, raise_errors: bool = True) -> Any:
        """The next reply (it may block). An error reply is raised as
        ``redis.ResponseError``, or returned as one with ``raise_errors=False``; behind
        sentinels, a demoted primary's refusal is a ``redis.ConnectionError`` (its cause is
        the refusal) and the connection is dropped, so the next command asks the sentinels
        where the primary went."""
        import redis

        reader = self._reader
        if reader is None:
            raise redis.ConnectionError("no reply is due: the connection was reset")
        reply = reader.gets()
        while reply is False:
            try:
                count = self._sock.recv_into(self._buffer)
            except TimeoutError as exc:
                self.disconnect()
                raise redis.TimeoutError("timed out reading from redis") from exc
            except OSError as exc:
                self.disconnect()
                raise redis.ConnectionError(f"error reading from redis: {exc}") from exc
            if not count:
                self.disconnect()
                raise redis.ConnectionError("connection closed by the redis server")
            reader.feed(self._buffer, 0, count)
            reply = reader.gets()
        if isinstance(reply, redis.ResponseError):
            if self._follows_primary and primary_moved(reply):
                self.disconnect()
                raise redis.ConnectionError(f"the primary moved: {reply}") from reply
            if raise_errors:
                raise reply
        return reply

    def can_read(self) -> bool:
        """A reply (or part of one) can be read without blocking."""
        import select

        sock = self._sock
        if sock is None:
            return False
        if self._reader.has_data() or getattr(sock, "pending", lambda: 0)():
            return True
        return bool(select.select([sock], [], [], 0)[0])

    def drop_if_closed(self) -> None:
        """Drop a connection with no reply due that the server closed meanwhile (a restart,
        a ``CLIENT KILL``, a failover), so the next :meth:`send` opens a fresh one instead
        of sending into a dead one. Anything readable on such a connection means that."""
        if self._sock is not None and self.can_read():
            self.disconnect()

    def disconnect(self) -> None:
        """Drop the connection (replies still due are lost with it)."""
        self._sock = None
        self._reader = None
        conn = self.redis.connection
        if conn is not None:
            conn.disconnect()

    def close(self) -> None:
        self._sock = None
        self._reader = None
        self.redis.close()


class _HubWatch:
    """Keeps one connection's socket registered for reading on a kombu Hub (``hub``;
    None: nothing is registered)."""

    def __init__(self, on_readable: Callable[[], None]) -> None:
        self.hub: Any = None
        self._on_readable = on_readable
        self._fd: int | None = None

    def watch(self, conn: RespConnection) -> None:
        """Register ``conn``'s socket, again after a reconnect gave it a new one."""
        fd = conn.fileno
        if fd is None or self.hub is None:
            return
        if self._fd != fd:
            self.unwatch()
            self._fd = fd
            self.hub.add_reader(fd, self._on_readable)

    def unwatch(self) -> None:
        if self._fd is not None and self.hub is not None:
            try:
                self.hub.remove_reader(self._fd)
            except Exception:
                pass
        self._fd = None


class HubCommand:
    """One blocking Redis command at a time on its own connection, its reply read by the
    worker's event loop (kombu's Hub) when the socket turns readable — how kombu runs its
    own ``BRPOP``.

    ``on_reply(reply)`` gets each reply, or the ``redis.ResponseError`` the server sent
    instead. The socket stays watched while the callback sends the next command at once;
    otherwise it is let go until the next :meth:`send`. Connection errors propagate from
    the loop's reader callback.
    """

    def __init__(self, url: str, on_reply: Callable[[Any], None],
                 options: Mapping[str, Any] | None = None) -> None:
        self._conn = RespConnection(url, socket_timeout=None, options=options)
        self._on_reply = on_reply
        self._socket = _HubWatch(self._on_readable)
        #: a command was sent and its reply is not read yet
        self.in_flight = False
        self.closed = False

    def attach(self, hub: Any) -> None:
        self._socket.hub = hub

    def send(self, *args: Any) -> None:
        self.send_packed(pack_commands(args))

    def send_packed(self, packet: bytes) -> None:
        """Send one command already packed with :func:`pack_commands`."""
        assert self._socket.hub is not None
        self._conn.send(packet)
        self.in_flight = True
        self._socket.watch(self._conn)

    def _on_readable(self) -> None:
        self.in_flight = False
        try:
            self._on_reply(self._conn.read_reply(raise_errors=False))
        finally:
            if not self.in_flight:
                self._socket.unwatch()

    def abandon(self) -> None:
        """Stop watching; a reply still due is dropped with the connection (it would be
        read as the next command's)."""
        self._socket.unwatch()
        if self.in_flight:
            self.in_flight = False
            self._conn.disconnect()

    def close(self) -> None:
        self.abandon()
        self.closed = True
        self._socket.hub = None
        try:
            self._conn.close()
        except Exception:
            pass


class ListReader:
    """Reads a Redis list on the worker's event loop (kombu's Hub), without blocking it.

    ``BLMPOP`` (Redis 7; ``BRPOP`` before) is kept in flight on a :class:`HubCommand`;
    ``on_items(frames)`` gets everything popped, oldest first. For lists whose items
    need no acknowledgement (control messages). Errors of the connection propagate
    from the loop's reader callback.
    """

    def __init__(self, url: str, key: str, on_items: Callable[[list[bytes]], None],
                 wait: float = 1.0, options: Mapping[str, Any] | None = None) -> None:
        self.key = key
        self.on_items = on_items
        self.wait = wait
        self._blmpop = True
        self._blmpop_packet = pack_commands(
            (b"BLMPOP", wait, 1, key, b"RIGHT", b"COUNT", 256))
        self._command = HubCommand(url, self._on_reply, options)

    def register(self, hub: Any) -> None:
        self._command.attach(hub)
        self._send()

    def _send(self) -> None:
        if self._blmpop:
            self._command.send_packed(self._blmpop_packet)
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

    def owns(self, callback: Any) -> bool:
        """Whether ``callback`` (a reader callback on the loop) is this list's reads."""
        return getattr(callback, "__self__", None) is self._command

    def close(self) -> None:
        self._command.close()


def pack_commands(*commands: tuple[bytes | str | int | float, ...]) -> bytes:
    """Redis commands in RESP, ready for one ``sendall``.

    Only what our commands carry (bytes, str, int and float arguments); redis-py's
    pipeline object costs ~150 µs per publish on a cold CPU here, this ~10 µs.
    """
    out = bytearray()
    for command in commands:
        out += b"*%d\r\n" % len(command)
        for arg in command:
            if isinstance(arg, str):
                arg = arg.encode()
            elif isinstance(arg, int):
                arg = b"%d" % arg
            elif isinstance(arg, float):
                arg = repr(arg).encode()
            out += b"$%d\r\n" % len(arg)
            out += arg
            out += b"\r\n"
    return bytes(out)


def read_replies(conn: RespConnection, count: int) -> tuple[Exception | None, Any]:
    """Read ``count`` replies on ``conn``, all of them, so the next command reads its own;
    returns the first error reply Redis sent (None if none) and the last reply.

    Raises the connection's errors.
    """
    error: Exception | None = None
    reply: Any = None
    for _ in range(count):
        reply = conn.read_reply(raise_errors=False)
        if error is None and isinstance(reply, Exception):
            error = reply
    return error, reply


def send_packed(conn: RespConnection, packet: bytes, replies: int) -> Any:
    """Send ``packet`` (``pack_commands``) on ``conn``, read its ``replies`` replies and
    return the last; raises the first ``redis.ResponseError`` among them after reading
    all (so the connection stays in step) and the connection's errors."""
    try:
        conn.send(packet)
        error, last = read_replies(conn, replies)
    except BaseException:
        conn.disconnect()  # replies may be left unread: never reuse this connection
        raise
    if error is not None:
        raise error
    return last


#: replies a stream of unsettled pushes may owe before one reads them (two per push)
PIPELINE_REPLIES = 512


def _settle_at_exit(ref: Any) -> None:
    publisher = ref()
    if publisher is not None and publisher._pid == os.getpid():
        publisher.close()


class TaskPublisher:
    """The client side of publishing to task and control queues: one ``LPUSH`` (with the
    ``PEXPIRE`` of an expiring queue and a task queue's bell), sent as one packet; with
    the ``wait_replicas`` option a task's packet ends with ``WAIT`` (``redis_urls``)."""

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        import threading

        self._conn = RespConnection(url, socket_timeout=10, options=options)
        self._wait = replica_wait(options)
        self._lock = threading.Lock()
        #: (queue, expire_ms) -> (packed "LPUSH queue" up to the item, packed PEXPIRE)
        self._packed: dict[tuple[str, int], tuple[bytes, bytes]] = {}
        #: replies due for pushes sent with ``settle=False`` and not read yet
        self._owed = 0
        self._settles_at_exit = False
        #: a forked child inherits this object (and its atexit hook) but not the replies
        #: owed: reading them would take the parent's
        self._pid = os.getpid()

    def publish(self, queue: str, envelope: bytes | None, expire_ms: int | None = None,
                bell: bool = False) -> None:
        """``LPUSH`` (and ``PEXPIRE`` for queues declared with an expiry); with ``bell``,
        ring the task queue's bell for idle workers (``redis_fetch``). ``envelope`` None
        only rings.

        Raises ``redis.RedisError``.
        """
        commands: list[tuple[bytes | str | int, ...]] = []
        if envelope is not None:
            commands.append((b"LPUSH", queue, envelope))
        if expire_ms is not None:
            commands.append((b"PEXPIRE", queue, expire_ms))
        if bell:
            from .redis_fetch import bell_commands

            commands.extend(bell_commands(queue))
        wait = self._wait if envelope is not None else None
        if wait is not None:
            commands.append((b"WAIT", *wait))
        self._send(pack_commands(*commands), len(commands), wait)

    def push(self, queue: str, item: bytes, expire_ms: int, *, settle: bool = True) -> None:
        """``LPUSH`` one item and ``PEXPIRE`` the list: what :meth:`publish` sends for a
        control frame, from commands packed once per queue (the client's control path).

        With ``settle=False`` (a stream of ``send(wait=False)``) it returns once the packet
        is written, without waiting for Redis's replies: they are read before the next
        packet that waits for its own, or once :data:`PIPELINE_REPLIES` are owed, which is
        also where an error reply or a broken connection is raised — to a later call
        (which then has not sent its own item), never more than ``PIPELINE_REPLIES / 2``
        pushes late.

        Raises ``redis.RedisError``.
        """
        packed = self._packed.get((queue, expire_ms))
        if packed is None:
            name = queue.encode()
            packed = self._packed[queue, expire_ms] = (
                b"*3\r\n$5\r\nLPUSH\r\n$%d\r\n%s\r\n" % (len(name), name),
                pack_commands((b"PEXPIRE", queue, expire_ms)))
        packet = b"%s$%d\r\n%s\r\n%s" % (packed[0], len(item), item, packed[1])
        if settle:
            self._send(packet, 2)
            return
        with self._lock:
            if not self._owed:
                self._conn.drop_if_closed()  # as _send: never into a dead idle connection
            try:
                self._conn.send(packet)
            except BaseException:
                self._owed = 0  # the connection is dropped, and what it owed with it
                raise
            self._owed += 2
            if not self._settles_at_exit:
                # a script that streams and exits without closing its app: its last
                # pushes are read out before the interpreter closes the socket
                import atexit
                import weakref

                atexit.register(_settle_at_exit, weakref.ref(self))
                self._settles_at_exit = True
            if self._owed >= PIPELINE_REPLIES:
                self._settle()

    def _settle(self) -> None:
        """Read the replies owed for unsettled pushes (caller holds the lock); raises the
        first error reply among them, or the connection's error."""
        owed, self._owed = self._owed, 0
        try:
            error, _ = read_replies(self._conn, owed)
        except BaseException:
            self._conn.disconnect()
            raise
        if error is not None:
            raise error

    def _send(self, packet: bytes, replies: int, wait: tuple[int, int] | None = None) -> None:
        """Send ``packet``; with ``wait``, its last command is ``WAIT``. Raises
        ``redis.RedisError``."""
        import redis

        with self._lock:
            if self._owed:
                self._settle()
            # An idle connection the server dropped (a restart, a CLIENT KILL, a failover)
            # is replaced before sending. A packet sent and then cut off is not sent again:
            # it may have run, and a second LPUSH would queue the task twice.
            self._conn.drop_if_closed()
            for last_try in (False, True):
                try:
                    acknowledged = send_packed(self._conn, packet, replies)
                except redis.ConnectionError as exc:
                    if last_try or not primary_moved(exc.__cause__):
                        raise
                    continue  # a demoted primary refused it, ran nothing: to the new one
                if wait is None or stays_written(acknowledged, wait, self._conn.redis,
                                                 "publish"):
                    return
                # No replica has it and the sentinels replace, or are replacing, the
                # primary it went to (which drops what it took since): once more, to the
                # primary they name now.
                self._conn.disconnect()
            raise redis.ConnectionError("the primary kept moving while publishing")

    def close(self) -> None:
        """Close the connection, first reading what unsettled pushes are owed: closing a
        socket with unread replies resets it, and Redis may drop pushes it has not read."""
        with self._lock:
            if self._owed and self._pid == os.getpid():
                try:
                    self._settle()
                except Exception:
                    pass  # closing anyway; a failed push was the sender's to see
            self._owed = 0
        self._conn.close()


class InboxReader:
    """The client side: blocking reads of one inbox list."""

    def __init__(self, url: str, key: str, options: Mapping[str, Any] | None = None) -> None:
        self.key = key
        self._blmpop = True
        self._conn = RespConnection(url, socket_timeout=None, options=options)
        self._redis = self._conn.redis  # BRPOP before Redis 7, PING, DEL
        self._packets: dict[float, bytes] = {}

    def read(self, timeout: float) -> list[bytes]:
        """Frames in arrival order; empty after ``timeout`` seconds without one.

        Raises the connection's errors (``redis.ConnectionError``).
        """
        import redis

        wait = max(timeout, 0.01)
        if self._blmpop:
            # BLMPOP (Redis >= 7): a wake-up and everything queued behind it, one round
            # trip; sent pre-packed, so the thread is back waiting on its socket (and lets
            # the woken application thread run) after as little Python as possible.
            packet = self._packets.get(wait)
            if packet is None:
                packet = self._packets[wait] = pack_commands(
                    (b"BLMPOP", wait, 1, self.key, b"RIGHT", b"COUNT", 256))
            conn = self._conn
            try:
                conn.send(packet)
                got: Any = conn.read_reply()
                return [bytes(m) for m in got[1]] if got else []
            except redis.ResponseError:
                self._blmpop = False  # an older server
            except BaseException:
                conn.disconnect()  # a reply may be due: never reuse this connection
                raise
        popped: Any = self._redis.brpop([self.key], timeout=wait)
        if not popped:
            return []
        frames = [bytes(popped[1])]
        more: Any = self._redis.rpop(self.key, 256)
        frames.extend(bytes(m) for m in more or ())
        return frames

    def ping(self) -> None:
        self._redis.ping()

    def primary_in_doubt(self) -> bool:
        """Behind sentinels: do they name another primary than the one read here, or
        fail it over (after ``SENTINEL FAILOVER`` the old one stays up, and silent, until
        it is demoted)? See ``redis_urls.primary_in_doubt``."""
        return primary_in_doubt(self._redis)

    def close(self, delete: bool = True) -> None:
        try:
            if delete:
                self._redis.delete(self.key)
        finally:
            self._conn.close()


class _Packet(NamedTuple):
    data: bytes
    replies: int
    acks: list[Any]
    context: Any
    sent: float


#: seconds without an answer after which a worker pipeline packet counts as lost
STALLED_AFTER = 10.0


class WorkerPipeline:
    """The worker side: results, acks and inbox frames in one packet per loop step.

    On the worker's event loop (after :meth:`attach`) a packet is sent and its replies
    are read when the socket turns readable, so the loop goes on serving pool slots
    and control while Redis answers (it waited ~0.2 ms per flush here, longer than the
    pool child took to answer a control message). Packets are answered in the order
    sent, on one connection, so their effects keep the order of :meth:`submit` calls.
    ``on_failed(contexts)`` gets back the ``context`` of every packet Redis did not
    answer (after one resend on a fresh connection); kombu marks a message acked only
    once Redis answered the packet with its ack. With the ``wait_replicas`` option each
    packet ends with ``WAIT``, so that answer comes once the replicas have it too.
    """

    def __init__(self, url: str, on_failed: Callable[[list[Any]], None],
                 on_answered: Callable[[], None] | None = None,
                 options: Mapping[str, Any] | None = None) -> None:
        self._conn = RespConnection(url, socket_timeout=10, options=options)
        self._wait = replica_wait(options)
        self._on_failed = on_failed
        self._on_answered = on_answered
        self._socket = _HubWatch(self._on_readable)
        #: sent, not answered yet, oldest first
        self._in_flight: collections.deque[_Packet] = collections.deque()

    @property
    def in_flight(self) -> int:
        """Packets sent and not answered yet."""
        return len(self._in_flight)

    def attach(self, hub: Any) -> None:
        """Read replies on ``hub``'s loop from now on (None: wait for them in submit)."""
        self._socket.unwatch()
        self._socket.hub = hub
        if self._in_flight:
            self._socket.watch(self._conn)

    def submit(self, *, results: list[tuple[str, bytes]], result_key: str | None,
               result_expire_at: int, acks: list[Any], frames: list[tuple[str, bytes]],
               context: Any = None) -> None:
        """Send one packet; without a hub, wait for its replies (``on_failed`` then)."""
        commands: list[tuple[bytes | str | int, ...]] = []
        if results and result_key:
            for task_id, record in results:
                commands.append((b"HSET", result_key, task_id, record))
            commands.append((b"EXPIREAT", result_key, result_expire_at))
        for message in acks:
            qos = message.channel.qos
            tag = message.delivery_tag
            commands.append((b"ZREM", qos.unacked_index_key, tag))
            commands.append((b"HDEL", qos.unacked_key, tag))
        touched: dict[str, None] = {}
        for key, frame in frames:
            commands.append((b"LPUSH", key, frame))
            touched[key] = None
        for key in touched:
            commands.append((b"PEXPIRE", key, INBOX_EXPIRES_MS))
        if not commands:
            return
        if self._wait is not None:
            commands.append((b"WAIT", *self._wait))
        packet = _Packet(pack_commands(*commands), len(commands), acks, context,
                         time.monotonic())
        self._in_flight.append(packet)
        try:
            self._send(packet.data)
        except Exception:
            self._resend_or_fail()
            return
        if self._socket.hub is None:
            self.drain()
        else:
            self._socket.watch(self._conn)

    def check_stalled(self) -> None:
        """Treat a packet unanswered for ``STALLED_AFTER`` seconds like a broken connection
        (the synchronous pipeline had its socket timeout); the worker calls this every
        second."""
        if self._in_flight and time.monotonic() - self._in_flight[0].sent > STALLED_AFTER:
            logger.warning("redis did not answer the worker's pipeline in %.0fs",
                           STALLED_AFTER)
            self._resend_or_fail()

    def drain(self) -> None:
        """Wait for every packet in flight to be answered (``on_failed`` for the rest)."""
        while self._in_flight:
            self._read_one()

    def _send(self, packet: bytes) -> None:
        self._conn.send(packet)

    def _on_readable(self) -> None:
        while self._in_flight:
            self._read_one()
            if not self._in_flight:
                break
            try:
                more = self._conn.can_read()
            except Exception:
                more = True  # reading meets the error and resends
            if not more:
                break
        if not self._in_flight:
            self._socket.unwatch()
        if self._on_answered is not None:
            self._on_answered()

    def _read_one(self) -> None:
        """Read the replies of the oldest packet (its first reply may block)."""
        try:
            self._complete(self._in_flight[0])
        except Exception:  # the connection's errors; Redis's own are handled inside
            self._resend_or_fail()
            return
        self._in_flight.popleft()

    def _complete(self, packet: _Packet) -> None:
        from kombu.transport import virtual

        error, last = read_replies(self._conn, packet.replies)
        if error is not None:
            logger.error("redis refused a worker pipeline command (%s); retrying", error)
            self._on_failed([packet.context])
            return
        if self._wait is not None and not stays_written(last, self._wait, self._conn.redis,
                                                        "worker pipeline"):
            import redis

            raise redis.ConnectionError("the packet went to a primary the sentinels are "
                                        "replacing")
        for message in packet.acks:
            # What kombu's redis QoS.ack does after the broker side: mark it locally.
            virtual.QoS.ack(message.channel.qos, message.delivery_tag)
            message._state = "ACK"

    def _resend_or_fail(self) -> None:
        """The connection failed with packets in flight: send them all again, once, on a
        fresh connection and wait for the answers (every command in them is safe to
        repeat; a repeated inbox frame is dropped by its sequence number); hand back
        what still fails."""
        self._socket.unwatch()
        self._conn.disconnect()
        entries = list(self._in_flight)
        self._in_flight.clear()
        answered = 0
        try:
            self._send(b"".join(entry.data for entry in entries))
            for entry in entries:
                self._complete(entry)
                answered += 1
        except Exception as exc:
            self._conn.disconnect()
            logger.error("redis pipeline failed (%s); retrying", exc)
            self._on_failed([entry.context for entry in entries[answered:]])

    def close(self) -> None:
        self._socket.unwatch()
        self._socket.hub = None
        self._conn.close()
