"""Events out: numbering, batching and publishing to watchers, results and acks.

:class:`Relay` turns what pool slots report into :class:`Event` objects and sends each to
every subscribed inbox. Events produced in one step of the worker loop go out together,
one publish per inbox, when the loop next runs its ready callbacks (``flush``); a progress
event replaces an unsent progress event of the same task (latest wins, never reordered).
``flush`` hands them to the broker's :class:`~interactive_tasks.transport.outbound.Outbound`,
which stores results first, then acks, then publishes, so a client that sees a final
event can always read the result, and a task is acked only once its result is recorded.
It also publishes the monitoring stream (``<ns>.events``): worker heartbeats always, task
events when the worker runs with ``-E`` (``worker_send_task_events``).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from interactive_tasks.protocol import Envelope, Event, EventKind, TaskSnapshot, TaskState
from interactive_tasks.transport.outbound import outbound_for

from .records import TaskRecord

if TYPE_CHECKING:
    from .state import WorkerState

logger = logging.getLogger("interactive_tasks.worker")

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

    def __init__(self, state: WorkerState) -> None:
        self.state = state
        self.outbox: dict[str, list[list[Any]]] = {}
        self.pending_results: list[tuple[str, dict[str, Any]]] = []
        self.pending_acks: list[Any] = []
        self.monitor: list[dict[str, Any]] = []
        self.flush_scheduled = False
        self.send_task_events = state.app.conf.worker_send_task_events
        self.outbound = outbound_for(state.app, lambda: state.producer, self._wake)

    def reset(self) -> None:
        """After a (re)connect: resend what could not go; raises the broker's
        connection errors."""
        self.outbound.connected(self.state.hub)

    def detach(self) -> None:
        """Before the worker's loop goes away: wait for what is in flight."""
        self.outbound.detach()

    def task_event(self, type_: str, record: TaskRecord, **fields: Any) -> None:
        """Queue a monitoring event (``task-received`` …) if task events are on."""
        if self.send_task_events:
            self.monitor.append({"type": type_, "id": record.id, "name": record.name,
                                 "worker": self.state.hostname, "ts": time.time(),
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
        hub = self.state.hub
        if not self.flush_scheduled and hub is not None:
            self.flush_scheduled = True
            hub.call_soon(self._scheduled_flush)

    def _wake(self, delay: float) -> None:
        """The outbound asks for a flush: now if anything waits, or to retry later."""
        if delay > 0:
            hub = self.state.hub
            if hub is not None:
                hub.call_later(delay, self.schedule_flush)
        elif self.outbox or self.pending_results or self.pending_acks or self.monitor or \
                self.outbound.pending:
            self.schedule_flush()

    def _scheduled_flush(self) -> None:
        if self.outbound.busy:
            # The broker's next answer wakes it again; meanwhile progress events
            # coalesce in the outbox.
            self.flush_scheduled = False
            return
        self.flush()

    def flush(self, wait: bool = False) -> None:
        """Store results, then ack, then publish batched events (in that order).

        With ``wait`` this returns only once the broker has everything sent so far.
        """
        w = self.state
        self.flush_scheduled = False
        messages = [(inbox, {"t": Envelope.EVENTS, "worker": w.hostname, "e": events})
                    for inbox, events in self.outbox.items()]
        self.outbox = {}
        results, acks = self.pending_results, self.pending_acks
        self.pending_results, self.pending_acks = [], []
        sent = self.outbound.send(results, acks, messages)
        if wait:
            self.outbound.drain()
        if sent and self.monitor:
            batch, self.monitor = self.monitor, []
            self.publish_monitor({"t": "task-events", "worker": w.hostname, "e": batch})

    def publish_monitor(self, payload: dict[str, Any]) -> None:
        """Publish on the fanout ``<ns>.events`` exchange (dropped when nobody listens)."""
        self.outbound.monitor(payload)

    def publish_inbox(self, inbox: str, payload: dict[str, Any]) -> None:
        """Send one message to a client inbox, after everything sent before it."""
        self.outbound.inbox(inbox, payload)

    def send_final_direct(self, task_id: str, name: str, reply_to: str | None, kind: str,
                           fields: dict[str, Any], store: bool = False) -> None:
        """Final event for a task that never got a record (rejected on arrival)."""
        w = self.state
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
        w = self.state
        inboxes: dict[str, list[str]] = {}
        for record in w.records.values():
            for inbox in record.subscribers:
                inboxes.setdefault(inbox, []).append(record.id)
        for inbox, task_ids in inboxes.items():
            self.publish_inbox(inbox, {"t": Envelope.HEARTBEAT, "worker": w.hostname,
                                        "tasks": task_ids[:100], "ts": time.time()})
        self.publish_monitor({"t": "worker-heartbeat", "worker": w.hostname,
                              "ts": time.time(), "freq": w.app.conf.worker_heartbeat,
                              "stats": w.stats()})

    def expire(self) -> None:
        """Drop expired subscriptions, held controls and revoked ids (every second)."""
        self._prune_revoked()
        self._expire_subscriptions()
        self.outbound.tick()

    def _prune_revoked(self) -> None:
        revoked = self.state.revoked
        if revoked:
            now = time.time()
            for task_id in [k for k, v in revoked.items() if v[0] < now]:
                del revoked[task_id]

    def _expire_subscriptions(self) -> None:
        w = self.state
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
