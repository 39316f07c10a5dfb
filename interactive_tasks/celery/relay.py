"""The relay in Celery's main process: control in from the broker, events out to inboxes.

It speaks the itask worker's protocol (docs/architecture.md), so handles, ``itask
attach`` and the widget see a Celery worker as one more worker named by its Celery
hostname. Three jobs, one lock over the task table; *channels* and *upkeep* are a reader
and a timer on Celery's event loop (kombu Hub) when :meth:`Relay.start` is given one,
threads otherwise, and *control* is always threads:

* *channels*: accepts each pool process's connection on a Unix socket and reads its
  frames (``begin``, ``ev``, ``done``); numbers each task's events and publishes them to
  the task's watchers, in order;
* *control*: reads the worker's control queue and the broadcast queue and applies pause,
  resume, cancel, message, answer, subscribe, locate and ping, forwarding task verbs to
  the process that runs the task (a hard pause is SIGSTOP of that prefork child);
* *upkeep*: heartbeats to watching clients, expired subscriptions, forced cancels.

What a control verb decides (``worker/verbs.py``), the watchers and held control kept per
task (``worker/records.py``) and the batching of events per inbox (``worker/relay.py``)
are the itask worker's own code, one implementation for both.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import selectors
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from interactive_tasks import codec
from interactive_tasks.app import App
from interactive_tasks.errors import ProtocolError
from interactive_tasks.protocol import (
    FINAL_KINDS,
    READ_VERBS,
    STATE_AFTER,
    TASK_VERBS,
    ControlMessage,
    Envelope,
    Event,
    EventKind,
    TaskSnapshot,
    TaskState,
    Verb,
    receipt_reply,
)
from interactive_tasks.transport.threaded_side import threaded_side_for
from interactive_tasks.worker import verbs
from interactive_tasks.worker.ipc import ChannelClosed, FrameReader, FrameWriter, ctl_frame
from interactive_tasks.worker.pools.base import stop_process
from interactive_tasks.worker.records import HeldControl, Subscriber, expire
from interactive_tasks.worker.relay import heartbeats, queue_event

logger = logging.getLogger("interactive_tasks.celery")

#: finished tasks kept for late control (TaskFinished) and attach
FINISHED_KEPT = 500
#: after a forced cancel's SIGTERM, SIGKILL follows this much later
KILL_AFTER = 1.0


@dataclass
class _Conn:
    """One pool process's channel."""

    sock: socket.socket
    reader: FrameReader = field(default_factory=FrameReader)
    writer: FrameWriter | None = None
    pid: int | None = None
    tasks: set[str] = field(default_factory=set)


@dataclass
class _Task:
    """What the relay knows of one task (the itask worker's TaskRecord, reduced)."""

    id: str
    name: str
    conn: _Conn | None
    pid: int | None
    token_digest: str | None
    run: int = 1
    seq: int = 0
    state: TaskState = TaskState.RUNNING
    subscribers: dict[str, Subscriber] = field(default_factory=dict)
    history: collections.deque[Event] = field(
        default_factory=lambda: collections.deque(maxlen=200))
    progress: Event | None = None
    question: dict[str, Any] | None = None
    result: Any = None
    error: dict[str, Any] | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    last_cseq: dict[str, int] = field(default_factory=dict)
    hard_paused: bool = False
    #: wall time a hard pause was announced at: progress made before it (held back in the
    #: pool process, ``BlockingChannel.send_progress``) and read only after is stale
    stale_progress_before: float = 0.0
    cancel_requested: bool = False
    force_at: float | None = None
    kill_at: float | None = None

    @property
    def is_final(self) -> bool:
        return self.state.is_final

    def snapshot(self, hostname: str) -> TaskSnapshot:
        return TaskSnapshot(
            task_id=self.id, name=self.name, state=self.state, seq=self.seq, run=self.run,
            worker=hostname, pid=self.pid, progress=self.progress,
            events=tuple(self.history), question=self.question, result=self.result,
            error=self.error, started=self.started, finished=self.finished)


class Relay:
    """One per Celery worker process; :meth:`start` after the socket is bound."""

    def __init__(self, app: App, hostname: str, socket_path: str, *,
                 supports_hard_pause: bool, pool: str = "prefork", concurrency: int = 1,
                 queues: list[str] | None = None) -> None:
        self.app = app
        self.hostname = hostname
        self.socket_path = socket_path
        self.supports_hard_pause = supports_hard_pause
        self.pool = pool
        self.concurrency = concurrency
        self.queues = list(queues or ())
        self.started_at = time.time()
        self.processed = 0
        self.conns: list[_Conn] = []
        #: events (their wire form) waiting for the end of the current batch, per inbox
        self._outbox: dict[str, list[list[Any]]] = {}
        self._depth = 0
        self.lock = threading.RLock()
        self.tasks: dict[str, _Task] = {}
        self.finished: collections.OrderedDict[str, _Task] = collections.OrderedDict()
        self.held: dict[str, list[HeldControl]] = {}
        self.held_subscribers: dict[str, dict[str, Subscriber]] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        #: the worker's kombu Hub when the relay runs on it (see :meth:`start`)
        self.hub: Any = None
        self._hub_timer: Any = None
        self._next_beat = 0.0
        #: the broker side: inboxes, monitoring and control, whichever the broker
        self.side = threaded_side_for(app, hostname)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(socket_path)
        self.listener.listen(64)
        self.listener.setblocking(False)

    # -- lifecycle ----------
    def start(self, hub: Any = None) -> None:
        """Start reading the pool channels and the broker's control.

        With ``hub`` (the worker's kombu Hub) the pool channels are readers on that
        event loop and the upkeep a timer on it; without, each runs on a thread. The
        broker's control is read on threads either way (docs/celery-bridge.md, "Limits").
        """
        # What the threads import, imported here first: a pool process forked while a
        # thread held a module's import lock would hang importing that module.
        import kombu  # noqa: F401
        import redis  # noqa: F401

        self.app.connection().transport  # noqa: B018 - imports the broker's transport
        loops: list[tuple[Any, str]] = [(self._control_loop, "control")]
        if hub is None:
            loops += [(self._channels_loop, "channels"), (self._upkeep_loop, "upkeep")]
        else:
            self.hub = hub
            self._hub_register()
            self._next_beat = 0.0
            self._hub_timer = hub.call_repeatedly(0.1, self._hub_tick)
        for target, name in loops:
            thread = threading.Thread(target=target, name=f"itask-relay-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.side.has_control_list:
            thread = threading.Thread(target=self.side.read_control_list,
                                      args=(self._stop, self.on_body),
                                      name="itask-relay-ctl-list", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop the threads and close the socket and connections; idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        hub = self.hub
        if hub is not None:
            if self._hub_timer is not None:
                self._hub_timer.cancel()
            for sock in [self.listener, *(c.sock for c in self.conns)]:
                with contextlib.suppress(Exception):
                    hub.remove_reader(sock.fileno())
        for thread in self._threads:
            thread.join(3)
        for conn in list(self.conns):
            conn.sock.close()
        try:
            self.listener.close()
            os.unlink(self.socket_path)
        except OSError:
            pass
        self.side.close()

    # -- publishing ----------
    def publish_inbox(self, inbox: str, payload: dict[str, Any]) -> None:
        """Send one message to a client inbox; a broker error is logged, not raised."""
        try:
            self.side.publish_inbox(inbox, payload)
        except Exception as exc:
            logger.warning("could not publish to %s: %s", inbox, exc)

    def reply(self, inbox: str, rid: str | None, ok: bool, *, data: Any = None,
              error: tuple[str, str] | None = None, pending: bool = False) -> None:
        self.publish_inbox(inbox, verbs.reply_message(
            self.hostname, rid, ok, data=data, error=error, pending=pending))

    # -- events (caller holds the lock) ----------
    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """The relay's lock; events emitted under it go out when the outermost holder
        leaves, one message per inbox (and consecutive progress of a task coalesced)."""
        with self.lock:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.flush()

    def flush(self) -> None:
        """Publish the queued events, in order, at most 256 to a message."""
        outbox, self._outbox = self._outbox, {}
        for inbox, events in outbox.items():
            for start in range(0, len(events), 256):
                self.publish_inbox(inbox, {"t": Envelope.EVENTS, "worker": self.hostname,
                                           "e": events[start:start + 256]})

    def emit(self, task: _Task, kind: str, fields: dict[str, Any],
             ts: float | None = None) -> None:
        task.seq += 1
        event = Event(task.id, task.seq, kind, ts or time.time(), fields, task.run)
        state = STATE_AFTER.get(kind)
        if state is not None:
            task.state = state
        if kind == EventKind.PROGRESS:
            # the latest progress is kept on its own, as on the itask worker: in the
            # history a progress-heavy task would push out its messages and log lines
            task.progress = event
        else:
            task.history.append(event)
        if kind == EventKind.QUESTION:
            task.question = dict(fields)
        elif kind == EventKind.ANSWERED:
            task.question = None
        if kind in FINAL_KINDS:
            task.question = None
            task.finished = event.ts
            task.result = fields.get("result")
            task.error = fields.get("error")
        if task.subscribers:
            queue_event(self._outbox, event.to_wire(), task.subscribers)
        if kind in FINAL_KINDS:
            self._finish(task)

    def _finish(self, task: _Task) -> None:
        self.tasks.pop(task.id, None)
        self.processed += 1
        if task.conn is not None:
            task.conn.tasks.discard(task.id)
        self.finished[task.id] = task
        while len(self.finished) > FINISHED_KEPT:
            self.finished.popitem(last=False)
        wire = task.snapshot(self.hostname).to_wire()
        wire["events"] = wire["events"][-20:]
        try:
            self.app.results.put(task.id, wire)
        except Exception as exc:
            logger.warning("could not store the final state of %s: %s", task.id, exc)

    def revoked(self, task_id: str, name: str, info: dict[str, Any], reason: str) -> None:
        """Celery revoked the task (``revoke()``, or it expired) before or while it ran:
        its watchers get the final ``revoked`` event."""
        with self.batch():
            task = self.tasks.get(task_id)
            if task is None:
                if task_id in self.finished:
                    return
                task = _Task(id=task_id, name=name, conn=None, pid=None,
                             token_digest=info.get("token"))
                reply_to = info.get("reply_to")
                if isinstance(reply_to, str):
                    task.subscribers[reply_to] = Subscriber(reply_to, float("inf"), True)
                task.subscribers.update(self.held_subscribers.pop(task_id, {}))
                self.tasks[task_id] = task
            if not task.is_final:
                self.emit(task, EventKind.REVOKED, {"error": {
                    "type": "TaskRevokedError", "message": reason, "traceback": ""}})

    # -- the pool channels: on a thread, or readers on the worker's hub ----------
    def _channels_loop(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ, None)

        def watch(conn: _Conn) -> None:
            sel.register(conn.sock, selectors.EVENT_READ, conn)

        while not self._stop.is_set():
            for key, _ in sel.select(0.5):
                if key.data is None:
                    self._accept(watch)
                elif not self._read(key.data):
                    sel.unregister(key.data.sock)
                    key.data.sock.close()
                    self._on_closed(key.data)
        sel.close()

    def _accept(self, watch: Any) -> None:
        """A pool process connected: ``watch(conn)`` starts reading its channel."""
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        sock.setblocking(False)
        conn = _Conn(sock)
        conn.writer = FrameWriter(sock)
        with self.lock:
            self.conns.append(conn)
        watch(conn)

    def _read(self, conn: _Conn) -> bool:
        """Read what a pool process sent and act on its frames; False when its channel
        is gone (closed, or it wrote something that is not our framing)."""
        return self._read_once(conn) is not False

    def _read_once(self, conn: _Conn) -> bool | None:
        """One read of ``conn``: True if frames came, None if nothing was waiting, False
        if the channel is gone. The read happens under the relay's lock, so bytes read
        here are acted on before any control the lock holds back (a hard pause drains
        the channel under it, see :meth:`_drain`)."""
        with self.batch():
            try:
                data = conn.sock.recv(262144)
                if not data:
                    raise ChannelClosed("pool process closed its channel")
                frames = conn.reader.feed(data)
            except (BlockingIOError, InterruptedError):
                return None
            except (OSError, ChannelClosed, ProtocolError, ValueError) as exc:
                if not isinstance(exc, (OSError, ChannelClosed)):
                    # Not our framing: whatever wrote it is not a pool process of ours.
                    logger.warning("dropped a pool channel that sent a malformed "
                                   "frame: %s", exc)
                return False
            for frame in frames:
                try:
                    self._on_frame(conn, frame)
                except Exception as exc:
                    logger.warning("ignored a bad frame from pool process %s: %r",
                                   conn.pid, exc)
            return True

    def _drain(self, conn: _Conn) -> None:
        """Act on everything a stopped pool process wrote before it stopped (caller
        holds the lock); its channel's reader sees EOF or garbage again by itself."""
        while self._read_once(conn):
            pass

    def _hub_register(self) -> None:
        """Put the listener and every open channel on the hub, as readers. Celery resets
        its hub when the broker connection is lost, dropping every reader; the upkeep
        timer (which survives the reset) calls this again when that happened."""
        hub = self.hub
        hub.add_reader(self.listener.fileno(), self._hub_accept)
        for conn in list(self.conns):
            hub.add_reader(conn.sock.fileno(), self._hub_read, conn)

    def _hub_accept(self) -> None:
        self._accept(lambda conn: self.hub.add_reader(conn.sock.fileno(), self._hub_read,
                                                      conn))

    def _hub_read(self, conn: _Conn) -> None:
        try:
            alive = self._read(conn)
        except Exception:  # never into Celery's loop: it would restart the consumer
            logger.exception("relay error reading pool process %s", conn.pid)
            alive = True
        if not alive:
            with contextlib.suppress(Exception):
                self.hub.remove_reader(conn.sock.fileno())
            conn.sock.close()
            self._on_closed(conn)

    def _on_frame(self, conn: _Conn, frame: Any) -> None:
        op = frame[0]
        if op == "ready":
            conn.pid = int(frame[1])
        elif op == "begin":
            self._on_begin(conn, str(frame[1]), frame[2])
        elif op == "rc":  # the task took a message whose sender wants to know
            _, task_id, receipt = frame
            self.publish_inbox(receipt[0], receipt_reply(self.hostname, task_id, receipt[1]))
        elif op in ("ev", "done"):
            _, task_id, kind, fields, ts = frame
            task = self.tasks.get(task_id)
            if task is None or task.conn is not conn:
                return
            if kind == EventKind.PAUSED and task.hard_paused:
                return
            if kind == EventKind.PROGRESS and ts < task.stale_progress_before:
                return  # made before a hard pause stopped the process: not after "paused"
            if kind == EventKind.RETRY:
                self.emit(task, kind, fields, ts)
                task.conn = None
                return
            if op == "done" and kind == EventKind.FAILED and task.cancel_requested:
                # The task failed on its way out of a cancel (the SIGTERM of a forced
                # cancel raises in the child, so does code that swallows Cancelled).
                kind, fields = EventKind.CANCELLED, (
                    {"forced": True} if task.kill_at is not None else {})
            self.emit(task, kind, fields, ts)
            if op == "done" and not task.is_final:
                self._finish(task)

    def _on_begin(self, conn: _Conn, task_id: str, info: dict[str, Any]) -> None:
        previous = self.tasks.get(task_id) or self.finished.pop(task_id, None)
        # Redelivered after its worker was lost: the watchers saw run 1 from that one.
        first_run = 2 if info.get("redelivered") else 1
        run = previous.run + 1 if previous is not None else first_run
        task = _Task(id=task_id, name=str(info.get("name") or ""), conn=conn, pid=conn.pid,
                     token_digest=info.get("token"), run=run)
        if previous is not None:
            task.subscribers = dict(previous.subscribers)
        ttl = self.app.conf.subscription_ttl
        reply_to = info.get("reply_to")
        if isinstance(reply_to, str):  # the starter: as long as the task
            task.subscribers[reply_to] = Subscriber(reply_to, float("inf"), True)
        for inbox, sub in self.held_subscribers.pop(task_id, {}).items():
            task.subscribers.setdefault(
                inbox, Subscriber(inbox, max(sub.expires, time.monotonic() + ttl), True))
        self.tasks[task_id] = task
        conn.tasks.add(task_id)
        self.emit(task, EventKind.STARTED, {"worker": self.hostname, "pid": conn.pid})
        for held in sorted(self.held.pop(task_id, []), key=lambda h: h.cseq):
            self.apply_task_control(task, held)

    def _on_closed(self, conn: _Conn) -> None:
        """A pool process ended (killed by a forced cancel, or it died)."""
        with self.batch():
            if conn in self.conns:
                self.conns.remove(conn)
            for task_id in list(conn.tasks):
                task = self.tasks.get(task_id)
                if task is None or task.is_final:
                    continue
                if task.cancel_requested:
                    self.emit(task, EventKind.CANCELLED, {"forced": True})
                else:
                    self.emit(task, EventKind.FAILED, {"error": {
                        "type": "WorkerLostError",
                        "message": f"pool process {conn.pid} exited while running the task",
                        "traceback": ""}})

    def send_ctl(self, task: _Task, verb: str, data: Any, receipt: Any = None) -> None:
        conn = task.conn
        if conn is None or conn.writer is None:
            return
        try:
            conn.writer.write(ctl_frame(task.id, verb, data, receipt))
        except ChannelClosed:
            pass

    # -- control ----------
    def on_body(self, body: bytes, signed: bool) -> None:
        """One control message body (msgpack) from the broker."""
        secret = self.app.secret
        try:
            if secret is not None and not signed:
                raise ProtocolError("control message is unsigned or its signature is wrong")
            ctl = ControlMessage.from_wire(codec.loads(body, self.app.conf.max_message_size))
        except ProtocolError as exc:
            logger.warning("refused control message: %s", exc.reason)
            return
        with self.batch():
            try:
                self.handle(ctl, signed)
            except Exception as exc:
                logger.exception("error handling control %s", ctl.verb)
                if ctl.sender:
                    self.reply(ctl.sender, ctl.rid, False, error=("ControlError", str(exc)))

    def handle(self, ctl: ControlMessage, signed: bool) -> None:
        verb = ctl.verb
        if verb == Verb.PING:
            if ctl.sender:
                self.reply(ctl.sender, ctl.rid, True, data={"pong": True})
            return
        if verb == Verb.INSPECT:
            if ctl.sender:
                self.reply(ctl.sender, ctl.rid, True, data=self.inspect(ctl.data))
            return
        if verb == Verb.REVOKE:
            return  # Celery's own revoke reaches Celery workers; nothing held here
        task_id = ctl.task_id or ""
        task = self.tasks.get(task_id) or self.finished.get(task_id)
        if verb in READ_VERBS:
            self.handle_read(ctl, task, signed)
            return
        if verb in TASK_VERBS:
            held = verbs.held_control(ctl, signed)
            if task is not None:
                self.apply_task_control(task, held)
            elif inbox := verbs.hold(self.held, task_id, held):
                self.reply(inbox, ctl.rid, True, pending=True)

    def authorized(self, task: _Task, held: HeldControl) -> bool:
        return held.signed or codec.token_matches(held.token, task.token_digest)

    def apply_task_control(self, task: _Task, held: HeldControl) -> None:
        ok, error = verbs.outcome(held, task.id, task.last_cseq,
                                  authorized=self.authorized(task, held),
                                  apply=lambda: self._apply(task, held), log=logger)
        if held.sender and held.rid:
            self.reply(held.sender, held.rid, ok, error=error)

    def _apply(self, task: _Task, held: HeldControl) -> None:
        """Apply one task verb; ``verbs.Refused`` when the task cannot take it."""
        if task.is_final:
            raise verbs.ended(task.id, task.state)
        verb, data = held.verb, held.data
        if verb == Verb.PAUSE:
            if verbs.is_hard(data):
                if not self._can_signal(task):
                    raise verbs.Refused("HardPauseUnsupported",
                                        "hard pause needs the prefork pool; a soft pause "
                                        "works everywhere")
                if not task.hard_paused:
                    stop_process(task.pid)  # type: ignore[arg-type]
                    task.hard_paused = True
                    if task.conn is not None:
                        # What it wrote before it stopped comes before "paused": no
                        # progress of a frozen task reaches a watcher after the pause.
                        self._drain(task.conn)
                    if task.is_final:  # it ended in what was drained
                        self._continue(task)
                        raise verbs.ended(task.id, task.state)
                    # Progress it made before it stopped but had not written (held
                    # back while the relay was behind) must not follow "paused".
                    task.stale_progress_before = time.time()
                    self.emit(task, EventKind.PAUSED, {"hard": True})
            else:
                self.send_ctl(task, Verb.PAUSE, None)
        elif verb == Verb.RESUME:
            if task.hard_paused:
                self._continue(task)
                self.emit(task, EventKind.RESUMED, {"hard": True})
            else:
                self.send_ctl(task, Verb.RESUME, None)
        elif verb == Verb.CANCEL:
            grace = verbs.cancel_grace(data)
            task.cancel_requested = True
            if task.hard_paused:
                self._continue(task)
            self.send_ctl(task, Verb.CANCEL, None)
            if self._can_signal(task):
                task.force_at = time.monotonic() + grace
        elif verb == Verb.MESSAGE:
            self.send_ctl(task, Verb.MESSAGE, data, verbs.receipt_of(held))
        elif verb == Verb.ANSWER:
            self.send_ctl(task, Verb.ANSWER, verbs.answer(task.id, task.question, data))

    def _can_signal(self, task: _Task) -> bool:
        """Only a prefork child can be stopped or killed without stopping Celery."""
        return self.supports_hard_pause and task.pid is not None and \
            task.pid != os.getpid()

    def _continue(self, task: _Task) -> None:
        if task.pid is not None:
            os.kill(task.pid, signal.SIGCONT)
        task.hard_paused = False

    def handle_read(self, ctl: ControlMessage, task: _Task | None, signed: bool) -> None:
        sender = ctl.sender
        try:
            if verbs.read_settled(ctl, task.subscribers if task is not None else None,
                                  task.token_digest if task is not None else None,
                                  signed=signed,
                                  read_only_attach=self.app.conf.read_only_attach):
                return
            assert sender is not None  # read_settled settles a read without one
            expires = time.monotonic() + self.app.conf.subscription_ttl
            renew = verbs.renewals(ctl)
            if renew is not None:
                for task_id in renew:
                    renewed = self.tasks.get(task_id)
                    if renewed is None or verbs.extend(renewed.subscribers, sender,
                                                       expires) or \
                            not self.app.conf.read_only_attach:
                        continue  # a renewal extends a watch; it never starts one that
                        # needs the task's token
                    # Dropped while the client was away: take it back, with a snapshot so
                    # the client learns what it missed (its handle skips what it has).
                    renewed.subscribers[sender] = Subscriber(sender, expires, True)
                    self.flush()
                    self.publish_inbox(sender, verbs.snapshot_message(
                        self.hostname, None, renewed.snapshot(self.hostname).to_wire()))
                return
            if task is None:
                verbs.watch_unknown(ctl, self.held_subscribers, expires, self.hostname)
                return
        except verbs.Refused as exc:
            if sender:
                self.reply(sender, ctl.rid, False, error=exc.error)
            return
        _watch(task.subscribers, sender, expires)
        if ctl.verb == Verb.SUBSCRIBE and ctl.rid is None:
            return  # a renewal
        self.flush()  # the snapshot must not overtake an event it includes
        self.publish_inbox(sender, verbs.snapshot_message(
            self.hostname, ctl.rid, task.snapshot(self.hostname).to_wire()))

    def inspect(self, data: Any) -> Any:
        """``inspect active``/``tasks``/``stats`` as the itask worker answers them."""
        what = data.get("what") if isinstance(data, dict) else None
        if what == "active":
            return [self._summary(t) for t in self.tasks.values()]
        if what == "tasks":
            recent = list(self.finished.values())[-50:]
            return [self._summary(t) for t in [*self.tasks.values(), *recent]]
        if what == "registered":
            return []
        return self.stats()

    def _summary(self, task: _Task) -> dict[str, Any]:
        return {"id": task.id, "name": task.name, "state": task.state.value,
                "worker": self.hostname, "pid": task.pid,
                "progress": task.progress.to_wire() if task.progress else None,
                "received": task.started, "started": task.started,
                "finished": task.finished, "question": task.question,
                "interactive": True}

    def stats(self) -> dict[str, Any]:
        children = []
        for conn in self.conns:
            running = [t for t in (self.tasks.get(i) for i in conn.tasks) if t is not None]
            task = running[0] if running else None
            state = "idle"
            if task is not None:
                state = "stopped" if task.hard_paused else (
                    "paused" if task.state is TaskState.PAUSED else "busy")
            children.append({"pid": conn.pid, "state": state,
                             "task_id": task.id if task else None,
                             "task": task.name if task else None})
        return {"worker": self.hostname, "hostname": socket.gethostname(),
                "pid": os.getpid(), "pool": f"celery {self.pool}",
                "concurrency": self.concurrency, "children": children,
                "processed": self.processed, "active": len(self.tasks), "reserved": 0,
                "uptime": time.time() - self.started_at,
                "broker": self.app.broker_url_display, "queues": self.queues,
                "online": True}

    # -- broker control intake ----------
    def _control_loop(self) -> None:
        """kombu consumers: the broadcast queue, and the control queue off Redis."""
        from kombu import Consumer

        queues = self.side.control_queues
        backoff = 0.5
        while not self._stop.is_set():
            conn = self.app.connection()
            try:
                conn.ensure_connection(max_retries=1)
                consumer = Consumer(conn.channel(), queues=queues, accept=None,
                                    on_message=self._on_kombu_message, no_ack=True)
                consumer.consume()
                backoff = 0.5
                while not self._stop.is_set():
                    try:
                        conn.drain_events(timeout=0.5)
                    except TimeoutError:
                        pass
            except Exception as exc:
                logger.warning("relay control connection lost (%s); retrying", exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                try:
                    conn.release()
                except Exception:
                    pass

    def _on_kombu_message(self, message: Any) -> None:
        body = message.body
        if isinstance(body, str):
            body = body.encode()
        secret = self.app.secret
        signed = secret is not None and codec.verify(
            secret, body, (message.headers or {}).get(codec.SIGNATURE_HEADER))
        self.on_body(body, signed)

    # -- upkeep ----------
    def _upkeep_loop(self) -> None:
        every = self.app.conf.worker_heartbeat
        next_beat = 0.0
        while not self._stop.wait(0.1):
            next_beat = self._upkeep(time.monotonic(), next_beat, every)

    def _upkeep(self, now: float, next_beat: float, every: float) -> float:
        """Forced cancels that are due, and each ``every`` seconds heartbeats and expiry;
        returns when the next heartbeat is due."""
        with self.batch():
            self._force_due(now)
            if now >= next_beat:
                next_beat = now + every
                self._heartbeat()
                self._expire(now)
        return next_beat

    def _hub_tick(self) -> None:
        """The upkeep, as a timer on the worker's hub."""
        if self._stop.is_set():
            return
        try:
            if self.listener.fileno() not in self.hub.readers:
                self._hub_register()  # the hub was reset (see _hub_register)
            self._next_beat = self._upkeep(time.monotonic(), self._next_beat,
                                           self.app.conf.worker_heartbeat)
        except Exception:  # never into Celery's loop
            logger.exception("relay upkeep failed")

    def publish_monitor(self, payload: dict[str, Any]) -> None:
        """Publish on the fanout ``<ns>.events`` exchange (``itask top``, ``itask
        events``); dropped when nobody listens, logged when the broker fails."""
        try:
            self.side.publish_monitor(payload)
        except Exception as exc:
            logger.warning("could not publish monitoring events: %s", exc)

    def _heartbeat(self) -> None:
        self.publish_monitor({"t": "worker-heartbeat", "worker": self.hostname,
                              "ts": time.time(), "freq": self.app.conf.worker_heartbeat,
                              "stats": self.stats()})
        watched = ((t.id, t.subscribers) for t in self.tasks.values())
        for inbox, payload in heartbeats(self.hostname, watched):
            self.publish_inbox(inbox, payload)

    def _expire(self, now: float) -> None:
        expire(now, (t.subscribers for t in self.tasks.values()), self.held,
               self.held_subscribers)

    def _force_due(self, now: float) -> None:
        """A cancel whose grace ran out: SIGTERM the child, SIGKILL a second later.
        Celery's pool replaces the child; the task's channel closing ends it here."""
        for task in self.tasks.values():
            if task.is_final or task.pid is None:
                continue
            if task.force_at is not None and now >= task.force_at:
                task.force_at = None
                task.kill_at = now + KILL_AFTER
                logger.info("forcing task %s to stop: SIGTERM to pool process %s",
                            task.id, task.pid)
                _signal(task.pid, signal.SIGTERM)
            elif task.kill_at is not None and now >= task.kill_at:
                task.kill_at = None
                logger.info("forcing task %s to stop: SIGKILL to pool process %s",
                            task.id, task.pid)
                _signal(task.pid, signal.SIGKILL)


def _watch(subscribers: dict[str, Subscriber], inbox: str, expires: float) -> None:
    """``inbox`` watches the task until ``expires`` (the starter's watch stays for as
    long as the task runs)."""
    if not verbs.extend(subscribers, inbox, expires):
        subscribers[inbox] = Subscriber(inbox, expires, True)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


__all__ = ["Relay"]
