"""Messages on the wire, as frozen dataclasses with ``to_wire()`` / ``from_wire()``.

Three streams cross the broker (docs/architecture.md, 'Queues and exchanges'):

* :class:`TaskMessage` on ``it.tasks.<queue>`` — a request to run a task;
* :class:`ControlMessage` on ``it.ctl.<worker>`` (or broadcast when the worker is not
  known yet) — pause, resume, cancel, message, answer, subscribe, and worker requests
  (ping, inspect, locate);
* inbox envelopes on ``it.inbox.<client>`` — :class:`Event` batches, snapshots, replies
  and worker heartbeats.

``from_wire`` validates types and raises :class:`ProtocolError` with the reason; it never
trusts a field it did not check.
"""

from __future__ import annotations

import enum
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ProtocolError

PROTOCOL_VERSION = 1

#: Message headers the worker acts on; a user's ``headers=`` may not set them.
HEADER_DELIVERIES = "itask-deliveries"
HEADER_CHAIN = "itask-chain"
HEADER_CHORD = "itask-chord"
#: ``apply_async(link=)``: steps published with the result when the task succeeds
HEADER_LINK = "itask-link"
#: ``apply_async(link_error=)``: steps published with the task's id when it fails
HEADER_LINK_ERROR = "itask-link-error"
#: headers that make the worker continue a workflow when the task ends
WORKFLOW_HEADERS = (HEADER_CHAIN, HEADER_CHORD, HEADER_LINK, HEADER_LINK_ERROR)
RESERVED_HEADERS = frozenset({HEADER_DELIVERIES, *WORKFLOW_HEADERS})


class TaskState(str, enum.Enum):
    """Lifecycle of a task as a client sees it."""

    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    RETRY = "retry"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REVOKED = "revoked"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES

    def __str__(self) -> str:
        return self.value


FINAL_STATES = frozenset(
    {TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED, TaskState.REVOKED}
)


class EventKind:
    """Names of event kinds. Plain strings on the wire."""

    STARTED = "started"
    PROGRESS = "progress"
    MESSAGE = "message"
    LOG = "log"
    QUESTION = "question"
    ANSWERED = "answered"
    PAUSED = "paused"
    RESUMED = "resumed"
    RETRY = "retry"
    WORKER_LOST = "worker-lost"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REVOKED = "revoked"


FINAL_KINDS = frozenset(
    {EventKind.SUCCEEDED, EventKind.FAILED, EventKind.CANCELLED, EventKind.REVOKED}
)

#: The state a task is in after an event of each kind.
STATE_AFTER: dict[str, TaskState] = {
    EventKind.STARTED: TaskState.RUNNING,
    EventKind.PAUSED: TaskState.PAUSED,
    EventKind.RESUMED: TaskState.RUNNING,
    EventKind.RETRY: TaskState.RETRY,
    EventKind.SUCCEEDED: TaskState.SUCCEEDED,
    EventKind.FAILED: TaskState.FAILED,
    EventKind.CANCELLED: TaskState.CANCELLED,
    EventKind.REVOKED: TaskState.REVOKED,
}


#: What a task id may look like: it names files in the embedded stores and Redis fields.
_TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@+=-]{0,199}")
#: Deeper arguments are refused: the worker wraps them once more for the pool, and msgpack
#: stops at 1024 levels.
MAX_NESTING = 256


def check_task_id(task_id: str) -> str:
    """Raise ProtocolError unless ``task_id`` is 1-200 safe characters (no ``/``)."""
    if not _TASK_ID.fullmatch(task_id):
        raise ProtocolError(
            f"invalid task id {task_id[:60]!r}: use 1-200 letters, digits and _.:@+=-, "
            "starting with a letter or digit")
    return task_id


def nesting_depth(value: Any, limit: int = MAX_NESTING) -> int:
    """How deep lists and maps nest in ``value`` (stops counting past ``limit``)."""
    depth, level = 0, [value]
    while level and depth <= limit:
        nxt: list[Any] = []
        for item in level:
            if isinstance(item, (list, tuple)):
                nxt.extend(item)
            elif isinstance(item, dict):
                nxt.extend(item.values())
        if not nxt:
            break
        depth += 1
        level = nxt
    return depth


def _require(d: Mapping[str, Any], key: str, types: type | tuple[type, ...], what: str) -> Any:
    try:
        value = d[key]
    except KeyError:
        raise ProtocolError(f"{what} is missing field {key!r}") from None
    if not isinstance(value, types):
        raise ProtocolError(f"{what} field {key!r} has type {type(value).__name__}")
    return value


def _optional(d: Mapping[str, Any], key: str, types: type | tuple[type, ...], what: str) -> Any:
    value = d.get(key)
    if value is not None and not isinstance(value, types):
        raise ProtocolError(f"{what} field {key!r} has type {type(value).__name__}")
    return value


_NUMBER = (int, float)


@dataclass(frozen=True)
class TaskMessage:
    """A request to run ``task`` with ``args`` and ``kwargs``."""

    id: str
    task: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    queue: str = "default"
    reply_to: str | None = None
    token_digest: str | None = None
    created: float = field(default_factory=time.time)
    eta: float | None = None
    expires: float | None = None
    retries: int = 0
    headers: dict[str, Any] = field(default_factory=dict)
    #: what ``reply_to`` is subscribed to: every event ("all") or the final one ("final")
    watch: str = "final"

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": PROTOCOL_VERSION,
            "id": self.id,
            "task": self.task,
            "args": self.args,
            "kwargs": self.kwargs,
            "queue": self.queue,
            "reply_to": self.reply_to,
            "token": self.token_digest,
            "created": self.created,
            "eta": self.eta,
            "expires": self.expires,
            "retries": self.retries,
            "headers": self.headers,
            "watch": self.watch,
        }

    @classmethod
    def from_wire(cls, d: object) -> TaskMessage:
        what = "task message"
        if not isinstance(d, dict):
            raise ProtocolError(f"{what} is {type(d).__name__}, expected a map")
        task_id = _require(d, "id", str, what)
        name = _require(d, "task", str, what)
        if not task_id or not name:
            raise ProtocolError(f"{what} has an empty id or task name")
        check_task_id(task_id)
        args = _require(d, "args", (list, tuple), what)
        kwargs = _require(d, "kwargs", dict, what)
        if nesting_depth([args, kwargs]) > MAX_NESTING:
            raise ProtocolError(f"{what} arguments nest deeper than {MAX_NESTING} levels")
        return cls(
            id=task_id,
            task=name,
            args=list(args),
            kwargs=dict(kwargs),
            queue=_optional(d, "queue", str, what) or "default",
            reply_to=_optional(d, "reply_to", str, what),
            token_digest=_optional(d, "token", str, what),
            created=float(_optional(d, "created", _NUMBER, what) or 0.0),
            eta=_optional(d, "eta", _NUMBER, what),
            expires=_optional(d, "expires", _NUMBER, what),
            retries=int(_optional(d, "retries", int, what) or 0),
            headers=dict(_optional(d, "headers", dict, what) or {}),
            watch="all" if d.get("watch") == "all" else "final",
        )


class Verb:
    """Control verbs. Task verbs need the task's token; worker verbs do not."""

    PAUSE = "pause"
    RESUME = "resume"
    CANCEL = "cancel"
    MESSAGE = "message"
    ANSWER = "answer"
    SUBSCRIBE = "subscribe"
    UNSUBSCRIBE = "unsubscribe"
    # worker-level requests (broadcast)
    PING = "ping"
    INSPECT = "inspect"
    LOCATE = "locate"
    REVOKE = "revoke"
    # worker-wide changes (need the operator secret)
    RATE_LIMIT = "rate_limit"
    TIME_LIMIT = "time_limit"
    ADD_CONSUMER = "add_consumer"
    CANCEL_CONSUMER = "cancel_consumer"
    SHUTDOWN = "shutdown"
    POOL_GROW = "pool_grow"
    POOL_SHRINK = "pool_shrink"
    AUTOSCALE = "autoscale"


TASK_VERBS = frozenset(
    {Verb.PAUSE, Verb.RESUME, Verb.CANCEL, Verb.MESSAGE, Verb.ANSWER}
)
READ_VERBS = frozenset({Verb.SUBSCRIBE, Verb.UNSUBSCRIBE, Verb.LOCATE})
#: change the whole worker, as Celery's remote control commands of the same names
WORKER_CONTROL_VERBS = frozenset({Verb.RATE_LIMIT, Verb.TIME_LIMIT, Verb.ADD_CONSUMER,
                                  Verb.CANCEL_CONSUMER, Verb.SHUTDOWN, Verb.POOL_GROW,
                                  Verb.POOL_SHRINK, Verb.AUTOSCALE})
WORKER_VERBS = frozenset({Verb.PING, Verb.INSPECT, Verb.REVOKE}) | WORKER_CONTROL_VERBS
ALL_VERBS = TASK_VERBS | READ_VERBS | WORKER_VERBS


def control_wire(verb: str, task_id: str | None, data: Any, sender: str | None,
                 rid: str | None, cseq: int, token: str | None, ts: float,
                 receipt: bool = False) -> dict[str, Any]:
    """A control message as it goes on the wire (:meth:`ControlMessage.to_wire`); the
    client's unacknowledged ``send`` builds it without the dataclass. ``receipt`` (a
    message only; key ``rc``): the sender wants to hear when the task has taken it."""
    wire = {"v": PROTOCOL_VERSION, "verb": verb, "task_id": task_id, "data": data,
            "sender": sender, "rid": rid, "cseq": cseq, "token": token, "ts": ts}
    if receipt:
        wire["rc"] = True
    return wire


@dataclass(frozen=True)
class ControlMessage:
    """A request from a client to a worker, about one task or about the worker itself.

    ``cseq`` numbers the task verbs one client sends to one task, so a worker applies them
    in the order sent even when one copy came by broadcast and the next by its own queue.
    ``receipt`` (a message): once the task has taken it with ``self.receive()``, the pool
    process says so, and the worker sends ``sender`` a reply naming the task and ``cseq``
    (the back-pressure of ``handle.send(wait=False)``).
    """

    verb: str
    task_id: str | None = None
    data: Any = None
    sender: str | None = None
    rid: str | None = None
    cseq: int = 0
    token: str | None = None
    ts: float = field(default_factory=time.time)
    receipt: bool = False

    def to_wire(self) -> dict[str, Any]:
        return control_wire(self.verb, self.task_id, self.data, self.sender, self.rid,
                            self.cseq, self.token, self.ts, self.receipt)

    @classmethod
    def from_wire(cls, d: object) -> ControlMessage:
        """Raises ProtocolError for anything :func:`control_fields` refuses."""
        return cls(*control_fields(d))


#: task verbs and the watch verbs: each names its task
_NEEDS_TASK_ID = TASK_VERBS | {Verb.SUBSCRIBE, Verb.UNSUBSCRIBE}
#: (key, the types it may have when not None) of the other optional fields
_CONTROL_CHECKED = (("sender", str), ("rid", str), ("cseq", int), ("token", str),
                    ("ts", _NUMBER))


def _check_verb(verb: str, task_id: str | None) -> None:
    if verb not in ALL_VERBS:
        raise ProtocolError(
            f"unknown control verb {verb!r}; expected one of {', '.join(sorted(ALL_VERBS))}"
        )
    if not task_id and verb in _NEEDS_TASK_ID:
        raise ProtocolError(f"control verb {verb!r} needs a task_id")


#: ``(verb, task_id, data, sender, rid, cseq, token, ts, receipt)``: a ControlMessage's
#: fields in order
ControlFields = tuple[str, str | None, Any, str | None, str | None, int, str | None, float,
                      bool]


def control_fields(d: object) -> ControlFields:
    """``(verb, task_id, data, sender, rid, cseq, token, ts, receipt)`` of a control
    message on the wire (:func:`control_wire`), checked: the fields of
    :class:`ControlMessage`, which the worker reads without building one for a task verb
    (one message of a stream costs a decode and a dictionary walk, nothing more).

    Raises ProtocolError for a message that is not a map, an unknown or missing verb, a
    field of the wrong type, or a task or watch verb without a task id.
    """
    if not isinstance(d, dict):
        raise ProtocolError(f"control message is {type(d).__name__}, expected a map")
    get = d.get
    verb: Any = get("verb")
    task_id: Any = get("task_id")
    sender: Any = get("sender")
    rid: Any = get("rid")
    token: Any = get("token")
    cseq: Any = get("cseq")
    ts: Any = get("ts")
    # one test for the common case; the checks in the order that names the first fault
    # run only when it fails (a subclass, an int ts, or a fault)
    if not (verb.__class__ is str and (task_id is None or task_id.__class__ is str)
            and (sender is None or sender.__class__ is str)
            and (rid is None or rid.__class__ is str)
            and (token is None or token.__class__ is str)
            and (cseq is None or cseq.__class__ is int)
            and (ts is None or ts.__class__ is float)):
        what = "control message"
        _check_verb(_require(d, "verb", str, what), _optional(d, "task_id", str, what))
        for key, types in _CONTROL_CHECKED:
            _optional(d, key, types, what)
    _check_verb(verb, task_id)
    return (verb, task_id, get("data"), sender, rid, int(cseq or 0), token,
            float(ts or 0.0), get("rc") is True)


@dataclass(frozen=True)
class Event:
    """One event in a task's ordered stream.

    ``seq`` counts from 1 within one ``run`` (a delivery of the task to a worker); a task
    delivered again after its worker died starts a new run. Kind-specific fields are in
    ``fields`` and exposed as properties (``current``, ``total``, ``message`` for progress;
    ``data`` for message; ``level``, ``text`` for log; ``prompt`` for question; ``worker``,
    ``pid`` for started; ``result`` for succeeded; ``error`` for failed).

    ``first`` is set on a progress event that stands for earlier ones the worker
    coalesced away (latest progress wins): the lowest ``seq`` it covers. A watcher that
    sees an event whose ``covers_from`` is past its next expected ``seq`` missed events.
    """

    task_id: str
    seq: int
    kind: str
    ts: float
    fields: Mapping[str, Any] = field(default_factory=dict)
    run: int = 1
    first: int = 0

    @property
    def covers_from(self) -> int:
        """The lowest sequence number this event accounts for (itself, or coalesced ones)."""
        return self.first or self.seq

    # -- kind-specific views ---------------------------------------------------------
    @property
    def current(self) -> float | None:
        return self.fields.get("current")

    @property
    def total(self) -> float | None:
        return self.fields.get("total")

    @property
    def message(self) -> str | None:
        return self.fields.get("message")

    @property
    def data(self) -> Any:
        return self.fields.get("data")

    @property
    def level(self) -> str | None:
        return self.fields.get("level")

    @property
    def text(self) -> str | None:
        return self.fields.get("text")

    @property
    def prompt(self) -> str | None:
        return self.fields.get("prompt")

    @property
    def worker(self) -> str | None:
        return self.fields.get("worker")

    @property
    def pid(self) -> int | None:
        return self.fields.get("pid")

    @property
    def result(self) -> Any:
        return self.fields.get("result")

    @property
    def error(self) -> dict[str, Any] | None:
        return self.fields.get("error")

    @property
    def is_final(self) -> bool:
        return self.kind in FINAL_KINDS

    def to_wire(self) -> list[Any]:
        wire = [self.task_id, self.seq, self.kind, self.ts, dict(self.fields), self.run]
        if self.first:
            wire.append(self.first)
        return wire

    @classmethod
    def from_wire(cls, w: object) -> Event:
        """Raises ProtocolError for anything but a 6-item list (7 with ``first``)."""
        if not isinstance(w, (list, tuple)) or len(w) not in (6, 7):
            raise ProtocolError("event is not a 6- or 7-item list")
        task_id, seq, kind, ts, fields, run = w[:6]
        first = w[6] if len(w) == 7 else 0
        if not (
            isinstance(task_id, str)
            and isinstance(seq, int)
            and isinstance(kind, str)
            and isinstance(ts, _NUMBER)
            and isinstance(fields, dict)
            and isinstance(run, int)
            and isinstance(first, int)
        ):
            raise ProtocolError("event has fields of the wrong types")
        return cls(task_id, seq, kind, float(ts), fields, run, first)

    def __repr__(self) -> str:
        extra = ", ".join(f"{k}={v!r}" for k, v in self.fields.items())
        return f"<Event {self.task_id[:8]} #{self.seq} {self.kind} {extra}>"


@dataclass(frozen=True)
class TaskSnapshot:
    """Everything a watcher needs to draw one task, at sequence number ``seq``."""

    task_id: str
    name: str
    state: TaskState
    seq: int = 0
    run: int = 1
    worker: str | None = None
    pid: int | None = None
    progress: Event | None = None
    events: tuple[Event, ...] = ()
    question: dict[str, Any] | None = None
    result: Any = None
    error: dict[str, Any] | None = None
    received: float | None = None
    started: float | None = None
    finished: float | None = None
    interactive: bool = True

    def to_wire(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "name": self.name,
            "state": self.state.value,
            "seq": self.seq,
            "run": self.run,
            "worker": self.worker,
            "pid": self.pid,
            "progress": self.progress.to_wire() if self.progress else None,
            "events": [e.to_wire() for e in self.events],
            "question": self.question,
            "result": self.result,
            "error": self.error,
            "received": self.received,
            "started": self.started,
            "finished": self.finished,
            "interactive": self.interactive,
        }

    @classmethod
    def from_wire(cls, d: object) -> TaskSnapshot:
        what = "snapshot"
        if not isinstance(d, dict):
            raise ProtocolError(f"{what} is not a map")
        try:
            state = TaskState(_require(d, "state", str, what))
        except ValueError:
            raise ProtocolError(f"{what} has an unknown state {d.get('state')!r}") from None
        progress = d.get("progress")
        return cls(
            task_id=_require(d, "task_id", str, what),
            name=_optional(d, "name", str, what) or "",
            state=state,
            seq=int(_optional(d, "seq", int, what) or 0),
            run=int(_optional(d, "run", int, what) or 1),
            worker=_optional(d, "worker", str, what),
            pid=_optional(d, "pid", int, what),
            progress=Event.from_wire(progress) if progress is not None else None,
            events=tuple(Event.from_wire(e) for e in _optional(d, "events", list, what) or ()),
            question=_optional(d, "question", dict, what),
            result=d.get("result"),
            error=_optional(d, "error", dict, what),
            received=_optional(d, "received", _NUMBER, what),
            started=_optional(d, "started", _NUMBER, what),
            finished=_optional(d, "finished", _NUMBER, what),
            interactive=bool(d.get("interactive", True)),
        )


class Envelope:
    """Types of message that arrive in a client's inbox (the ``"t"`` field)."""

    EVENTS = "events"  # {"t", "e": [event wire, ...]}
    SNAPSHOT = "snapshot"  # {"t", "rid", "snapshot": TaskSnapshot wire}
    REPLY = "reply"  # {"t", "rid", "ok", "worker", "data" | "error": {"type", "message"}}
    # a receipt is a reply with no rid: {"t": "reply", "ok", "worker", "task_id", "receipt":
    # cseq}, the task has taken that message (receipt_reply)
    HEARTBEAT = "heartbeat"  # {"t", "worker", "tasks": [task ids], "ts"}


def receipt_reply(worker: str, task_id: str, cseq: Any) -> dict[str, Any]:
    """The inbox reply saying that task ``task_id`` has taken the message ``cseq`` its
    client sent with ``receipt`` (:class:`ControlMessage`)."""
    return {"t": Envelope.REPLY, "rid": None, "ok": True, "worker": worker,
            "task_id": task_id, "receipt": cseq}
