"""``InteractiveTask``: a Celery task base class with the interactive task API.

In a bridged worker (``enable(app)``) each run registers with the relay over its
process's channel, and ``self.progress``, ``send``, ``receive``, ``checkpoint``, ``ask``
and ``log`` act as they do in an itask worker. Called directly, eagerly, or in a worker
without the relay, the task runs as a plain Celery task (events go nowhere, ``receive``
returns None, ``ask`` raises :class:`~interactive_tasks.errors.QuestionTimeout`).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from celery import Task
from celery.exceptions import Ignore
from celery.exceptions import Retry as CeleryRetry
from celery.result import AsyncResult

from .. import codec
from ..context import LocalRuntime, Request, current_runtime, reset_runtime, set_runtime
from ..errors import Cancelled
from ..handle import TaskHandle
from ..protocol import EventKind
from .enabling import bridge_app
from .process import process_channel

#: the message header that carries the starter's inbox and the token's digest
HEADER = "itask_bridge"


class CeleryTaskHandle(TaskHandle[Any]):
    """A :class:`~interactive_tasks.handle.TaskHandle` that also holds the Celery
    ``AsyncResult`` of the same task id (``handle.async_result``)."""

    async_result: AsyncResult | None = None


class InteractiveTask(Task):
    """Base class for Celery tasks that can be watched and steered while they run.

    Use it as ``@app.task(base=InteractiveTask, bind=True)``; ``task.start()`` returns a
    :class:`CeleryTaskHandle`; ``delay()``/``apply_async()`` and ``AsyncResult`` stay
    Celery's.
    """

    # -- the task-side API (inside the task body) ---------------------------------------
    def progress(self, current: float, total: float | None = None,
                 message: str | None = None) -> None:
        """Report progress to watchers; a checkpoint (pause and cancel act here)."""
        current_runtime().progress(current, total, message)

    def send(self, data: Any) -> None:
        """Send ``data`` to every watcher as a ``message`` event; a checkpoint."""
        current_runtime().send(data)

    def receive(self, timeout: float | None = None) -> Any:
        """The next message sent to the task, or None after ``timeout`` seconds (0: do
        not wait); a checkpoint. Raises :class:`~interactive_tasks.errors.Cancelled`."""
        return current_runtime().receive(timeout)

    def checkpoint(self) -> None:
        """Wait here while paused; raise :class:`~interactive_tasks.errors.Cancelled`
        when cancelled."""
        current_runtime().checkpoint()

    def ask(self, prompt: str, timeout: float | None = None,
            choices: list[str] | None = None) -> Any:
        """Ask watchers a question and wait for the answer. Raises
        :class:`~interactive_tasks.errors.QuestionTimeout` after ``timeout`` seconds."""
        return current_runtime().ask(prompt, timeout, choices)

    def log(self, text: str, level: str = "info") -> None:
        """Send a log line to watchers (``print`` and ``logging`` already do)."""
        current_runtime().log(level, text)

    # -- running ----------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        channel = None
        if not request.called_directly and not request.is_eager:
            channel = process_channel()
        if channel is None:
            local = LocalRuntime(Request(id=request.id or str(uuid.uuid4()), task=self.name,
                                         args=tuple(args), kwargs=dict(kwargs)))
            reset = set_runtime(local)
            try:
                return super().__call__(*args, **kwargs)
            finally:
                reset_runtime(reset)
        return self._run_bridged(channel, args, kwargs)

    def _run_bridged(self, channel: Any, args: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> Any:
        from interactive_tasks.worker.child import SlotRuntime, bind_output, describe_exception

        request = self.request
        task_id = str(request.id)
        info = bridge_header(request)
        runtime = SlotRuntime(
            channel.channel,
            Request(id=task_id, task=self.name, args=tuple(args), kwargs=dict(kwargs),
                    retries=int(request.retries or 0), hostname=request.hostname),
            paused=False, soft_time_limit=None)
        channel.register(runtime)
        channel.channel.send(["begin", task_id, {
            "name": self.name, "reply_to": info.get("reply_to"), "token": info.get("token"),
            "args": _plain(list(args)), "kwargs": _plain(dict(kwargs)),
            "retries": int(request.retries or 0),
            # a message given back by a lost worker (acks_late): a new run for watchers
            "redelivered": bool((request.delivery_info or {}).get("redelivered"))}])
        reset = set_runtime(runtime)
        bind_output(runtime)
        kind: str = EventKind.SUCCEEDED
        fields: dict[str, Any] = {}
        try:
            runtime.checkpoint()  # paused or cancelled before it started
            result = super().__call__(*args, **kwargs)
            fields = {"result": result}
            return result
        except Cancelled:
            kind = EventKind.CANCELLED
            # Celery's nearest state: AsyncResult.get() raises TaskRevokedError.
            self.backend.mark_as_revoked(task_id, "cancelled", request=request)
            raise Ignore() from None
        except CeleryRetry as retry:
            kind = EventKind.RETRY
            fields = {"retries": int(request.retries or 0) + 1}
            when = getattr(retry, "when", None)
            if isinstance(when, (int, float)):
                fields["countdown"] = float(when)
            raise
        except BaseException as exc:
            kind, fields = EventKind.FAILED, {"error": describe_exception(exc)}
            raise
        finally:
            bind_output(None)
            reset_runtime(reset)
            channel.unregister(task_id)
            _send_done(channel, task_id, kind, fields)

    # -- the client side ----------
    def start(self, *args: Any, **kwargs: Any) -> CeleryTaskHandle:
        """Queue the task through Celery and stream every event to the returned handle.

        Raises :class:`~interactive_tasks.errors.ConfigurationError` when the app was
        not bridged with ``enable(app)``, and
        :class:`~interactive_tasks.errors.TransportError` when the broker is unreachable.
        """
        return self.start_async(args, kwargs)

    def start_async(self, args: tuple[Any, ...] | list[Any] | None = None,
                    kwargs: dict[str, Any] | None = None,
                    **options: Any) -> CeleryTaskHandle:
        """:meth:`start` with Celery's ``apply_async`` options (``countdown``, ``queue``,
        ``link`` ...)."""
        app = bridge_app(self.app)
        client = app.client
        client.ensure_started()
        token = codec.new_token()
        task_id = options.pop("task_id", None) or str(uuid.uuid4())
        # Subscribed before the message goes out, so no event is missed.
        handle = CeleryTaskHandle(app, task_id, name=self.name, token=token, starter=True)
        headers = dict(options.pop("headers", None) or {})
        headers[HEADER] = {"reply_to": client.inbox.name, "token": codec.token_digest(token)}
        handle.async_result = self.apply_async(args, kwargs, task_id=task_id,
                                               headers=headers, **options)
        return handle


def bridge_header(request: Any) -> dict[str, Any]:
    """The bridge's header of a Celery request (custom headers become attributes of the
    request in Celery 5; ``request.headers`` in some paths)."""
    value = getattr(request, HEADER, None)
    if not isinstance(value, dict):
        headers = getattr(request, "headers", None)
        value = headers.get(HEADER) if isinstance(headers, dict) else None
    return value if isinstance(value, dict) else {}


def _plain(value: Any) -> Any:
    """``value`` if msgpack can carry it, else its repr (for a snapshot's summary)."""
    try:
        codec.dumps(value)
        return value
    except Exception:
        return repr(value)[:200]


def _send_done(channel: Any, task_id: str, kind: str, fields: dict[str, Any]) -> None:
    from interactive_tasks.worker.ipc import ChannelClosed

    try:
        try:
            channel.channel.send(["done", task_id, kind, fields, time.time()])
        except TypeError as exc:
            # The result is not msgpack data: Celery still stores it (its serializer);
            # watchers learn that it succeeded and why they cannot see the value.
            fields = {"result": None, "unsent": f"result cannot be sent: {exc}"}
            channel.channel.send(["done", task_id, kind, fields, time.time()])
    except ChannelClosed:
        pass


__all__ = ["HEADER", "CeleryTaskHandle", "InteractiveTask"]
