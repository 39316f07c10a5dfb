"""Jupyter display of task handles: a live widget for one task, a compact table for several.

In a notebook, a handle as a cell's value (or ``display(handle)``) shows :class:`TaskWidget`:
state, a progress bar with current/total, rate and ETA, the latest log and message lines,
a pending question with an answer box, Pause / Resume / Cancel buttons and a message box.
:func:`watch` (``app.watch(handles)``, or a list of handles as a cell's value) shows one
compact row per task. Displaying returns at once; the widget follows the task from the
client's inbox thread while other cells run.

**Buttons need an idle or awaiting kernel.** A click reaches the kernel only when no cell
is running or the running cell is awaiting: wait with ``await handle`` (or
``await handle.wait_async()``), not with ``handle.wait()`` / ``handle.result()`` /
``time.sleep()``, which block the kernel so clicks are held until the cell ends (progress
keeps updating either way).

The live widget needs the ``jupyter`` extra (``pip install "interactive_tasks[jupyter]"``,
which brings anywidget and ipywidgets); without it a handle displays as a static summary
with that hint. This module is imported lazily (by :meth:`TaskHandle._repr_mimebundle_`
and ``App.watch``) and imports anywidget only when a widget is built, so nothing Jupyter
loads outside Jupyter.
"""

from __future__ import annotations

import collections
import functools
import html
import logging
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .protocol import EventKind, TaskSnapshot
from .view import RateMeter, cut, format_eta, format_rate, outcome_text, show

if TYPE_CHECKING:
    from .handle import TaskHandle

# TaskWidget and WatchWidget are here too, built on first access (they import anywidget).
__all__ = [
    "HINT",
    "handle_mimebundle",
    "install_display_hooks",
    "jupyter_available",
    "task_view",
    "task_widget",
    "watch",
]

HINT = 'pip install "interactive_tasks[jupyter]" for a live widget'

#: Seconds between two updates a widget sends to the browser (at most ~10 Hz).
UPDATE_INTERVAL = 0.1
#: Log and message lines a widget shows (the latest ones).
MAX_LINES = 6

_ASSETS = Path(__file__).resolve().parent
_LINE_CHARS = 500
_OUTCOME_CHARS = 300
_ACTIONS = ("pause", "resume", "cancel", "answer", "send")


# -- availability -------------------------------------------------------------------------


def jupyter_available() -> bool:
    """Whether the ``jupyter`` extra (anywidget, ipywidgets) can be imported."""
    try:
        import anywidget  # noqa: F401
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def _in_kernel() -> bool:
    """Whether this process is a Jupyter kernel (a front end can show widgets)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:
        return False
    return getattr(shell, "kernel", None) is not None


# -- the view of one task (pure) ----------------------------------------------------------


def _lines(snap: TaskSnapshot) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for event in snap.events:
        if event.kind == EventKind.LOG:
            out.append({"kind": "log", "level": str(event.level or "info"),
                        "text": show(event.text or "", _LINE_CHARS)})
        elif event.kind == EventKind.MESSAGE:
            out.append({"kind": "message", "level": "",
                        "text": show(event.data, _LINE_CHARS)})
    return out[-MAX_LINES:]


def task_view(snap: TaskSnapshot, rate: float | None = None, eta: float | None = None,
              *, worker_lost: bool = False) -> dict[str, Any]:
    """Everything the widget shows of one task, as JSON-ready values (a pure function)."""
    progress = snap.progress
    question = None
    if snap.question:
        choices = snap.question.get("choices")
        question = {
            "prompt": show(snap.question.get("prompt") or "", _LINE_CHARS),
            "qid": str(snap.question.get("qid") or ""),
            "choices": [show(c, 100) for c in choices] if isinstance(choices, list) else [],
        }
    current = progress.current if progress is not None else None
    total = progress.total if progress is not None else None
    return {
        "task_id": snap.task_id,
        "name": snap.name,
        "state": snap.state.value,
        "current": float(current) if isinstance(current, (int, float)) else None,
        "total": float(total) if isinstance(total, (int, float)) and total > 0 else None,
        "progress_message": show(progress.message or "", 200) if progress is not None else "",
        "rate": rate,
        "eta": eta,
        "lines": _lines(snap),
        "question": question,
        "worker": snap.worker or "",
        "rate_text": format_rate(rate) if rate is not None else "",
        "eta_text": format_eta(eta) if eta is not None else "",
        "outcome": outcome_text(snap, _OUTCOME_CHARS),
        "notice": "worker lost: waiting for the task to be delivered again"
        if worker_lost else "",
    }


# -- static fallback ----------------------------------------------------------------------


def _static_bundle(handle: TaskHandle[Any], *, hint: bool) -> dict[str, str]:
    snap = handle.snapshot()
    progress = ""
    if snap.progress is not None and snap.progress.total:
        progress = f" {snap.progress.current}/{snap.progress.total}"
    text = f"{snap.name or 'task'} {snap.task_id} {snap.state.value}{progress}"
    if not hint:
        return {"text/plain": text, "text/html": f"<code>{html.escape(text)}</code>"}
    return {
        "text/plain": f"{text}  ({HINT})",
        "text/html": f"<code>{html.escape(text)}</code> <small>{html.escape(HINT)}</small>",
    }


def handle_mimebundle(handle: TaskHandle[Any], **kwargs: Any) -> Any:
    """What a handle shows in IPython: the live widget in a Jupyter kernel with the extra.

    Without anywidget/ipywidgets a static summary with :data:`HINT`; outside a kernel
    (plain Python, terminal IPython) the static summary.
    """
    if not jupyter_available():
        return _static_bundle(handle, hint=True)
    if not _in_kernel():
        return _static_bundle(handle, hint=False)
    install_display_hooks()
    return task_widget(handle)._repr_mimebundle_(**kwargs)


# -- widgets ------------------------------------------------------------------------------

# One widget per handle: displaying a handle twice shows two views of one model. Keyed
# by id() and weak on the widget: a live widget keeps its handle alive (it steers it), a
# closed and forgotten one lets both go.
_WIDGETS: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
_WIDGETS_LOCK = threading.Lock()


def task_widget(handle: TaskHandle[Any]) -> Any:
    """The :class:`TaskWidget` of ``handle`` (made on first use, then reused)."""
    with _WIDGETS_LOCK:
        widget = _WIDGETS.get(id(handle))
        if widget is None or widget.handle is not handle or widget.comm is None:
            widget = _classes()[0](handle)
            _WIDGETS[id(handle)] = widget
        return widget


def watch(handles: Iterable[TaskHandle[Any]]) -> Any:
    """A :class:`WatchWidget`: one compact row per task, with Pause / Resume / Cancel.

    Needs the ``jupyter`` extra; raises ImportError with the install hint without it.
    """
    if not jupyter_available():
        raise ImportError(f"the task widgets need the jupyter extra: {HINT}")
    return _classes()[1](handles)


def install_display_hooks() -> None:
    """Make a list or tuple of handles, as a cell's value, display as :func:`watch`.

    Idempotent; does nothing outside a Jupyter kernel or without the ``jupyter`` extra.
    Other lists display as before.
    """
    global _HOOKS_INSTALLED
    if _HOOKS_INSTALLED or not _in_kernel() or not jupyter_available():
        return
    shell = sys.modules["IPython"].get_ipython()
    formatter = shell.display_formatter.mimebundle_formatter
    for kind in (list, tuple):
        previous = formatter.type_printers.get(kind)
        formatter.for_type(kind, functools.partial(_sequence_bundle, previous))
    _HOOKS_INSTALLED = True


_HOOKS_INSTALLED = False


def _sequence_bundle(previous: Callable[[Any], Any] | None, obj: Any) -> Any:
    from .handle import TaskHandle

    if obj and all(isinstance(item, TaskHandle) for item in obj):
        return watch(obj)._repr_mimebundle_()
    return previous(obj) if previous is not None else None


class _Scheduler:
    """One daemon thread runs every widget's delayed updates.

    Each thread that sends on a kernel's iopub channel gets its own pipe, so delayed
    updates come from this one long-lived thread rather than a timer thread each.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: dict[Callable[[], None], float] = {}
        self._thread: threading.Thread | None = None

    def at(self, when: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` at ``when`` (``time.monotonic()``), unless it is already due."""
        with self._cond:
            if callback in self._due:
                return
            self._due[callback] = when
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                name="itask-widget-updates")
                self._thread.start()
            self._cond.notify()

    def cancel(self, callback: Callable[[], None]) -> None:
        with self._cond:
            self._due.pop(callback, None)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    ready = [cb for cb, when in self._due.items() if when <= now]
                    if ready:
                        for cb in ready:
                            del self._due[cb]
                        break
                    wait = min(self._due.values()) - now if self._due else None
                    self._cond.wait(wait)
            for callback in ready:
                try:
                    callback()
                except Exception:  # one broken widget must not stop the others
                    logging.getLogger(__name__).exception("widget update failed")


_SCHEDULER = _Scheduler()


class _Throttle:
    """Calls ``flush`` at most every :data:`UPDATE_INTERVAL` seconds, and once more after.

    ``poke()`` comes from the inbox thread after every change; ``poke(now=True)`` flushes
    at once (final states). A flush never runs concurrently with another one.
    """

    def __init__(self, flush: Callable[[], None]) -> None:
        self._flush = flush
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._scheduled = False
        self._last = 0.0

    def poke(self, now: bool = False) -> None:
        with self._lock:
            if self._scheduled and not now:
                return  # a flush is already scheduled and will see this change
            delay = self._last + UPDATE_INTERVAL - time.monotonic()
            if delay > 0 and not now:
                self._scheduled = True
                _SCHEDULER.at(time.monotonic() + delay, self.run)
                return
        self.run()

    def run(self) -> None:
        with self._flush_lock:
            with self._lock:
                self._scheduled = False
                self._last = time.monotonic()
            self._flush()

    def cancel(self) -> None:
        _SCHEDULER.cancel(self.run)
        with self._lock:
            self._scheduled = False


class _Controls:
    """Runs control calls (which wait up to 5 s for the worker) off the comm thread, in order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: collections.deque[Callable[[], None]] = collections.deque()
        self._running = False

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            self._jobs.append(job)
            if self._running:
                return
            self._running = True
        threading.Thread(target=self._drain, name="itask-widget-control", daemon=True).start()

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._jobs:
                    self._running = False
                    return
                job = self._jobs.popleft()
            job()


def _control(handle: TaskHandle[Any], action: str, content: dict[str, Any]) -> None:
    """One button's effect on the task (blocks until the worker acknowledges)."""
    if action == "pause":
        handle.pause()
    elif action == "resume":
        handle.resume()
    elif action == "cancel":
        handle.cancel()
    elif action == "answer":
        handle.answer(content.get("value", ""))
    elif action == "send":
        handle.send(content.get("data", ""))
    else:  # pragma: no cover - filtered before
        raise ValueError(f"unknown action {action!r}")



def _error_text(action: str, exc: BaseException) -> str:
    return cut(f"{action} failed: {type(exc).__name__}: {exc}", 400)


@functools.cache
def _classes() -> tuple[type, type]:
    """Build the widget classes on first use (imports anywidget)."""
    import anywidget
    import traitlets as t

    class TaskWidget(anywidget.AnyWidget):
        """The live view of one task; the buttons steer it.

        Traits mirror :func:`task_view` (``state``, ``current``, ``total``, ``rate``,
        ``eta``, ``lines``, ``question`` …) plus ``error`` (the last failed control, such
        as NotAuthorized or TaskFinished) and ``busy`` (the control on its way). The
        browser sends ``{"action": "pause" | "resume" | "cancel" | "answer" | "send",
        "value"?, "data"?}``.
        """

        _esm = _ASSETS / "_widget.js"
        _css = _ASSETS / "_widget.css"
        view = t.Unicode("task").tag(sync=True)
        task_id = t.Unicode("").tag(sync=True)
        name = t.Unicode("").tag(sync=True)
        state = t.Unicode("pending").tag(sync=True)
        current = t.Float(None, allow_none=True).tag(sync=True)
        total = t.Float(None, allow_none=True).tag(sync=True)
        progress_message = t.Unicode("").tag(sync=True)
        rate = t.Float(None, allow_none=True).tag(sync=True)
        eta = t.Float(None, allow_none=True).tag(sync=True)
        rate_text = t.Unicode("").tag(sync=True)
        eta_text = t.Unicode("").tag(sync=True)
        lines = t.List(t.Dict()).tag(sync=True)
        question = t.Dict(None, allow_none=True).tag(sync=True)
        worker = t.Unicode("").tag(sync=True)
        outcome = t.Unicode("").tag(sync=True)
        notice = t.Unicode("").tag(sync=True)
        error = t.Unicode("").tag(sync=True)
        busy = t.Unicode("").tag(sync=True)

        def __init__(self, handle: TaskHandle[Any], **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.handle = handle
            self._sync_lock = threading.RLock()
            self._meter = RateMeter()
            self._throttle = _Throttle(self._update)
            self._controls = _Controls()
            self.on_msg(self._on_custom)
            # Listen first, then draw: a change that came between a first draw and the
            # listener would be lost for good when nothing follows it (a task that asks
            # a question and then waits showed as "pending" in JupyterLab, seen in CI).
            # Every draw goes through the throttle, so an older snapshot never
            # overwrites a newer one.
            if not handle.state.is_final:
                handle.add_listener(self._on_change)
            self._throttle.run()
            if handle.state.is_final:  # it may have ended before the listener was added
                handle.remove_listener(self._on_change)

        def _on_change(self, handle: TaskHandle[Any]) -> None:
            final = handle.state.is_final
            self._throttle.poke(now=final)
            if final:
                self._throttle.cancel()
                handle.remove_listener(self._on_change)

        def _update(self) -> None:
            if self.comm is None:  # closed
                return
            snap = self.handle.snapshot()
            rate, eta = self._meter.observe(snap)
            values = task_view(snap, rate, eta, worker_lost=self.handle.worker_lost)
            with self._sync_lock, self.hold_sync():
                for key, value in values.items():
                    setattr(self, key, value)

        def _on_custom(self, _widget: Any, content: Any, _buffers: Any) -> None:
            action = content.get("action") if isinstance(content, dict) else None
            if action not in _ACTIONS:
                with self._sync_lock:
                    self.error = f"unknown action {action!r}"
                return
            with self._sync_lock:
                self.busy = str(action)
            self._controls.submit(lambda: self._run(str(action), content))

        def _run(self, action: str, content: dict[str, Any]) -> None:
            try:
                _control(self.handle, action, content)
            except Exception as exc:
                error = _error_text(action, exc)
            else:
                error = ""
            with self._sync_lock, self.hold_sync():
                self.error = error
                self.busy = ""

        def close(self) -> None:
            self._throttle.cancel()
            self.handle.remove_listener(self._on_change)
            super().close()

        def __repr__(self) -> str:  # the text/plain a saved notebook shows without JS
            count = ""
            if self.current is not None:
                count = f" {self.current:g}" + (f"/{self.total:g}" if self.total else "")
            return f"<TaskWidget {self.name or 'task'} {self.task_id} {self.state}{count}>"

    class WatchWidget(anywidget.AnyWidget):
        """One compact row per task (``rows``: a :func:`task_view` per task).

        The browser sends ``{"action": ..., "task_id": ...}``; ``errors`` maps task ids
        to the last failed control, ``busy`` task ids to the control on its way.
        """

        _esm = _ASSETS / "_widget.js"
        _css = _ASSETS / "_widget.css"
        view = t.Unicode("watch").tag(sync=True)
        rows = t.List(t.Dict()).tag(sync=True)
        errors = t.Dict().tag(sync=True)
        busy = t.Dict().tag(sync=True)

        def __init__(self, handles: Iterable[TaskHandle[Any]], **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.handles: list[TaskHandle[Any]] = []
            self._meters: dict[str, RateMeter] = {}
            self._sync_lock = threading.RLock()
            self._throttle = _Throttle(self._update)
            self._controls: dict[str, _Controls] = {}
            self.on_msg(self._on_custom)
            for handle in handles:
                self.add(handle, update=False)
            self._throttle.run()
            for handle in self.handles:
                if handle.state.is_final:  # it may have ended before the listener was added
                    handle.remove_listener(self._on_change)

        def add(self, handle: TaskHandle[Any], *, update: bool = True) -> None:
            """Show one more task (a handle already shown is ignored)."""
            if any(h is handle or h.id == handle.id for h in self.handles):
                return
            self.handles.append(handle)
            self._meters[handle.id] = RateMeter()
            self._controls[handle.id] = _Controls()
            # Listen, then draw (see TaskWidget.__init__).
            if not handle.state.is_final:
                handle.add_listener(self._on_change)
            if update:
                self._throttle.run()
                if handle.state.is_final:
                    handle.remove_listener(self._on_change)

        def _on_change(self, handle: TaskHandle[Any]) -> None:
            final = handle.state.is_final
            self._throttle.poke(now=final)
            if final:
                handle.remove_listener(self._on_change)

        def _update(self) -> None:
            if self.comm is None:
                return
            rows = []
            for handle in list(self.handles):
                snap = handle.snapshot()
                rate, eta = self._meters[handle.id].observe(snap)
                rows.append(task_view(snap, rate, eta, worker_lost=handle.worker_lost))
            with self._sync_lock:
                self.rows = rows

        def _on_custom(self, _widget: Any, content: Any, _buffers: Any) -> None:
            if not isinstance(content, dict):
                return
            action, task_id = content.get("action"), content.get("task_id")
            handle = next((h for h in self.handles if h.id == task_id), None)
            if handle is None or action not in _ACTIONS:
                with self._sync_lock:
                    self.errors = {**self.errors,
                                   str(task_id): f"unknown action {action!r} or task"}
                return
            with self._sync_lock:
                self.busy = {**self.busy, handle.id: str(action)}
            self._controls[handle.id].submit(
                lambda: self._run(handle, str(action), content))

        def _run(self, handle: TaskHandle[Any], action: str, content: dict[str, Any]) -> None:
            try:
                _control(handle, action, content)
            except Exception as exc:
                error = _error_text(action, exc)
            else:
                error = ""
            with self._sync_lock, self.hold_sync():
                self.errors = {**self.errors, handle.id: error}
                self.busy = {k: v for k, v in self.busy.items() if k != handle.id}

        def close(self) -> None:
            self._throttle.cancel()
            for handle in self.handles:
                handle.remove_listener(self._on_change)
            super().close()

        def __repr__(self) -> str:
            states = collections.Counter(row.get("state") for row in self.rows)
            summary = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
            return f"<WatchWidget {len(self.rows)} tasks: {summary}>"

    for cls in (TaskWidget, WatchWidget):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    return TaskWidget, WatchWidget


def __getattr__(name: str) -> Any:
    # ``from interactive_tasks.widgets import TaskWidget`` imports anywidget only then.
    if name == "TaskWidget":
        return _classes()[0]
    if name == "WatchWidget":
        return _classes()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
