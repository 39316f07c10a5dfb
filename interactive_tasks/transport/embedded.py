"""The embedded broker: a kombu virtual transport on the local filesystem.

``embedded://`` (the per-user directory; ``ITASK_HOME`` overrides it) or
``embedded:///abs/path`` needs no server and works across processes on one machine.
kombu's own ``filesystem://`` transport loses messages (a reader can open a half-written
file) and does not keep order; this one is rebuilt around atomic renames. POSIX only.

This module is the kombu layer: ``Transport`` (the ``embedded://`` entry point), its
``Channel`` and ``QoS``, and the event-loop glue. The files themselves, their layout and
the guarantees (no loss, order, one consumer per delivery with leases, routing, expiry) are
described and implemented in ``embedded_store``, with helpers in ``embedded_files``.

Not AMQP: ``exclusive``, ``auto_delete`` and ``if_unused`` are ignored (use ``expires``);
publishing to a queue nobody declared creates it, as on Redis; deleting an exchange
removes its bindings, not its queues.

Wake-ups: a connection that waits for messages has a doorbell (``embedded_bells``), a
FIFO that every publish to a queue it consumes writes a byte to. The worker's event loop
watches it (``register_with_event_loop``) and a blocking ``drain_events`` waits on it, so
a message is taken as soon as its file is renamed into place. Both also look at their queues
every ``polling_interval`` whatever the bell says: a ring that is lost or never sent (a
publisher without bells, a FIFO that could not be made) delays a message by at most that
period. Each wake-up delivers as much as QoS allows, for at most 50 ms; an ack that makes room
under the prefetch limit rings the connection's own bell, so a backlog is taken at once
rather than on the next poll. An idle look costs one ``stat`` per consumed queue.

Transport options: ``polling_interval`` (0.01 s: the safety-net poll, also the longest a
blocking ``drain_events`` waits between looks), ``sweep_interval`` (1 s),
``housekeeping_interval`` (5 s), ``fsync``
(False: publishes and acks of task queues reach the disk before they return, so they
survive a power cut; see ``embedded_store``).
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from queue import Empty
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import virtual
from kombu.transport.base import to_rabbitmq_queue_arguments
from kombu.utils.json import dumps, loads

from interactive_tasks.transport import embedded_directory
from interactive_tasks.transport.embedded_bells import Bell
from interactive_tasks.transport.embedded_files import (
    delivery_count,
    owner_alive,
    process_start_time,
    safe_name,
)
from interactive_tasks.transport.embedded_store import RELIST_INTERVAL, Store, store_for

__all__ = ["Channel", "QoS", "Transport", "owner_alive", "process_start_time", "safe_name"]

__version__ = "1.0"

logger = logging.getLogger(__name__)

#: A cached, non-empty listing is used for at most this long before listing again, so a
#: message returned to an earlier position by another process is seen soon.
_LISTING_TTL = 0.5
#: One hub tick delivers messages for at most this long, then lets the loop run.
_TICK_BUDGET = 0.05


@dataclass
class _Claim:
    queue: str
    reserved: str


@dataclass
class _Listing:
    names: deque[str] = field(default_factory=deque)
    listed_at: float = 0.0
    generation: int = -1
    #: (inode, mtime) of the queue directory when a trusted listing found it empty.
    empty_key: tuple[int, int] | None = None


class QoS(virtual.QoS):
    """kombu's prefetch accounting, plus the files behind each unacked delivery."""

    def ack(self, delivery_tag: str) -> None:
        full = not self.can_consume()
        self.channel._settle(delivery_tag)
        super().ack(delivery_tag)
        if full:
            self.channel.connection.wake_loop()

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        full = not self.can_consume()
        if requeue:
            self.channel._unreserve(delivery_tag)
        else:
            self.channel._settle(delivery_tag)
        self._quick_ack(delivery_tag)
        if full:
            self.channel.connection.wake_loop()


class Channel(virtual.Channel):
    """A channel on the embedded broker."""

    QoS = QoS
    supports_fanout = True
    from_transport_options = (  # type: ignore[assignment]
        *virtual.Channel.from_transport_options,
        "sweep_interval",
        "housekeeping_interval",
    )
    #: Seconds between lease sweeps of each polled queue.
    sweep_interval = 1.0
    #: Seconds between expiry checks of the whole directory.
    housekeeping_interval = 5.0

    def __init__(self, connection: Transport, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        self._broker: Store = connection.broker
        self._claims: dict[str, _Claim] = connection.claims
        self._listings: dict[str, _Listing] = {}
        self._poll_position = 0

    def prepare_queue_arguments(self, arguments: dict[str, Any], **kwargs: Any) -> Any:
        # ``Queue(expires=…)`` reaches us as ``x-expires`` in ms, as on RabbitMQ.
        return to_rabbitmq_queue_arguments(arguments, **kwargs)

    # -- queues ---------------------------------------------------------------------------

    def _new_queue(
        self, queue: str, arguments: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        expires_ms = (arguments or {}).get("x-expires")
        self._broker.declare_queue(queue, expires_ms / 1000.0 if expires_ms else None)

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        return self._broker.has_queue(queue)

    def _size(self, queue: str) -> int:
        return self._broker.size(queue)

    def _purge(self, queue: str) -> int:
        return self._broker.purge(queue)

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        self._broker.delete_queue(queue)

    def queue_delete(
        self, queue: str, if_unused: bool = False, if_empty: bool = False, **kwargs: Any
    ) -> None:
        if if_empty and self._size(queue):
            return
        self._broker.forget(queue)
        self._broker.delete_queue(queue)
        self.state.queue_bindings_delete(queue)
        self._listings.pop(queue, None)

    # -- exchanges and bindings -----------------------------------------------------------

    def exchange_declare(
        self,
        exchange: str | None = None,
        type: str = "direct",
        durable: bool = False,
        auto_delete: bool = False,
        arguments: dict[str, Any] | None = None,
        nowait: bool = False,
        passive: bool = False,
    ) -> None:
        type = type or "direct"
        exchange = exchange or f"amq.{type}"
        if passive and exchange not in self.state.exchanges:
            if self._broker.exchange_type(exchange) is None:
                raise ChannelError(
                    f"NOT_FOUND - no exchange {exchange!r}",
                    (50, 10), "Channel.exchange_declare", "404",
                )
            return
        super().exchange_declare(exchange, type, durable, auto_delete, arguments, nowait, passive)
        if not passive:
            self._broker.declare_exchange(exchange, type)

    def exchange_delete(self, exchange: str, if_unused: bool = False, nowait: bool = False) -> None:
        # AMQP deletes the exchange and its bindings, not the queues bound to it.
        self._broker.delete_exchange(exchange)
        self.state.exchanges.pop(exchange, None)

    def typeof(self, exchange: str, default: str = "direct") -> Any:
        try:
            type_ = self.state.exchanges[exchange]["type"]
        except KeyError:
            type_ = self._broker.exchange_type(exchange) or default
        return self.exchange_types[type_]

    def queue_bind(
        self,
        queue: str,
        exchange: str | None = None,
        routing_key: str = "",
        arguments: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        # Always checked on disk: the binding may have expired since this connection made it.
        exchange = exchange or "amq.direct"
        self.state.binding_declare(queue, exchange, routing_key, arguments)
        meta = self.typeof(exchange).prepare_bind(queue, exchange, routing_key, arguments)
        self._queue_bind(exchange, *meta)

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str | None, queue: str) -> None:
        self._broker.bind(exchange, routing_key or "", pattern, queue)

    def queue_unbind(
        self,
        queue: str,
        exchange: str | None = None,
        routing_key: str = "",
        arguments: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        exchange = exchange or "amq.direct"
        self.state.binding_delete(queue, exchange, routing_key)
        rkey, pattern, _ = self.typeof(exchange).prepare_bind(
            queue, exchange, routing_key, arguments
        )
        self._broker.unbind(exchange, rkey or "", pattern, queue)

    def get_table(self, exchange: str) -> list[tuple[str, str | None, str]]:
        return self._broker.table(exchange)

    def list_bindings(self) -> Iterator[tuple[str, str, str]]:
        return self._broker.all_bindings()

    # -- publish --------------------------------------------------------------------------

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        data = dumps(message).encode()
        try:
            self._broker.put(queue, data)
        except OSError as exc:
            qdir = self._broker.queue_path(queue)
            raise ChannelError(f"cannot publish to queue {queue!r} in {qdir}: {exc}") from exc
        self._broker.maybe_housekeep(self.housekeeping_interval)

    def _put_fanout(
        self, exchange: str, message: dict[str, Any], routing_key: str, **kwargs: Any
    ) -> None:
        for queue in {queue for _, _, queue in self.get_table(exchange)}:
            self._put(queue, message, **kwargs)

    # -- consume --------------------------------------------------------------------------

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        self._broker.maybe_housekeep(self.housekeeping_interval)
        payload = self._get_nowait(queue)
        if payload is None:
            raise Empty()
        return payload

    def _poll(self, cycle: Any, callback: Any, timeout: float | None = None) -> None:
        # kombu's FairCycle raises and catches Empty once per empty queue; this runs for
        # every consumed queue on every tick, so rotate over the queues without exceptions.
        queues = self._active_queues
        count = len(queues)
        if count:
            self._broker.maybe_housekeep(self.housekeeping_interval)
            first = self._poll_position
            for offset in range(count):
                queue = queues[(first + offset) % count]
                payload = self._get_nowait(queue)
                if payload is not None:
                    self._poll_position = (first + offset + 1) % count
                    callback(payload, queue)
                    return
        raise Empty()

    def _get_nowait(self, queue: str) -> dict[str, Any] | None:
        """Claim the first ready message of ``queue`` (None if there is none)."""
        broker = self._broker
        now = time.monotonic()
        if now >= broker.next_maintenance.get(queue, 0.0):
            broker.maintain(queue, self.sweep_interval)
        listing = self._listings.get(queue)
        fresh = False
        if (
            listing is None
            or not listing.names
            or listing.generation != broker.generation
            or now - listing.listed_at > _LISTING_TTL
        ):
            listing, fresh = self._relist(queue, listing, now), True
        while listing is not None:
            while listing.names:
                name = listing.names.popleft()
                claimed = broker.claim(queue, name)
                if claimed is None:
                    continue
                reserved, data = claimed
                try:
                    payload = loads(data)
                    props = payload["properties"]
                except (ValueError, KeyError, TypeError):
                    logger.error("undecodable message %s in queue %r moved aside", name, queue)
                    broker.set_aside(queue, reserved)
                    continue
                # Fanout copies share the publisher's tag: give every delivery its own.
                tag = uuid.uuid4().hex
                props["delivery_tag"] = tag
                count = delivery_count(name)
                info = props.setdefault("delivery_info", {})
                info["redelivered"] = count > 1
                info["delivery_count"] = count
                self._claims[tag] = _Claim(queue, reserved)
                return payload
            if fresh:
                return None
            # Other consumers took every cached candidate; newer ones may be waiting.
            listing, fresh = self._relist(queue, listing, now), True
        return None

    def _relist(self, queue: str, previous: _Listing | None, now: float) -> _Listing | None:
        """List ``queue`` again, unless its directory provably did not change while empty."""
        broker = self._broker
        version = broker.queue_version(queue)
        if version is None:
            self._listings.pop(queue, None)
            return None
        key, trusted = version
        if (
            previous is not None
            and previous.empty_key == key
            and now - previous.listed_at < RELIST_INTERVAL
        ):
            return None  # nothing was renamed in or out since an empty, trusted listing
        generation = broker.generation
        try:
            names = broker.list_ready(broker.queue_path(queue))
        except FileNotFoundError:
            return None
        listing = _Listing(deque(names), now, generation, key if trusted and not names else None)
        self._listings[queue] = listing
        return listing

    def basic_consume(
        self, queue: str, no_ack: bool, callback: Any, consumer_tag: str, **kwargs: Any
    ) -> Any:
        result = super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)
        self._broker.add_consumer(queue)
        if no_ack:
            deliver = self.connection._callbacks[queue]

            def settle_then_deliver(raw_message: dict[str, Any]) -> Any:
                self._settle(raw_message["properties"]["delivery_tag"])
                return deliver(raw_message)

            self.connection._callbacks[queue] = settle_then_deliver
        return result

    def basic_cancel(self, consumer_tag: str) -> None:
        queue = self._tag_to_queue.get(consumer_tag) if consumer_tag in self._consumers else None
        super().basic_cancel(consumer_tag)
        if queue is not None:
            self._broker.remove_consumer(queue)

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        message = super().basic_get(queue, no_ack=no_ack, **kwargs)
        if message is not None and no_ack:
            self._settle(message.delivery_tag)
        return message

    def _settle(self, delivery_tag: str) -> None:
        claim = self._claims.pop(delivery_tag, None)
        if claim is not None:
            self._broker.settle(claim.queue, claim.reserved)

    def _unreserve(self, delivery_tag: str) -> None:
        claim = self._claims.pop(delivery_tag, None)
        if claim is not None:
            self._broker.unreserve(claim.queue, claim.reserved)

    def _restore(self, message: Any) -> None:
        # Back to its original position, never re-published: a re-publish would move it to
        # the tail and, for fanout, copy it to every bound queue again. A tag we no longer
        # hold was acked (possibly by another thread) and must not come back.
        self._unreserve(message.delivery_tag)

    def _restore_at_beginning(self, message: Any) -> None:
        self._unreserve(message.delivery_tag)

    def close(self) -> None:
        super().close()
        self._listings.clear()


class Transport(virtual.Transport):
    """The embedded broker transport (``embedded://`` URLs)."""

    Channel = Channel

    #: The URL reaches us whole: ``embedded_directory`` owns its interpretation.
    can_parse_url = True
    polling_interval = 0.01
    default_port = None
    driver_type = "embedded"
    driver_name = "embedded"
    # ``asynchronous``: the worker's Hub drives us with timers (register_with_event_loop),
    # as Celery does for every transport that sets it; without it a Hub-based consumer
    # would fall back to blocking drain_events.
    implements = virtual.Transport.implements.extend(
        asynchronous=True,
        exchange_type=frozenset({"direct", "fanout"}),
        heartbeats=False,
    )

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        hostname = client.hostname or ""
        url = hostname if "://" in hostname else "embedded://"
        self.directory = str(embedded_directory(url))
        self.broker: Store = store_for(self.directory,
                                       fsync=bool(client.transport_options.get("fsync")))
        #: Unacked deliveries of every channel of this connection, by delivery tag.
        self.claims: dict[str, _Claim] = {}
        self._tref: Any = None
        self._bell: Bell | None = None
        self._bell_tried = False
        self._loop: Any = None

    def driver_version(self) -> str:
        return __version__

    def as_uri(self, uri: str, include_password: bool = False, mask: str = "**") -> str:
        return uri

    def establish_connection(self) -> Any:
        self.broker.ensure()
        return super().establish_connection()

    def close_connection(self, connection: Any) -> None:
        self.unregister_from_event_loop(connection, self._loop)
        super().close_connection(connection)
        bell, self._bell, self._bell_tried = self._bell, None, False
        if bell is not None:
            bell.close()
        # A delivery no channel's QoS knew about (e.g. a callback that raised before kombu
        # recorded it) would otherwise stay reserved until this process exits.
        for tag in list(self.claims):
            claim = self.claims.pop(tag, None)
            if claim is not None:
                self.broker.unreserve(claim.queue, claim.reserved)

    def _doorbell(self) -> Bell | None:
        """This connection's bell, made on first use (None: poll only)."""
        if not self._bell_tried:
            self._bell_tried = True
            self._bell = self.broker.bell()
        return self._bell

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        """Deliver when the doorbell rings, and every ``polling_interval`` anyway."""
        self.unregister_from_event_loop(connection, loop)
        self._loop = loop
        bell = self._doorbell()
        if bell is not None:
            loop.add_reader(bell.fileno(), self._on_bell)
        self._tref = loop.call_repeatedly(max(self.polling_interval or 0.0, 0.001), self._on_tick)

    def unregister_from_event_loop(self, connection: Any, loop: Any) -> None:
        if self._tref is not None:
            self._tref.cancel()
            self._tref = None
        if self._bell is not None and self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove(self._bell.fileno())
        self._loop = None

    def wake_loop(self) -> None:
        """Make the event loop look at the queues again soon (a settled delivery made room
        under the prefetch limit, and a backlog rings no bell)."""
        bell = self._bell
        if bell is not None and self._loop is not None:
            bell.ring()

    def _on_bell(self) -> None:
        # Empty the FIFO before looking: a ring after this point wakes us again.
        bell = self._bell
        if bell is not None:
            bell.clear()
        self._on_tick()

    def _on_tick(self) -> None:
        # Deliver everything QoS allows, but hand the loop back after _TICK_BUDGET so a
        # backlog cannot starve the pool's file descriptors; the next tick goes on.
        if self.cycle is None:
            return
        deadline = time.monotonic() + _TICK_BUDGET
        get = self.cycle.get
        while True:
            try:
                get(self._deliver)
            except Empty:
                return
            if time.monotonic() >= deadline:
                return

    # kombu's two transport bases type this differently; this is virtual's signature
    def drain_events(self, connection: Any,  # type: ignore[override]
                     timeout: float | None = None) -> None:
        """Deliver one message, waiting up to ``timeout`` seconds (None: for ever) for the
        doorbell, looking every ``polling_interval`` anyway; raises TimeoutError
        (socket.timeout) when none came."""
        deadline = None if timeout is None else time.monotonic() + timeout
        poll = max(self.polling_interval or 0.0, 0.001)
        bell = self._doorbell()
        assert self.cycle is not None  # set by the first channel
        while True:
            try:
                self.cycle.get(self._deliver, timeout=timeout)
                return
            except Empty:
                pass
            wait = poll
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError()
                wait = min(wait, remaining)
            if bell is None:
                time.sleep(wait)
            else:
                bell.wait(wait)
