"""What the control verbs decide, from plain data, for the worker and the Celery bridge.

The worker's :class:`~.control.ControlRouter` and the Celery bridge's relay
(``interactive_tasks/celery/relay.py``) reach their tasks differently (a pool slot, a
Celery pool process's channel) but answer clients alike. What a verb decides is here once:
each function takes plain values (the control's data, a task's pending question, its
``last_cseq`` or watchers, the tables of held control and watchers) and returns the
decision, or raises :class:`Refused` with the error the client's reply carries. Acting on
the decision (writing to the task's process, emitting, publishing) stays with the caller.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from interactive_tasks import codec
from interactive_tasks.protocol import ControlFields, ControlMessage, Envelope, TaskState, Verb

from .records import HeldControl, Receipt, Subscriber

#: control held for a task this worker does not have yet is dropped after this long
HELD_CONTROL_TTL = 300.0
#: seconds a cancelled task has to end on its own before it is stopped by force
DEFAULT_CANCEL_GRACE = 5.0


class Refused(Exception):
    """A control the task cannot take; ``error`` is the reply's (type, message)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.error = (kind, message)


def reply_message(hostname: str, rid: str | None, ok: bool, *, data: Any = None,
                  error: tuple[str, str] | None = None,
                  pending: bool = False) -> dict[str, Any]:
    """The reply to a control request, for the sender's inbox."""
    payload: dict[str, Any] = {"t": Envelope.REPLY, "rid": rid, "ok": ok, "worker": hostname}
    if data is not None:
        payload["data"] = data
    if pending:
        payload["pending"] = True
    if error is not None:
        payload["error"] = {"type": error[0], "message": error[1]}
    return payload


def snapshot_message(hostname: str, rid: str | None, snapshot: dict[str, Any]) -> dict[str, Any]:
    """A task's snapshot (its wire form), for a watcher's inbox."""
    return {"t": Envelope.SNAPSHOT, "rid": rid, "worker": hostname, "snapshot": snapshot}


# -- task verbs (pause, resume, cancel, message, answer) ----------
def held_control(ctl: ControlMessage, signed: bool) -> HeldControl:
    """A task verb as it waits to be applied: at once when its task is here, else when
    the task arrives (within :data:`HELD_CONTROL_TTL`)."""
    return held_fields((ctl.verb, ctl.task_id, ctl.data, ctl.sender, ctl.rid, ctl.cseq,
                        ctl.token, ctl.ts, ctl.receipt), signed)


def held_fields(fields: ControlFields, signed: bool) -> HeldControl:
    """:func:`held_control` from a control's checked wire fields
    (:func:`~interactive_tasks.protocol.control_fields`), without a ControlMessage."""
    verb, _, data, sender, rid, cseq, token, _, receipt = fields
    return HeldControl(verb, data, sender, rid, cseq, token, signed,
                       time.monotonic() + HELD_CONTROL_TTL, receipt)


def receipt_of(held: HeldControl) -> Receipt | None:
    """``[sender's inbox, cseq]`` of a message whose sender asked for a receipt: the pool
    process hands it back (``["rc", task_id, receipt]``) once the task has taken the
    message, and the worker passes it on to that inbox (back-pressure on
    ``handle.send(wait=False)``)."""
    if held.receipt and held.sender:
        return [held.sender, held.cseq]
    return None


def hold(held: dict[str, list[HeldControl]], task_id: str, control: HeldControl) -> str | None:
    """Keep ``control`` for a task that is not here (yet); returns the sender's inbox when
    it waits for a reply (which then says that the control is pending)."""
    held.setdefault(task_id, []).append(control)
    return control.sender if control.sender and control.rid else None


def first_time(last_cseq: dict[str, int], control: HeldControl) -> bool:
    """False for a copy of a control already applied to the task (a client sends one both
    broadcast and direct when it does not know the task's worker yet); True otherwise,
    noting its sequence number in ``last_cseq`` (the task's, per sender)."""
    sender = control.sender
    if sender and control.cseq:
        if control.cseq <= last_cseq.get(sender, 0):
            return False
        last_cseq[sender] = control.cseq
    return True


def outcome(control: HeldControl, task_id: str, last_cseq: dict[str, int], *,
            authorized: bool, apply: Callable[[], None], log: logging.Logger,
            token_help: str = "") -> tuple[bool, tuple[str, str] | None]:
    """Apply a task verb (``apply()``, which raises :class:`Refused` when the task cannot
    take it) if its sender may and it is not a copy already applied; returns the reply's
    ``ok`` and error. A refusal for want of the token is logged on ``log`` (the caller's)
    and its message ends with ``token_help``."""
    if not authorized:
        log.warning("refused %s for task %s from %s: wrong or missing token",
                    control.verb, task_id, control.sender)
        return False, ("NotAuthorized", f"not authorised to {control.verb} task {task_id}: "
                                        f"wrong or missing token{token_help}")
    if not first_time(last_cseq, control):
        return True, None
    try:
        apply()
    except Refused as exc:
        return False, exc.error
    return True, None


def ended(task_id: str, state: TaskState) -> Refused:
    """The refusal of a task verb for a task that has ended."""
    return Refused("TaskFinished", f"task {task_id} already ended ({state.value})")


def is_hard(data: Any) -> bool:
    """Whether a ``pause`` asks to stop the task's process (SIGSTOP), not the task."""
    return isinstance(data, dict) and bool(data.get("hard"))


def cancel_grace(data: Any) -> float:
    """How long a ``cancel`` gives the task to end before it is stopped by force."""
    if isinstance(data, dict) and isinstance(data.get("grace"), (int, float)):
        return max(0.0, float(data["grace"]))
    return DEFAULT_CANCEL_GRACE


def answer(task_id: str, question: dict[str, Any] | None, data: Any) -> dict[str, Any]:
    """What an ``answer`` tells the task: the pending question's id and the value.
    Refused when no question is pending, or when the answer names an earlier one."""
    qid = data.get("qid") if isinstance(data, dict) else None
    if question is None:
        raise Refused("ControlError", f"task {task_id} has no pending question")
    if qid and qid != question.get("qid"):
        raise Refused("ControlError", "that question was already answered")
    value = data.get("value") if isinstance(data, dict) else data
    return {"qid": question.get("qid"), "value": value}


# -- reads (subscribe, unsubscribe, locate) ----------
def read_settled(ctl: ControlMessage, subscribers: dict[str, Subscriber] | None,
                 token_digest: str | None, *, signed: bool, read_only_attach: bool) -> bool:
    """The first steps of a read on a task's watchers (``subscribers``; None when the task
    is not here). True when they settle it: no sender to answer, or an ``unsubscribe``
    (done here). Refused when it would attach without the task's token where attaching
    needs it (``read_only_attach`` off, ``ctl`` unsigned). False: the caller goes on."""
    sender = ctl.sender
    if not sender:
        return True
    if ctl.verb == Verb.UNSUBSCRIBE:
        if subscribers is not None:
            subscribers.pop(sender, None)
        return True
    if subscribers is not None and not read_only_attach and not signed and \
            not codec.token_matches(ctl.token, token_digest):
        raise Refused("NotAuthorized", "attach needs the task's token here")
    return False


def renewals(ctl: ControlMessage) -> list[str] | None:
    """The task ids a ``subscribe`` renews the sender's watch of (its ``renew`` list), or
    None when ``ctl`` is not such a renewal."""
    renew = ctl.data.get("renew") if isinstance(ctl.data, dict) else None
    if ctl.verb != Verb.SUBSCRIBE or not isinstance(renew, list):
        return None
    return [task_id for task_id in renew if isinstance(task_id, str)]


def extend(subscribers: dict[str, Subscriber], inbox: str, expires: float) -> bool:
    """Extend ``inbox``'s watch to ``expires`` (one for as long as the task runs stays
    so); False when ``inbox`` does not watch."""
    sub = subscribers.get(inbox)
    if sub is None:
        return False
    if sub.expires != float("inf"):
        sub.expires = expires
    return True


def watch_unknown(ctl: ControlMessage, held_subscribers: dict[str, dict[str, Subscriber]],
                  expires: float, hostname: str) -> None:
    """A read for a task that is not here: its sender watches the task from when it
    arrives (until ``expires``). Refused for a ``subscribe`` (a ``locate`` is not
    answered by the workers that do not hold the task)."""
    if ctl.task_id and ctl.sender:
        subs = held_subscribers.setdefault(ctl.task_id, {})
        subs[ctl.sender] = Subscriber(ctl.sender, expires, True)
    if ctl.verb == Verb.SUBSCRIBE:
        raise Refused("UnknownTask", f"task {ctl.task_id} is not on {hostname}")
