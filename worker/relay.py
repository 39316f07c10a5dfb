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
:func:`queue_event` (the batching and coalescing) and :func:`heartbeats` serve the Celery
bridge's relay too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from interactive_tasks.protocol import Envelope, Event, EventKind, TaskSnapshot, TaskState
from interactive_tasks.transport.outbound import outbound_for

from .records import TaskRecord, expire

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
        queue_event(self.outbox, event.to_wire(), (
            sub.inbox for sub in record.subscribers.values() if sub.everything or final))
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
        watched = ((r.id, r.subscribers) for r in w.records.values())
        for inbox, payload in heartbeats(w.hostname, watched):
            self.publish_inbox(inbox, payload)
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
        expire(time.monotonic(), (r.subscribers for r in w.records.values()), w.held,
               w.held_subscribers)


def queue_event(outbox: dict[str, list[list[Any]]], wire: list[Any],
                inboxes: Iterable[str]) -> None:
    """Queue an event (its wire form) in ``outbox`` for each of ``inboxes``. A progress
    event replaces an unsent progress event of the same task at the end of an inbox's
    queue: latest progress wins, never reordered, and it says which seq it covers from,
    so the watcher can tell this skip from a lost event."""
    is_progress = wire[2] == EventKind.PROGRESS
    for inbox in inboxes:
        box = outbox.setdefault(inbox, [])
        if is_progress and box and box[-1][2] == EventKind.PROGRESS and \
                box[-1][0] == wire[0]:
            replaced = box[-1]
            box[-1] = [*wire[:6], replaced[6] if len(replaced) > 6 else replaced[1]]
        else:
            box.append(wire)


def heartbeats(hostname: str, watched: Iterable[tuple[str, Iterable[str]]]
               ) -> list[tuple[str, dict[str, Any]]]:
    """The heartbeat to each watching inbox, naming the tasks it watches here (up to 100):
    ``watched`` is each task's id with its watchers' inboxes."""
    inboxes: dict[str, list[str]] = {}
    for task_id, watchers in watched:
        for inbox in watchers:
            inboxes.setdefault(inbox, []).append(task_id)
    now = time.time()
    return [(inbox, {"t": Envelope.HEARTBEAT, "worker": hostname, "tasks": task_ids[:100],
                     "ts": now}) for inbox, task_ids in inboxes.items()]
