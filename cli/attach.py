"""Sources that feed the terminal UIs from live handles and worker inspection.

:class:`HandleSource` adapts a :class:`~interactive_tasks.handle.TaskHandle` to the
``itask attach`` app; :class:`ClusterSource` polls every worker (``inspect stats`` and
``inspect tasks``) for ``itask top``. The apps themselves (``tui.py``) only render.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

from interactive_tasks import App, TaskHandle
from interactive_tasks.errors import InteractiveTasksError
from interactive_tasks.protocol import Event, TaskSnapshot, TaskState
from interactive_tasks.view import RateMeter

from .tui import run_attach, run_top

HELP = "pause | resume | cancel | answer TEXT | q to detach | anything else is sent as a message"


def run_command(handle: TaskHandle[Any], line: str) -> str:
    """Execute one typed line against the task; returns a status text, never raises."""
    line = line.strip()
    if not line:
        return HELP
    word, _, rest = line.partition(" ")
    try:
        if word in ("pause", "resume", "cancel") and not rest:
            if word == "pause":
                handle.pause()
            elif word == "resume":
                handle.resume()
            else:
                handle.cancel()
            return f"{word}: delivered"
        if word == "pause" and rest == "--hard":
            handle.pause(hard=True)
            return "hard pause: delivered"
        if word == "answer":
            handle.answer(rest)
            return f"answered {rest!r}"
        if word in ("help", "?"):
            return HELP
        try:
            data: Any = json.loads(line)
        except json.JSONDecodeError:
            data = line
        handle.send(data)
        return f"sent {data!r}"
    except InteractiveTasksError as exc:
        return f"error: {exc}"


class HandleSource:
    """``AttachSource`` over one task handle."""

    def __init__(self, handle: TaskHandle[Any]) -> None:
        self.handle = handle
        self._meter = RateMeter()
        self._lock = threading.Lock()
        self._rate: tuple[float | None, float | None] = (None, None)
        self._callbacks: list[Callable[[], None]] = []
        handle.add_listener(self._on_change)
        self._observe()

    def _observe(self) -> None:
        with self._lock:
            self._rate = self._meter.observe(self.handle.snapshot())

    def _on_change(self, handle: TaskHandle[Any]) -> None:
        self._observe()
        for callback in list(self._callbacks):
            callback()

    def snapshot(self) -> TaskSnapshot:
        return self.handle.snapshot()

    def rate(self) -> tuple[float | None, float | None]:
        with self._lock:
            return self._rate

    def command(self, line: str) -> str:
        return run_command(self.handle, line)

    def subscribe_changes(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)


def attach(handle: TaskHandle[Any], *, color: bool = True, left_note: str | None = None) -> int:
    """Run ``itask attach`` on ``handle``; returns the exit code. ``left_note`` replaces
    the "the task keeps running" line printed when the user leaves a running task."""
    return run_attach(HandleSource(handle), color=color, left_note=left_note)


def summary_to_snapshot(item: dict[str, Any]) -> TaskSnapshot:
    progress = item.get("progress")
    return TaskSnapshot(
        task_id=item["id"], name=item.get("name") or "", state=TaskState(item["state"]),
        worker=item.get("worker"), pid=item.get("pid"),
        progress=Event.from_wire(progress) if progress else None,
        received=item.get("received"), started=item.get("started"),
        finished=item.get("finished"), question=item.get("question"),
        interactive=bool(item.get("interactive", True)),
    )


class ClusterSource:
    """``TopSource``: workers from the monitoring stream, tasks polled from every worker.

    Worker heartbeats (every ``worker_heartbeat`` seconds, with stats) keep a worker
    online; a worker missing three heartbeats, or saying ``worker-offline``, is shown
    offline. Task events (workers started with ``-E``) trigger an immediate refresh.
    """

    def __init__(self, app: App, interval: float = 1.0) -> None:
        from interactive_tasks.monitor import EventReceiver, WorkerBook

        self.app = app
        self.interval = interval
        self._book = WorkerBook(float(app.conf.worker_heartbeat))
        self._tasks: list[TaskSnapshot] = []
        self._by_worker: dict[str, list[TaskSnapshot]] = {}
        self._callbacks: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._poke = threading.Event()
        self._receiver = EventReceiver(app, self._on_event)
        self._receiver.start()
        self._thread = threading.Thread(target=self._poll, name="itask-top", daemon=True)
        self._thread.start()

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if not isinstance(event.get("worker"), str):
            return
        self._book.on_event(event)
        if isinstance(kind, str) and kind.startswith("task-"):
            self._poke.set()
        self._changed()

    def _changed(self) -> None:
        for callback in list(self._callbacks):
            callback()

    def _poll(self) -> None:
        first = True
        while not self._stop.is_set():
            try:
                self.refresh(with_stats=first)
                first = False
            except InteractiveTasksError:
                pass
            self._poke.wait(self.interval)
            self._poke.clear()

    def refresh(self, with_stats: bool = False) -> None:
        if with_stats:  # before the first heartbeat arrives
            for reply in self.app.inspect("stats", timeout=0.5):
                data = reply.get("data")
                if isinstance(data, dict) and isinstance(data.get("worker"), str):
                    self._book.seen(data["worker"], data)
        # Keep the last answer of a worker that was too busy to reply this time, so rows
        # do not flicker away (a key press would then find no selected task).
        for reply in self.app.inspect("tasks", timeout=0.5):
            worker = reply.get("worker")
            if isinstance(worker, str):
                self._by_worker[worker] = [summary_to_snapshot(item)
                                           for item in reply.get("data") or ()]
        online = {w["worker"] for w in self.workers() if w.get("online")}
        tasks = [t for worker, items in self._by_worker.items() if worker in online
                 for t in items]
        self._tasks = sorted(tasks, key=lambda s: s.received or 0)
        self._changed()

    def workers(self) -> list[dict[str, Any]]:
        return self._book.workers()

    def tasks(self) -> list[TaskSnapshot]:
        return self._tasks

    def control(self, task_id: str, verb: str) -> str:
        try:
            handle = self.app.attach(task_id, timeout=1.0)
            if verb == "pause":
                handle.pause()
            elif verb == "resume":
                handle.resume()
            elif verb == "cancel":
                handle.cancel()
            else:
                return f"unknown action {verb!r}"
        except InteractiveTasksError as exc:
            return f"{verb} {task_id[:8]}: {exc}"
        return f"{verb} {task_id[:8]}: delivered"

    def subscribe_changes(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def close(self) -> None:
        self._stop.set()
        self._poke.set()
        self._receiver.stop()


def top(app: App, *, color: bool = True) -> int:
    """Run ``itask top``; pressing a/Enter on a task attaches to it."""
    source = ClusterSource(app)
    chosen: list[str] = []
    try:
        code = run_top(source, color=color, on_attach=chosen.append)
    finally:
        source.close()
    if chosen:
        handle = app.attach(chosen[0])
        return attach(handle, color=color)
    return code
