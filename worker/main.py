"""The worker: one event loop that consumes tasks and control, and relays to pool slots.

Everything runs on one thread, on a :class:`kombu.asynchronous.Hub` (the loop Celery uses):
broker sockets (or the embedded transport's poll timer), every slot's channel, and timers
(subscription expiry, heartbeats, forced cancel, time limits). Because one thread owns
all state there are no locks, and an event read from a slot is numbered, stored and
published in the same step.

Flow of a task: message → validated (else dead letter) → :class:`TaskRecord` → free slot
(``["run", job]``) → events (``["ev", ...]``) numbered and batched per subscriber inbox →
``["done", ...]`` → result stored → message acked → slot freed.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import time
from typing import TYPE_CHECKING, Any

from interactive_tasks import codec, signals
from interactive_tasks.app import App
from interactive_tasks.errors import ConfigurationError, ProtocolError, TransportError
from interactive_tasks.protocol import (
    HEADER_DELIVERIES,
    WORKFLOW_HEADERS,
    EventKind,
    TaskMessage,
    TaskState,
    Verb,
    receipt_reply,
)
from interactive_tasks.task import parse_rate
from interactive_tasks.transport import incarnation
from interactive_tasks.transport.frames import redeliveries, task_envelope
from interactive_tasks.transport.upkeep import SCHEDULE_AHEAD, upkeep_for
from interactive_tasks.transport.worker_side import intake_for

from .canvas import Workflows, after_finish
from .control import ControlRouter
from .inbound import decode_body, signed_by
from .ipc import ChannelClosed, ctl_frame
from .outcomes import Outcomes, error_fields
from .pools.base import Pool, PoolSlot, release_free_memory, resident_kb
from .pools.green_channel import CLOSED, decode
from .records import Receipt, Subscriber, TaskRecord
from .relay import Relay
from .remote import WorkerControl
from .state import WorkerState

if TYPE_CHECKING:
    from kombu import Producer
    from kombu.asynchronous import Hub

    from .autoscale import Autoscaler

logger = logging.getLogger("interactive_tasks.worker")

#: a connection that served this long (seconds) before it broke starts the reconnect
#: delays over from the shortest
RECONNECT_RESET = 30.0
#: bytes read from one pool slot's channel per turn of the loop: a slot that floods the
#: worker with progress is read in this many bytes at a time, with control handled
#: between (docs/architecture.md, "The path of an event")
SLOT_READ_BYTES = 1 << 14
#: frames taken from a green pool's inbox per turn of the loop, with control handled
#: between (worker.pools.green_channel)
INBOX_BATCH = 256


def make_pool(name: str, app: App, concurrency: int, hostname: str,
              max_tasks_per_child: int | None) -> Pool:
    """The pool class for ``--pool NAME``; raises ConfigurationError for an unknown name
    or a pool whose extra is not installed."""
    if name == "prefork":
        from .pools.prefork import PreforkPool

        return PreforkPool(app, concurrency, hostname, max_tasks_per_child)
    if name == "threads":
        from .pools.threads import ThreadsPool

        return ThreadsPool(app, concurrency, hostname, max_tasks_per_child)
    if name == "solo":
        from .pools.threads import SoloPool

        return SoloPool(app, 1, hostname, max_tasks_per_child)
    if name == "gevent":
        try:
            import gevent  # noqa: F401
        except ImportError:
            raise ConfigurationError("--pool gevent needs gevent: pip install "
                                     '"interactive_tasks[gevent]"') from None
        from .pools.gevent import GeventPool

        return GeventPool(app, concurrency, hostname, max_tasks_per_child)
    if name == "eventlet":
        from interactive_tasks._eventlet import import_eventlet

        try:
            import_eventlet()
        except ImportError:
            raise ConfigurationError("--pool eventlet needs eventlet: pip install "
                                     '"interactive_tasks[eventlet]"') from None
        # eventlet's own warning is many lines at every start (see import_eventlet)
        logger.warning("eventlet is deprecated upstream (bug fixes only); the gevent pool "
                       "(-P gevent) is recommended")
        from .pools.eventlet import EventletPool

        return EventletPool(app, concurrency, hostname, max_tasks_per_child)
    raise ConfigurationError(f"unknown pool {name!r}; choose prefork, threads, solo, gevent "
                             "or eventlet")


class TokenBucket:
    """Celery-style rate limit: ``"10/s"``, ``"100/m"``, ``"1000/h"`` starts per worker."""

    def __init__(self, per_second: float) -> None:
        self.interval = 1.0 / per_second
        self.next_free = time.monotonic()

    @classmethod
    def parse(cls, spec: str) -> TokenBucket:
        """Raises ValueError for a malformed spec."""
        return cls(parse_rate(spec))

    def take(self) -> float:
        """0 when a start is allowed now (and taken), else the seconds to wait."""
        now = time.monotonic()
        if now >= self.next_free:
            self.next_free = max(now, self.next_free) + self.interval
            return 0.0
        return self.next_free - now


class Worker:
    """A worker node. ``Worker(app, hostname="w1@host").run()`` blocks until shutdown."""

    def __init__(
        self,
        app: App,
        *,
        hostname: str | None = None,
        pool: str = "prefork",
        concurrency: int | None = None,
        queues: list[str] | None = None,
        max_tasks_per_child: int | None = None,
        shutdown_timeout: float | None = None,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        max_memory_per_child: int | None = None,
        autoscale: tuple[int, int] | None = None,
        autoscale_keepalive: float | None = None,
    ) -> None:
        self.app = app
        #: KB of resident memory after which a pool process is replaced once its task ends
        self.max_memory_per_child = max_memory_per_child
        #: the limits of tasks that set none (``--time-limit``; else ``task_time_limit``)
        self.time_limit = app.conf.task_time_limit if time_limit is None else time_limit
        self.soft_time_limit = (app.conf.task_soft_time_limit if soft_time_limit is None
                                else soft_time_limit)
        self.hostname = hostname or f"worker-{os.getpid()}@{socket.gethostname()}"
        #: this start of the worker, as the broker's liveness record knows it
        self.incarnation = incarnation(self.hostname)
        self.concurrency = 1 if pool == "solo" else (concurrency or os.cpu_count() or 1)
        #: ``--autoscale``: the pool's size follows the work between MIN and MAX slots
        self.autoscaler: Autoscaler | None = None
        if autoscale is not None and pool != "solo":
            from .autoscale import DEFAULT_KEEPALIVE, Autoscaler

            # Reserve for MAX from the start (as Celery), so a backlog is seen to grow for.
            self.concurrency = autoscale[0]
            self.autoscaler = Autoscaler(*autoscale, keepalive=DEFAULT_KEEPALIVE
                                         if autoscale_keepalive is None else autoscale_keepalive)
        elif autoscale is not None:
            logger.warning("--autoscale does not apply to the solo pool (one slot); ignored")
        self.pool = make_pool(pool, app, self.concurrency, self.hostname, max_tasks_per_child)
        for option, value in (("--max-tasks-per-child", max_tasks_per_child),
                              ("--max-memory-per-child", max_memory_per_child)):
            if value and not self.pool.separate_processes:
                logger.warning("%s applies to the prefork pool only (the %s pool's tasks "
                               "share the worker's process); ignored", option, pool)
        self.queue_names = queues or [app.conf.task_default_queue]
        self.shutdown_timeout = (
            app.conf.shutdown_timeout if shutdown_timeout is None else shutdown_timeout
        )
        #: what the worker's parts share (they get it, not the worker)
        self.state = state = WorkerState(app, self.hostname, self.pool, self.concurrency,
                                         self.queue_names, self.autoscaler)
        # The loop's own names for the shared containers (never rebound).
        self.slots = state.slots
        self.records = state.records
        self.finished = state.finished
        self.ready = state.ready
        self.held = state.held
        self.held_subscribers = state.held_subscribers
        self.revoked = state.revoked
        self._stopping = False
        self._stop_deadline: float | None = None
        self._terminate = False
        self.connection: Any = None
        self.upkeep = upkeep_for(app, self.incarnation, self._on_declared_dead, self.records,
                                 self._give_back)
        self._buckets: dict[str, TokenBucket | None] = {}
        self.relay = Relay(state)
        self.workflows = Workflows(app, self.relay, self.publish_task)
        self.outcomes = Outcomes(state, relay=self.relay, upkeep=self.upkeep,
                                 workflows=self.workflows, publish_task=self.publish_task)
        self.control = ControlRouter(state, relay=self.relay, outcomes=self.outcomes,
                                     workflows=self.workflows, upkeep=self.upkeep,
                                     send_ctl=self.send_ctl, drain_slot=self.drain_slot)
        self.intake = intake_for(app, self.hostname, on_task=self._on_task_message,
                                 on_garbage=self.outcomes.dead_letter,
                                 on_control=self.control.on_message,
                                 on_control_frames=self.control.on_frames)
        self.remote = WorkerControl(state, self._buckets, self.intake, self.begin_shutdown,
                                    self._rates_changed,
                                    lambda: (self.soft_time_limit, self.time_limit),
                                    self.resize_pool)
        self.control.remote = self.remote
        #: slots that may be free, oldest first (checked when taken: see _free_slot)
        self._maybe_free: dict[PoolSlot, None] = {}
        self._exit_code = 0
        self._rate_timer = False
        self._spawn_failures = 0
        self._ready_sent = False

    @property
    def hub(self) -> Hub | None:
        """The loop while connected, else None."""
        return self.state.hub

    @hub.setter
    def hub(self, hub: Hub | None) -> None:
        self.state.hub = hub

    @property
    def producer(self) -> Producer | None:
        """The kombu producer of the worker's connection while connected, else None."""
        return self.state.producer

    @producer.setter
    def producer(self, producer: Producer | None) -> None:
        self.state.producer = producer

    @property
    def processed(self) -> int:
        """Tasks finished here since the start."""
        return self.state.processed

    @processed.setter
    def processed(self, count: int) -> None:
        self.state.processed = count

    @property
    def started_at(self) -> float:
        return self.state.started_at

    # -- lifecycle ----------
    def run(self) -> int:
        """Start the pool, connect, and serve until SIGTERM/SIGINT. Returns the exit code."""
        self._install_signals()
        app = self.app
        self.app.finalize()
        signals.worker_init.send(sender=self)
        logger.info("worker %s starting: pool=%s concurrency=%d queues=%s broker=%s",
                    self.hostname, self.pool.name, self.concurrency,
                    ",".join(self.queue_names), app.broker_url_display)
        if app.embedded_directory is not None:
            logger.info("embedded broker files: %s", app.embedded_directory)
        # The pool forks before anything here touches the broker: a child starts as a copy
        # of this process, and the first connection imports the broker's client library
        # (redis-py, with its asyncio and cluster modules) that a pool
        # process needs only if its task publishes. Children that replace these later fork
        # from the full worker.
        # What is frozen (gc.freeze) is left out of the children's garbage collector
        # passes too: a full pass in a child would write to every object it inherited,
        # copying the pages they sit on (some 5 MB a child). CPython's advice for
        # servers that fork without exec.
        gc.freeze()
        release_free_memory()
        first = self.autoscaler.min if self.autoscaler is not None else self.concurrency
        for index in range(first):
            self.slots.append(self.pool.spawn(index))
        # What start-up made lives as long as the worker (the app, its modules, every
        # slot: with a green pool thousands of greenlets and their channels): out of the
        # garbage collector's full passes, which otherwise walk all of it every few
        # seconds while events are relayed, stopping the loop for each pass.
        gc.freeze()
        try:
            self.revoked.update(app.results.revoked())
        except Exception as exc:
            logger.warning("could not load revoked task ids: %s", exc)
        backoff = 0.5
        recoverable: tuple[type[BaseException], ...] = (
            TransportError, *self._connection_errors())
        try:
            while not self._terminate:
                connected_at = time.monotonic()
                try:
                    self._serve_connected()
                    break
                except recoverable as exc:
                    if self._terminate or (self._stopping and not self.records):
                        break
                    if time.monotonic() - connected_at > RECONNECT_RESET:
                        backoff = 0.5  # it served a while: a new outage, not the same one
                    logger.warning("broker connection lost (%s); reconnecting in %.1fs",
                                   exc, backoff)
                    self._teardown_connection()
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 10.0)
        finally:
            self._shutdown_pool()
            self._teardown_connection()
            if self.pool.inbox is not None:
                self.pool.inbox.close()  # green slots still ending write nowhere now
            self.upkeep.close(clean=not self.records)
        signals.worker_shutdown.send(sender=self)
        logger.info("worker %s stopped", self.hostname)
        return self._exit_code

    def _connection_errors(self) -> tuple[type[BaseException], ...]:
        conn = self.app.connection()
        return tuple(conn.connection_errors) + tuple(conn.channel_errors) + (OSError,)

    def _install_signals(self) -> None:
        def on_signal(signum: int, frame: Any) -> None:
            if self._stopping:
                logger.warning("second signal: stopping now, running tasks will be "
                               "delivered again")
                self._terminate = True
                if self.hub is not None:
                    self.hub.call_soon(self._check_stop)
            else:
                self.begin_shutdown(signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def begin_shutdown(self, reason: str) -> None:
        """Start a warm shutdown (SIGTERM, or the ``shutdown`` remote control)."""
        if self._stopping:
            return
        logger.info("%s: warm shutdown, finishing running tasks (up to %.0fs); "
                    "send SIGTERM again to stop now", reason, self.shutdown_timeout)
        self._stopping = True
        self._stop_deadline = time.monotonic() + self.shutdown_timeout
        if self.hub is not None:
            self.hub.call_soon(self._check_stop)

    def _serve_connected(self) -> None:
        # kombu is imported on the first connection, after the pool has forked: the pool
        # processes need none of it (transport.kombu_transports).
        from kombu import Producer

        from .order import ControlFirstHub  # a kombu Hub

        app = self.app
        names = app.names
        self.hub = hub = ControlFirstHub(self.intake.is_control, self._is_slot_reader)
        conn = app.connection(self.upkeep.transport_options, heartbeat=True)
        try:
            conn.ensure_connection(max_retries=1, timeout=10)
        except Exception as exc:
            raise TransportError(f"cannot reach the broker at {app.broker_url_display}: "
                                 f"{exc}") from exc
        self.connection = conn
        self.producer = Producer(conn.channel())
        self.relay.reset()
        prefetch = self.concurrency * app.conf.prefetch_multiplier
        self.intake.start(conn, hub, self.queue_names, prefetch, take_tasks=not self._stopping)
        dead = names.dead_letter_queue
        dead.bind(self.producer.channel).declare()
        conn.transport.register_with_event_loop(conn.connection, hub)
        for slot in self.slots:
            if not slot.closed:
                self._add_slot_reader(slot)
        if self.pool.inbox is not None:
            hub.add_reader(self.pool.inbox.fileno(), self._on_inbox_readable)
        try:
            self.upkeep.start(hub, conn)  # before the first fetch: nothing taken is unowned
        except Exception as exc:
            raise TransportError(f"cannot reach the broker at {app.broker_url_display}: "
                                 f"{exc}") from exc
        hub.call_repeatedly(app.conf.worker_heartbeat, self.relay.heartbeat)
        hub.call_repeatedly(1.0, self.relay.expire)
        hub.call_repeatedly(0.1, self._check_limits)
        if self.autoscaler is not None:
            hub.call_repeatedly(1.0, self._autoscale_down)
        self.relay.publish_monitor({"t": "worker-online", "worker": self.hostname,
                                    "ts": time.time()})
        logger.info("worker %s ready", self.hostname)
        if not self._ready_sent:  # once, not again after a reconnect
            self._ready_sent = True
            signals.worker_ready.send(sender=self)
        self._dispatch()
        self.intake.after_registered(hub, take_tasks=not self._stopping)
        intake = self.intake
        loop = hub.create_loop()
        while not self._terminate:
            if self._stopping and self._check_stop():
                break
            intake.pump()
            next(loop)
        self.relay.flush(wait=True)
        self.relay.publish_monitor({"t": "worker-offline", "worker": self.hostname,
                                    "ts": time.time()})

    def _teardown_connection(self) -> None:
        try:
            self.relay.detach()
        except Exception as exc:
            logger.warning("could not finish sending to the broker: %s", exc)
        hub, self.hub = self.hub, None
        if hub is not None:
            try:
                hub.close()
            except Exception:
                pass
        conn, self.connection = self.connection, None
        self.producer = None
        self.intake.close()
        if conn is not None:
            try:
                conn.release()
            except Exception:
                pass

    def _check_stop(self) -> bool:
        """During warm shutdown: stop consuming, give back queued tasks, wait for running."""
        if not self._stopping:
            return False
        self.intake.stop_tasks()
        while self.ready:  # reserved here but not started: back to the queue for others
            self._requeue(self.ready.popleft())
        running = [r for r in self.records.values() if r.slot is not None]
        if not running:
            return True
        if self._stop_deadline is not None and time.monotonic() > self._stop_deadline:
            logger.warning("shutdown timeout: %d task(s) still running will be delivered "
                           "again", len(running))
            self._terminate = True
            return True
        return False

    def _on_declared_dead(self) -> None:
        """Other workers took this one for dead: each running task may run elsewhere too,
        so its end is checked against the stored result before it is reported."""
        for record in self.records.values():
            record.maybe_redelivered = True

    def _give_back(self, record: TaskRecord) -> None:
        """A task that waited here too long without starting goes to the end of its queue
        (its delivery count unchanged), for any worker to take."""
        try:
            self.ready.remove(record)  # when it comes back it is a new record
        except ValueError:
            pass
        self.outcomes.republish(record, deliveries=record.delivery)

    def _requeue(self, record: TaskRecord) -> None:
        self.records.pop(record.id, None)
        try:
            record.kombu_message.reject(requeue=True)
        except Exception as exc:
            logger.warning("could not requeue task %s: %s", record.id, exc)

    def _shutdown_pool(self) -> None:
        live = [s for s in self.slots if not s.closed]
        if self._terminate:
            self.pool.terminate(live)
        else:
            self.pool.stop(live, 5.0)

    # -- broker input: tasks -------------------------------------------------------------------
    def _on_task_message(self, message: Any) -> None:
        try:
            if not signed_by(self.app, message):
                raise ProtocolError("message is unsigned or its signature is wrong "
                                    "(the sender lacks the app's secret)", message.body)
            payload = decode_body(self.app, message)
            task_message = TaskMessage.from_wire(payload)
        except ProtocolError as exc:
            reply_to = None
            try:
                candidate = codec.loads(message.body)
                if isinstance(candidate, dict) and isinstance(candidate.get("reply_to"), str):
                    reply_to = candidate
            except Exception:
                pass
            self.outcomes.dead_letter(message, exc.reason)
            if reply_to is not None and isinstance(reply_to.get("id"), str) and \
                    signed_by(self.app, message):
                self.relay.send_final_direct(reply_to["id"], str(reply_to.get("task", "?")),
                                             reply_to["reply_to"], EventKind.FAILED,
                                             {"error": error_fields("ProtocolError", exc.reason)})
            return
        try:
            self._accept_task(task_message, message)
        except Exception as exc:  # a message we cannot handle must not stop the worker
            logger.exception("could not accept task %s", task_message.id)
            if task_message.id not in self.records:
                self.outcomes.dead_letter(message, f"could not accept the task: {exc!r}")

    def _accept_task(self, msg: TaskMessage, message: Any) -> None:
        existing = self.records.get(msg.id)
        if existing is not None and not existing.is_final:
            # The broker delivered it again (reconnect); the newest delivery is the one
            # to acknowledge when it ends.
            logger.info("task %s delivered again while it runs here; keeping one run", msg.id)
            existing.duplicates.append(message)
            return
        try:
            task = self.app.get_task(msg.task)
        except Exception as exc:
            self._reject_task(msg, message, str(exc), "UnknownTask")
            return
        raw_deliveries = msg.headers.get(HEADER_DELIVERIES, 1)
        delivery = raw_deliveries if isinstance(raw_deliveries, int) and raw_deliveries > 0 \
            else 1
        earlier = redeliveries(message, self.app.conf.namespace)
        if earlier:
            delivery += earlier
            stored = self._stored_final(msg.id)
            if stored:
                logger.info("task %s was already finished; not running it again", msg.id)
                message.ack()
                return
        if delivery > self.app.conf.max_deliveries:
            reason = (f"delivered {delivery} times without finishing "
                      f"(max_deliveries={self.app.conf.max_deliveries})")
            self._reject_task(msg, message, reason, "WorkerLost")
            return
        record = TaskRecord(msg, message, task.interactive, self.app.conf.event_history,
                            delivery=delivery, run=msg.retries + delivery)
        record.worker = self.hostname
        # A task's own limit wins over the worker's default, as in Celery.
        own_limit, own_soft = task.time_limit, task.soft_time_limit
        record.time_limit = self.time_limit if own_limit is None else own_limit
        record.soft_time_limit = self.soft_time_limit if own_soft is None else own_soft
        now = time.monotonic()
        if msg.reply_to:
            # A starter that only wants the result keeps its subscription for the task's
            # life: one message at the end. Streaming subscriptions expire unless renewed.
            everything = msg.watch == "all"
            expires = now + self.app.conf.subscription_ttl if everything else float("inf")
            record.subscribers[msg.reply_to] = Subscriber(msg.reply_to, expires, everything)
        for sub in self.held_subscribers.pop(msg.id, {}).values():
            record.subscribers.setdefault(sub.inbox, sub)
        self.records[msg.id] = record
        self.relay.task_event("task-received", record)
        logger.info("Task %s[%s] received", msg.task, msg.id)  # as Celery's worker
        if msg.expires is not None and msg.expires < time.time():
            self.outcomes.finish(record, EventKind.REVOKED, {
                "error": error_fields("TaskRevoked", "expired before it started")})
            return
        revoked = self.revoked.get(msg.id)
        if revoked is not None and self.control.revoke_applies(revoked, record):
            self.outcomes.finish(record, EventKind.REVOKED, {
                "error": error_fields("TaskRevoked", "revoked before it started")})
            return
        for held in sorted(self.held.pop(msg.id, []), key=lambda h: (h.sender or "", h.cseq)):
            self.control.apply_task_control(record, held)
        if record.is_final:
            return
        if msg.eta is not None and msg.eta > time.time():
            assert self.hub is not None
            # kombu's timer runs on the monotonic clock: convert the wall-clock ETA.
            delay = max(0.0, msg.eta - time.time())
            record.timers.append(self.hub.call_later(delay, self._eta_due, record))
            return
        self.ready.append(record)
        self._dispatch()

    def _reject_task(self, msg: TaskMessage, message: Any, reason: str, type_: str) -> None:
        """A valid message we will not run: dead letter, a final ``failed`` for its
        watchers and result, and the end of any workflow it belongs to."""
        self.outcomes.dead_letter(message, reason)
        fields = {"error": error_fields(type_, reason)}
        self.relay.send_final_direct(msg.id, msg.task, msg.reply_to, EventKind.FAILED,
                                     fields, store=True)
        if any(header in msg.headers for header in WORKFLOW_HEADERS):
            after_finish(self.workflows, msg, EventKind.FAILED, fields)

    def _eta_due(self, record: TaskRecord) -> None:
        if record.is_final or record.id not in self.records:
            return
        self.ready.append(record)
        self._dispatch()

    def _stored_final(self, task_id: str) -> bool:
        try:
            record = self.app.results.get(task_id)
        except Exception:
            return False
        return bool(record and TaskState(record.get("state", "pending")).is_final)

    # -- dispatch to the pool ----------
    def _free_slot(self) -> PoolSlot | None:
        """The free slot that has waited longest, or None. Slots that turn free (ready,
        done) are noted in ``_maybe_free``; one that no longer is gets dropped here, so
        finding one costs nothing per idle or busy slot of the pool."""
        maybe = self._maybe_free
        while maybe:
            slot = next(iter(maybe))
            if slot.ready and slot.task_id is None and not slot.closed and not slot.retiring:
                return slot
            del maybe[slot]
        return None

    def _dispatch(self) -> None:
        """Start ready tasks on free slots, in order, honouring per-task rate limits."""
        if not self.ready:
            return
        held_back: list[TaskRecord] = []
        wait = None
        while self.ready:
            slot = self._free_slot()
            if slot is None:
                break
            record = self.ready.popleft()
            if record.is_final or record.id not in self.records:
                continue
            expires = record.message.expires
            if expires is not None and expires < time.time():
                self.outcomes.finish(record, EventKind.REVOKED, {
                    "error": error_fields("TaskRevoked", "expired before it started")})
                continue
            bucket = self._bucket(record.name)
            delay = bucket.take() if bucket is not None else 0.0
            if delay > 0:
                held_back.append(record)
                wait = delay if wait is None else min(wait, delay)
                continue
            self._start_on(record, slot)
        self.ready.extendleft(reversed(held_back))
        if self.ready and self.autoscaler is not None:
            self._autoscale_up()
        if wait is not None and self.hub is not None and not self._rate_timer:
            self._rate_timer = True
            self.hub.call_later(wait, self._rate_wakeup)

    # -- pool size ----------
    def _demand(self) -> int:
        """Tasks that want a slot now: running, and ready for a free one."""
        return sum(1 for slot in self.slots if slot.busy) + len(self.ready)

    def _autoscale_up(self) -> None:
        assert self.autoscaler is not None
        if self._stopping:
            return
        more = self.autoscaler.grow_by(len(self.slots), self._demand())
        if more:
            logger.info("autoscale: %d task(s) want a slot; growing the pool from %d to %d",
                        self._demand(), len(self.slots), len(self.slots) + more)
            self.grow_pool(more)

    def _autoscale_down(self) -> None:
        assert self.autoscaler is not None
        if self._stopping:
            return
        fewer = self.autoscaler.shrink_by(len(self.slots), self._demand())
        if fewer and self.shrink_pool(fewer):
            logger.info("autoscale: no growth for %.0fs; pool shrunk to %d",
                        self.autoscaler.keepalive, len(self.slots))

    def resize_pool(self, verb: str, count: int, minimum: int | None) -> str:
        """Remote control: ``pool_grow`` / ``pool_shrink`` by ``count`` slots, or
        ``autoscale`` to ``count`` (max) and ``minimum``. Returns what was done; raises
        ControlRefused where it cannot apply (as Celery, ``pool_grow`` / ``pool_shrink``
        are refused under ``--autoscale``: change its range instead)."""
        from .remote import ControlRefused

        if self.pool.name == "solo":
            raise ControlRefused("ControlError", f"{verb}: the solo pool has one slot")
        scaler = self.autoscaler
        if verb == Verb.AUTOSCALE:
            if scaler is None:
                raise ControlRefused("ControlError", "autoscale: this worker was not "
                                                     "started with --autoscale")
            scaler.max = count
            scaler.min = scaler.min if minimum is None else minimum
            scaler.min = min(scaler.min, scaler.max)
            self._set_concurrency(scaler.max)
            if len(self.slots) < scaler.min:
                self.grow_pool(scaler.min - len(self.slots))
            self._autoscale_up()  # a backlog the old maximum held back
            # (slots above a lower maximum stop when idle, after the keepalive)
            return f"autoscale now max={scaler.max} min={scaler.min}"
        if scaler is not None:
            raise ControlRefused("ControlError", f"{verb} is not supported with --autoscale; "
                                                 "change the autoscale range instead")
        if verb == Verb.POOL_GROW:
            self.grow_pool(count)
            self._set_concurrency(len(self.slots))
            return f"pool grew by {count} to {len(self.slots)}"
        stopped = self.shrink_pool(min(count, len(self.slots) - 1))
        if not stopped:
            raise ControlRefused("ControlError", "pool_shrink: no idle slot to stop (a busy "
                                                 "one is never stopped, the last one stays)")
        self._set_concurrency(len(self.slots))
        return f"pool shrank by {stopped} to {len(self.slots)}"

    def _set_concurrency(self, count: int) -> None:
        """The pool's nominal size changed: reserve for it from now on."""
        self.concurrency = self.state.concurrency = count
        if self.connection is not None:
            self.intake.set_prefetch(count * self.app.conf.prefetch_multiplier)

    def grow_pool(self, count: int) -> None:
        """Start ``count`` more slots (Celery's ``pool_grow``)."""
        used = {slot.index for slot in self.slots}
        index = 0
        for _ in range(count):
            while index in used:
                index += 1
            used.add(index)
            slot = self.pool.spawn(index)
            self.slots.append(slot)
            self._add_slot_reader(slot)

    def shrink_pool(self, count: int) -> int:
        """Stop up to ``count`` idle slots (Celery's ``pool_shrink``; a busy slot is never
        stopped). Returns how many were stopped."""
        idle = [slot for slot in self.slots
                if not slot.busy and not slot.retiring and not slot.closed]
        # Slots still starting first, then the newest: the oldest keep their warm caches.
        idle.sort(key=lambda slot: (slot.ready, -slot.index))
        stopping = idle[:count]
        for slot in stopping:
            # Out of the pool now: nothing is dispatched to it, and when its channel
            # closes it is not replaced (see _on_slot_closed).
            self.slots.remove(slot)
            self._retire(slot)
        return len(stopping)

    def _rates_changed(self) -> None:
        """A rate limit changed: what the old one held back may start now, and the next
        wait is the new limit's (a stale wake-up only dispatches early)."""
        self._rate_timer = False
        self._dispatch()

    def _rate_wakeup(self) -> None:
        self._rate_timer = False
        self._dispatch()

    def _acks_late(self, name: str) -> bool:
        task = self.app.tasks.get(name)
        option = getattr(task, "acks_late", None)
        return self.app.conf.acks_late if option is None else bool(option)

    def _bucket(self, name: str) -> TokenBucket | None:
        if name not in self._buckets:
            task = self.app.tasks.get(name)
            limit = getattr(task, "rate_limit", None)
            self._buckets[name] = TokenBucket.parse(limit) if limit else None
        return self._buckets[name]

    def _start_on(self, record: TaskRecord, slot: PoolSlot) -> None:
        msg = record.message
        job = {
            "id": msg.id, "task": msg.task, "args": msg.args, "kwargs": msg.kwargs,
            "retries": msg.retries, "delivery": record.delivery, "headers": msg.headers,
            "paused": record.start_paused, "eta": msg.eta, "expires": msg.expires,
            "soft_time_limit": record.soft_time_limit,
        }
        slot.task_id = record.id
        record.slot = slot
        record.pid = slot.pid
        record.started = time.time()
        record.run_started_mono = time.monotonic()
        try:
            slot.writer.write(["run", job])
            for verb, data, receipt in record.early_messages:
                slot.writer.write(ctl_frame(record.id, verb, data, receipt))
            record.early_messages.clear()
        except ChannelClosed:
            pass  # noticed by the reader; the slot's death handling takes over
        self._watch_writer(slot)
        self.relay.emit(record, EventKind.STARTED, {"worker": self.hostname, "pid": slot.pid})
        if not self._acks_late(record.name) and record.kombu_message is not None:
            self.relay.pending_acks.append(record.kombu_message)
            record.kombu_message = None
        if record.cancel_requested:
            self.send_ctl(record, Verb.CANCEL, None)

    def _watch_writer(self, slot: PoolSlot) -> None:
        if slot.writer.pending and self.hub is not None and slot.sock is not None:
            self.hub.add_writer(slot.sock, self._on_slot_writable, slot)

    def _on_slot_writable(self, slot: PoolSlot) -> None:
        try:
            done = slot.writer.flush()
        except ChannelClosed:
            done = True
        if done and self.hub is not None:
            self.hub.remove_writer(slot.sock)

    def send_ctl(self, record: TaskRecord, verb: str, data: Any,
                 receipt: Receipt | None = None) -> None:
        """Write ``["ctl", task id, verb, data]`` (a message that wants a receipt: with
        ``receipt`` after it) to the slot running ``record`` (nothing when it runs nowhere
        or its channel closed)."""
        slot = record.slot
        if slot is None:
            return
        try:
            if slot.writer.write(ctl_frame(record.id, verb, data, receipt)):
                return  # all sent (the common case): nothing left for the loop to write
        except ChannelClosed:
            return
        self._watch_writer(slot)

    # -- pool input ----------
    def _is_slot_reader(self, callback: Any) -> bool:
        """Whether ``callback`` (a reader callback on the loop) reads a pool slot."""
        return bool(callback == self._on_slot_readable or callback == self._on_inbox_readable)

    def _add_slot_reader(self, slot: PoolSlot) -> None:
        """Watch ``slot``'s socket (a green slot has none: the pool's inbox is watched)."""
        if self.hub is not None and slot.sock is not None:
            self.hub.add_reader(slot.sock, self._on_slot_readable, slot)

    def _on_inbox_readable(self) -> bool:
        """Act on up to ``INBOX_BATCH`` frames from the green pool's inbox (urgent ones
        first; superseded progress is gone already); True if frames came."""
        inbox = self.pool.inbox
        assert inbox is not None
        taken = inbox.drain(INBOX_BATCH)
        for slot, body in taken:
            if body == CLOSED:
                self._on_slot_closed(slot)
            elif not slot.closed:
                self._on_frame(slot, decode(body))
        return bool(taken)

    def _on_slot_readable(self, slot: PoolSlot) -> bool:
        """Read what ``slot`` sent (up to ``SLOT_READ_BYTES``) and act on its frames;
        True if frames came (more may be waiting)."""
        assert slot.sock is not None
        try:
            data = slot.sock.recv(SLOT_READ_BYTES)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            data = b""
        if not data:
            self._on_slot_closed(slot)
            return False
        try:
            frames = slot.reader.feed(data)
        except (ChannelClosed, ProtocolError) as exc:
            logger.error("pool slot %d sent garbage (%s); replacing it", slot.index, exc)
            self.pool.force_stop(slot, 2)
            return False
        last = len(frames) - 1
        for i, frame in enumerate(frames):
            if i < last and _superseded(frame, frames[i + 1]):
                continue
            self._on_frame(slot, frame)
        return True

    def drain_slot(self, slot: PoolSlot) -> None:
        """Act on everything ``slot`` has written so far (a stopped slot: all it wrote
        before it stopped; a green slot: everything in the pool's inbox)."""
        if slot.sock is None:
            while self._on_inbox_readable():
                pass
            return
        while not slot.closed and self._on_slot_readable(slot):
            pass

    def _on_frame(self, slot: PoolSlot, frame: list[Any]) -> None:
        op = frame[0]
        if op == "ev":
            _, task_id, kind, fields, ts = frame
            record = self.records.get(task_id)
            if record is not None and record.slot is slot:
                if kind == EventKind.PROGRESS and ts < slot.stale_progress_before:
                    return  # made before a hard pause stopped the slot: not after "paused"
                self.relay.emit(record, kind, fields, ts)
        elif op == "done":
            _, task_id, kind, fields, ts = frame
            record = self.records.get(task_id)
            slot.task_id = None
            slot.tasks_run += 1
            self._maybe_free[slot] = None
            if record is not None and record.slot is slot:
                record.slot = None
                if kind == EventKind.RETRY and not record.cancel_requested:
                    self.outcomes.retry(record, fields)
                else:
                    self.outcomes.finish(record, kind, fields, ts)
            self._maybe_recycle(slot)
            self._dispatch()
        elif op == "rc":
            # The task took a message whose sender asked to hear of it (back-pressure
            # on handle.send(wait=False)); the slot only echoes what send_ctl gave it.
            _, task_id, receipt = frame
            self.relay.publish_inbox(receipt[0], receipt_reply(self.hostname, task_id,
                                                               receipt[1]))
        elif op == "ready":
            slot.ready = True
            slot.pid = int(frame[1])
            self._maybe_free[slot] = None
            self._dispatch()

    def _maybe_recycle(self, slot: PoolSlot) -> None:
        """Retire a pool process that ran ``--max-tasks-per-child`` tasks or grew past
        ``--max-memory-per-child`` (checked after each task, as in Celery)."""
        if not self.pool.separate_processes:
            return
        limit = self.pool.max_tasks_per_child
        if limit and slot.tasks_run >= limit:
            self._retire(slot)
            return
        memory_limit = self.max_memory_per_child
        rss = resident_kb(slot.pid) if memory_limit else None
        if memory_limit and rss is not None and rss > memory_limit:
            logger.info("pool process %d uses %d KB, more than --max-memory-per-child "
                        "(%d KB): replacing it", slot.pid, rss, memory_limit)
            self._retire(slot)

    def _retire(self, slot: PoolSlot) -> None:
        """Ask an idle slot to stop; its channel closing replaces it (see below)."""
        slot.retiring = True
        try:
            slot.writer.write(["stop"])
        except ChannelClosed:
            pass
        self._watch_writer(slot)

    def _on_slot_closed(self, slot: PoolSlot) -> None:
        if slot.closed:
            return
        slot.closed = True
        self._maybe_free.pop(slot, None)
        if self.hub is not None and slot.sock is not None:
            self.hub.remove(slot.sock)
        how = self.pool.reap(slot)
        try:
            if slot.sock is not None:
                slot.sock.close()
        except OSError:
            pass
        if slot not in self.slots and slot.task_id is None:
            return  # stopped to shrink the pool: not replaced
        task_id = slot.task_id
        slot.task_id = None
        record = self.records.get(task_id) if task_id else None
        if record is not None:
            record.slot = None
            self.outcomes.task_lost(record, how, slot)
            # Tell its watchers now: spawning the replacement below forks (milliseconds).
            self.relay.flush()
        elif not slot.retiring and not self._stopping:
            logger.warning("pool slot %d (pid %d) %s while idle; replacing it",
                           slot.index, slot.pid, how)
        if not self._stopping or self.ready:
            # A slot that dies before it could take any work, again and again (a broken
            # import, say), is replaced with growing delays instead of in a tight loop.
            # One that dies running a task (a forced cancel, a crash) is replaced at once.
            young = record is None and (not slot.ready or (
                time.monotonic() - slot.spawned < 1.0 and slot.tasks_run == 0))
            self._spawn_failures = self._spawn_failures + 1 if young else 0
            delay = min(0.1 * 2 ** self._spawn_failures, 10.0) if young else 0.0
            if delay and self.hub is not None:
                logger.warning("pool slot %d died %d time(s) right after start; "
                               "retrying in %.1fs", slot.index, self._spawn_failures, delay)
                self.hub.call_later(delay, self._replace, slot)
            else:
                self._replace(slot)

    def _replace(self, slot: PoolSlot) -> None:
        if self._terminate or slot not in self.slots:
            return
        new = self.pool.spawn(slot.index)
        self.slots[self.slots.index(slot)] = new
        self._add_slot_reader(new)

    def publish_task(self, message: TaskMessage) -> None:
        """Publish a task message (signed when the app has a secret) to its queue; one
        whose ``eta`` is ahead waits in the broker where the broker can keep it."""
        body = codec.dumps(message.to_wire())
        queue = self.app.names.task_queue(message.queue)
        secret = self.app.secret
        if message.eta is not None and message.eta - time.time() > SCHEDULE_AHEAD and \
                self.upkeep.schedule(queue.name, message.id,
                                     task_envelope(body, queue.name, secret), None,
                                     message.eta):
            return
        headers = {}
        if secret is not None:
            headers[codec.SIGNATURE_HEADER] = codec.sign(secret, body)
        assert self.producer is not None
        self.producer.publish(body, routing_key=queue.routing_key, exchange="",
                              content_type=codec.CONTENT_TYPE, content_encoding="binary",
                              headers=headers, declare=[queue])
        self.intake.ring_for(queue.name)

    # -- timers ----------
    def _check_limits(self) -> None:
        now = time.monotonic()
        for record in list(self.records.values()):
            limit = record.time_limit
            if limit is None or record.slot is None or record.kill_reason:
                continue
            if record.slot.hard_paused:
                continue
            if record.running_time(now) > limit:
                record.kill_reason = (f"hard time limit of {limit}s exceeded "
                                      "(paused time not counted)")
                logger.error("task %s: %s; killing its pool process", record.id,
                             record.kill_reason)
                if self.pool.separate_processes:
                    self.control.force(record, 2)
                else:
                    self.control.force(record, 1)


def _superseded(frame: list[Any], following: list[Any]) -> bool:
    """Whether ``frame`` is a progress event that the very next frame of the same slot
    replaces: progress of the same task. The latest wins, as in the relay's batches
    (``queue_event``), but here before the event is numbered or stored, so a slot that
    sends progress faster than the worker relays it costs one event per read, not one
    per frame."""
    return (frame[0] == "ev" and following[0] == "ev" and frame[2] == EventKind.PROGRESS
            and following[2] == EventKind.PROGRESS and frame[1] == following[1])
