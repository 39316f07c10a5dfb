"""Reliable task fetching on Redis: a message is never only in a worker's memory.

kombu's Redis consumer takes a message with ``BRPOP`` and records it as unacknowledged in
a second round trip; a worker killed (SIGKILL, OOM) between the two loses the message for
good: it is in no list, hash or index any more. Measured here: 1 of 3,000 tasks lost to 48
SIGKILLs under load (``python -m benchmarks.kill``); none since.

:class:`TaskFetcher` takes messages with one Lua script that pops them *and* records them
in the worker's unacked hash and index, atomically on the server, in the exact format
kombu's own ``QoS.append`` writes, so ack, reject and requeue on channel close stay
kombu's. The hash and index are the worker's own (see :mod:`.redis_liveness`): when the
worker dies, a live worker returns their messages to the queues; the script flags those
(the ``<ns>.redelivered`` hash) so the worker counts the delivery.

A script cannot block, so publishers ring a *bell*: a short list per queue
(``<queue>\\x06\\x16bell``) that an idle worker waits on with ``BRPOP``. A bell popped by
a worker that then finds nothing costs one round trip and loses nothing; a message
published without a bell (publishers other than ours) is fetched by the poll every
:data:`POLL_INTERVAL` seconds.

The fetcher runs on the worker's event loop (kombu's Hub), like kombu's own consumer: the
``BRPOP`` is sent without waiting and its socket is watched by the loop.

Private parts of kombu used here (its ``QoS`` bookkeeping: ``_delivered``, ``_dirty``,
``_remove_from_indices``, ``Channel._q_for_pri``) are tested against the kombu versions
``pyproject.toml`` admits.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from .redis_fast import HubCommand
from .redis_urls import primary_in_doubt, redis_client, replica_wait, stays_written

logger = logging.getLogger("interactive_tasks.worker")

#: the bell list of a queue; kombu's priority lists are ``<queue>\x06\x16<digit>``
BELL_SUFFIX = "\x06\x16bell"
#: bells kept per queue (more wake-ups than this are not needed)
BELL_KEEP = 16
BELL_EXPIRES_MS = 60_000
#: fetch this often even without a bell
POLL_INTERVAL = 1.0
#: the held-message map is cleared of settled messages when it grows to this size
HELD_PRUNE_AT = 1024

# KEYS: unacked hash, unacked index, redelivered tags, then the queue lists in delivery
# order.
# ARGV: now (seconds), how many at most.
# Returns a flat list: message, list key, message, list key, ... A message that is not a
# kombu envelope is returned with the key prefixed by "!" and is not recorded: the worker
# dead-letters it at once. A message restored from a dead worker comes with "~" before
# its key.
FETCH_SCRIPT = """
local out = {}
local want = tonumber(ARGV[2])
local taken = 0
for i = 4, #KEYS do
  while taken < want do
    local raw = redis.call('RPOP', KEYS[i])
    if not raw then break end
    local ok, msg = pcall(cjson.decode, raw)
    local tag = nil
    local ex, rk = '', ''
    if ok and type(msg) == 'table' and type(msg['properties']) == 'table' then
      tag = msg['properties']['delivery_tag']
      local info = msg['properties']['delivery_info']
      if type(info) == 'table' then
        if type(info['exchange']) == 'string' then ex = info['exchange'] end
        if type(info['routing_key']) == 'string' then rk = info['routing_key'] end
      end
    end
    if type(tag) == 'string' then
      redis.call('ZADD', KEYS[2], ARGV[1], tag)
      redis.call('HSET', KEYS[1], tag,
                 '[' .. raw .. ',' .. cjson.encode(ex) .. ',' .. cjson.encode(rk) .. ']')
      out[#out + 1] = raw
      if redis.call('HDEL', KEYS[3], tag) == 1 then
        out[#out + 1] = '~' .. KEYS[i]
      else
        out[#out + 1] = KEYS[i]
      end
    else
      out[#out + 1] = raw
      out[#out + 1] = '!' .. KEYS[i]
    end
    taken = taken + 1
  end
end
return out
"""


def bell_key(queue: str) -> str:
    """The bell list of task queue ``queue``."""
    return queue + BELL_SUFFIX


def bell_commands(queue: str) -> list[tuple[bytes | str | int, ...]]:
    """The commands that ring ``queue``'s bell (``redis_fast.pack_commands`` form)."""
    key = bell_key(queue)
    return [(b"LPUSH", key, b"1"), (b"LTRIM", key, 0, BELL_KEEP - 1),
            (b"PEXPIRE", key, BELL_EXPIRES_MS)]


class TaskFetcher:
    """Feeds a worker's task messages from Redis without a window for loss.

    ``channel`` is the kombu Redis channel whose QoS (prefetch count, unacked keys)
    governs the messages; they are kombu messages of that channel, so ``ack()``,
    ``reject()`` and the channel's close behave as with kombu's consumer.
    ``on_message(message)`` gets each one; ``on_garbage(message, reason)`` gets what is
    not a kombu envelope, as a :class:`RawMessage`. Errors of the Redis connection
    propagate from :meth:`pump` and from the loop's reader callback (the worker
    reconnects).
    """

    def __init__(self, url: str, channel: Any, queues: list[str],
                 on_message: Callable[[Any], None],
                 on_garbage: Callable[[Any, str], None], redelivered_key: str,
                 held: dict[str, Any] | None = None) -> None:
        self.channel = channel
        #: delivery tag -> the message handed to ``on_message``; kept across the fetchers of
        #: one worker process (one per connection) to tell its own messages from strays
        self.held: dict[str, Any] = {} if held is None else held
        self.redelivered_key = redelivered_key
        self.qos = channel.qos
        self.queues: list[str] = []
        self.keys: list[str] = []
        self.bells: list[str] = []
        self.set_queues(queues)
        self.on_message = on_message
        self.on_garbage = on_garbage
        options = channel.connection.client.transport_options  # a sentinel's master_name …
        # one connection: WAIT counts the writes of the connection it is sent on
        self._redis = redis_client(url, options, single_connection=True,
                                   socket_connect_timeout=5, socket_timeout=10)
        self._bell_wait = HubCommand(url, self._on_bell, options)  # BRPOP on the bells
        self._script = self._redis.register_script(FETCH_SCRIPT)
        self._wait = replica_wait(options)
        self._next_primary_check = 0.0
        self._hub: Any = None
        self._want = True  # fetch at the next chance (a bell rang, or the last fetch was full)
        self._next_poll = 0.0
        self.stopped = False

    def set_queues(self, queues: list[str]) -> None:
        """Fetch from ``queues`` (kombu queue names) from the next fetch on; a wait for a
        bell already sent ends by its timeout."""
        channel = self.channel
        self.queues = list(queues)
        self.keys = [channel._q_for_pri(q, p) for p in channel.priority_steps for q in queues]
        self.bells = [bell_key(q) for q in queues]
        self._want = True

    # -- the loop ---------
    def register(self, hub: Any) -> None:
        """Start on ``hub``: return strays, fetch, and wait for bells.

        Raises the Redis client's connection errors.
        """
        self._hub = hub
        self._bell_wait.attach(hub)
        self.return_strays()
        self.pump()

    def return_strays(self) -> None:
        """Put back in their queues the messages recorded for this worker that it never
        received (:func:`.redis_liveness.return_strays`: a fetch whose reply was lost
        with the connection before this one)."""
        from .redis_liveness import return_strays

        self._forget_settled()
        returned = return_strays(self._redis, self.qos.unacked_key,
                                 self.qos.unacked_index_key, list(self.held))
        if returned:
            logger.warning("%d task(s) fetched on a lost connection but never received "
                           "returned to their queues", returned)

    def _forget_settled(self) -> None:
        for tag in [tag for tag, message in self.held.items() if message.acknowledged]:
            del self.held[tag]

    def stop(self) -> None:
        """Fetch nothing more (warm shutdown); an in-flight wait is left to time out."""
        self.stopped = True
        self._bell_wait.abandon()

    def close(self) -> None:
        self.stop()
        self._bell_wait.close()
        try:
            self._redis.close()
        except Exception:
            pass

    def room(self) -> int:
        """How many more messages the prefetch count allows."""
        count = self.qos.prefetch_count
        if not count:
            return 64
        return max(0, count - (len(self.qos._delivered) - len(self.qos._dirty)))

    def pump(self) -> None:
        """Fetch what there is room for; when the queues are empty, wait for a bell.

        Raises the Redis client's connection errors.
        """
        if self.stopped:
            return
        room = self.room()
        if room <= 0:
            return
        now = time.monotonic()
        if self._want or now >= self._next_poll:
            self._next_poll = now + POLL_INTERVAL
            got = self.fetch(room)
            self._want = got >= room  # full: more may be waiting
            if self._want or self.stopped:
                return
        if not self._bell_wait.in_flight and self._hub is not None:
            self._bell_wait.send("BRPOP", *self.bells, POLL_INTERVAL)

    def ring_for(self, queue: str) -> None:
        """Wake a worker waiting on ``queue`` (after a publish that rang no bell).

        Raises the Redis client's errors.
        """
        pipe = self._redis.pipeline(transaction=False)
        for command in bell_commands(queue):
            pipe.execute_command(*command)
        pipe.execute()

    def fetch(self, count: int) -> int:
        """Take up to ``count`` messages (recorded unacked on the server) and deliver them."""
        # kombu here, not at the top: the worker imports this module before its pool
        # processes fork, and they need no kombu (transport.kombu_transports).
        from kombu.transport import virtual

        qos = self.qos
        flat = self._run_script(keys=[qos.unacked_key, qos.unacked_index_key,
                                      self.redelivered_key, *self.keys],
                                args=[time.time(), count])
        for i in range(0, len(flat), 2):
            raw, key = bytes(flat[i]), flat[i + 1].decode()
            redelivered = key.startswith("~")
            if key.startswith("!"):
                self.on_garbage(RawMessage(raw, key[1:], self._redis),
                                "not a kombu message (no JSON envelope with a delivery tag)")
                continue
            try:
                payload = json.loads(raw)
                message = self.channel.Message(payload, channel=self.channel)
            except Exception as exc:
                # Recorded as unacked, so a restore would bring it back: dead-letter it.
                with contextlib.suppress(Exception):
                    self.qos._remove_from_indices(payload_tag(raw)).execute()
                self.on_garbage(RawMessage(raw, key, self._redis), f"undecodable envelope: {exc}")
                continue
            if redelivered:
                message.delivery_info["redelivered"] = True
            # The server side of kombu's QoS.append is done (by the script); this is its
            # local side, so ack/reject/close find the message.
            virtual.QoS.append(qos, message, message.delivery_tag)
            if len(self.held) >= HELD_PRUNE_AT:
                self._forget_settled()
            self.held[message.delivery_tag] = message
            self.on_message(message)
        return len(flat) // 2

    def _run_script(self, keys: list[str], args: list[Any]) -> Any:
        """The fetch script's reply. With ``wait_replicas``, once the replicas have its
        pops too, so a failover cannot put back in the queue a message this worker runs.
        Messages no replica took from a primary in doubt (``redis_urls.primary_in_doubt``)
        are dropped here — the new primary still has them — and ``redis.ConnectionError``
        is raised, as for an empty fetch from such a primary (checked once a second)."""
        import redis

        flat = self._script(keys=keys, args=args)
        if self._wait is None:
            return flat
        if flat:
            acknowledged = self._redis.execute_command("WAIT", *self._wait)
            moved = not stays_written(acknowledged, self._wait, self._redis, "task fetch")
        else:
            now = time.monotonic()
            moved = now >= self._next_primary_check and primary_in_doubt(self._redis)
            self._next_primary_check = now + 1.0
        if moved:
            raise redis.ConnectionError("fetched from a primary the sentinels are replacing")
        return flat

    def _on_bell(self, reply: Any) -> None:
        if isinstance(reply, Exception):
            raise reply
        self._want = True  # a bell, or the wait timed out: look
        self.pump()


def payload_tag(raw: bytes) -> str:
    """The delivery tag of a kombu envelope (raises for anything else)."""
    return str(json.loads(raw)["properties"]["delivery_tag"])


class RawMessage:
    """What the worker's dead-lettering needs of a list item that is not a kombu message."""

    content_type = "application/octet-stream"
    content_encoding = "binary"
    headers: dict[str, Any] = {}

    def __init__(self, body: bytes, key: str, client: Any) -> None:
        self.body = body
        self.delivery_info = {"routing_key": key}
        self._key = key
        self._client = client

    def ack(self) -> None:
        """Nothing to do: the fetch took it off its list."""

    def reject(self, requeue: bool = False) -> None:
        if requeue:  # dead-lettering failed: back where it was, at the head
            self._client.rpush(self._key, self.body)
