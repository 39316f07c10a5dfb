"""The application: settings, the task registry, the broker connection and the client.

::

    app = App("proj")                                  # embedded broker, no server
    app = App("proj", broker="redis://localhost:6379/0")
    app = App("proj", broker="amqp://guest:guest@localhost//", result_backend="redis://")
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Concatenate, Literal, ParamSpec, TypeVar, overload

from .errors import ConfigurationError, UnknownTask
from .handle import TaskHandle, unknown_task
from .protocol import ControlMessage, TaskSnapshot, Verb
from .results import ResultStore
from .task import InteractiveTask, Signature, Task, _class_tasks, build_message
from .transport import (
    OWN_SCHEMES,
    Names,
    check_priority,
    kombu_transports,
    resolve_broker_url,
)
from .transport.connections import broker_directory, broker_secret, connection_for
from .transport.result_stores import check_result_backend, result_store_for

if TYPE_CHECKING:
    from datetime import timedelta

    # kombu is imported where a connection is made (connection_for), not here: a worker's
    # pool processes fork after the app module is imported and, running tasks, never
    # connect (tests/test_imports.py).
    from kombu import Connection

    from .client import Client
    from .control import Control
    from .schedules import PeriodicDecorator, Schedule
    from .transport.upkeep import ScheduledTask

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class Settings:
    """Every setting, with its default. Pass any of them as ``App(name, **settings)``."""

    #: prefix of every queue and key, so several projects can share one broker
    namespace: str = "it"
    #: seconds a finished task's result is kept
    result_expires: float = 24 * 3600
    #: largest message body accepted or sent, in bytes
    max_message_size: int = 16 * 1024 * 1024
    #: HMAC secret: when set, every message is signed and unsigned ones are refused;
    #: its holder may control any task (an operator). Also read from ITASK_SECRET.
    secret: str | None = None
    #: allow attach (read-only watching) without the task's token
    read_only_attach: bool = True
    #: accept pickle-serialized task messages (never by default)
    allow_pickle: bool = False
    #: the queue of tasks that name none
    task_default_queue: str = "default"
    #: task name (or glob) -> queue name
    task_routes: dict[str, str] = field(default_factory=dict)
    #: ack only after the final state is recorded
    acks_late: bool = True
    #: when a pool child dies mid-task: True = deliver the task again, False = fail it
    reject_on_worker_lost: bool = True
    #: deliveries after which a task that keeps killing its worker goes to dead letters
    max_deliveries: int = 3
    #: messages a worker reserves per pool slot
    prefetch_multiplier: int = 4
    #: the ``time_limit`` of tasks that set none, in seconds (Celery's setting;
    #: ``itask worker --time-limit`` overrides it for that worker)
    task_time_limit: float | None = None
    #: the ``soft_time_limit`` of tasks that set none (``--soft-time-limit``)
    task_soft_time_limit: float | None = None
    #: seconds between worker heartbeats (to subscribed clients and the events stream,
    #: and on Redis into the broker's record of live workers)
    worker_heartbeat: float = 2.0
    #: seconds without a heartbeat in the broker after which a worker counts as dead and
    #: a live worker returns its unacknowledged tasks to their queues (Redis)
    worker_lost_timeout: float = 10.0
    #: publish task events (received, started, succeeded …) on ``<ns>.events`` (``-E``)
    worker_send_task_events: bool = False
    #: seconds a worker keeps a subscription that its client stopped renewing
    subscription_ttl: float = 30.0
    #: events kept per task for clients that attach later
    event_history: int = 200
    #: messages a handle may have sent with ``send(wait=False)`` that its task has not
    #: taken with ``self.receive()`` yet; one more blocks ``send`` until the task catches
    #: up (every quarter of this many, a message asks the task's pool process for a
    #: receipt, which travels back like a control reply)
    send_window: int = 2048
    #: kombu transport options (e.g. {"socket_timeout": 15}; Redis' ``visibility_timeout``
    #: no longer applies: a dead worker is found by ``worker_lost_timeout``); a sentinel://
    #: broker's {"master_name": …}; {"fsync": True} on the embedded broker
    broker_transport_options: dict[str, Any] = field(default_factory=dict)
    #: the same for a ``result_backend`` URL (a sentinel:// backend's {"master_name": …},
    #: a file:// backend's {"fsync": True}); without a result_backend, the results live in
    #: the broker and follow ``broker_transport_options``
    result_backend_transport_options: dict[str, Any] = field(default_factory=dict)
    #: seconds a graceful shutdown waits for running tasks
    shutdown_timeout: float = 30.0
    #: Python's thread switch interval (``sys.setswitchinterval``) where tasks run: in
    #: prefork children, and in the worker itself with the threads and solo pools. A
    #: thread that wants the interpreter lock waits this long before a CPU-bound task
    #: must hand it over, so it bounds how late a pool child's control reader sees a
    #: pause, cancel or message for such a task (Python's 5 ms default: pause → paused
    #: took 3.3 ms at the median here, 1.5–1.7 ms with 0.5 ms). None keeps Python's default.
    worker_switch_interval: float | None = 0.0005
    #: how much lower than the worker's the scheduling priority of the threads that run
    #: tasks is (Linux ``nice``, per thread): prefork children's task threads and the
    #: threads pool's; their control readers and the worker's loop keep the worker's. When
    #: CPU-bound tasks use every core, the loop and the readers then get the CPU first, so
    #: a pause, a message or its reply is not queued behind the tasks' time slices (the
    #: gevent and eventlet pools run tasks on the loop's own thread: not applied there).
    #: 0 or None: tasks run at the worker's priority.
    worker_task_nice: int | None = 5
    #: RabbitMQ: seconds after which a worker hands the delivery of a running task over to
    #: its held queue and acknowledges it (and gives one that has not started back to the
    #: end of its queue), so the server's ``consumer_timeout`` (30 min by default) never
    #: closes the channel under a long task. Keep it well below ``consumer_timeout``; None:
    #: never (then raise ``consumer_timeout`` above your longest task and wait).
    worker_hold_after: float | None = 60.0
    #: RabbitMQ: AMQP heartbeat of the worker's connection and of each client's inbox, in
    #: seconds (Celery's ``broker_heartbeat``; 0 turns them off). The server requeues the
    #: unacknowledged tasks of a worker it has not heard from for 2-3 times this.
    broker_heartbeat: float = 10.0


_SETTING_NAMES = {f.name for f in fields(Settings)}


def _check_settings(conf: Settings) -> None:
    """Raises ConfigurationError for a setting that cannot work, before anything runs."""
    for name in ("worker_heartbeat", "worker_lost_timeout"):
        value = getattr(conf, name)
        if not (isinstance(value, (int, float)) and value > 0):
            raise ConfigurationError(f"{name} must be a positive number of seconds, "
                                     f"not {value!r}")
    if conf.worker_lost_timeout <= 2 * conf.worker_heartbeat:
        raise ConfigurationError(
            f"worker_lost_timeout ({conf.worker_lost_timeout}s) must be more than twice "
            f"worker_heartbeat ({conf.worker_heartbeat}s), or a live worker that misses "
            "one beat is taken for dead")
    window = conf.send_window
    if not (isinstance(window, int) and not isinstance(window, bool) and window >= 1):
        raise ConfigurationError(f"send_window must be a number of messages (1 or more), "
                                 f"not {window!r}")
    hold = conf.worker_hold_after
    if hold is not None and not (isinstance(hold, (int, float)) and hold > 0):
        raise ConfigurationError(
            f"worker_hold_after must be a positive number of seconds or None, not {hold!r}")
    beat = conf.broker_heartbeat
    if not (isinstance(beat, (int, float)) and beat >= 0):
        raise ConfigurationError(
            f"broker_heartbeat must be a number of seconds (0: off), not {beat!r}")
    for name in ("task_time_limit", "task_soft_time_limit"):
        limit = getattr(conf, name)
        if limit is not None and not (isinstance(limit, (int, float)) and limit > 0):
            raise ConfigurationError(f"{name} must be a positive number of seconds or "
                                     f"None, not {limit!r}")
    nice = conf.worker_task_nice
    if nice is not None and not (isinstance(nice, int) and not isinstance(nice, bool)
                                 and 0 <= nice <= 19):
        raise ConfigurationError(
            f"worker_task_nice must be a number from 0 to 19 or None, not {nice!r}")
    interval = conf.worker_switch_interval
    if interval is not None and not (isinstance(interval, (int, float)) and interval > 0):
        raise ConfigurationError(
            f"worker_switch_interval must be a positive number of seconds or None, "
            f"not {interval!r}")


BROKER_URL_HINT = ("use redis://HOST:6379/0, amqp://USER:PASSWORD@HOST:5672// or embedded:// "
                   "(the default: no server)")


def mask_password(url: str) -> str:
    """``url`` with the password of its credentials, if any, replaced by ``**`` (in each
    part of a ``;`` list, as in ``sentinel://:pw@h1;sentinel://:pw@h2``)."""
    if ";" in url:
        return ";".join(mask_password(part) for part in url.split(";"))
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        if ":" in creds:
            creds = creds.split(":", 1)[0] + ":**"
        return f"{scheme}://{creds}@{host}"
    return url


def check_broker_url(url: str) -> str:
    """``url`` if kombu has a transport for its scheme; else :class:`ConfigurationError`.

    Checked when the app is made, so a typo is one clear line instead of an error deep in
    a connection thread.
    """
    scheme, sep, _ = url.partition("://")
    if not sep or not scheme:
        raise ConfigurationError(f"broker URL {mask_password(url)!r} is not a URL "
                                 f"(scheme://host…); {BROKER_URL_HINT}")
    base = scheme.split("+", 1)[0]
    # Only another broker's scheme is looked up in kombu: importing kombu here would put
    # it in every pool process of a worker (kombu_transports).
    if base not in OWN_SCHEMES and base not in kombu_transports():
        raise ConfigurationError(f"unknown broker URL scheme {scheme!r} in "
                                 f"{mask_password(url)!r}; {BROKER_URL_HINT}")
    return url


class App:
    """A task queue application: where tasks are registered and sent from."""

    def __init__(
        self,
        name: str = "app",
        broker: str | None = None,
        result_backend: str | None = None,
        **settings: Any,
    ) -> None:
        unknown = set(settings) - _SETTING_NAMES
        if unknown:
            raise ConfigurationError(
                f"unknown setting(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(_SETTING_NAMES))}"
            )
        self.main = name
        self._broker_url = ""
        try:
            self.broker_url = resolve_broker_url(broker)
        except ConfigurationError as exc:
            if broker:
                raise
            raise ConfigurationError(f"ITASK_BROKER_URL: {exc}") from None
        self.result_backend = result_backend or os.environ.get("ITASK_RESULT_BACKEND") or None
        if "secret" not in settings and os.environ.get("ITASK_SECRET"):
            settings["secret"] = os.environ["ITASK_SECRET"]
        self.conf = Settings(**settings)
        _check_settings(self.conf)
        self.names = Names(self.conf.namespace)
        self.tasks: dict[str, Task[Any, Any]] = {}
        self._client: Client | None = None
        self._results: ResultStore | None = None
        self._secret: bytes | None = None
        self._secret_loaded = False
        self._lock = threading.Lock()
        #: periodic tasks for ``itask beat``: entry name -> {"task": name, "schedule":
        #: seconds | crontab text | crontab(...), "args": [...], "kwargs": {...},
        #: "options": {...}} (see docs/beat.md)
        self.beat_schedule: dict[str, dict[str, Any]] = {}
        #: task modules to import before the registry is used (autodiscover_tasks)
        self._pending_imports: list[tuple[Any, str | None]] = []
        #: built-in tasks (map, starmap), made when first asked for; not in ``tasks``
        self._builtins: dict[str, Task[Any, Any]] = {}
        #: task_annotations: task name (or "*") -> task options
        self._annotations: list[tuple[str, dict[str, Any]]] = []
        from .shared import app_created

        app_created(self)  # the current app now, with every @shared_task

    def __repr__(self) -> str:
        return f"<App {self.main} broker={self.broker_url_display}>"

    def configure(self, **settings: Any) -> None:
        """Change settings after creation (before workers or clients start)."""
        unknown = set(settings) - _SETTING_NAMES
        if unknown:
            raise ConfigurationError(f"unknown setting(s) {', '.join(sorted(unknown))}")
        conf = replace(self.conf, **settings)
        _check_settings(conf)
        self.conf = conf
        self.names = Names(self.conf.namespace)
        self._secret_loaded = False

    def config_from_object(self, obj: Any, namespace: str | None = None) -> None:
        """Load settings named the Celery way from a module, a module name
        (``"proj.celeryconfig"``, ``"proj.settings:Config"``), an object or a mapping.

        ``namespace="CELERY"`` reads ``CELERY_BROKER_URL`` as ``broker_url`` (Django
        settings). Celery's names map to this project's where they mean the same
        (``task_acks_late`` → ``acks_late``, ``worker_prefetch_multiplier`` →
        ``prefetch_multiplier``, ``result_backend="rpc://"`` → results through the
        starter's inbox …; see docs/celery.md). Raises :class:`ConfigurationError` naming
        every setting that cannot apply and what to use instead.
        """
        from .config import settings_of, translate

        settings = translate(self, settings_of(obj, namespace), namespace)
        if settings:
            self.configure(**settings)

    def use_result_backend(self, url: str | None) -> None:
        """Set the result backend (``redis://``, ``file://`` …; ``rpc://`` or None: the
        default). Raises ConfigurationError for a backend this project has no store for."""
        if url in (None, "", "rpc://", "rpc"):
            url = None  # Celery's rpc backend sends results back to the caller: the inbox
        elif isinstance(url, str):
            check_result_backend(url)
        else:
            raise ConfigurationError(f"result_backend must be a URL, not {url!r}")
        if self._results is not None:
            self._results.close()
            self._results = None
        self.result_backend = url

    def annotate(self, annotations: Any) -> None:
        """Celery's ``task_annotations``: ``{"proj.add": {"rate_limit": "10/s"}}`` (``"*"``
        for every task), or a list of such mappings; applied to tasks registered now and
        later. Raises ConfigurationError for an option tasks do not have."""
        from .task import TASK_OPTIONS

        maps = [annotations] if isinstance(annotations, dict) else list(annotations or ())
        for mapping in maps:
            if not isinstance(mapping, dict):
                raise ConfigurationError(f"task_annotations: {mapping!r} is not a mapping "
                                         "of task names to options")
            for name, options in mapping.items():
                unknown = set(options) - TASK_OPTIONS
                if unknown:
                    raise ConfigurationError(
                        f"task_annotations[{name!r}]: unknown option(s) "
                        f"{', '.join(sorted(unknown))}; options are "
                        f"{', '.join(sorted(TASK_OPTIONS))}")
                self._annotations.append((str(name), dict(options)))
        for task in self.tasks.values():
            self._annotate(task)

    def _annotate(self, task: Task[Any, Any]) -> None:
        # "*" first, so an annotation naming the task wins whatever the order given
        for wanted in ("*", task.name):
            for name, options in self._annotations:
                if name == wanted:
                    for key, value in options.items():
                        setattr(task, key, value)

    def autodiscover_tasks(self, packages: Any = None, related_name: str = "tasks",
                           force: bool = False) -> None:
        """Import ``<package>.tasks`` of each package when the tasks are first needed (a
        worker starting, a task looked up by name), or now with ``force=True``.

        ``packages``: names, a callable returning them (``lambda:
        settings.INSTALLED_APPS``), or None for Django's installed apps. Deferred so that a
        ``proj/celery.py`` can call it before Django or the tasks' own imports are ready.
        """
        self._pending_imports.append((packages, related_name))
        if force:
            self.finalize()

    def autodiscover_modules(self, modules: list[str]) -> None:
        """Celery's ``imports``/``include``: modules to import when the tasks are first
        needed; a missing one raises :class:`ConfigurationError` then."""
        self._pending_imports.append((list(modules), None))

    def finalize(self) -> None:
        """Import what ``autodiscover_tasks`` and ``imports`` named, and adopt class-form
        tasks. The worker calls it at start; idempotent."""
        from .config import discover

        while self._pending_imports:
            packages, related_name = self._pending_imports.pop(0)
            discover(packages, related_name)
        self._adopt_class_tasks()

    # -- broker ----------
    @property
    def broker_url(self) -> str:
        """The broker URL; setting it checks the scheme (:class:`ConfigurationError`)."""
        return self._broker_url

    @broker_url.setter
    def broker_url(self, url: str) -> None:
        self._broker_url = check_broker_url(url)

    @property
    def broker_url_display(self) -> str:
        """The broker URL with any password masked."""
        return mask_password(self.broker_url)

    @property
    def embedded_directory(self) -> str | None:
        """Where the embedded broker keeps its files (None for other brokers)."""
        directory = broker_directory(self.broker_url)
        return None if directory is None else str(directory)

    def connection(self, transport_options: dict[str, Any] | None = None,
                   heartbeat: bool = False) -> Connection:
        """A new kombu connection to the broker (not yet connected); ``transport_options``
        override the app's ``broker_transport_options``.

        ``heartbeat``: on RabbitMQ, negotiate AMQP heartbeats of ``broker_heartbeat``
        seconds; the caller must then call ``heartbeat_check()`` on the connection at
        least every ``broker_heartbeat / 2`` seconds, or the server closes it. Without it
        heartbeats are off: a connection used only now and then (a client's publisher)
        has nobody to answer them.

        Raises ConfigurationError for a sentinel:// URL without its ``master_name``.
        """
        options = dict(self.conf.broker_transport_options)
        options.update(transport_options or {})
        return connection_for(self.broker_url, options, namespace=self.conf.namespace,
                              heartbeat=self.conf.broker_heartbeat if heartbeat else 0)

    @property
    def client(self) -> Client:
        """This process's broker client (inbox thread started on first use)."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    from .client import Client

                    self._client = Client(self)
        return self._client

    @property
    def results(self) -> ResultStore:
        if self._results is None:
            with self._lock:
                if self._results is None:
                    self._results = result_store_for(
                        self.broker_url, self.result_backend, self.conf.namespace,
                        self.conf.result_expires, self.conf.broker_transport_options,
                        self.conf.result_backend_transport_options,
                    )
        return self._results

    @property
    def secret(self) -> bytes | None:
        """The operator secret; the embedded broker keeps one per user (mode 0600)."""
        if not self._secret_loaded:
            if self.conf.secret:
                self._secret = self.conf.secret.encode()
            else:
                self._secret = broker_secret(self.broker_url)
            self._secret_loaded = True
        return self._secret

    def close(self) -> None:
        """Stop the inbox thread and close connections."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._results is not None:
            self._results.close()
            self._results = None

    # -- tasks ----------
    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(
        self, *, base: type[InteractiveTask[Any, Any]], name: str | None = ...,
        queue: str | None = ..., bind: bool | None = ..., **options: Any,
    ) -> Callable[[Callable[Concatenate[Any, P], R]], InteractiveTask[P, R]]: ...

    @overload
    def task(
        self, *, bind: Literal[True], name: str | None = ..., queue: str | None = ...,
        **options: Any,
    ) -> Callable[[Callable[Concatenate[Any, P], R]], Task[P, R]]: ...

    @overload
    def task(
        self, *, name: str | None = ..., queue: str | None = ...,
        bind: Literal[False] | None = ..., **options: Any,
    ) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    def task(  # type: ignore[misc]  # mypy cannot match **options across overloads
        self, fn: Any = None, /, *, base: Any = None, name: str | None = None,
        queue: str | None = None, bind: bool | None = None, **options: Any,
    ) -> Any:
        """Register a function as a task: ``@app.task`` or ``@app.task(name=, queue=, base=)``.

        ``base=InteractiveTask`` makes it interactive (its first parameter is the running
        task); ``bind=True`` gives a plain task ``self`` (Celery's form). Other options
        (``acks_late``, ``time_limit``, ``soft_time_limit``, ``max_retries``,
        ``rate_limit``) are Celery's. Raises ``TypeError`` for an unknown option.
        """
        cls = base or Task

        def decorate(func: Callable[..., Any]) -> Task[Any, Any]:
            if isinstance(func, type) and issubclass(func, Task):
                return self.register(func)
            task: Task[Any, Any] = cls(func, app=self, name=name, queue=queue, bind=bind,
                                       **options)
            self.tasks[task.name] = task
            self._annotate(task)
            return task

        if fn is not None:
            return decorate(fn)
        return decorate

    def periodic(
        self, every: float | timedelta | None = None, crontab: str | Schedule | None = None,
        name: str | None = None, args: tuple[Any, ...] | list[Any] = (),
        kwargs: dict[str, Any] | None = None, **options: Any,
    ) -> PeriodicDecorator:
        """Send a task periodically under ``itask beat``: ``@app.periodic(every=30)`` or
        ``@app.periodic(crontab="*/5 * * * *")``, above ``@app.task`` or on a plain function
        (then registered as a task). ``options`` go to :meth:`send_task`. Raises
        :class:`ConfigurationError` unless exactly one of ``every`` and ``crontab`` is given.
        """
        from .schedules import periodic

        return periodic(self, every=every, crontab=crontab, name=name, args=args,
                        kwargs=kwargs, **options)

    def register(self, task_class: type[Task[Any, Any]]) -> Task[Any, Any]:
        """Register a class-form task (a subclass with ``name`` and ``run``)."""
        task = task_class(app=self)
        if not task.name:
            raise ConfigurationError(f"{task_class.__name__} needs a class attribute 'name'")
        self.tasks[task.name] = task
        self._annotate(task)
        return task

    def _adopt_class_tasks(self) -> None:
        for cls in list(_class_tasks):
            if cls.name not in self.tasks and (cls.app is None or cls.app is self):
                self.register(cls)

    def get_task(self, name: str) -> Task[Any, Any]:
        """The registered task ``name``; raises :class:`UnknownTask`."""
        task = self.tasks.get(name) or self._builtins.get(name)
        if task is None and name.startswith("interactive_tasks."):
            from .canvas import builtin_task

            task = builtin_task(self, name)
            if task is not None:
                self._builtins[name] = task
        if task is None:
            self.finalize()
            task = self.tasks.get(name)
        if task is None:
            raise UnknownTask(unknown_task_name(name, self.main, list(self.tasks)))
        return task

    def route(self, name: str) -> str:
        """The queue for task ``name`` by ``task_routes`` (exact name or glob)."""
        import fnmatch

        routes = self.conf.task_routes
        if name in routes:
            return routes[name]
        for pattern, queue in routes.items():
            if fnmatch.fnmatchcase(name, pattern):
                return queue
        return self.conf.task_default_queue

    def send_task(
        self,
        name: str,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        queue: str | None = None,
        watch: str = "final",
        priority: int | None = None,
        link: Signature[Any] | list[Signature[Any]] | None = None,
        link_error: Signature[Any] | list[Signature[Any]] | None = None,
        **options: Any,
    ) -> TaskHandle[Any]:
        """Queue a task by name (it need not be registered here); returns its handle.

        ``link``/``link_error``: callbacks, as in :meth:`Task.apply_async`. Raises
        ValueError for a priority that is not an integer from 0 to 9, and what
        :meth:`Task.apply_async` raises.
        """
        if priority is not None:
            check_priority(priority)
        client = self.client
        client.ensure_started()
        message, token = build_message(
            name, args, kwargs, queue=queue or self.route(name), reply_to=client.inbox.name,
            watch=watch, **options,
        )
        handle: TaskHandle[Any] = TaskHandle(self, message.id, name=name, token=token,
                                             starter=True, streaming=watch == "all")
        if link is not None or link_error is not None:
            from .canvas import attach_callbacks

            handle.children = attach_callbacks(self, message, link, link_error)
        client.send_task(message, priority=priority)
        return handle

    # -- finding tasks ----------
    def attach(self, task_id: str, token: str | None = None, *,
               timeout: float = 2.0) -> TaskHandle[Any]:
        """A handle on any task by id: snapshot, then the live tail.

        Looks in the result store first, then asks every worker. A task nobody reports
        yet (still queued) gives a pending handle that follows it once it starts. Raises
        :class:`~interactive_tasks.errors.TransportError` when the broker is unreachable.
        """
        handle: TaskHandle[Any] = TaskHandle(self, task_id, token=token)
        handle._expect_snapshot()
        try:
            record = self.results.get(task_id)
            if record is not None:
                handle._on_snapshot(TaskSnapshot.from_wire(record))
                return handle
            self.locate(handle, timeout=timeout)
        finally:
            handle._end_snapshot_wait()
        return handle

    def locate(self, handle: TaskHandle[Any], timeout: float = 2.0) -> bool:
        """Ask every worker for the task; True when one has it (its snapshot is applied)."""
        client = self.client
        message = ControlMessage(
            verb=Verb.LOCATE, task_id=handle.id, data={"since": 0}, token=handle.token,
        )
        replies = client.request(message, None, timeout, many=True,
                                 until=lambda rs: any(r.get("t") == "snapshot" for r in rs))
        return any(r.get("t") == "snapshot" for r in replies)

    def find(self, task_id: str, token: str | None = None,
             timeout: float = 2.0) -> TaskHandle[Any]:
        """Like :meth:`attach`, but raises :class:`UnknownTask` when nobody knows the id."""
        handle = self.attach(task_id, token, timeout=timeout)
        if handle.state.value == "pending" and handle.worker is None:
            raise unknown_task(task_id)
        return handle

    def watch(self, handles: list[TaskHandle[Any]]) -> Any:
        """In Jupyter: one live row per task (needs the ``jupyter`` extra)."""
        from .widgets import watch

        return watch(handles)

    # -- remote control of workers ----------
    @property
    def control(self) -> Control:
        """Celery's ``app.control``: ``rate_limit``, ``time_limit``, ``add_consumer``,
        ``cancel_consumer``, ``shutdown``, ``ping``, ``revoke``, ``inspect()``."""
        from .control import Control

        return Control(self)

    def _broadcast(self, verb: str, data: Any, timeout: float,
                   expect: int | None) -> list[dict[str, Any]]:
        message = ControlMessage(verb=verb, data=data)
        return self.client.request(
            message, None, timeout, many=True,
            until=(lambda rs: len(rs) >= expect) if expect else None,
        )

    def ping(self, timeout: float = 1.0, expect: int | None = None) -> list[dict[str, Any]]:
        """Every worker's reply to a ping within ``timeout`` (``{"worker", "ok"}`` each)."""
        return self._broadcast(Verb.PING, None, timeout, expect)

    def revoke(self, task_ids: list[str] | str, *, terminate: bool = False,
               tokens: dict[str, str] | None = None, expires: float | None = None,
               timeout: float = 1.0) -> list[dict[str, Any]]:
        """Revoke tasks that have not started: every worker refuses them until ``expires``.

        The ids are also kept in the result store, so a worker that starts later (or
        restarts) refuses them too. ``terminate=True`` also cancels running ones. Needs
        each task's token (``tokens``) or the operator secret. Returns worker replies.
        """
        import time as _time

        ids = [task_ids] if isinstance(task_ids, str) else list(task_ids)
        until = expires or _time.time() + self.conf.result_expires
        tokens = dict(tokens or {})
        self.results.add_revoked(
            {i: [until, tokens.get(i), self.secret is not None] for i in ids})
        message = ControlMessage(verb=Verb.REVOKE, data={
            "ids": ids, "tokens": tokens, "expires": until, "terminate": terminate})
        return self.client.request(message, None, timeout, many=True, settle=0.2)

    def scheduled(self, limit: int = 100) -> list[ScheduledTask]:
        """Tasks waiting in the broker for their ``eta``, soonest first (empty where the
        broker does not keep delayed tasks: workers hold them, see ``inspect("tasks")``).

        Raises the broker client's connection errors.
        """
        from .transport.upkeep import upkeep_for

        upkeep = upkeep_for(self, "tool", lambda: None)
        try:
            return upkeep.scheduled(limit)
        finally:
            upkeep.close(clean=False)

    def inspect(self, what: str, timeout: float = 1.0,
                expect: int | None = None) -> list[dict[str, Any]]:
        """``active`` | ``reserved`` | ``revoked`` | ``registered`` | ``stats`` | ``tasks``
        from every worker (``app.control.inspect()`` has Celery's methods, and
        ``query_task``). Raises ValueError for another ``what``."""
        if what not in ("active", "reserved", "revoked", "registered", "stats", "tasks"):
            raise ValueError(f"unknown inspect command {what!r}; use active, reserved, "
                             "revoked, registered, stats or tasks")
        return self._broadcast(Verb.INSPECT, {"what": what}, timeout, expect)


def unknown_task_name(name: str, app_name: str, known: list[str]) -> str:
    """The one-line error for a task name that is not registered, with what to do."""
    import difflib

    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return (f"no task named {name!r} is registered with app {app_name!r}; {hint}"
            "start the worker with -A the module that defines it (itask inspect registered "
            "lists a worker's tasks)")


def load_app(spec: str) -> App:
    """Find the app for ``-A module`` or ``-A module:attribute`` (Celery's rules).

    Raises :class:`ConfigurationError` with a one-line reason (and what to do) when the
    module cannot be imported, fails while importing, or holds no :class:`App`.
    """
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if module_name.endswith(".py") or "/" in module_name:
            dotted = module_name.removesuffix(".py").strip("./").replace("/", ".")
            raise ConfigurationError(
                f"-A takes a module name, not a file path: try -A {dotted}"
                + (f":{attr}" if attr else "")) from exc
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise ConfigurationError(
                f"cannot import app module {module_name!r}: {exc}; run itask from the "
                "directory that contains it, or add that directory to PYTHONPATH") from exc
        raise ConfigurationError(f"cannot import app module {module_name!r}: {exc}") from exc
    except ConfigurationError:
        raise
    except Exception as exc:
        raise ConfigurationError(
            f"app module {module_name!r} raised {type(exc).__name__} while importing"
            f"{_where(exc)}: {exc}") from exc
    if attr:
        app = _as_app(getattr(module, attr, None))
        if app is None:
            found = [k for k, v in vars(module).items() if _as_app(v) is not None]
            what = "has no attribute" if not hasattr(module, attr) else "is not an App:"
            raise ConfigurationError(
                f"{spec!r} is not an interactive_tasks App ({module_name!r} {what} {attr!r})"
                + (f"; its App is -A {module_name}:{found[0]}" if len(found) == 1 else ""))
        return app
    for candidate in ("app", "celery"):
        app = _as_app(getattr(module, candidate, None))
        if app is not None:
            return app
    apps = [a for a in (_as_app(v) for v in vars(module).values()) if a is not None]
    if len(apps) == 1:
        return apps[0]
    if not apps and hasattr(module, "__path__") and \
            importlib.util.find_spec(f"{module_name}.celery") is not None:
        return load_app(f"{module_name}.celery")  # Celery's layout: proj/celery.py
    raise ConfigurationError(
        f"module {module_name!r} has {'no' if not apps else 'several'} App; "
        f"name one with -A {module_name}:<attribute>"
    )


def _as_app(obj: object) -> App | None:
    """``obj`` when it is an :class:`App`; the App that speaks for it when it offers one
    (``interactive_tasks_app()``: a Celery app given to the Celery bridge's ``enable``,
    so ``-A proj`` names a Celery project too); else None."""
    if isinstance(obj, App):
        return obj
    offer = getattr(obj, "interactive_tasks_app", None) if not isinstance(obj, type) else None
    if callable(offer):
        app = offer()
        if isinstance(app, App):
            return app
    return None


def _where(exc: BaseException) -> str:
    """`` at file:line`` of the innermost frame of ``exc``'s traceback (or nothing)."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    if isinstance(exc, SyntaxError) and exc.filename:
        return f" at {exc.filename}:{exc.lineno}"
    return f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
