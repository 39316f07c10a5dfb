"""Around one run of a task, in the process that runs it: signals before and after.

:class:`~.child.Slot` calls :func:`before` once the task is found and its runtime is in
place, and :func:`after` with the run's outcome while that runtime is still in place, so
receivers see ``self.request`` and may use an interactive task's ``progress``/``send``.
Neither ever raises: a receiver's exception is logged by the signal.
"""

from __future__ import annotations

import signal
import traceback as traceback_module
from types import TracebackType
from typing import Any

from interactive_tasks import signals
from interactive_tasks.context import Request
from interactive_tasks.errors import Retry
from interactive_tasks.protocol import EventKind, TaskMessage, TaskState


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
    """The outcome's signal (``task_success``, ``task_failure`` or ``task_retry``), then
    ``task_postrun``. ``kind`` and ``fields`` are the run's final event."""
    retval: Any = fields.get("result")
    if kind == EventKind.SUCCEEDED:
        signals.task_success.send(sender=task, result=retval)
    elif kind == EventKind.RETRY:
        reason = error.exc if isinstance(error, Retry) and error.exc is not None else error
        signals.task_retry.send(sender=task, request=request, reason=reason,
                                einfo=ExceptionInfo(reason) if reason is not None else None)
    elif kind == EventKind.FAILED and error is not None:
        retval = error
        signals.task_failure.send(sender=task, task_id=request.id, exception=error,
                                  args=request.args, kwargs=request.kwargs,
                                  traceback=error.__traceback__, einfo=ExceptionInfo(error))
    elif error is not None:
        retval = error
    signals.task_postrun.send(sender=task, task_id=request.id, task=task, args=request.args,
                              kwargs=request.kwargs, retval=retval, state=TaskState(kind))


def revoked(app: Any, message: TaskMessage, kind: str, fields: dict[str, Any],
            hostname: str) -> None:
    """``task_revoked``, in the worker process, for a task that ends ``revoked`` (revoked
    or expired before it started) or ``cancelled`` (``terminated``; ``signum`` is SIGTERM
    when the cancel was forced)."""
    if kind not in (EventKind.REVOKED, EventKind.CANCELLED) or \
            not signals.task_revoked.receivers:
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
