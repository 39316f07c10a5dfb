"""Continuing workflows on the worker: the next chain step, a chord's callback.

Called after a task's final state is recorded. A chain step carries the steps after it
(``headers[HEADER_CHAIN]``); a chord member carries the chord (``headers[HEADER_CHORD]``: id, size,
member ids and the callback). See :mod:`interactive_tasks.canvas` for the client side.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from interactive_tasks.errors import ProtocolError
from interactive_tasks.protocol import (
    HEADER_CHAIN,
    HEADER_CHORD,
    HEADER_LINK,
    HEADER_LINK_ERROR,
    EventKind,
    TaskMessage,
    TaskSnapshot,
    TaskState,
)

if TYPE_CHECKING:
    from interactive_tasks.app import App

    from .relay import Relay

logger = logging.getLogger("interactive_tasks.worker")


@dataclass(frozen=True)
class Workflows:
    """What continuing a workflow needs of the worker: its ``app`` (the result store, for
    a chord), its ``relay`` (final events of steps that will never run) and
    ``publish_task`` (the next step)."""

    app: App
    relay: Relay
    publish_task: Callable[[TaskMessage], None]


def _step_message(step: object, args_prefix: list[Any], reply_to: str | None,
                  headers: dict[str, Any]) -> TaskMessage:
    if not isinstance(step, dict):
        raise ProtocolError("workflow step is not a map")
    if step.get("immutable"):  # task.si(): no parent result
        args_prefix = []
    wire = {"id": step.get("id"), "task": step.get("task"),
            "args": [*args_prefix, *(step.get("args") or [])],
            "kwargs": step.get("kwargs") or {}, "queue": step.get("queue"),
            "reply_to": step.get("reply_to", reply_to), "token": step.get("token_digest"),
            "headers": headers, "watch": step.get("watch")}
    return TaskMessage.from_wire(wire)


def _stop(flow: Workflows, steps: list[Any], reply_to: str | None, reason: str) -> None:
    """End the steps that will never run as ``revoked``, so their handles finish too."""
    for step in steps:
        if isinstance(step, dict) and isinstance(step.get("id"), str):
            flow.relay.send_final_direct(
                step["id"], str(step.get("task", "?")), step.get("reply_to", reply_to),
                EventKind.REVOKED,
                {"error": {"type": "TaskRevoked", "message": reason, "traceback": ""}},
                store=True)


def after_finish(flow: Workflows, message: TaskMessage, kind: str,
                 fields: dict[str, Any]) -> None:
    """Publish what comes next in the task's workflow, if it is part of one.

    Also called for a step rejected on arrival (unknown task, too many deliveries), so
    the rest of its workflow ends instead of waiting for ever.
    """
    headers = message.headers
    try:
        chain = headers.get(HEADER_CHAIN)
        if isinstance(chain, list) and chain:
            _continue_chain(flow, message, kind, fields, chain)
        chord = headers.get(HEADER_CHORD)
        if isinstance(chord, dict):
            _chord_member_done(flow, chord)
        if HEADER_LINK in headers or HEADER_LINK_ERROR in headers:
            _callbacks(flow, message, kind, fields)
    except ProtocolError as exc:
        logger.error("task %s: cannot continue its workflow: %s", message.id, exc.reason)


def _callbacks(flow: Workflows, message: TaskMessage, kind: str,
               fields: dict[str, Any]) -> None:
    """``apply_async(link=, link_error=)``: after a success each link is published with
    the result first in its arguments, after a failure each errback with the task's id
    (Celery's arguments for an errback that is a task); the callbacks that do not apply
    end ``revoked``, so their handles finish too."""
    links = message.headers.get(HEADER_LINK) or []
    errbacks = message.headers.get(HEADER_LINK_ERROR) or []
    if not (isinstance(links, list) and isinstance(errbacks, list)):
        raise ProtocolError("callbacks header is not a list")
    if kind == EventKind.SUCCEEDED:
        run, prefix, skipped = links, [fields.get("result")], errbacks
    elif kind == EventKind.FAILED:
        run, prefix, skipped = errbacks, [message.id], links
    else:
        run, prefix, skipped = [], [], links + errbacks
    for step in run:
        flow.publish_task(_step_message(step, prefix, message.reply_to, {}))
    _stop(flow, skipped, message.reply_to,
          f"callback not run: task {message.task} ({message.id}) ended {kind}")


def _continue_chain(flow: Workflows, message: TaskMessage, kind: str, fields: dict[str, Any],
                    chain: list[Any]) -> None:
    reply_to = message.reply_to
    last = chain[-1]
    # a chain in a chord's header: its last step carries the chord
    chord = last.get("chord") if isinstance(last, dict) else None
    if kind != EventKind.SUCCEEDED:
        _stop(flow, chain, reply_to,
              f"chain stopped: step {message.task} ({message.id}) ended {kind}")
        if isinstance(chord, dict):
            _chord_member_done(flow, chord)  # the chain ended: the chord counts it
        return
    rest = chain[1:]
    headers: dict[str, Any] = {HEADER_CHAIN: rest} if rest else {}
    if not rest and isinstance(chord, dict):
        headers[HEADER_CHORD] = chord
    message = _step_message(chain[0], [fields.get("result")], reply_to, headers)
    flow.publish_task(message)


def _chord_member_done(flow: Workflows, chord: dict[str, Any]) -> None:
    chord_id, size = chord.get("id"), chord.get("size")
    members, body = chord.get("members"), chord.get("body")
    if not (isinstance(chord_id, str) and isinstance(size, int) and isinstance(members, list)):
        raise ProtocolError("chord header is malformed")
    # The member's own result must be readable before we count it.
    flow.relay.flush(wait=True)
    results = flow.app.results
    if results.chord_incr(chord_id) < size:
        return
    results.chord_forget(chord_id)
    values, failure = [], None
    for member_id in members:
        stored = results.get(member_id) if isinstance(member_id, str) else None
        snap = TaskSnapshot.from_wire(stored) if stored else None
        if snap is None or snap.state is not TaskState.SUCCEEDED:
            error = (snap.error if snap else None) or {}
            failure = (f"chord member {member_id} ended "
                       f"{snap.state.value if snap else 'without a result'}: "
                       f"{error.get('type', '')} {error.get('message', '')}".strip())
            break
        values.append(snap.result)
    reply_to = body.get("reply_to") if isinstance(body, dict) else None
    if failure is not None:
        if isinstance(body, dict) and isinstance(body.get("id"), str):
            flow.relay.send_final_direct(
                body["id"], str(body.get("task", "?")), reply_to, EventKind.FAILED,
                {"error": {"type": "ChordError", "message": failure, "traceback": ""}},
                store=True)
        return
    flow.publish_task(_step_message(body, [values], reply_to, {}))
