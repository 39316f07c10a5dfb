"""The task-side API: what a running task can do, and the runtime that provides it.

The worker's pool installs a :class:`TaskRuntime` for the task it runs (in a context
variable, so threads pools keep one per thread). :class:`~interactive_tasks.task.InteractiveTask`
methods (``progress``, ``send``, ``receive``, ``checkpoint``, ``ask``) delegate to it.
Calling a task directly (``long_task(5)``) runs it with :class:`LocalRuntime`, which needs
no worker: progress and messages are dropped, ``receive`` returns None and ``ask`` raises.
"""

from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import QuestionTimeout


@dataclass(frozen=True)
class Request:
    """What a running task knows about its own invocation (Celery's ``self.request``)."""

    id: str
    task: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    retries: int = 0
    hostname: str | None = None
    delivery: int = 1
    headers: dict[str, Any] = field(default_factory=dict)
    eta: float | None = None
    expires: float | None = None


class TaskRuntime(Protocol):
    """Implemented by the worker's pool child runtime; one per running task."""

    request: Request

    def progress(self, current: float, total: float | None, message: str | None) -> None:
        """Emit a progress event; also a checkpoint."""

    def send(self, data: Any) -> None:
        """Emit a message event to every watcher; also a checkpoint."""

    def receive(self, timeout: float | None) -> Any:
        """Next inbound message, or None after ``timeout`` (0 = do not wait)."""

    def checkpoint(self) -> None:
        """Block while paused; raise :class:`~interactive_tasks.errors.Cancelled` if cancelled."""

    def ask(self, prompt: str, timeout: float | None, choices: list[str] | None) -> Any:
        """Emit a question and block until a client answers it."""

    def log(self, level: str, text: str) -> None:
        """Emit a log event."""


_current: contextvars.ContextVar[TaskRuntime | None] = contextvars.ContextVar(
    "interactive_tasks_runtime", default=None
)


def current_runtime() -> TaskRuntime:
    """The runtime of the task running in this thread.

    Raises ``RuntimeError`` outside a running task.
    """
    runtime = _current.get()
    if runtime is None:
        raise RuntimeError("not inside a running task")
    return runtime


def set_runtime(runtime: TaskRuntime | None) -> contextvars.Token[TaskRuntime | None]:
    return _current.set(runtime)


def reset_runtime(token: contextvars.Token[TaskRuntime | None]) -> None:
    _current.reset(token)


class LocalRuntime:
    """Runtime for a task called directly in the current process (tests, scripts)."""

    def __init__(self, request: Request) -> None:
        self.request = request

    def progress(self, current: float, total: float | None, message: str | None) -> None:
        return None

    def send(self, data: Any) -> None:
        return None

    def receive(self, timeout: float | None) -> Any:
        if timeout:
            time.sleep(timeout)
        return None

    def checkpoint(self) -> None:
        return None

    def ask(self, prompt: str, timeout: float | None, choices: list[str] | None) -> Any:
        raise QuestionTimeout(f"no client can answer {prompt!r}: the task runs locally")

    def log(self, level: str, text: str) -> None:
        return None
