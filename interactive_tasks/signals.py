"""Signals: hooks other code connects to, with Celery's names and arguments.

::

    from interactive_tasks import signals

    @signals.worker_process_init.connect
    def open_db(**kwargs):
        db.connect()                      # once in every prefork pool process

    @signals.task_failure.connect(sender=charge)      # only for this task
    def alert(sender, task_id, exception, **kwargs):
        sentry.capture(exception)

Receivers take keyword arguments (always accept ``**kwargs``: more may be added).
Where each signal is sent, and with what:

* In the process that **runs the task** (a prefork pool process, or the worker process
  for the threads, solo and gevent pools), inside the task's context (``self.request``
  and an interactive task's ``progress``/``send`` work): ``task_prerun``,
  ``task_success``, ``task_failure``, ``task_retry``, ``task_postrun``.
* In each **prefork pool process** when it starts and stops: ``worker_process_init``,
  ``worker_process_shutdown``.
* In the **worker process**: ``worker_init``, ``worker_ready``, ``worker_shutdown``, and
  ``task_revoked`` (a task revoked or expired before it started, or cancelled; a forcibly
  cancelled task's process is gone, so the worker is the one place that always knows).
* In the process that **publishes** a task (``delay``, ``apply_async``, ``send_task``,
  the first steps of a workflow): ``before_task_publish`` and ``after_task_publish``.
  ``headers`` in ``before_task_publish`` may be changed: keys a receiver adds travel
  with the task (``self.request.headers``), which is how tracing context is carried.

A receiver that raises is logged (logger ``interactive_tasks.signals``) and the others
still run; it never changes the task's outcome.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("interactive_tasks.signals")

Receiver = Callable[..., Any]


def _same_sender(wanted: Any, sender: Any) -> bool:
    """Whether a receiver connected for ``wanted`` hears a signal sent by ``sender``.

    A task sender also matches its name, so ``connect(sender="proj.add")`` and
    ``connect(sender=add)`` both work for task signals (the publish signals send the
    name).
    """
    if wanted is sender:
        return True
    wanted_name = getattr(wanted, "name", wanted)
    sender_name = getattr(sender, "name", sender)
    return isinstance(wanted_name, str) and wanted_name == sender_name


class Signal:
    """A named hook: ``connect`` receivers, ``send`` calls them with keyword arguments."""

    def __init__(self, name: str, providing_args: frozenset[str] | set[str] = frozenset()
                 ) -> None:
        self.name = name
        self.providing_args = frozenset(providing_args)
        self._lock = threading.Lock()
        #: (lookup key, reference to the receiver, sender filter)
        self._receivers: list[tuple[Any, Callable[[], Receiver | None], Any]] = []

    def connect(self, receiver: Receiver | None = None, *, sender: Any = None,
                weak: bool = False, dispatch_uid: Any = None) -> Any:
        """Connect ``receiver``; usable as ``@signal.connect`` or ``@signal.connect(sender=…)``.

        ``sender`` limits it to one sender (a task, or its name). ``weak=True`` holds only
        a weak reference (Celery's default; here the default is a strong one, so a
        receiver defined in a function is not lost when the function returns).
        ``dispatch_uid`` makes connecting twice a no-op. Returns the receiver.
        Raises TypeError when ``receiver`` is not callable.
        """
        if receiver is None:
            def decorator(fn: Receiver) -> Receiver:
                self.connect(fn, sender=sender, weak=weak, dispatch_uid=dispatch_uid)
                return fn
            return decorator
        if not callable(receiver):
            raise TypeError(f"signal {self.name}: receiver {receiver!r} is not callable")
        key = (dispatch_uid if dispatch_uid is not None else _receiver_id(receiver),
               id(sender) if sender is not None and not isinstance(sender, str) else sender)
        ref: Callable[[], Receiver | None]
        if weak:
            ref = (weakref.WeakMethod(receiver) if hasattr(receiver, "__self__")
                   else weakref.ref(receiver))
        else:
            ref = _strong(receiver)
        with self._lock:
            if not any(existing == key for existing, _, _ in self._receivers):
                self._receivers.append((key, ref, sender))
        return receiver

    def disconnect(self, receiver: Receiver | None = None, *, sender: Any = None,
                   dispatch_uid: Any = None) -> bool:
        """Disconnect a receiver (or the one with ``dispatch_uid``); True if one was."""
        if receiver is None and dispatch_uid is None:
            raise TypeError("disconnect() needs a receiver or a dispatch_uid")
        key = (dispatch_uid if dispatch_uid is not None else _receiver_id(receiver),
               id(sender) if sender is not None and not isinstance(sender, str) else sender)
        with self._lock:
            before = len(self._receivers)
            self._receivers = [r for r in self._receivers if r[0] != key]
            return len(self._receivers) != before

    @property
    def receivers(self) -> list[Receiver]:
        """The receivers connected now (live ones only)."""
        with self._lock:
            entries = list(self._receivers)
        return [fn for _, ref, _ in entries if (fn := ref()) is not None]

    def has_listeners(self, sender: Any = None) -> bool:
        """Whether a receiver is connected (for ``sender``). Without a sender it is one
        attribute read, cheap enough for the path of every published task."""
        if sender is None:
            return bool(self._receivers)
        return bool(self._live(sender))

    def _live(self, sender: Any) -> list[Receiver]:
        with self._lock:
            entries = list(self._receivers)
        live = []
        dead = False
        for _, ref, wanted in entries:
            fn = ref()
            if fn is None:
                dead = True
            elif wanted is None or _same_sender(wanted, sender):
                live.append(fn)
        if dead:
            with self._lock:
                self._receivers = [r for r in self._receivers if r[1]() is not None]
        return live

    def send(self, sender: Any, **named: Any) -> list[tuple[Receiver, Any]]:
        """Call every receiver for ``sender``; returns ``[(receiver, response)]``.

        Never raises for a receiver: its exception is logged and is its response.
        """
        responses: list[tuple[Receiver, Any]] = []
        if not self._receivers:  # the common case, kept cheap: no lock, no list
            return responses
        for receiver in self._live(sender):
            try:
                response = receiver(signal=self, sender=sender, **named)
            except Exception as exc:
                logger.exception("signal %s: receiver %s raised %s", self.name,
                                 getattr(receiver, "__qualname__", receiver),
                                 type(exc).__name__)
                response = exc
            responses.append((receiver, response))
        return responses

    send_robust = send  # Celery's (Django's) name for a send that never raises

    def __repr__(self) -> str:
        return f"<Signal: {self.name}>"


def _receiver_id(receiver: Any) -> Any:
    if hasattr(receiver, "__self__") and hasattr(receiver, "__func__"):
        return (id(receiver.__self__), id(receiver.__func__))
    return id(receiver)


def _strong(receiver: Receiver) -> Callable[[], Receiver]:
    return lambda: receiver


# -- the signals ------------------------------------------------------------------------------
# publishing (the sending process; sender: the task's name)
before_task_publish = Signal("before_task_publish", {
    "body", "exchange", "routing_key", "headers", "properties", "declare", "retry_policy"})
after_task_publish = Signal("after_task_publish", {"body", "exchange", "routing_key",
                                                   "headers"})

# running a task (the process that runs it; sender: the task)
task_prerun = Signal("task_prerun", {"task_id", "task", "args", "kwargs"})
task_postrun = Signal("task_postrun", {"task_id", "task", "args", "kwargs", "retval",
                                       "state"})
task_success = Signal("task_success", {"result"})
task_failure = Signal("task_failure", {"task_id", "exception", "args", "kwargs",
                                       "traceback", "einfo"})
task_retry = Signal("task_retry", {"request", "reason", "einfo"})

# the worker process (sender: the task, or the worker)
task_revoked = Signal("task_revoked", {"request", "terminated", "signum", "expired"})
worker_init = Signal("worker_init")
worker_ready = Signal("worker_ready")
worker_shutdown = Signal("worker_shutdown")

# each prefork pool process (sender: None)
worker_process_init = Signal("worker_process_init")
worker_process_shutdown = Signal("worker_process_shutdown", {"pid", "exitcode"})

__all__ = [
    "Signal",
    "after_task_publish",
    "before_task_publish",
    "task_failure",
    "task_postrun",
    "task_prerun",
    "task_retry",
    "task_revoked",
    "task_success",
    "worker_init",
    "worker_process_init",
    "worker_process_shutdown",
    "worker_ready",
    "worker_shutdown",
]
