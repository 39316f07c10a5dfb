"""How a task's run ends: finished, retried, lost with its pool process, redelivered or
dead-lettered.

:class:`Outcomes` holds the worker's decisions at the end of a run; the worker loop calls
it when a pool slot reports ``done`` or dies, when a message cannot be accepted, and when
control (cancel before start, revoke) ends a task that never ran. Every final event goes
through :meth:`Outcomes.finish`, which queues the result before the ack (``Relay.flush``
writes them in that order).
"""

from __future__ import annotations

import logging
import reprlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from interactive_tasks import codec
from interactive_tasks.protocol import (
    HEADER_DELIVERIES,
    WORKFLOW_HEADERS,
    EventKind,
    TaskMessage,
    TaskState,
)
from interactive_tasks.transport.frames import settle_quietly

from . import trace
from .canvas import after_finish
from .records import Subscriber, TaskRecord

if TYPE_CHECKING:
    from interactive_tasks.transport.upkeep import BrokerUpkeep

    from .canvas import Workflows
    from .pools.base import PoolSlot
    from .relay import Relay
    from .state import WorkerState

logger = logging.getLogger("interactive_tasks.worker")

#: finished records kept in memory for late attach/locate
FINISHED_KEPT = 1000

#: a result's repr in the worker's "succeeded" log line, cut to about this many characters
RESULT_REPR_MAX = 100
_result_repr = reprlib.Repr()
_result_repr.maxstring = _result_repr.maxother = RESULT_REPR_MAX
_result_repr.maxlist = _result_repr.maxtuple = _result_repr.maxdict = 10
_result_repr.maxset = _result_repr.maxfrozenset = 10


def result_repr(value: Any) -> str:
    """``repr(value)`` cut to about ``RESULT_REPR_MAX`` characters (reprlib: a large
    container is not rendered whole first)."""
    text = _result_repr.repr(value)
    return text if len(text) <= RESULT_REPR_MAX else text[:RESULT_REPR_MAX - 3] + "..."


def log_outcome(record: TaskRecord, kind: str, fields: dict[str, Any]) -> None:
    """Celery's per-task lines: "Task NAME[ID] succeeded in Xs: RESULT" at INFO, "Task
    NAME[ID] raised TYPE: MESSAGE" and the task's traceback at ERROR."""
    if kind == EventKind.SUCCEEDED:
        if logger.isEnabledFor(logging.INFO):  # nothing to pay per task at -l warning
            runtime = (record.finished or time.time()) - (record.started or record.received)
            logger.info("Task %s[%s] succeeded in %.4fs: %s", record.name, record.id,
                        max(runtime, 0.0), result_repr(fields.get("result")))
    elif kind == EventKind.FAILED:
        error = fields.get("error") or {}
        trace_text = str(error.get("traceback") or "").rstrip("\n")
        logger.error("Task %s[%s] raised %s: %s%s", record.name, record.id,
                     error.get("type") or "Exception", error.get("message") or "",
                     f"\n{trace_text}" if trace_text else "")


def error_fields(type_: str, message: str) -> dict[str, Any]:
    """The ``error`` of a final event the worker decided on (no traceback: no exception)."""
    return {"type": type_, "message": message, "traceback": ""}


class Outcomes:
    """The end of each run, for one worker."""

    def __init__(self, state: WorkerState, *, relay: Relay, upkeep: BrokerUpkeep,
                 workflows: Workflows, publish_task: Callable[[TaskMessage], None]) -> None:
        self.state = state
        self.relay = relay
        self.upkeep = upkeep
        self.workflows = workflows
        self.publish_task = publish_task

    def dead_letter(self, message: Any, reason: str, task_id: str | None = None) -> None:
        """Keep a rejected message on the dead-letter queue, ack the original, log why.
        Raises nothing of the broker's: a delivery that cannot be settled any more (its
        connection is gone) is logged, and the broker delivers it again."""
        w = self.state
        logger.error("rejected message from %s: %s",
                     (message.delivery_info or {}).get("routing_key", "?"), reason)
        try:
            assert w.producer is not None
            dead = w.app.names.dead_letter_queue
            w.producer.publish(
                message.body, routing_key=dead.routing_key, exchange="",
                content_type=message.content_type or "application/octet-stream",
                content_encoding=message.content_encoding or "binary",
                headers={"itask-reason": reason, "itask-worker": w.hostname,
                         "itask-queue": (message.delivery_info or {}).get("routing_key")},
            )
        except Exception as exc:
            logger.error("could not dead-letter the message (%s); requeueing it", exc)
            settle_quietly(message, task_id, requeue=True)
            return
        settle_quietly(message, task_id)

    def dead_letter_record(self, record: TaskRecord, reason: str) -> None:
        """Dead-letter a task we hold a record of (its message may be acked already)."""
        w = self.state
        if record.kombu_message is not None:
            self.dead_letter(record.kombu_message, reason, record.id)
            record.kombu_message = None
            return
        logger.error("dead-lettered task %s: %s", record.id, reason)
        assert w.producer is not None
        dead = w.app.names.dead_letter_queue
        w.producer.publish(codec.dumps(record.message.to_wire()),
                           routing_key=dead.routing_key, exchange="",
                           content_type=codec.CONTENT_TYPE, content_encoding="binary",
                           headers={"itask-reason": reason, "itask-worker": w.hostname,
                                    "itask-queue": w.app.names.task_queue_name(
                                        record.message.queue)})

    def task_lost(self, record: TaskRecord, how: str, slot: PoolSlot) -> None:
        """The pool process running ``record`` died: cancelled, timed out, redelivered (up
        to ``max_deliveries``, then dead-lettered) or failed with ``WorkerLost``."""
        w = self.state
        if record.cancel_requested:
            logger.info("task %s cancelled: %s", record.id, how)
            self.finish(record, EventKind.CANCELLED, {"forced": True})
            return
        if record.kill_reason:
            self.finish(record, EventKind.FAILED,
                        {"error": error_fields("TimeLimitExceeded", record.kill_reason)})
            return
        reason = f"pool process {slot.pid} {how} while running task {record.id}"
        logger.error("%s", reason)
        # Also while stopping: a SIGTERM sent to the whole process group (a service
        # manager) kills pool children mid-task; their tasks go back to the queue.
        if w.app.conf.reject_on_worker_lost:
            if record.delivery >= w.app.conf.max_deliveries:
                reason += (f"; delivered {record.delivery} times "
                           f"(max_deliveries={w.app.conf.max_deliveries}): dead-lettered")
                self.dead_letter_record(record, reason)
                self.finish(record, EventKind.FAILED,
                            {"error": error_fields("WorkerLost", reason)})
                return
            self.relay.emit(record, EventKind.WORKER_LOST, {"reason": reason, "redelivered": True})
            self.redeliver(record)
            return
        self.finish(record, EventKind.FAILED, {"error": error_fields("WorkerLost", reason)})

    def superseded(self, record: TaskRecord) -> bool:
        """Whether another worker already recorded this task's end.

        A task whose worker was taken for dead (frozen, or cut off from the broker for
        longer than ``worker_lost_timeout``) may have been delivered again and finished
        elsewhere: its stale run must not report a second final state nor overwrite the
        result. Other runs need no look.
        """
        w = self.state
        if not (record.maybe_redelivered or self.upkeep.possibly_lost()):
            return False
        try:
            stored = w.app.results.get(record.id)
        except Exception:
            return False
        if not stored or not TaskState(stored.get("state", "pending")).is_final:
            return False
        return int(stored.get("run") or 0) > record.run or stored.get("worker") != w.hostname

    def retry(self, record: TaskRecord, fields: dict[str, Any]) -> None:
        """The task asked to run again: tell watchers, publish it with a countdown."""
        countdown = float(fields.get("countdown") or 0.0)
        retries = int(fields.get("retries") or record.message.retries + 1)
        self.relay.emit(record, EventKind.RETRY, {**fields, "attempt": retries + 1})
        logger.info("task %s retry %d in %.3gs", record.id, retries, countdown)
        self.republish(record, deliveries=1, retries=retries, eta=time.time() + countdown)

    def redeliver(self, record: TaskRecord) -> None:
        """Publish the task again with its delivery count, then ack this copy."""
        self.republish(record, deliveries=record.delivery + 1)

    def republish(self, record: TaskRecord, *, deliveries: int, retries: int | None = None,
                  eta: float | None = None) -> None:
        """Publish a new copy of the task, hand its watchers over, ack this copy and the
        other deliveries of the task held here (a redelivery after a reconnect), as
        :meth:`finish` does. Raises what publishing raises; acknowledging raises
        nothing (a delivery from a connection gone since is logged and left: the broker
        delivered it again on the new connection, and that copy is acked here)."""
        w = self.state
        msg = record.message
        headers = dict(msg.headers)
        headers[HEADER_DELIVERIES] = deliveries
        wire = msg.to_wire()
        wire["headers"] = headers
        if retries is not None:
            wire["retries"] = retries
        if eta is not None:
            wire["eta"] = eta
        self.publish_task(TaskMessage.from_wire(wire))
        # Watchers follow the task to its next delivery (if it comes back here; others
        # locate it again). Held subscriptions expire like any other.
        until = time.monotonic() + w.app.conf.subscription_ttl
        held = w.held_subscribers.setdefault(record.id, {})
        for sub in record.subscribers.values():
            held[sub.inbox] = Subscriber(sub.inbox, min(sub.expires, until), sub.everything)
        w.records.pop(record.id, None)
        self.cancel_timers(record)
        if record.kombu_message is not None:  # None: acked at start (acks_late=False)
            settle_quietly(record.kombu_message, record.id)
            record.kombu_message = None
        if record.duplicates:
            # through the relay, as finish() settles them
            self.relay.pending_acks.extend(record.duplicates)
            record.duplicates.clear()
            self.relay.schedule_flush()

    def finish(self, record: TaskRecord, kind: str, fields: dict[str, Any],
               ts: float | None = None) -> None:
        """The final event: emitted, result stored, message acked (in that order, by the
        relay's next flush), workflow continued; a stale run of a task that finished
        elsewhere is dropped instead."""
        w = self.state
        if record.is_final:
            return
        if self.superseded(record):
            logger.warning("task %s already finished elsewhere after this worker was "
                           "taken for dead; dropping this stale run %d",
                           record.id, record.run)
            self.cancel_timers(record)
            if record.kombu_message is not None:
                self.relay.pending_acks.append(record.kombu_message)
                record.kombu_message = None
            w.records.pop(record.id, None)
            self.relay.schedule_flush()
            return
        self.cancel_timers(record)
        if record.kill_reason and kind in (EventKind.CANCELLED, EventKind.FAILED):
            # the hard time limit forced it (in a threads pool, through a cancel)
            kind, fields = EventKind.FAILED, {
                "error": error_fields("TimeLimitExceeded", record.kill_reason)}
        elif kind in (EventKind.FAILED, EventKind.RETRY) and record.cancel_requested:
            kind, fields = EventKind.CANCELLED, {}
        self.relay.emit(record, kind, fields, ts)
        log_outcome(record, kind, fields)
        trace.revoked(w.app, record.message, kind, fields, w.hostname)
        w.processed += 1
        self.relay.pending_results.append((record.id, record.final_record()))
        if record.kombu_message is not None:
            self.relay.pending_acks.append(record.kombu_message)
            record.kombu_message = None
        self.relay.pending_acks.extend(record.duplicates)
        record.duplicates.clear()
        w.records.pop(record.id, None)
        w.finished[record.id] = record
        while len(w.finished) > FINISHED_KEPT:
            w.finished.popitem(last=False)
        self.relay.schedule_flush()
        if any(header in record.message.headers for header in WORKFLOW_HEADERS):
            try:
                after_finish(self.workflows, record.message, kind, fields)
            except Exception:  # the task's own result is safe; log the workflow failure
                logger.exception("task %s: continuing its workflow failed", record.id)

    def cancel_timers(self, record: TaskRecord) -> None:
        for tref in record.timers:
            try:
                tref.cancel()
            except Exception:
                pass
        record.timers.clear()
