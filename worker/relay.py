"""Events out: numbering, batching and publishing to watchers, results and acks.

:class:`Relay` turns what pool slots report into :class:`Event` objects and sends each to
every subscribed inbox. Events produced in one step of the worker loop go out together,
one publish per inbox, when the loop next runs its ready callbacks (``flush``); a progress
event replaces an unsent progress event of the same task (latest wins, never reordered).
``flush`` stores results first, then acks, then publishes, so a client that sees a final
event can always read the result, and a task is acked only once its result is recorded.
It also publishes the monitoring stream (``<ns>.events``): worker heartbeats always, task
events when the worker runs with ``-E`` (``worker_send_task_events``).
"""

from __future__ import annotations

import collections
import logging
import time
from typing import TYPE_CHECKING, Any

from interactive_tasks import codec
from interactive_tasks.errors import ConfigurationError
from interactive_tasks.protocol import Envelope, Event, EventKind, TaskSnapshot, TaskState
from interactive_tasks.results import RedisResultStore
from interactive_tasks.transport.redis_fast import WorkerPipeline, encode_frame
from interactive_tasks.transport.worker_side import pipeline_for

from .records import TaskRecord

if TYPE_CHECKING:
    from .main import Worker

logger = logging.getLogger("interactive_tasks.worker")

#: inbox messages kept for resending while the broker is unreachable (oldest dropped past)
UNSENT_KEPT = 100_000
#: Redis: packets sent and not answered before the next flush waits for an answer. The
#: back-pressure that makes progress coalesce when the broker or a watcher is slow.
MAX_IN_FLIGHT = 2

#: event kinds that also go to the monitoring stream, as Celery's task event names
MONITORED = {
    EventKind.STARTED: "task-started",
    EventKind.SUCCEEDED: "task-succeeded",
    EventKind.FAILED: "task-failed",
    EventKind.RETRY: "task-retried",
    EventKind.REVOKED: "task-revoked",
    EventKind.CANCELLED: "task-cancelled",
}


class Relay:
    """Everything the worker sends to clients; one per worker."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.outbox: dict[str, list[list[Any]]] = {}
        self.pending_results: list[tuple[str, dict[str, Any]]] = []
        self.pending_acks: list[Any] = []
        self.monitor: list[dict[str, Any]] = []
        self.flush_scheduled = False
        self.declared_inboxes: set[str] = set()
        self.send_task_events = worker.app.conf.worker_send_task_events
        #: Redis only: inbox frames waiting for the next pipeline
        self.frames: list[tuple[str, bytes]] = []
        #: inbox messages that failed while the broker connection went down (kombu path)
        self.unsent: collections.deque[tuple[str, dict[str, Any]]] = collections.deque(
            maxlen=UNSENT_KEPT)
        self.fast: WorkerPipeline | None = None

    def reset(self) -> None:
        """Forget per-connection state (after a (re)connect); resend what could not go."""
        self.declared_inboxes.clear()
        if self.unsent:
            pending, self.unsent = self.unsent, collections.deque(maxlen=UNSENT_KEPT)
            logger.info("resending %d inbox message(s) held while disconnected", len(pending))
            for inbox, payload in pending:
                self.publish_inbox(inbox, payload)
        if self.fast is None:
            self.fast = pipeline_for(self.worker.app, self._pipeline_failed,
                                     self._pipeline_answered)
        if self.fast is not None:
            self.fast.attach(self.worker.hub)
            if self.pending_results or self.pending_acks or self.frames:
                self.schedule_flush()  # what failed while the connection was down

    def detach(self) -> None:
        """Before the worker's loop goes away: wait for what is in flight to Redis."""
        if self.fast is not None:
            self.fast.attach(None)
            self.fast.drain()

    def task_event(self, type_: str, record: TaskRecord, **fields: Any) -> None:
        """Queue a monitoring event (``task-received`` …) if task events are on."""
        if self.send_task_events:
            self.monitor.append({"type": type_, "id": record.id, "name": record.name,
                                 "worker": self.worker.hostname, "ts": time.time(),
                                 "state": record.state.value, **fields})
            self.schedule_flush()

    def emit(self, record: TaskRecord, kind: str, fields: dict[str, Any],
              ts: float | None = None) -> Event:
        event = record.make_event(kind, fields, ts)
        final = event.is_final
        if self.send_task_events and kind in MONITORED:
            extra = {"runtime": round(event.ts - record.started, 6)} if (
                final and record.started) else {}
            self.task_event(MONITORED[kind], record, **extra)
        if not record.subscribers:
            return event
        wire = event.to_wire()
        is_progress = kind == EventKind.PROGRESS
        for sub in record.subscribers.values():
            if not (sub.everything or final):
                continue
            box = self.outbox.setdefault(sub.inbox, [])
            if is_progress and box and box[-1][2] == EventKind.PROGRESS and \
                    box[-1][0] == record.id:
                # Coalesce: latest progress wins, never reordered. It says which seq it
                # covers from, so the watcher can tell this skip from a lost event.
                replaced = box[-1]
                box[-1] = [*wire[:6], replaced[6] if len(replaced) > 6 else replaced[1]]
            else:
                box.append(wire)
        self.schedule_flush()
        return event

    def schedule_flush(self) -> None:
        w = self.worker
        if not self.flush_scheduled and w.hub is not None:
            self.flush_scheduled = True
            w.hub.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        if self.fast is not None and self.fast.in_flight >= MAX_IN_FLIGHT:
            # The next answer from Redis schedules it again (_pipeline_answered);
            # meanwhile progress events coalesce in the outbox.
            self.flush_scheduled = False
            return
        self.flush()

    def flush(self, wait: bool = False) -> None:
        """Store results, then ack, then publish batched events (in that order).

        On Redis they go out in one packet whose answer the loop reads later; with
        ``wait`` this returns only once Redis answered everything sent so far.
        """
        w = self.worker
        self.flush_scheduled = False
        if self.fast is not None:
            self._flush_fast()
            if wait:
                self.fast.drain()
            return
        if self.pending_results:
            results, self.pending_results = self.pending_results, []
            try:
                w.app.results.put_many(results)
            except ConfigurationError as exc:  # the store refuses them: retrying cannot help
                logger.error("result store refused %d result(s): %s", len(results), exc)
            except Exception as exc:
                logger.error("result store failed (%s); retrying", exc)
                self.pending_results[:0] = results
                if w.hub is not None:
                    w.hub.call_later(0.5, self.schedule_flush)
                return
        if self.pending_acks:
            acks, self.pending_acks = self.pending_acks, []
            for message in acks:
                try:
                    message.ack()
                except Exception as exc:
                    logger.warning("ack failed (%s); the broker may deliver it again", exc)
        if self.outbox:
            outbox, self.outbox = self.outbox, {}
            for inbox, events in outbox.items():
                self.publish_inbox(inbox, {"t": Envelope.EVENTS, "worker": w.hostname,
                                            "e": events})
        if self.monitor:
            batch, self.monitor = self.monitor, []
            self.publish_monitor({"t": "task-events", "worker": w.hostname, "e": batch})

    def _flush_fast(self) -> None:
        """Redis: results, acks and inbox frames in one pipeline (one round trip)."""
        w = self.worker
        assert self.fast is not None
        for inbox, events in self.outbox.items():
            self.frames.append((inbox, self._frame({"t": Envelope.EVENTS,
                                                    "worker": w.hostname, "e": events})))
        self.outbox = {}
        results, acks, frames = self.pending_results, self.pending_acks, self.frames
        self.pending_results, self.pending_acks, self.frames = [], [], []
        store = w.app.results
        result_key, expire_at = None, 0
        packed: list[tuple[str, bytes]] = []
        if results:
            if isinstance(store, RedisResultStore) and store.url == w.app.broker_url:
                result_key, expire_at = store.current_bucket()
                packed = [(task_id, codec.dumps(record)) for task_id, record in results]
            else:
                try:
                    store.put_many(results)
                except ConfigurationError as exc:
                    logger.error("result store refused %d result(s): %s", len(results), exc)
                except Exception as exc:
                    logger.error("result store failed (%s); retrying", exc)
                    self._retry_later(results, acks, frames)
                    return
        self.fast.submit(results=packed, result_key=result_key, result_expire_at=expire_at,
                         acks=acks, frames=frames,
                         context=(results if packed else [], acks, frames))
        if self.monitor:
            batch, self.monitor = self.monitor, []
            self.publish_monitor({"t": "task-events", "worker": w.hostname, "e": batch})

    def _pipeline_answered(self) -> None:
        if self.outbox or self.frames or self.pending_results or self.pending_acks or \
                self.monitor:
            self.schedule_flush()

    def _pipeline_failed(self, contexts: list[Any]) -> None:
        results: list[tuple[str, dict[str, Any]]] = []
        acks: list[Any] = []
        frames: list[tuple[str, bytes]] = []
        for context_results, context_acks, context_frames in contexts:
            results += context_results
            acks += context_acks
            frames += context_frames
        self._retry_later(results, acks, frames)

    def _retry_later(self, results: list[tuple[str, dict[str, Any]]], acks: list[Any],
                     frames: list[tuple[str, bytes]]) -> None:
        self.pending_results[:0] = results
        self.pending_acks[:0] = acks
        self.frames[:0] = frames
        hub = self.worker.hub
        if hub is not None:
            hub.call_later(0.5, self.schedule_flush)

    def _frame(self, payload: dict[str, Any]) -> bytes:
        return encode_frame(codec.dumps(payload), self.worker.app.secret)

    def publish_monitor(self, payload: dict[str, Any]) -> None:
        """Publish on the fanout ``<ns>.events`` exchange (dropped when nobody listens)."""
        w = self.worker
        producer = w.producer
        if producer is None:
            return
        body = codec.dumps(payload)
        headers = {}
        if w.app.secret is not None:
            headers[codec.SIGNATURE_HEADER] = codec.sign(w.app.secret, body)
        exchange = w.app.names.events_exchange
        try:
            producer.publish(body, routing_key="", exchange=exchange,
                             content_type=codec.CONTENT_TYPE, content_encoding="binary",
                             headers=headers, declare=[exchange])
        except Exception as exc:
            logger.warning("could not publish monitoring events: %s", exc)

    def publish_inbox(self, inbox: str, payload: dict[str, Any]) -> None:
        """Send one message to a client inbox (on Redis: with the next pipeline)."""
        w = self.worker
        if self.fast is not None:
            self.frames.append((inbox, self._frame(payload)))
            self.schedule_flush()
            return
        producer = w.producer
        if producer is None or self.unsent:  # reconnecting: keep the order
            self.unsent.append((inbox, payload))
            return
        body = codec.dumps(payload)
        headers = {}
        if w.app.secret is not None:
            headers[codec.SIGNATURE_HEADER] = codec.sign(w.app.secret, body)
        declare = []
        if inbox not in self.declared_inboxes:
            client_id = inbox.rsplit(".", 1)[-1]
            queue = w.app.names.inbox_queue(client_id)
            if queue.name == inbox:
                declare = [queue]
            self.declared_inboxes.add(inbox)
        try:
            producer.publish(body, routing_key=inbox, exchange="",
                             content_type=codec.CONTENT_TYPE, content_encoding="binary",
                             headers=headers, declare=declare)
        except Exception as exc:
            # The broker connection is going down: keep it, in order, for the reconnect.
            logger.warning("could not publish to %s (%s); will resend after reconnecting",
                           inbox, exc)
            self.declared_inboxes.discard(inbox)
            self.unsent.append((inbox, payload))

    def send_final_direct(self, task_id: str, name: str, reply_to: str | None, kind: str,
                           fields: dict[str, Any], store: bool = False) -> None:
        """Final event for a task that never got a record (rejected on arrival)."""
        w = self.worker
        event = Event(task_id, 1, kind, time.time(), fields, 1)
        if store:
            snap = TaskSnapshot(task_id=task_id, name=name, state=TaskState(kind), seq=1,
                                worker=w.hostname, error=fields.get("error"),
                                finished=event.ts, events=(event,))
            self.pending_results.append((task_id, snap.to_wire()))
        if reply_to:
            self.outbox.setdefault(reply_to, []).append(event.to_wire())
        self.schedule_flush()

    def heartbeat(self) -> None:
        w = self.worker
        inboxes: dict[str, list[str]] = {}
        for record in w.records.values():
            for inbox in record.subscribers:
                inboxes.setdefault(inbox, []).append(record.id)
        for inbox, task_ids in inboxes.items():
            self.publish_inbox(inbox, {"t": Envelope.HEARTBEAT, "worker": w.hostname,
                                        "tasks": task_ids[:100], "ts": time.time()})
        self.publish_monitor({"t": "worker-heartbeat", "worker": w.hostname,
                              "ts": time.time(), "freq": w.app.conf.worker_heartbeat,
                              "stats": w.control.stats()})

    def expire(self) -> None:
        """Drop expired subscriptions, held controls and revoked ids (every second)."""
        self._prune_revoked()
        self._expire_subscriptions()
        if self.fast is not None:
            self.fast.check_stalled()

    def _prune_revoked(self) -> None:
        revoked = self.worker.revoked
        if revoked:
            now = time.time()
            for task_id in [k for k, v in revoked.items() if v[0] < now]:
                del revoked[task_id]

    def _expire_subscriptions(self) -> None:
        w = self.worker
        now = time.monotonic()
        for record in w.records.values():
            expired = [k for k, s in record.subscribers.items() if s.expires < now]
            for key in expired:
                del record.subscribers[key]
        for task_id in list(w.held):
            kept = [h for h in w.held[task_id] if h.expires > now]
            if kept:
                w.held[task_id] = kept
            else:
                del w.held[task_id]
        for task_id in list(w.held_subscribers):
            subs = {k: s for k, s in w.held_subscribers[task_id].items() if s.expires > now}
            if subs:
                w.held_subscribers[task_id] = subs
            else:
                del w.held_subscribers[task_id]
