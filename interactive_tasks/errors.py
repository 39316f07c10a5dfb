"""Every error interactive_tasks raises, in one tree.

::

    InteractiveTasksError
    ├── ConfigurationError          bad settings, app module not importable
    ├── TransportError              broker or result store unreachable
    ├── ProtocolError               a message that cannot be decoded or validated
    │   └── PayloadTooLarge
    ├── TaskError
    │   ├── TaskFailed              the task raised; carries remote type, text, traceback
    │   ├── TaskCancelled           the task was cancelled (client side view)
    │   ├── TaskRevoked             revoked or expired before it ran
    │   ├── WorkerLost              the process running the task died
    │   ├── UnknownTask             no such task name registered / no such task id known
    │   ├── TaskTimeout             waiting for a result or event timed out (also TimeoutError)
    │   ├── QuestionTimeout         ``ask()`` got no answer in time (also TimeoutError)
    │   ├── SoftTimeLimitExceeded   raised in a task past its ``soft_time_limit``
    │   └── MaxRetriesExceeded      ``self.retry()`` past ``max_retries``
    └── ControlError                a control message was refused
        ├── NotAuthorized           missing or wrong capability token / signature
        ├── TaskFinished            the task already ended
        └── HardPauseUnsupported    hard pause asked of a pool that cannot do it

Interrupts raised inside tasks are *not* in this tree: :class:`Cancelled` derives from
``BaseException`` so an ``except Exception:`` in user code cannot swallow a cancel, and
:class:`Retry` (raised by ``self.retry()``) likewise.
"""

from __future__ import annotations

from typing import Any


class InteractiveTasksError(Exception):
    """Root of every error this package raises."""


class ConfigurationError(InteractiveTasksError):
    """Settings are invalid or an app module cannot be imported."""


class TransportError(InteractiveTasksError):
    """The broker or result store cannot be reached."""


#: What to do about a broker that cannot be reached: the end of the TransportError raised
#: for it, so a Python program's traceback says it as ``itask`` does.
BROKER_HINT = ("check that the broker runs and that its URL gives its address and "
               "credentials: App(broker=...), -b or ITASK_BROKER_URL")


class ProtocolError(InteractiveTasksError):
    """A message could not be decoded or failed validation.

    ``raw`` keeps the undecoded bytes so the message can go to the dead-letter queue.
    """

    def __init__(self, reason: str, raw: bytes | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.raw = raw


class PayloadTooLarge(ProtocolError):
    """A message body is over the configured ``max_message_size``."""


class TaskError(InteractiveTasksError):
    """Base for errors about one task."""


class TaskFailed(TaskError):
    """The task raised an exception on the worker.

    ``remote_type`` is the exception's qualified class name, ``remote_message`` its text and
    ``remote_traceback`` the formatted traceback from the worker.
    """

    def __init__(
        self,
        task_id: str,
        remote_type: str,
        remote_message: str,
        remote_traceback: str = "",
    ) -> None:
        super().__init__(f"task {task_id} failed: {remote_type}: {remote_message}")
        self.task_id = task_id
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback

    @classmethod
    def from_error(cls, task_id: str, error: dict[str, Any] | None) -> TaskFailed:
        error = error or {}
        return cls(
            task_id,
            str(error.get("type", "Exception")),
            str(error.get("message", "")),
            str(error.get("traceback", "")),
        )


class TaskCancelled(TaskError):
    """The task was cancelled before it could return a value."""


class TaskRevoked(TaskError):
    """The task was revoked or expired and never ran."""


class WorkerLost(TaskError):
    """The worker process (or pool child) running the task died."""


class UnknownTask(TaskError):
    """No task is registered under that name, or no task with that id is known."""


class TaskTimeout(TaskError, TimeoutError):
    """Waiting for a task's result or next event timed out."""


class QuestionTimeout(TaskError, TimeoutError):
    """``ask()`` got no answer before its timeout."""


class MaxRetriesExceeded(TaskError):
    """A task asked to be retried more than its ``max_retries``."""


class SoftTimeLimitExceeded(TaskError):
    """Raised inside a task that ran past its ``soft_time_limit`` (paused time excluded).

    Catch it to clean up; the hard ``time_limit`` (if any) still applies. In the prefork
    pool it interrupts the task wherever it is; elsewhere at the next checkpoint.
    """


class ControlError(InteractiveTasksError):
    """A control message was refused by the worker."""


class NotAuthorized(ControlError):
    """Control needs the task's capability token or the app's operator secret."""


class TaskFinished(ControlError):
    """The task already ended; it cannot be controlled any more."""


class SendTimeout(ControlError, TimeoutError):
    """``handle.send(data, wait=False)`` waited its ``timeout`` for the task to take
    earlier messages: the handle had ``send_window`` of them outstanding (the task reads
    slower than it is sent to, is paused, or its worker went away)."""


class HardPauseUnsupported(ControlError):
    """Hard pause (SIGSTOP) is only possible in the prefork pool."""


class Cancelled(BaseException):
    """Raised inside a task at a checkpoint when a client cancelled it.

    Derives from ``BaseException`` so ``except Exception:`` cannot swallow it. Let it
    propagate; clean-up in ``finally`` blocks runs as usual.
    """


class Retry(BaseException):
    """Raised by ``self.retry()``: end this run and run the task again later.

    ``countdown`` is the delay in seconds; ``exc`` the error that caused the retry.
    """

    def __init__(self, exc: BaseException | None = None, countdown: float = 0.0) -> None:
        super().__init__(f"retry in {countdown:.3g}s" + (f": {exc!r}" if exc else ""))
        self.exc = exc
        self.countdown = countdown


__all__ = [
    "Cancelled",
    "ConfigurationError",
    "ControlError",
    "HardPauseUnsupported",
    "InteractiveTasksError",
    "MaxRetriesExceeded",
    "NotAuthorized",
    "PayloadTooLarge",
    "ProtocolError",
    "QuestionTimeout",
    "Retry",
    "SoftTimeLimitExceeded",
    "TaskCancelled",
    "TaskError",
    "TaskFailed",
    "TaskFinished",
    "TaskRevoked",
    "TaskTimeout",
    "TransportError",
    "UnknownTask",
    "WorkerLost",
]
