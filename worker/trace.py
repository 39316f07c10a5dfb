"""Around one run of a task, in the process that runs it: signals and the task's hooks.

:class:`~.child.Slot` calls :func:`before` once the task is found and its runtime is in
place, and :func:`after` with the run's outcome while that runtime is still in place, so
receivers see ``self.request`` and may use an interactive task's ``progress``/``send``.
Neither ever raises: a receiver's exception is logged by the signal.
"""

from __future__ import annotations

import logging
import signal
import traceback as traceback_module
from types import TracebackType
from typing import Any

from interactive_tasks import signals
from interactive_tasks.context import Request
from interactive_tasks.errors import Retry
from interactive_tasks.protocol import EventKind, TaskMessage, TaskState

logger = logging.getLogger("interactive_tasks.worker")


class ExceptionInfo:
    """An exception with its traceback, as Celery's ``einfo``: ``str(einfo)`` is the
    formatted traceback; ``type``, ``exception`` and ``tb`` are the parts."""

    def __init__(self, exc: BaseException) -> None:
        self.type: type[BaseException] = type(exc)
        self.exception = exc
        self.tb: TracebackType | None = exc.__traceback__
        self.traceback = "".join(traceback_module.format_exception(
            self.type, exc, exc.__traceback__))

    def __str__(self) -> str:
        return self.traceback

    def __repr__(self) -> str:
        return f"<ExceptionInfo: {self.exception!r}>"


def before(task: Any, request: Request) -> None:
    """``task_prerun``, just before the task's body runs."""
    signals.task_prerun.send(sender=task, task_id=request.id, task=task,
                             args=request.args, kwargs=request.kwargs)


def after(task: Any, request: Request, kind: str, fields: dict[str, Any],
          error: BaseException | None) -> None:
    """The task's hook and the signal of the outcome (``on_success``/``task_success``,
    ``on_failure``/``task_failure`` or ``on_retry``/``task_retry``), then ``after_return``
    and ``task_postrun``, in Celery's order. ``kind`` and ``fields`` are the run's final
    event. A hook that raises is logged; the outcome stands."""
    retval: Any = fields.get("result")
    einfo: ExceptionInfo | None = None
    args, kwargs = request.args, request.kwargs
    if kind == EventKind.SUCCEEDED:
        _hook(task, "on_success", retval, request.id, args, kwargs)
        signals.task_success.send(sender=task, result=retval)
    elif kind == EventKind.RETRY:
        reason = error.exc if isinstance(error, Retry) and error.exc is not None else error
        einfo = ExceptionInfo(reason) if reason is not None else None
        _hook(task, "on_retry", reason, request.id, args, kwargs, einfo)
        signals.task_retry.send(sender=task, request=request, reason=reason, einfo=einfo)
    elif kind == EventKind.FAILED and error is not None:
        retval, einfo = error, ExceptionInfo(error)
        _hook(task, "on_failure", error, request.id, args, kwargs, einfo)
        signals.task_failure.send(sender=task, task_id=request.id, exception=error,
                                  args=args, kwargs=kwargs, traceback=error.__traceback__,
                                  einfo=einfo)
    elif error is not None:
        retval = error
    state = TaskState(kind)
    _hook(task, "after_return", state, retval, request.id, args, kwargs, einfo)
    signals.task_postrun.send(sender=task, task_id=request.id, task=task, args=args,
                              kwargs=kwargs, retval=retval, state=state)


def _hook(task: Any, name: str, *args: Any) -> None:
    try:
        getattr(task, name)(*args)
    except Exception:
        logger.exception("task %s: %s raised", getattr(task, "name", task), name)


def revoked(app: Any, message: TaskMessage, kind: str, fields: dict[str, Any],
            hostname: str) -> None:
    """``task_revoked``, in the worker process, for a task that ends ``revoked`` (revoked
    or expired before it started) or ``cancelled`` (``terminated``; ``signum`` is SIGTERM
    when the cancel was forced)."""
    if kind not in (EventKind.REVOKED, EventKind.CANCELLED) or \
            not signals.task_revoked.has_listeners():
        return
    task = app.tasks.get(message.task)
    request = Request(id=message.id, task=message.task, args=tuple(message.args),
                      kwargs=dict(message.kwargs), retries=message.retries,
                      hostname=hostname, headers=dict(message.headers), eta=message.eta,
                      expires=message.expires)
    error = fields.get("error") or {}
    expired = kind == EventKind.REVOKED and "expired" in str(error.get("message", ""))
    terminated = kind == EventKind.CANCELLED
    signum = signal.SIGTERM if terminated and fields.get("forced") else None
    signals.task_revoked.send(sender=task, request=request, terminated=terminated,
                              signum=signum, expired=expired)
