"""The broker side of a client process: publishing, and one inbox consumed by one thread.

Every handle in the process shares one :class:`Client` per app. Its thread owns a kombu
connection consuming ``<ns>.inbox.<client id>`` and dispatches what arrives: events to the
handles watching that task, replies and snapshots to whoever waits on their request id,
worker heartbeats to the liveness table. Publishing uses a second connection guarded by a
lock, so user threads can publish while the inbox thread blocks in ``drain_events``.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from kombu import Connection, Producer, Queue

from . import codec, signals
from .errors import BROKER_HINT, PayloadTooLarge, ProtocolError, TransportError
from .protocol import (
    RESERVED_HEADERS,
    ControlMessage,
    Envelope,
    Event,
    TaskMessage,
    TaskSnapshot,
    Verb,
    control_wire,
)
from .transport import is_amqp
from .transport.client_side import ClientSide, InboxSession, client_side_for
from .transport.frames import task_envelope
from .transport.upkeep import SCHEDULE_AHEAD, BrokerUpkeep, upkeep_for

if TYPE_CHECKING:
    from .app import App
    from .transport.amqp_fast import FastPublisher

logger = logging.getLogger("interactive_tasks.client")

#: A client renews its subscriptions this often; workers drop them after 3 × this.
RENEW_INTERVAL = 10.0
#: A worker silent for this long is presumed dead by the handles watching its tasks.
WORKER_SILENCE = 6.0


class Watcher(Protocol):
    """What the client feeds; implemented by :class:`~interactive_tasks.handle.TaskHandle`."""

    task_id: str

    def _on_event(self, event: Event) -> None: ...

    def _on_snapshot(self, snapshot: TaskSnapshot) -> None: ...

    def _on_worker_lost(self, worker: str) -> None: ...

    def _check_resync(self, now: float) -> None: ...

    def _expect_receipt(self, cseq: int, count: int) -> None:
        """Message ``cseq`` (the ``count``-th this watcher streamed) is about to go out
        asking for a receipt."""

    def _on_receipt(self, cseq: int) -> None:
        """The task has taken this client's message ``cseq`` (asked for with
        :meth:`Client.expect_receipt`)."""

    def _watch_info(self) -> tuple[str | None, int, int, bool, bool]:
        """(worker, run, seq, final, starter) of the task as this watcher knows it.

        ``starter``: the handle of the client that published the task, whose subscription
        travels in the task message (``reply_to``) and so needs no locate broadcast.
        """
        ...

    @property
    def token(self) -> str | None: ...


class _Waiter:
    """A request waiting for replies (one, or many for broadcasts)."""

    __slots__ = ("cond", "many", "replies")

    def __init__(self, many: bool) -> None:
        self.cond = threading.Condition()
        self.replies: list[dict[str, Any]] = []
        self.many = many


class Client:
    """One per app and process; created lazily by :attr:`App.client`."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.id = uuid.uuid4().hex[:16]
        self.inbox: Queue = app.names.inbox_queue(self.id)
        #: the process that chose ``id`` (a forked child chooses its own)
        self._id_pid = os.getpid()
        self._pub_lock = threading.RLock()
        self._pub_conn: Connection | None = None
        self._producer: Producer | None = None
        #: RabbitMQ: task and control messages past kombu's producer (amqp_fast.py)
        self._fast: FastPublisher | None = None
        if is_amqp(app.broker_url):
            from .transport.amqp_fast import FastPublisher

            self._fast = FastPublisher()
        self._declared: set[str] = set()
        #: the kombu queue of each task queue name (one built per publish cost ~7 µs)
        self._task_queues: dict[str, Queue] = {}
        self._lock = threading.Lock()
        self._watchers: dict[str, list[weakref.ref[Any]]] = {}
        self._waiters: dict[str, _Waiter] = {}
        self._worker_seen: dict[str, float] = {}
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread_error: BaseException | None = None
        self._pid = 0
        self._cseq: dict[str, int] = {}
        self._rids = itertools.count(1)
        #: (task id, cseq) of a message sent asking for a receipt -> the handle that sent
        #: it (weakly: a collected handle's receipts go nowhere)
        self._receipts: weakref.WeakValueDictionary[tuple[str, int], Any] = \
            weakref.WeakValueDictionary()
        #: task ids whose handles were collected, pruned from _watchers under the lock
        self._unwatched: collections.deque[str] = collections.deque()
        #: this process's side of the broker (publishing, the inbox), made on first use
        self._side: ClientSide | None = None
        #: where tasks with an eta ahead wait (created on first use)
        self._delays: BrokerUpkeep | None = None

    # -- lifecycle ----------
    def ensure_started(self, timeout: float = 15.0) -> None:
        """Start the inbox thread and wait until the inbox is consumed.

        Raises :class:`TransportError` when the broker cannot be reached in ``timeout``.
        """
        if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
                return
            if self._id_pid != os.getpid():
                # Created (or started) in a parent before a fork: the parent may use the
                # same inbox name; two readers would take each other's replies.
                self._id_pid = os.getpid()
                self.id = uuid.uuid4().hex[:16]
                self.inbox = self.app.names.inbox_queue(self.id)
            if self._pid != os.getpid():
                # After a fork the parent's connections and thread are not ours.
                self._pub_conn = None
                self._producer = None
                self._side = None
                self._delays = None
                self._declared = set()
            self._pid = os.getpid()
            self._ready.clear()
            self._stop.clear()
            self._thread_error = None
            self._thread = threading.Thread(
                target=self._run, name=f"itask-inbox-{self.id[:6]}", daemon=True
            )
            self._thread.start()
        if not self._ready.wait(timeout):
            raise TransportError(
                f"cannot reach the broker at {self.app.broker_url_display}: "
                f"no connection within {timeout:.0f}s ({BROKER_HINT})"
            )
        if self._thread_error is not None:
            raise TransportError(
                f"cannot reach the broker at {self.app.broker_url_display}: "
                f"{self._thread_error} ({BROKER_HINT})"
            )

    def close(self) -> None:
        """Stop the inbox thread, delete the inbox and close connections."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            thread.join(5)
        with self._pub_lock:
            self._drop_publisher(graceful=True)
            if self._side is not None:
                self._side.close()
                self._side = None
            if self._delays is not None:
                self._delays.close(clean=False)
                self._delays = None

    # -- publishing ----------
    def _drop_publisher(self, *, graceful: bool) -> None:
        """Let the publishing connection go: closed with the broker (``graceful``), or
        collected without another word on it (a connection a failed write left unusable).
        Never raises."""
        conn, self._pub_conn, self._producer = self._pub_conn, None, None
        if conn is not None:
            try:
                conn.release() if graceful else conn.collect()
            except Exception:
                pass

    def _renew_publisher(self) -> Producer:
        """Drop the publishing connection without talking to the broker on it, and open
        a new one (raises kombu's connection errors when none can be opened)."""
        self._drop_publisher(graceful=False)
        return self._producer_for_publish()

    def _producer_for_publish(self) -> Producer:
        if self._producer is None:
            conn = self.app.connection()
            conn.ensure_connection(max_retries=3, interval_start=0.2, interval_step=0.5)
            self._pub_conn = conn
            self._producer = Producer(conn.default_channel)
        return self._producer

    def publish(
        self,
        payload: dict[str, Any],
        *,
        routing_key: str,
        exchange: Any = "",
        declare: list[Any] | None = None,
        headers: dict[str, Any] | None = None,
        priority: int | None = None,
    ) -> None:
        """Encode, sign and publish ``payload``.

        Raises ``TypeError`` for data msgpack cannot carry, :class:`ProtocolError` for a
        payload over ``max_message_size`` and :class:`TransportError` when the broker is
        unreachable after retries.
        """
        body = codec.dumps(payload)
        self.publish_raw(body, routing_key=routing_key, exchange=exchange, declare=declare,
                         headers=headers, priority=priority)

    def publish_raw(
        self,
        body: bytes,
        *,
        routing_key: str,
        exchange: Any = "",
        declare: list[Any] | None = None,
        headers: dict[str, Any] | None = None,
        priority: int | None = None,
    ) -> None:
        limit = self.app.conf.max_message_size
        if len(body) > limit:
            from .errors import PayloadTooLarge

            raise PayloadTooLarge(
                f"message of {len(body)} bytes is over max_message_size={limit}; "
                "pass a reference (a path or URL) instead of the data"
            )
        plain = not headers  # only the signature: what the fast path sends
        headers = dict(headers or {})
        signature = None
        if self.app.secret is not None:
            signature = headers[codec.SIGNATURE_HEADER] = codec.sign(self.app.secret, body)
        with self._pub_lock:
            try:
                producer = self._producer_for_publish()
                to_declare = [q for q in declare or () if q.name not in self._declared]
                fast = self._fast
                if fast is not None and plain and not to_declare and \
                        getattr(exchange, "name", exchange) == "":
                    try:
                        fast.publish(producer.channel, routing_key, body, signature,
                                     priority)
                        return
                    except Exception as exc:
                        # The connection went away, or a write failed part-way through
                        # the message's frames: the broker would refuse anything more on
                        # this connection, so kombu sends again on a new one.
                        logger.debug("fast publish failed (%s); retrying through kombu "
                                     "on a new connection", exc)
                        producer = self._renew_publisher()
                producer.publish(
                    body,
                    routing_key=routing_key,
                    exchange=exchange,
                    content_type=codec.CONTENT_TYPE,
                    content_encoding="binary",
                    headers=headers,
                    declare=to_declare,
                    priority=priority,
                    retry=True,
                    retry_policy={"max_retries": 3, "interval_start": 0.1,
                                  "interval_step": 0.5},
                )
                self._declared.update(q.name for q in to_declare)
            except ProtocolError:
                raise
            except Exception as exc:
                if isinstance(exc, TypeError):
                    raise
                # The next publish opens a new connection; this one is let go, not kept
                # open and unreferenced until the garbage collector finds it.
                self._drop_publisher(graceful=False)
                self._declared.clear()
                raise TransportError(
                    f"cannot publish to the broker at {self.app.broker_url_display}: {exc}"
                ) from exc

    def send_task(self, message: TaskMessage, priority: int | None = None) -> None:
        """Publish a task message to its queue (declaring the queue once per process); a
        task whose ``eta`` is ahead waits in the broker where the broker can keep it.

        Raises PayloadTooLarge and TransportError.
        """
        queue = self._task_queues.get(message.queue)
        if queue is None:
            queue = self._task_queues[message.queue] = self.app.names.task_queue(
                message.queue)
        announce = signals.before_task_publish.has_listeners() or \
            signals.after_task_publish.has_listeners()
        if announce:
            _before_publish(message, queue.name)
        body = codec.dumps(message.to_wire())
        scheduled = message.eta is not None and message.eta - time.time() > SCHEDULE_AHEAD \
            and self._schedule(queue.name, message.id, body, priority, message.eta)
        if not scheduled:
            self._check_size(body)
            self._client_side().publish_task(queue, body, priority)
        if announce:
            signals.after_task_publish.send(
                sender=message.task, body=message.to_wire(), exchange="",
                routing_key=queue.name, headers={**message.headers, "id": message.id,
                                                 "task": message.task})

    def _client_side(self) -> ClientSide:
        """This process's side of the broker (created on first use)."""
        if self._side is None:
            with self._pub_lock:
                if self._side is None:
                    self._side = client_side_for(self.app, self.publish_raw)
        return self._side

    def _check_size(self, body: bytes) -> None:
        limit = self.app.conf.max_message_size
        if len(body) > limit:
            raise PayloadTooLarge(
                f"message of {len(body)} bytes is over max_message_size={limit}; "
                "pass a reference (a path or URL) instead of the data")

    def _schedule(self, queue: str, task_id: str, body: bytes, priority: int | None,
                  eta: float) -> bool:
        """Keep the task in the broker until ``eta`` where the broker can (False: it
        cannot, publish it now and the worker holds it).

        Raises PayloadTooLarge and TransportError.
        """
        self._check_size(body)
        with self._pub_lock:
            if self._delays is None:
                self._delays = upkeep_for(self.app, "client", lambda: None)
        envelope = task_envelope(body, queue, self.app.secret, priority)
        try:
            return self._delays.schedule(queue, task_id, envelope, priority, eta)
        except Exception as exc:
            raise TransportError(
                f"cannot publish to the broker at {self.app.broker_url_display}: {exc}"
            ) from exc

    def new_rid(self) -> str:
        """A request id unique among this client's requests (replies come to its inbox)."""
        return f"{self.id}.{next(self._rids)}"

    def next_cseq(self, task_id: str) -> int:
        """The next control sequence number for ``task_id`` from this client (from 1)."""
        with self._lock:
            value = self._cseq.get(task_id, 0) + 1
            self._cseq[task_id] = value
            return value

    def expect_receipt(self, task_id: str, cseq: int, watcher: Watcher, count: int) -> None:
        """Message ``cseq``, the ``count``-th ``watcher`` streamed, is about to ask for a
        receipt: tell the watcher, and pass the receipt to ``watcher._on_receipt`` when it
        comes."""
        watcher._expect_receipt(cseq, count)
        with self._lock:
            self._receipts[task_id, cseq] = watcher

    def send_task_verb_nowait(self, task_id: str, verb: str, data: Any, token: str | None,
                              worker: str,
                              receipt: tuple[Watcher, int] | None = None) -> None:
        """Publish a task verb to ``worker``'s control queue without a request id: the
        worker applies it and sends no reply. The shortest path from ``handle.send`` to the
        broker: on Redis about half the Python calls of building a :class:`ControlMessage`
        for :meth:`send_control`, 60–80 µs less before the packet leaves on a cold CPU here.

        Raises PayloadTooLarge and TransportError.
        """
        self._send_control_wire(self.task_verb_wire(task_id, verb, data, token, receipt),
                                worker, settle=False)

    def task_verb_wire(self, task_id: str, verb: str, data: Any, token: str | None,
                       receipt: tuple[Watcher, int] | None = None, *,
                       reply: bool = False) -> dict[str, Any]:
        """A task verb from this client as it goes on the wire (``control_wire``), with
        the next sequence number for the task and, with ``reply``, a new request id (for
        :meth:`request`); without a ControlMessage in between.

        With ``receipt`` (a watcher, and the count of messages it has streamed with this
        one) the message asks for a receipt once the task has taken it, passed to the
        watcher's ``_on_receipt(cseq)`` (registered here, before it is sent, so it cannot
        arrive first).

        Raises TransportError when the inbox cannot be started.
        """
        self.ensure_started()  # also: after a fork, this process's own inbox and publisher
        cseq = self.next_cseq(task_id)
        if receipt is not None:
            self.expect_receipt(task_id, cseq, *receipt)
        return control_wire(verb, task_id, data, self.inbox.name,
                            self.new_rid() if reply else None, cseq, token, time.time(),
                            receipt is not None)

    def send_control(self, message: ControlMessage, worker: str | None) -> None:
        """Send to one worker's control queue, or to every worker when ``worker`` is None."""
        self._send_control_wire(message.to_wire(), worker)

    def _send_control_wire(self, wire: dict[str, Any], worker: str | None,
                           settle: bool = True) -> None:
        """Raises PayloadTooLarge and TransportError (with ``settle=False``, possibly for
        an earlier unsettled message: see ``ClientSide.publish_control``)."""
        if worker is None:
            exchange = self.app.names.broadcast_exchange
            self.publish(wire, routing_key="", exchange=exchange, declare=[exchange])
            return
        body = codec.dumps(wire)
        limit = self.app.conf.max_message_size
        if len(body) > limit:
            raise PayloadTooLarge(f"control message of {len(body)} bytes is over "
                                  f"max_message_size={limit}")
        self._client_side().publish_control(worker, body, settle)

    def request(
        self,
        message: ControlMessage | dict[str, Any],
        worker: str | None,
        timeout: float,
        *,
        many: bool = False,
        until: Callable[[list[dict[str, Any]]], bool] | None = None,
        settle: float | None = None,
        resend: float | None = None,
    ) -> list[dict[str, Any]]:
        """Send ``message`` and collect replies addressed to its request id.

        With ``many`` (broadcasts) it gathers replies until ``timeout`` or until
        ``until(replies)`` is true, or ``settle`` seconds after the first reply; otherwise
        it returns as soon as one reply arrives. Returns the replies, possibly none.

        With ``resend`` the message goes out again after that many seconds, then after
        twice as long, and so on, while no reply has come: a broadcast is not stored (on
        Redis it is a PUBLISH), so a worker that was not listening at that moment — between
        its start and its first subscription, or reconnecting — never sees it. Only for
        messages a worker recognises when they come twice (task verbs, by ``cseq``).

        ``message`` may be in its wire form already, from :meth:`task_verb_wire` with
        ``reply=True`` (its sender this client's inbox, its request id set): sent as it is;
        one without a request id raises ValueError (no reply could be told apart).
        """
        if isinstance(message, dict):
            wire = message
            if not isinstance(wire.get("rid"), str):
                raise ValueError("a control message in its wire form needs its request id: "
                                 "build it with task_verb_wire(..., reply=True)")
        else:
            self.ensure_started()
            rid = message.rid or self.new_rid()
            if message.sender != self.inbox.name or message.rid != rid:
                message = dataclasses.replace(message, sender=self.inbox.name, rid=rid)
            wire = message.to_wire()
        rid = wire["rid"]
        waiter = _Waiter(many)
        with self._lock:
            self._waiters[rid] = waiter
        try:
            self._send_control_wire(wire, worker)
            deadline = time.monotonic() + timeout
            first_reply = float("inf")
            resend_at = time.monotonic() + resend if resend else float("inf")
            with waiter.cond:
                while True:
                    if waiter.replies and not many:
                        break
                    if until is not None and until(waiter.replies):
                        break
                    if settle is not None and waiter.replies:
                        deadline = min(deadline, first_reply + settle)
                    now = time.monotonic()
                    remaining = deadline - now
                    if remaining <= 0:
                        break
                    if resend and not waiter.replies:
                        if now >= resend_at:
                            waiter.cond.release()  # replies may come in meanwhile
                            try:
                                self._send_control_wire(wire, worker)
                            finally:
                                waiter.cond.acquire()
                            resend *= 2
                            resend_at = now + resend
                            continue
                        remaining = min(remaining, resend_at - now)
                    waiter.cond.wait(remaining)
                    if waiter.replies and first_reply == float("inf"):
                        first_reply = time.monotonic()
                return list(waiter.replies)
        finally:
            with self._lock:
                self._waiters.pop(rid, None)

    # -- watchers ----------
    def watch(self, watcher: Watcher) -> None:
        with self._lock:
            self._prune_unwatched()
            refs = self._watchers.setdefault(watcher.task_id, [])
            refs.append(weakref.ref(watcher))

    def unwatch(self, watcher: Watcher) -> None:
        """Forget ``watcher`` (a handle being collected) soon; never blocks.

        The garbage collector calls this from ``TaskHandle.__del__`` at any allocation,
        also in a thread that holds ``_lock`` (inside :meth:`watch`, say): taking the lock
        here deadlocked that thread and, with it, the inbox thread. The task id is queued
        instead (``deque.append`` is atomic) and pruned under the lock later.
        """
        self._unwatched.append(watcher.task_id)

    def _prune_unwatched(self) -> None:
        """Drop dead watchers of the task ids :meth:`unwatch` queued. Caller holds _lock."""
        while self._unwatched:
            task_id = self._unwatched.popleft()
            refs = self._watchers.get(task_id)
            if refs is not None:
                refs[:] = [r for r in refs if r() is not None]
                if not refs:
                    del self._watchers[task_id]

    def _watchers_of(self, task_id: str) -> list[Watcher]:
        with self._lock:
            refs = self._watchers.get(task_id)
            if not refs:
                return []
            alive = [w for w in (r() for r in refs) if w is not None]
            if len(alive) != len(refs):
                refs[:] = [weakref.ref(w) for w in alive]
            return alive

    def worker_last_seen(self, worker: str) -> float | None:
        return self._worker_seen.get(worker)

    def note_worker_alive(self, worker: str) -> None:
        self._worker_seen[worker] = time.monotonic()

    # -- the inbox thread ----------
    def _run(self) -> None:
        """The inbox thread: read, dispatch, keep subscriptions alive; reconnect with a
        growing delay when the broker goes away."""
        backoff = 0.2
        next_housekeeping = time.monotonic() + 1.0
        side = self._client_side()
        while not self._stop.is_set():
            session: InboxSession | None = None
            try:
                session = side.open_inbox(self.inbox)
                if self._ready.is_set():
                    logger.info("inbox reconnected to %s", self.app.broker_url_display)
                    self._renew(force=True)
                self._ready.set()
                backoff = 0.2
                while not self._stop.is_set():
                    for body in session.read(0.5):
                        self._handle_body(body)
                    now = time.monotonic()
                    if now >= next_housekeeping:
                        next_housekeeping = now + 1.0
                        self._housekeeping()
                        session.check()
                session.close(delete=True)
            except Exception as exc:
                if session is not None:
                    session.close(delete=False)
                if not self._ready.is_set():
                    self._thread_error = exc
                    self._ready.set()
                    return
                logger.warning("inbox connection lost (%s); reconnecting in %.1fs",
                               exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def _handle_body(self, body: bytes) -> None:
        """Decode one inbox message and dispatch it; a bad one is logged, never raised."""
        try:
            payload = codec.loads(body, self.app.conf.max_message_size)
            if not isinstance(payload, dict):
                raise ProtocolError("inbox message is not a map")
            self._dispatch(payload)
        except ProtocolError as exc:
            logger.warning("dropped a malformed inbox message: %s", exc)
        except Exception:
            logger.exception("error handling an inbox message")

    def _dispatch(self, payload: dict[str, Any]) -> None:
        kind = payload.get("t")
        worker = payload.get("worker")
        if isinstance(worker, str):
            self.note_worker_alive(worker)
        if kind == Envelope.EVENTS:
            for wire in payload.get("e") or ():
                event = Event.from_wire(wire)
                for w in self._watchers_of(event.task_id):
                    w._on_event(event)
        elif kind == Envelope.REPLY and "receipt" in payload:
            task_id, cseq = payload.get("task_id"), payload.get("receipt")
            if isinstance(task_id, str) and isinstance(cseq, int):
                with self._lock:
                    watcher = self._receipts.pop((task_id, cseq), None)
                if watcher is not None:
                    watcher._on_receipt(cseq)
        elif kind in (Envelope.REPLY, Envelope.SNAPSHOT):
            if kind == Envelope.SNAPSHOT:
                snapshot = TaskSnapshot.from_wire(payload.get("snapshot"))
                for w in self._watchers_of(snapshot.task_id):
                    w._on_snapshot(snapshot)
            rid = payload.get("rid")
            with self._lock:
                waiter = self._waiters.get(rid) if isinstance(rid, str) else None
            if waiter is not None:
                with waiter.cond:
                    waiter.replies.append(payload)
                    waiter.cond.notify_all()
        elif kind == Envelope.HEARTBEAT:
            pass  # liveness noted above
        else:
            raise ProtocolError(f"unknown inbox message type {kind!r}")

    def _housekeeping(self) -> None:
        with self._lock:
            self._prune_unwatched()
        self._renew(force=False)
        self._check_workers()

    _last_renew = 0.0

    def _renew(self, force: bool) -> None:
        """Re-subscribe to the tasks this process watches before workers expire them.

        One message per worker renews all of its tasks; a task whose worker is not known
        yet is located by broadcast, unless this client started it (its subscription rides
        in the task message and begins when a worker takes it).
        """
        now = time.monotonic()
        if not force and now - self._last_renew < RENEW_INTERVAL:
            return
        self._last_renew = now
        with self._lock:
            task_ids = list(self._watchers)
        by_worker: dict[str, list[str]] = {}
        to_locate: list[tuple[str, Watcher, int, int]] = []
        for task_id in task_ids:
            for w in self._watchers_of(task_id)[:1]:
                worker, run, seq, final, starter = w._watch_info()
                if final:
                    continue
                if worker is not None:
                    by_worker.setdefault(worker, []).append(task_id)
                elif not starter:
                    to_locate.append((task_id, w, run, seq))
        messages = [
            (ControlMessage(verb="subscribe", task_id=ids[0], data={"renew": ids},
                            sender=self.inbox.name), worker)
            for worker, ids in by_worker.items()
        ] + [
            (ControlMessage(verb="locate", task_id=task_id, data={"since": seq, "run": run},
                            sender=self.inbox.name, token=w.token), None)
            for task_id, w, run, seq in to_locate
        ]
        for message, target in messages:
            try:
                self.send_control(message, target)
            except Exception as exc:
                logger.debug("renewing subscriptions failed: %s", exc)

    def locate_soon(self, task_id: str, token: str | None) -> None:
        """Broadcast a locate for ``task_id`` without waiting for replies."""
        msg = ControlMessage(verb="locate", task_id=task_id, data={"since": 0},
                             sender=self.inbox.name, token=token)
        try:
            self.send_control(msg, None)
        except Exception as exc:
            logger.debug("locate of %s failed: %s", task_id, exc)

    def resync(self, task_id: str, worker: str | None, token: str | None) -> None:
        """Ask for a fresh snapshot of ``task_id`` (a watcher missed events); no waiting.

        Its worker if known, else every worker by broadcast; the snapshot comes to the
        inbox like an attach's.
        """
        if worker is None:
            self.locate_soon(task_id, token)
            return
        msg = ControlMessage(verb=Verb.SUBSCRIBE, task_id=task_id, sender=self.inbox.name,
                             rid=uuid.uuid4().hex, token=token)
        try:
            self.send_control(msg, worker)
        except Exception as exc:
            logger.debug("resync of %s failed: %s", task_id, exc)

    def _check_workers(self) -> None:
        now = time.monotonic()
        with self._lock:
            task_ids = list(self._watchers)
        for task_id in task_ids:
            for w in self._watchers_of(task_id):
                w._check_resync(now)
                worker, _run, _seq, final, _starter = w._watch_info()
                if final or worker is None:
                    continue
                seen = self._worker_seen.get(worker)
                if seen is not None and now - seen > WORKER_SILENCE:
                    w._on_worker_lost(worker)


def _before_publish(message: TaskMessage, routing_key: str) -> None:
    """``before_task_publish``: ``headers`` holds the message's headers with Celery's
    ``id`` and ``task``; keys a receiver adds or changes travel with the task."""
    headers = {**message.headers, "id": message.id, "task": message.task}
    signals.before_task_publish.send(
        sender=message.task, body=message.to_wire(), exchange="", routing_key=routing_key,
        headers=headers, properties={"reply_to": message.reply_to}, declare=[],
        retry_policy=None)
    for key, value in headers.items():
        if key not in ("id", "task") and key not in RESERVED_HEADERS:
            message.headers[key] = value
