"""``@shared_task``: a task defined without an app, as Celery's, for reusable modules (a
Django app's ``tasks.py``) that must not import the project's app.

The function is registered with every :class:`~interactive_tasks.App` — those that exist
when it is decorated and those created later — and the name it is bound to stands for
the task of the *current* app: the last one created, as with Celery's default
``set_as_current``. ``add.delay(2, 2)``, ``add.s(1)``, ``add.start(…)`` and ``add(2, 2)``
go to that app's task.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast, overload

from .errors import ConfigurationError
from .task import TASK_OPTIONS

if TYPE_CHECKING:
    from .app import App
    from .task import Task

P = ParamSpec("P")
R = TypeVar("R")

_lock = threading.Lock()
#: every shared task, in the order defined
_shared: list[SharedTask] = []
_apps: weakref.WeakSet[App] = weakref.WeakSet()
_current: weakref.ref[App] | None = None


def app_created(app: App) -> None:
    """``App.__init__`` calls this: the new app is current and has every shared task."""
    global _current
    with _lock:
        _apps.add(app)
        _current = weakref.ref(app)
        shared = list(_shared)
    for task in shared:
        task.register(app)


def current_app() -> App:
    """The app shared tasks resolve to: the last one created.

    Raises :class:`ConfigurationError` when there is none (alive).
    """
    app = _current() if _current is not None else None
    if app is None:
        raise ConfigurationError("a @shared_task needs an App: create the project's app "
                                 "(e.g. in proj/celery.py) before sending or calling it")
    return app


class SharedTask:
    """Stands for one shared task on the current app (see the module doc)."""

    def __init__(self, func: Callable[..., Any], options: dict[str, Any]) -> None:
        self.__wrapped__ = func
        self._options = options
        #: the registered name (the same on every app), known after the first registration
        self._name: str | None = None

    def register(self, app: App) -> Task[Any, Any]:
        """This task on ``app`` (registered there on first use); raises ``TypeError`` for
        an unknown option."""
        task = app.tasks.get(self._name) if self._name else None
        if task is None:
            task = cast("Task[Any, Any]", app.task(**self._options)(self.__wrapped__))
            self._name = task.name
        return task

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("__") or attribute in ("_options", "_name"):
            raise AttributeError(attribute)
        return getattr(self.register(current_app()), attribute)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.register(current_app())(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<shared task {getattr(self.__wrapped__, '__qualname__', self.__wrapped__)}>"


@overload
def shared_task(fn: Callable[P, R], /) -> Task[P, R]: ...


@overload
def shared_task(**options: Any) -> Callable[[Callable[..., Any]], Task[Any, Any]]: ...


def shared_task(fn: Any = None, /, **options: Any) -> Any:
    """Celery's ``@shared_task`` / ``@shared_task(bind=True, base=InteractiveTask, …)``:
    register the function with every app, and return a stand-in for the current app's
    task. The options are ``@app.task``'s; an unknown one raises ``TypeError``."""

    unknown = set(options) - {"base", "name", "queue", "bind"} - set(TASK_OPTIONS)
    if unknown:  # refused here: every app created later would fail to register it
        raise TypeError(f"unknown task option(s) {', '.join(sorted(unknown))}; options are "
                        f"base, bind, name, queue, {', '.join(sorted(TASK_OPTIONS))}")

    def decorate(func: Callable[..., Any]) -> Any:
        shared = SharedTask(func, options)
        with _lock:
            _shared.append(shared)
            apps = list(_apps)
        for app in apps:
            shared.register(app)
        return shared

    if fn is not None:
        return decorate(fn)
    return decorate
