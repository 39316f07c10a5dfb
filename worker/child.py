"""What runs inside a pool slot: the job loop and the task-side runtime.

A slot has two threads. The *reader* takes frames from the worker: ``run`` jobs go to the
executor's queue; ``ctl`` frames (pause, resume, cancel, message, answer) update the
running task's :class:`SlotRuntime` under its condition variable. The *executor* runs one
job at a time and writes events back. The task only sees control at checkpoints
(``progress``, ``checkpoint``, ``receive``, ``ask``, ``send``), which is what makes pause
and cancel cooperative and safe; forced cancel and hard pause are the worker's business.

Frames (lists): worker → slot ``["run", job]``, ``["ctl", task_id, verb, data]`` (a
message that wants a receipt: ``[..., data, receipt]``), ``["stop"]``; slot → worker
``["ready", pid]``, ``["ev", task_id, kind, fields, ts]``, ``["rc", task_id, receipt]``
(the task took that message), ``["done", task_id, kind, fields, ts]``.
"""

from __future__ import annotations

import collections
import inspect
import io
import logging
import os
import queue
import signal
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from interactive_tasks.app import App
from interactive_tasks.context import Request, reset_runtime, set_runtime
from interactive_tasks.errors import Cancelled, QuestionTimeout, Retry, SoftTimeLimitExceeded
from interactive_tasks.protocol import EventKind

from . import trace
from .ipc import ChannelClosed

logger = logging.getLogger("interactive_tasks.worker.child")


class SlotChannel(Protocol):
    """The slot's end of its channel to the worker: :class:`.ipc.BlockingChannel` (a
    socket) or :class:`.pools.green_channel.GreenChannel` (a green slot). ``send`` raises
    TypeError for what cannot be encoded, ``recv`` ChannelClosed once the worker is gone."""

    def send(self, obj: Any) -> None: ...

    def send_progress(self, obj: Any) -> None: ...

    def recv(self) -> Any: ...

#: after a hard pause the soft limit waits up to this many 50 ms steps for the worker's
#: note of how long the child was frozen
SOFT_LIMIT_GRACE_STEPS = 10
#: a SIGALRM handled this much after it fell due means the process was stopped (or starved)
ALARM_LATE = 0.05


class SlotRuntime:
    """The runtime of one running task; thread-safe between reader and executor."""

    def __init__(self, channel: SlotChannel, request: Request, *,
                 paused: bool, soft_time_limit: float | None,
                 condition: Callable[[], Any] = threading.Condition) -> None:
        self.channel = channel
        self.request = request
        self.task_id = request.id
        #: ``threading.Condition``, or what a green pool gives for it
        #: (:class:`.pools.gevent_condition.GeventCondition`)
        self._cond = condition()
        self._paused = paused
        self._cancelled = False
        #: (message, receipt or None) in the order they came
        self._inbox: collections.deque[tuple[Any, Any]] = collections.deque()
        self._answers: dict[str, Any] = {}
        self._pending_qid: str | None = None
        self._started = time.monotonic()
        self._paused_total = 0.0
        self._paused_since: float | None = None
        self._soft_limit = soft_time_limit
        self._soft_fired = False
        self._soft_grace_left = SOFT_LIMIT_GRACE_STEPS
        self._alarm_due = 0.0
        #: set by SIGCONT (a hard pause ended), cleared by the worker's "frozen" note
        self._continued = False

    # -- from the reader thread ----------
    def control(self, verb: str, data: Any, receipt: Any = None) -> None:
        """Apply a control frame; a message's ``receipt`` (its sender wants to know when
        the task takes it) goes back from :meth:`receive`."""
        with self._cond:
            if verb == "message":  # the common case first
                self._inbox.append((data, receipt))
            elif verb == "pause":
                self._paused = True
            elif verb == "resume":
                self._paused = False
                if isinstance(data, dict) and isinstance(data.get("frozen"), (int, float)):
                    self._paused_total += float(data["frozen"])  # a hard pause (SIGSTOP)
                    self._continued = False
            elif verb == "cancel":
                self._cancelled = True
            elif verb == "answer":
                qid = data.get("qid") if isinstance(data, dict) else None
                value = data.get("value") if isinstance(data, dict) else data
                self._answers[qid or self._pending_qid or ""] = value
            self._cond.notify_all()

    # -- events ----------
    def emit(self, kind: str, fields: dict[str, Any]) -> None:
        self.channel.send(["ev", self.task_id, kind, fields, time.time()])

    # -- checkpoints (executor thread, under no lock) ------------------------------------
    def _check_locked(self) -> None:
        """Raise Cancelled, or block while paused. Caller holds ``_cond``."""
        if self._cancelled:
            raise Cancelled()
        if self._paused:
            paused_at = time.monotonic()
            self._paused_since = paused_at
            self._cond.release()
            try:
                self.emit(EventKind.PAUSED, {})
            finally:
                self._cond.acquire()
            try:
                while self._paused and not self._cancelled:
                    self._cond.wait()
            finally:
                self._paused_total += time.monotonic() - paused_at
                self._paused_since = None
            if self._cancelled:
                raise Cancelled()
            self._cond.release()
            try:
                self.emit(EventKind.RESUMED, {})
            finally:
                self._cond.acquire()
        self._check_soft_limit()

    def _check_soft_limit(self) -> None:
        """At a checkpoint (caller holds ``_cond``): raise past the soft limit."""
        if self._soft_limit is None or self._soft_fired:
            return
        if self._continued and self.running_time() > self._soft_limit:
            # Just continued after a hard pause: wait for the worker's note of how long
            # we were frozen before judging (it is on its way over the channel).
            self._cond.wait_for(lambda: not self._continued, timeout=0.5)
            self._continued = False
        if self.running_time() > self._soft_limit:
            self._soft_fired = True
            raise SoftTimeLimitExceeded(
                f"soft time limit of {self._soft_limit}s exceeded (paused time not counted)"
            )

    def running_time(self) -> float:
        """Seconds the task has run, not counting time spent paused (so far)."""
        now = time.monotonic()
        paused = self._paused_total
        if self._paused_since is not None:
            paused += now - self._paused_since
        return now - self._started - paused

    def arm_soft_limit(self) -> bool:
        """Prefork: interrupt the task at its soft limit even between checkpoints.

        Uses SIGALRM, so only in the process's main thread; returns whether it did.
        """
        if self._soft_limit is None or threading.current_thread() is not \
                threading.main_thread():
            return False

        def on_alarm(signum: int, frame: Any) -> None:
            if self._soft_fired or self._soft_limit is None:
                return
            late = time.monotonic() - self._alarm_due > ALARM_LATE
            remaining = self._soft_limit - self.running_time()
            if remaining <= 0 and (self._continued or late) and self._soft_grace_left > 0:
                # Continued after a hard pause and the worker's note of how long we were
                # frozen has not arrived yet: look again shortly. A SIGALRM that fell due
                # while we were stopped is handled before on_continue runs (Python runs
                # pending handlers in signal-number order), so lateness tells us too.
                self._soft_grace_left -= 1
                remaining = 0.05
            if remaining > 0:  # paused meanwhile: the limit moved
                self._set_alarm(remaining)
                return
            self._soft_fired = True
            raise SoftTimeLimitExceeded(
                f"soft time limit of {self._soft_limit}s exceeded (paused time not counted)")

        def on_continue(signum: int, frame: Any) -> None:
            self._continued = True  # we were stopped (SIGSTOP): a hard pause

        signal.signal(signal.SIGALRM, on_alarm)
        signal.signal(signal.SIGCONT, on_continue)
        self._set_alarm(self._soft_limit)
        return True

    def _set_alarm(self, seconds: float) -> None:
        self._alarm_due = time.monotonic() + seconds
        signal.setitimer(signal.ITIMER_REAL, seconds)

    def disarm_soft_limit(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGCONT, signal.SIG_DFL)

    def checkpoint(self) -> None:
        with self._cond:
            self._check_locked()

    def progress(self, current: float, total: float | None, message: str | None) -> None:
        with self._cond:
            self._check_locked()
        fields: dict[str, Any] = {"current": current, "total": total}
        if message is not None:
            fields["message"] = message
        # Latest wins while the worker is behind (see BlockingChannel.send_progress,
        # SlotInbox.put_progress).
        self.channel.send_progress(["ev", self.task_id, EventKind.PROGRESS, fields,
                                    time.time()])

    def send(self, data: Any) -> None:
        with self._cond:
            self._check_locked()
        self.emit(EventKind.MESSAGE, {"data": data})

    def receive(self, timeout: float | None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                self._check_locked()
                if self._inbox:
                    data, receipt = self._inbox.popleft()
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
        if receipt is not None:
            # the sender holds back its next messages until this reaches it
            self.channel.send(["rc", self.task_id, receipt])
        return data

    def ask(self, prompt: str, timeout: float | None, choices: list[str] | None) -> Any:
        qid = uuid.uuid4().hex[:12]
        with self._cond:
            self._check_locked()
            self._pending_qid = qid
        fields: dict[str, Any] = {"prompt": prompt, "qid": qid}
        if choices:
            fields["choices"] = list(choices)
        if timeout is not None:
            fields["timeout"] = timeout
        self.emit(EventKind.QUESTION, fields)
        waited = 0.0
        with self._cond:
            try:
                while qid not in self._answers:
                    self._check_locked()
                    if timeout is not None and waited >= timeout:
                        raise QuestionTimeout(f"no answer to {prompt!r} within {timeout}s")
                    step = 0.5 if timeout is None else min(0.5, timeout - waited)
                    before = time.monotonic()
                    self._cond.wait(step)
                    if not self._paused:  # paused time does not count against the timeout
                        waited += time.monotonic() - before
                value = self._answers.pop(qid)
            finally:
                self._pending_qid = None
        self.emit(EventKind.ANSWERED, {"qid": qid, "value": value})
        return value

    def log(self, level: str, text: str) -> None:
        self.emit(EventKind.LOG, {"level": level, "text": text})


# -- print() and logging reach watchers ------------------------------------------------------
_local = threading.local()


def _runtime_here() -> SlotRuntime | None:
    try:
        return getattr(_local, "runtime", None)
    except RuntimeError:
        # gevent's thread-local while the interpreter exits ("greenlet is being
        # finalized"): no task runs any more; raising here made the final flush of
        # sys.stdout fail, and the worker exit with 120 instead of 0
        return None


class _StreamToEvents(io.TextIOBase):
    """Replaces sys.stdout/stderr: lines written by a running task become log events."""

    def __init__(self, original: Any, level: str) -> None:
        self._original = original
        self._level = level

    def write(self, s: str) -> int:
        runtime = _runtime_here()
        if runtime is None:
            return int(self._original.write(s))
        buf: list[str] = getattr(_local, f"buf_{self._level}", [])
        buf.append(s)
        text = "".join(buf)
        if "\n" in text:
            *lines, rest = text.split("\n")
            for line in lines:
                runtime.log(self._level, line)
            buf = [rest] if rest else []
        setattr(_local, f"buf_{self._level}", buf)
        return len(s)

    def flush(self) -> None:
        runtime = _runtime_here()
        if runtime is None:
            self._original.flush()

    def isatty(self) -> bool:
        return False


class _LogToEvents(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        runtime = _runtime_here()
        if runtime is None or record.name.startswith("interactive_tasks"):
            return
        try:
            runtime.log(record.levelname.lower(), self.format(record))
        except Exception:
            pass


_capture_installed = False
_capture_lock = threading.Lock()


def install_capture() -> None:
    """Route task prints and log records to events; idempotent, process-wide."""
    global _capture_installed
    with _capture_lock:
        if _capture_installed:
            return
        sys.stdout = _StreamToEvents(sys.stdout, "info")
        sys.stderr = _StreamToEvents(sys.stderr, "error")
        handler = _LogToEvents(level=logging.INFO)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        _capture_installed = True


def bind_output(runtime: SlotRuntime | None) -> None:
    """Send this thread's prints and log records to ``runtime``'s watchers from now on;
    ``None`` stops that, after sending a partial last line. For task code that runs
    outside a :class:`Slot` (the Celery bridge); installs the capture on first use."""
    if runtime is None:
        current = _runtime_here()
        if current is not None:
            _flush_partial_lines(current)
        _local.runtime = None
        return
    install_capture()
    _local.runtime = runtime


def _flush_partial_lines(runtime: SlotRuntime) -> None:
    for level in ("info", "error"):
        buf = getattr(_local, f"buf_{level}", [])
        text = "".join(buf)
        if text:
            runtime.log(level, text)
        setattr(_local, f"buf_{level}", [])


# -- the slot ----------
class Slot:
    """Serves one channel: runs jobs one after another, relays control to the current one."""

    def __init__(self, app: App, channel: SlotChannel, hostname: str,
                 nice: int | None = None,
                 condition: Callable[[], Any] = threading.Condition) -> None:
        self.app = app
        #: makes each task runtime's condition variable (see SlotRuntime)
        self.condition = condition
        self.channel = channel
        self.hostname = hostname
        #: how much to lower the priority of the thread that runs jobs (``serve``'s),
        #: after the reader thread has started at the caller's
        self.nice = nice
        self.jobs: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.current: SlotRuntime | None = None
        self._current_lock = threading.Lock()
        self._early: dict[str, list[tuple[str, Any, Any]]] = {}

    def serve(self) -> None:
        """Run until the worker says stop or the channel closes."""
        install_capture()
        reader = threading.Thread(target=self._read_loop, name="itask-slot-reader", daemon=True)
        reader.start()
        if self.nice:
            lower_thread_priority(self.nice)
        self.channel.send(["ready", os.getpid()])
        while True:
            job = self.jobs.get()
            if job is None:
                return
            self._execute(job)

    def _read_loop(self) -> None:
        try:
            while True:
                frame = self.channel.recv()
                op = frame[0]
                if op == "run":
                    self.jobs.put(frame[1])
                elif op == "ctl":
                    task_id, verb, data = frame[1], frame[2], frame[3]
                    receipt = frame[4] if len(frame) > 4 else None
                    with self._current_lock:
                        runtime = self.current
                        if runtime is not None and runtime.task_id == task_id:
                            runtime.control(verb, data, receipt)
                        else:
                            # The job frame may still be queued behind this one.
                            self._early.setdefault(task_id, []).append(
                                (verb, data, receipt))
                elif op == "stop":
                    self.jobs.put(None)
                    return
        except ChannelClosed:
            self.jobs.put(None)

    def _execute(self, job: dict[str, Any]) -> None:
        request = Request(
            id=job["id"], task=job["task"], args=tuple(job.get("args") or ()),
            kwargs=dict(job.get("kwargs") or {}), retries=job.get("retries", 0),
            hostname=self.hostname, delivery=job.get("delivery", 1),
            headers=dict(job.get("headers") or {}), eta=job.get("eta"),
            expires=job.get("expires"),
        )
        runtime = SlotRuntime(self.channel, request, paused=bool(job.get("paused")),
                              soft_time_limit=job.get("soft_time_limit"),
                              condition=self.condition)
        with self._current_lock:
            self.current = runtime
            for verb, data, receipt in self._early.pop(request.id, []):
                runtime.control(verb, data, receipt)
            self._early.clear()
        token = set_runtime(runtime)
        _local.runtime = runtime
        kind: str = EventKind.SUCCEEDED
        fields: dict[str, Any] = {}
        task = None
        error: BaseException | None = None
        armed = runtime.arm_soft_limit()
        try:
            task = self.app.get_task(request.task)
            trace.before(task, request)
            runtime.checkpoint()  # starts paused / never runs when cancelled early
            result = task.run(*request.args, **request.kwargs)
            if inspect.isawaitable(result):  # an ``async def`` task: its own event loop
                import asyncio  # here: with ssl, some 9 MB a pool process needs only now

                result = asyncio.run(_awaited(result))
            fields = {"result": result}
        except Cancelled as exc:
            kind, fields, error = EventKind.CANCELLED, {}, exc
        except Retry as retry:
            kind, fields, error = EventKind.RETRY, _retry_fields(request, retry), retry
        except BaseException as exc:  # the task's failure is data, not our crash
            kind, fields, error = EventKind.FAILED, {"error": describe_exception(exc)}, exc
            if task is not None and task.autoretry_for and isinstance(exc, task.autoretry_for):
                kind, fields = _autoretry(task, request, exc, fields)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                fields["error"]["fatal"] = True
        finally:
            if armed:
                runtime.disarm_soft_limit()
            if task is not None:
                trace.after(task, request, kind, fields, error)
            _flush_partial_lines(runtime)
            _local.runtime = None
            reset_runtime(token)
            with self._current_lock:
                self.current = None
        try:
            self.channel.send(["done", request.id, kind, fields, time.time()])
        except TypeError as exc:
            # The return value is not serializable: report that instead of losing the task.
            unsent = {"type": "TypeError", "message": f"result cannot be sent: {exc}",
                      "traceback": ""}
            self.channel.send(["done", request.id, EventKind.FAILED, {"error": unsent},
                               time.time()])


def lower_thread_priority(nice: int) -> None:
    """Add ``nice`` to the calling thread's nice value (on Linux the value is per thread:
    threads started before keep theirs; threads and processes started after inherit it).
    Nothing where that cannot be done."""
    try:
        current = os.getpriority(os.PRIO_PROCESS, 0)
        os.setpriority(os.PRIO_PROCESS, 0, min(19, current + nice))
    except (OSError, AttributeError):
        pass


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def _retry_fields(request: Request, retry: Retry) -> dict[str, Any]:
    fields: dict[str, Any] = {"countdown": retry.countdown, "retries": request.retries + 1}
    if retry.exc is not None:
        fields["error"] = describe_exception(retry.exc)
    return fields


def _autoretry(task: Any, request: Request, exc: BaseException,
               failed: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``autoretry_for``: a retry while retries remain, else the original failure."""
    limit = task.max_retries
    if limit is not None and request.retries >= limit:
        return EventKind.FAILED, failed
    countdown = task.backoff(request.retries) if task.retry_backoff else \
        task.default_retry_delay
    return EventKind.RETRY, _retry_fields(request, Retry(exc, countdown))


def describe_exception(exc: BaseException) -> dict[str, Any]:
    cls = type(exc)
    name = cls.__qualname__ if cls.__module__ in ("builtins", "__main__") else (
        f"{cls.__module__}.{cls.__qualname__}")
    return {
        "type": name,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(cls, exc, exc.__traceback__)),
    }
