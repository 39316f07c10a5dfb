"""Tasks: ``Task[P, R]`` for plain functions, :class:`InteractiveTask` for tasks you talk to.

``@app.task`` turns a function into a :class:`Task`; ``delay``/``apply_async``/``start``
publish it and return a :class:`~interactive_tasks.handle.TaskHandle`. Interactive tasks
(``base=InteractiveTask`` or a subclass with ``run``) receive the task as their first
parameter and use ``self.progress()``, ``self.send()``, ``self.receive()``,
``self.checkpoint()`` and ``self.ask()`` while they run.
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, Generic, ParamSpec, TypeVar

from . import codec
from .context import LocalRuntime, Request, current_runtime, reset_runtime, set_runtime
from .errors import MaxRetriesExceeded, Retry
from .protocol import MAX_NESTING, RESERVED_HEADERS, TaskMessage, check_task_id, nesting_depth

if TYPE_CHECKING:
    from .app import App
    from .canvas import chain, chunks
    from .handle import TaskHandle

P = ParamSpec("P")
R = TypeVar("R")

logger = logging.getLogger("interactive_tasks.task")

#: Class-form tasks (subclasses with a ``name``) waiting to be adopted by an app.
_class_tasks: list[type[Task[Any, Any]]] = []


TASK_OPTIONS = frozenset({
    "acks_late", "soft_time_limit", "time_limit", "max_retries", "default_retry_delay",
    "autoretry_for", "retry_backoff", "retry_backoff_max", "retry_jitter", "rate_limit",
    "ignore_result",
})


def parse_rate(spec: str) -> float:
    """Starts per second for a Celery-style rate: ``"10/s"``, ``"100/m"``, ``"5/h"``.

    Raises ValueError for anything else.
    """
    number, _, unit = str(spec).partition("/")
    per = {"s": 1.0, "m": 60.0, "h": 3600.0}.get(unit or "s")
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if per is None or value <= 0:
        raise ValueError(f"bad rate_limit {spec!r}; use e.g. '10/s', '100/m', '5/h'")
    return value / per


class Task(Generic[P, R]):
    """A registered task. Call it to run locally; ``delay``/``apply_async`` to queue it."""

    name: str = ""
    queue: str | None = None
    interactive: ClassVar[bool] = False
    bind: bool = False
    app: App | None = None
    #: Celery-compatible options, read by the worker.
    #: ack after the final state is recorded (None: the app's ``acks_late`` setting);
    #: False acks when the task starts, so a crash loses it (Celery's default)
    acks_late: bool | None = None
    soft_time_limit: float | None = None
    time_limit: float | None = None
    max_retries: int | None = 3
    #: seconds before a retry when ``retry()`` gives no countdown (Celery: 180)
    default_retry_delay: float = 180.0
    #: exception types that retry the task automatically
    autoretry_for: tuple[type[BaseException], ...] = ()
    #: exponential backoff for automatic retries: True (base 1 s) or the base in seconds
    retry_backoff: bool | float = False
    retry_backoff_max: float = 600.0
    retry_jitter: bool = True
    #: at most this many starts per worker: "10/s", "100/m", "1000/h"
    rate_limit: str | None = None
    #: accepted for Celery code and without effect: the final state is always kept for
    #: ``result_expires`` (attach, ``itask result``, workflows and redelivery read it)
    ignore_result: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name") and "run" in cls.__dict__:
            _class_tasks.append(cls)

    def __init__(
        self,
        fn: Callable[..., R] | None = None,
        *,
        app: App | None = None,
        name: str | None = None,
        queue: str | None = None,
        bind: bool | None = None,
        **options: Any,
    ) -> None:
        self.fn = fn
        if app is not None:
            self.app = app
        if fn is not None:
            self.name = name or f"{_module_name(fn.__module__)}.{fn.__qualname__}"
            self.__doc__ = fn.__doc__
            self.__wrapped__ = fn
        elif name:
            self.name = name
        if queue is not None:
            self.queue = queue
        if bind is not None:
            self.bind = bind
        for key, value in options.items():
            if key not in TASK_OPTIONS:
                raise TypeError(f"unknown task option {key!r}; options are "
                                f"{', '.join(sorted(TASK_OPTIONS))}")
            setattr(self, key, value)
        if self.rate_limit is not None:
            parse_rate(self.rate_limit)  # a typo fails here, not in the worker

    # -- running ----------
    def run(self, *args: Any, **kwargs: Any) -> Any:
        """The task body; the function given to ``@app.task``, or override it."""
        if self.fn is None:
            raise NotImplementedError(f"task {self.name!r} has no run()")
        if self.bind or self.interactive:
            return self.fn(self, *args, **kwargs)
        return self.fn(*args, **kwargs)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the task here and now, without a worker (progress and messages go nowhere)."""
        try:
            current_runtime()
            return self.run(*args, **kwargs)
        except RuntimeError:
            pass
        request = Request(id=str(uuid.uuid4()), task=self.name, args=tuple(args),
                          kwargs=dict(kwargs))
        token = set_runtime(LocalRuntime(request))
        try:
            return self.run(*args, **kwargs)
        finally:
            reset_runtime(token)

    @property
    def request(self) -> Request:
        """The running invocation's request (id, args, retries, hostname …)."""
        return current_runtime().request

    def retry(self, exc: BaseException | None = None, countdown: float | None = None,
              max_retries: int | None = None) -> Retry:
        """End this run and have the task run again after ``countdown`` seconds.

        Use as ``raise self.retry(exc=err, countdown=5)``. Raises
        :class:`~interactive_tasks.errors.MaxRetriesExceeded` (or ``exc`` itself) when
        the task already retried ``max_retries`` times; returns the :class:`Retry` to
        raise otherwise.
        """
        request = self.request
        limit = self.max_retries if max_retries is None else max_retries
        if limit is not None and request.retries >= limit:
            if exc is not None:
                raise exc
            raise MaxRetriesExceeded(
                f"task {self.name} {request.id} retried {request.retries} times "
                f"(max_retries={limit})")
        if countdown is None:
            countdown = self.backoff(request.retries) if self.retry_backoff else \
                self.default_retry_delay
        return Retry(exc, float(countdown))

    def backoff(self, retries: int) -> float:
        """Exponential backoff with full jitter for retry number ``retries`` (from 0)."""
        import random

        base = 1.0 if self.retry_backoff is True else float(self.retry_backoff)
        delay = min(self.retry_backoff_max, base * (2 ** retries))
        return random.uniform(0, delay) if self.retry_jitter else delay

    # -- publishing ----------
    def _bound_app(self) -> App:
        if self.app is None:
            raise RuntimeError(f"task {self.name!r} is not registered with an app")
        return self.app

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> TaskHandle[R]:
        """Queue the task with these arguments; returns its handle at once."""
        return self.apply_async(args, kwargs)

    def start(self, *args: P.args, **kwargs: P.kwargs) -> TaskHandle[R]:
        """Queue the task and stream every event to the returned handle.

        The handle is subscribed before the task is published, so no event is missed.
        """
        return self.apply_async(args, kwargs, watch="all")

    def apply_async(
        self,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        queue: str | None = None,
        countdown: float | None = None,
        eta: datetime | float | None = None,
        expires: datetime | float | None = None,
        priority: int | None = None,
        headers: dict[str, Any] | None = None,
        task_id: str | None = None,
        watch: str | None = None,
        link: Signature[Any] | list[Signature[Any]] | None = None,
        link_error: Signature[Any] | list[Signature[Any]] | None = None,
        ignore_result: bool | None = None,
    ) -> TaskHandle[R]:
        """Queue the task with Celery's options (``ignore_result`` is accepted without
        effect, as the task option).

        ``countdown`` (seconds) or ``eta`` (datetime or epoch seconds) delays the start;
        ``expires`` (seconds from now, datetime or epoch) makes a task that has not started
        by then end ``revoked``. ``link`` signatures run after a success with the result
        as their first argument, ``link_error`` ones after a failure with the task's id
        (``.si()`` signatures get neither); their handles are ``handle.children``.
        Raises ``TypeError`` for arguments msgpack cannot carry, ``ValueError`` for a
        ``priority`` that is not an integer from 0 to 9,
        :class:`~interactive_tasks.errors.PayloadTooLarge` and
        :class:`~interactive_tasks.errors.TransportError`.
        """
        app = self._bound_app()
        return app.send_task(
            self.name, args, kwargs, queue=queue or self.queue, countdown=countdown, eta=eta,
            expires=expires, priority=priority, headers=headers, task_id=task_id,
            watch=watch or ("all" if self.interactive else "final"), link=link,
            link_error=link_error,
        )

    def s(self, *args: Any, **kwargs: Any) -> Signature[R]:
        """A signature: this task with (partial) arguments, to call later."""
        return Signature(self, args, kwargs)

    signature = s

    def si(self, *args: Any, **kwargs: Any) -> Signature[R]:
        """An immutable signature: in a chain or as a callback it gets no parent result."""
        return Signature(self, args, kwargs, immutable=True)

    def map(self, items: Iterable[Any]) -> Signature[list[Any]]:
        """One task that runs this one on each item (a list of results), as Celery's."""
        from .canvas import mapped

        return mapped(self, items, star=False)

    def starmap(self, items: Iterable[Any]) -> Signature[list[Any]]:
        """One task that runs this one with each item as its arguments."""
        from .canvas import mapped

        return mapped(self, items, star=True)

    def chunks(self, items: Iterable[Any], n: int) -> chunks:
        """``items`` (argument tuples) in chunks of ``n``, a task per chunk, as a group;
        ``.delay()`` returns the group's handle (its result: a list of lists)."""
        from .canvas import chunks

        return chunks(self, items, n)

    # -- hooks (class-based tasks and ``base=`` classes override them) ----------------------
    def on_success(self, retval: Any, task_id: str, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> None:
        """Called in the worker after the task returned ``retval``."""

    def on_failure(self, exc: BaseException, task_id: str, args: tuple[Any, ...],
                   kwargs: dict[str, Any], einfo: Any) -> None:
        """Called in the worker after the task raised ``exc`` (``einfo``: the traceback)."""

    def on_retry(self, exc: BaseException, task_id: str, args: tuple[Any, ...],
                 kwargs: dict[str, Any], einfo: Any) -> None:
        """Called in the worker when the task asked to run again (``exc``: the reason)."""

    def after_return(self, status: Any, retval: Any, task_id: str, args: tuple[Any, ...],
                     kwargs: dict[str, Any], einfo: Any) -> None:
        """Called in the worker after every run, with its ``TaskState`` (``status``)."""

    def __repr__(self) -> str:
        kind = "interactive task" if self.interactive else "task"
        return f"<{kind} {self.name}>"


class InteractiveTask(Task[P, R]):
    """Base for tasks that stream progress and take control while they run.

    As a decorator base: ``@app.task(base=InteractiveTask) def job(self, n): ...``.
    As a class: ``class Deploy(InteractiveTask): name = "deploy"; def run(self, target): ...``.
    """

    interactive: ClassVar[bool] = True
    bind = True

    def progress(self, current: float, total: float | None = None,
                 message: str | None = None) -> Any:
        """Report progress; also a checkpoint (may block while paused, may raise Cancelled).

        In an ``async def`` task, ``await self.progress(...)`` works too.
        """
        return _maybe_async(current_runtime().progress, current, total, message)

    def send(self, data: Any) -> Any:
        """Send a message event to every watcher; also a checkpoint (awaitable too)."""
        return _maybe_async(current_runtime().send, data)

    def receive(self, timeout: float | None = 0) -> Any:
        """The next message a client sent, or None after ``timeout`` seconds (0: no wait).

        Also a checkpoint. In an ``async def`` task use ``await self.receive(...)``: the
        wait then runs off the event loop.
        """
        return _maybe_async(current_runtime().receive, timeout)

    def checkpoint(self) -> Any:
        """Block while paused; raise :class:`~interactive_tasks.errors.Cancelled` if cancelled.

        ``await self.checkpoint()`` in an ``async def`` task.
        """
        return _maybe_async(current_runtime().checkpoint)

    def ask(self, prompt: str, timeout: float | None = None,
            choices: list[str] | None = None) -> Any:
        """Ask watchers a question and block until one answers (``await`` it when async).

        The question stays pending in the task's snapshot, so a client that attaches later
        can answer it. Raises :class:`~interactive_tasks.errors.QuestionTimeout` after
        ``timeout`` seconds (time spent paused does not count).
        """
        return _maybe_async(current_runtime().ask, prompt, timeout, choices)

    def log(self, text: str, level: str = "info") -> Any:
        """Send a log line to watchers (``print`` and ``logging`` already do)."""
        return _maybe_async(current_runtime().log, level, text)


def _maybe_async(fn: Callable[..., Any], *args: Any) -> Any:
    """Call ``fn`` now, or, inside a running event loop (an ``async def`` task), return a
    coroutine that runs it in a thread: every task call may block while the task is
    paused, and the loop (with the task's other coroutines) must keep going meanwhile."""
    # No event loop runs where asyncio was never imported. Importing it to find that out
    # would load asyncio with ssl (some 5 MB) into every pool process that runs an
    # interactive task, at its first progress or receive.
    asyncio = sys.modules.get("asyncio")
    if asyncio is None:
        return fn(*args)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn(*args)
    return asyncio.to_thread(fn, *args)


class Signature(Generic[R]):
    """A task with arguments bound, to be sent later (Celery's ``task.s()``)."""

    def __init__(self, task: Task[Any, R], args: tuple[Any, ...] = (),
                 kwargs: dict[str, Any] | None = None, *, immutable: bool = False,
                 **options: Any) -> None:
        self.task = task
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        #: ``task.si()``: takes no result from a parent (chain step, callback)
        self.immutable = immutable
        self.options = options

    def delay(self, *args: Any, **kwargs: Any) -> TaskHandle[R]:
        return self.apply_async(args, kwargs)

    def apply_async(self, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None,
                    **options: Any) -> TaskHandle[R]:
        merged = {**self.kwargs, **(kwargs or {})}
        return self.task.apply_async(self.args + tuple(args), merged,
                                     **{**self.options, **options})

    def start(self, *args: Any, **kwargs: Any) -> TaskHandle[R]:
        return self.apply_async(args, kwargs, watch="all")

    def __or__(self, other: Any) -> chain:
        """``a.s() | b.s()`` is ``chain(a.s(), b.s())``."""
        from .canvas import chain

        if isinstance(other, (Signature, chain)):
            return chain(self, other)
        return NotImplemented

    def __repr__(self) -> str:
        form = "si" if self.immutable else "s"
        return f"{self.task.name}.{form}(*{self.args!r}, **{self.kwargs!r})"


def _module_name(module: str) -> str:
    """The importable name of ``module``, also for a script run as ``__main__``.

    ``python examples/hello.py`` and ``itask worker -A examples.hello`` must agree on the
    task's name, so a script's tasks are named after its path relative to the working
    directory (or its ``-m`` name), not ``__main__``.
    """
    if module != "__main__":
        return module
    import os
    import sys

    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name and spec.name != "__main__":
        return str(spec.name)
    path = getattr(main, "__file__", None)
    if path:
        rel = os.path.relpath(os.path.abspath(path))
        if not rel.startswith(".."):
            return os.path.splitext(rel)[0].replace(os.sep, ".")
        return os.path.splitext(os.path.basename(path))[0]
    return module


def build_message(
    name: str,
    args: tuple[Any, ...] | list[Any] | None,
    kwargs: dict[str, Any] | None,
    *,
    queue: str,
    reply_to: str | None,
    countdown: float | None = None,
    eta: datetime | float | None = None,
    expires: datetime | float | None = None,
    headers: dict[str, Any] | None = None,
    task_id: str | None = None,
    watch: str = "final",
) -> tuple[TaskMessage, str]:
    """The message for one invocation and the capability token that controls it."""
    now = time.time()
    eta_ts: float | None = None
    if countdown is not None:
        eta_ts = now + float(countdown)
    elif eta is not None:
        eta_ts = eta.timestamp() if isinstance(eta, datetime) else float(eta)
    expires_ts: float | None = None
    if expires is not None:
        if isinstance(expires, datetime):
            expires_ts = expires.timestamp()
        else:
            # Celery's rule: small numbers are seconds from now, large ones epoch times.
            expires_ts = float(expires) if float(expires) > 1e9 else now + float(expires)
    for key in headers or {}:
        if key in RESERVED_HEADERS:
            raise ValueError(f"header {key!r} is reserved: the worker acts on it")
    if task_id is not None:
        check_task_id(task_id)  # raises ProtocolError with what is allowed
    if nesting_depth([list(args or ()), dict(kwargs or {})]) > MAX_NESTING:
        raise ValueError(f"task arguments nest deeper than {MAX_NESTING} levels")
    token = codec.new_token()
    message = TaskMessage(
        id=task_id or str(uuid.uuid4()),
        task=name,
        args=list(args or ()),
        kwargs=dict(kwargs or {}),
        queue=queue,
        reply_to=reply_to,
        token_digest=codec.token_digest(token),
        created=now,
        eta=eta_ts,
        expires=expires_ts,
        headers=dict(headers or {}),
        watch=watch,
    )
    return message, token
