"""The worker's memory of each task: state, ring buffer of events, subscribers, controls.

One :class:`TaskRecord` per task the worker holds (queued here, running, or recently
finished). Attach is one step in the worker loop: :meth:`TaskRecord.snapshot` carries the
sequence number it covers and the live tail continues from there — no gap, no duplicate.
:class:`Subscriber`, :class:`HeldControl` and :func:`expire` serve the Celery bridge's
relay too, which keeps watchers and held control of its tasks the same way.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from interactive_tasks.protocol import (
    STATE_AFTER,
    Event,
    EventKind,
    TaskMessage,
    TaskSnapshot,
    TaskState,
)

#: ``[sender's inbox, cseq]``: where to say that the task has taken a message
Receipt = list[Any]


@dataclass
class Subscriber:
    inbox: str
    expires: float  # monotonic
    everything: bool  # False: the final event only


@dataclass
class HeldControl:
    """A control message waiting for its task (or for an earlier one from its sender)."""

    verb: str
    data: Any
    sender: str | None
    rid: str | None
    cseq: int
    token: str | None
    signed: bool
    expires: float
    #: a message whose sender wants a receipt once the task has taken it
    receipt: bool = False


@dataclass(eq=False)
class TaskRecord:
    message: TaskMessage
    kombu_message: Any
    interactive: bool
    history_size: int
    delivery: int = 1
    #: run number in events: retries + deliveries, so it grows with each new attempt
    run: int = 1
    state: TaskState = TaskState.PENDING
    seq: int = 0
    slot: Any = None
    worker: str | None = None
    pid: int | None = None
    progress: Event | None = None
    question: dict[str, Any] | None = None
    result: Any = None
    error: dict[str, Any] | None = None
    received: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    subscribers: dict[str, Subscriber] = field(default_factory=dict)
    start_paused: bool = False
    early_messages: list[tuple[str, Any, Receipt | None]] = field(default_factory=list)
    cancel_requested: bool = False
    cancel_stage: int = 0
    kill_reason: str | None = None
    last_cseq: dict[str, int] = field(default_factory=dict)
    #: the token that last proved itself against the message's digest (hashing it again
    #: for every message of a stream took ~7 % of the worker's time per control here)
    proven_token: str | None = None
    #: seconds of running time after which the task is stopped / told (the task's own
    #: limits, else the worker's)
    time_limit: float | None = None
    soft_time_limit: float | None = None
    # running time excluding pauses, for time limits
    run_started_mono: float | None = None
    paused_since: float | None = None
    paused_total: float = 0.0
    timers: list[Any] = field(default_factory=list)
    #: further deliveries of the same task that arrived while it ran (acked with it)
    duplicates: list[Any] = field(default_factory=list)
    #: the broker may have given this task to another worker while it ran here (this
    #: worker was taken for dead): its end is checked against the stored result
    maybe_redelivered: bool = False
    history: collections.deque[Event] = field(init=False)

    def __post_init__(self) -> None:
        self.history = collections.deque(maxlen=self.history_size)

    @property
    def id(self) -> str:
        return self.message.id

    @property
    def name(self) -> str:
        return self.message.task

    @property
    def is_final(self) -> bool:
        return self.state.is_final

    def running_time(self, now: float) -> float:
        if self.run_started_mono is None:
            return 0.0
        paused = self.paused_total
        if self.paused_since is not None:
            paused += now - self.paused_since
        return now - self.run_started_mono - paused

    def make_event(self, kind: str, fields: dict[str, Any], ts: float | None = None) -> Event:
        """Number the next event and fold it into the record's state."""
        self.seq += 1
        event = Event(self.id, self.seq, kind, ts or time.time(), fields, self.run)
        new_state = STATE_AFTER.get(kind)
        if new_state is not None:
            self.state = new_state
        now = time.monotonic()
        if kind == EventKind.PROGRESS:
            self.progress = event
            return event
        if kind == EventKind.PAUSED and self.paused_since is None:
            self.paused_since = now
        elif kind in (EventKind.RESUMED, *_FINAL) and self.paused_since is not None:
            self.paused_total += now - self.paused_since
            self.paused_since = None
        if kind == EventKind.QUESTION:
            self.question = dict(fields)
        elif kind == EventKind.ANSWERED:
            self.question = None
        elif kind in _FINAL:
            self.question = None
            self.finished = event.ts
            self.result = fields.get("result")
            self.error = fields.get("error")
        self.history.append(event)
        return event

    def snapshot(self) -> TaskSnapshot:
        return TaskSnapshot(
            task_id=self.id, name=self.name, state=self.state, seq=self.seq,
            run=self.run, worker=self.worker, pid=self.pid, progress=self.progress,
            events=tuple(self.history), question=self.question, result=self.result,
            error=self.error, received=self.received, started=self.started,
            finished=self.finished, interactive=self.interactive,
        )

    def final_record(self) -> dict[str, Any]:
        """What the result store keeps: the final snapshot without the event history."""
        wire = self.snapshot().to_wire()
        wire["events"] = [e.to_wire() for e in list(self.history)[-20:]]
        return wire

    def summary(self) -> dict[str, Any]:
        """One line of ``itask ls`` / ``inspect active``."""
        return {
            "id": self.id, "name": self.name, "state": self.state.value,
            "worker": self.worker, "pid": self.pid, "queue": self.message.queue,
            "progress": self.progress.to_wire() if self.progress else None,
            "received": self.received, "started": self.started, "finished": self.finished,
            "args": self.message.args, "kwargs": self.message.kwargs,
            "interactive": self.interactive, "question": self.question,
        }


_FINAL = (EventKind.SUCCEEDED, EventKind.FAILED, EventKind.CANCELLED, EventKind.REVOKED)


def expire(now: float, watchers: Iterable[dict[str, Subscriber]],
           held: dict[str, list[HeldControl]],
           held_subscribers: dict[str, dict[str, Subscriber]]) -> None:
    """Drop what expired by ``now`` (monotonic): watches of the tasks here (``watchers``,
    each task's subscribers), control held for tasks not here, and the watchers waiting
    for them (both tables keyed by task id)."""
    for subscribers in watchers:
        for key in [k for k, s in subscribers.items() if s.expires < now]:
            del subscribers[key]
    for task_id in list(held):
        kept = [h for h in held[task_id] if h.expires > now]
        if kept:
            held[task_id] = kept
        else:
            del held[task_id]
    for task_id in list(held_subscribers):
        subs = {k: s for k, s in held_subscribers[task_id].items() if s.expires > now}
        if subs:
            held_subscribers[task_id] = subs
        else:
            del held_subscribers[task_id]
