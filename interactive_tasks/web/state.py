"""What the dashboard knows: the cluster (workers, tasks, queues) and one feed per open task.

:class:`Cluster` learns workers from the ``<ns>.events`` stream (heartbeats, as ``itask
top`` does) and tasks from ``inspect tasks`` (running and recent, on every worker, each
second and at once after a task event when workers run with ``-E``); it keeps up to
``recent`` finished tasks after their workers forgot them. :class:`TaskFeed` is one task's
attach handle (snapshot, then the live tail) turned into an ordered log of numbered
entries, so a browser that reconnects asks for what came after the last number it saw.

Threads feed both; the ASGI side waits on :class:`Changes`, which wakes asyncio waiters
from any thread.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..errors import InteractiveTasksError
from ..monitor import WorkerBook
from ..protocol import Event, EventKind, TaskSnapshot, TaskState
from ..view import RateMeter, format_eta, format_rate, outcome_text, show

if TYPE_CHECKING:
    from ..app import App
    from ..handle import TaskHandle

logger = logging.getLogger("interactive_tasks.web")

#: Characters of a log line, message or answer in an event entry.
LINE_CHARS = 2000
#: Event entries a task feed keeps (the oldest tenth go when it has more).
MAX_ENTRIES = 10_000
#: Progress samples a task page's chart keeps (older ones are thinned out).
CHART_POINTS = 600
#: Minutes of overview history (one point every ``HISTORY_STEP`` seconds).
HISTORY_POINTS = 300
HISTORY_STEP = 2.0


class Changes:
    """A version counter that asyncio tasks can wait on, bumped from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.version = 0
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def bump(self) -> None:
        with self._lock:
            self.version += 1
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop closed: its waiter is gone
                pass

    async def wait(self, seen: int, timeout: float) -> int:
        """Return the version once it is past ``seen`` (or after ``timeout`` seconds)."""
        event = asyncio.Event()
        entry = (asyncio.get_running_loop(), event)
        with self._lock:
            if self.version != seen:
                return self.version
            self._waiters.append(entry)
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            with self._lock:
                self._waiters.remove(entry)
        return self.version


# -- one task ---------------------------------------------------------------------------


def _entry(event: Event) -> dict[str, Any]:
    """An event as the page shows it (values made short, JSON-ready, never raising)."""
    f = event.fields
    item: dict[str, Any] = {"kind": event.kind, "ts": event.ts, "run": event.run,
                            "seq": event.seq}
    if event.kind == EventKind.LOG:
        item["level"] = show(f.get("level") or "info", 20)
        item["text"] = show(f.get("text") or "", LINE_CHARS)
    elif event.kind == EventKind.MESSAGE:
        item["text"] = show(f.get("data"), LINE_CHARS)
    elif event.kind == EventKind.QUESTION:
        item["text"] = show(f.get("prompt") or "", LINE_CHARS)
    elif event.kind == EventKind.ANSWERED:
        item["text"] = show(f.get("value"), LINE_CHARS)
    elif event.kind == EventKind.STARTED:
        item["text"] = show(f.get("worker") or "", 200)
    return item


def task_page_view(snap: TaskSnapshot, rate: float | None, eta: float | None,
                   *, worker_lost: bool = False) -> dict[str, Any]:
    """The task page's state (everything but the event lines), JSON-ready."""
    progress = snap.progress
    current = progress.current if progress is not None else None
    total = progress.total if progress is not None else None
    question = None
    if snap.question and not snap.state.is_final:
        choices = snap.question.get("choices")
        question = {"prompt": show(snap.question.get("prompt") or "", LINE_CHARS),
                    "qid": str(snap.question.get("qid") or ""),
                    "choices": [show(c, 100) for c in choices]
                    if isinstance(choices, list) else []}
    error = snap.error or {}
    return {
        "task_id": snap.task_id, "name": snap.name, "state": snap.state.value,
        "final": snap.state.is_final, "worker": snap.worker or "", "pid": snap.pid,
        "run": snap.run, "started": snap.started, "finished": snap.finished,
        "current": float(current) if isinstance(current, (int, float)) else None,
        "total": float(total) if isinstance(total, (int, float)) and total > 0 else None,
        "progress_message": show(progress.message or "", 500) if progress is not None else "",
        "rate": rate, "eta": eta,
        "rate_text": format_rate(rate) if rate is not None else "",
        "eta_text": format_eta(eta) if eta is not None else "",
        "question": question,
        "outcome": outcome_text(snap),
        "traceback": show(error.get("traceback") or "", 20000)
        if snap.state is TaskState.FAILED else "",
        "notice": "worker lost: waiting for the task to be delivered again"
        if worker_lost else "",
    }


class TaskFeed:
    """One task, followed through an attach handle, as numbered entries and a view.

    ``entries`` holds the non-progress events in order (progress is state: the view and
    the chart carry it); entry ``n`` is ``entries[n - 1 - dropped]``: past
    :data:`MAX_ENTRIES` the oldest are dropped. Changes bump ``changes``.
    """

    def __init__(self, handle: TaskHandle[Any]) -> None:
        self.task_id = handle.id
        self.changes = Changes()
        self.entries: list[dict[str, Any]] = []
        self.dropped = 0
        self.chart: list[tuple[float, float]] = []
        self._chart_thin = 1
        self._lock = threading.Lock()
        self._meter = RateMeter()
        self.view: dict[str, Any] = {}
        self.handle = handle
        self.handle.add_listener(self._on_change)
        self._on_change(self.handle)

    def _on_change(self, handle: TaskHandle[Any]) -> None:
        with self._lock:
            for event in handle.events_nowait():
                if event.kind == EventKind.PROGRESS:
                    self._sample(event)
                else:
                    self.entries.append(_entry(event))
            if len(self.entries) > MAX_ENTRIES:
                drop = max(1, MAX_ENTRIES // 10)
                del self.entries[:drop]
                self.dropped += drop
            snap = handle.snapshot()
            if snap.progress is not None and not self.chart:
                self._sample(snap.progress)
            rate, eta = self._meter.observe(snap)
            self.view = task_page_view(snap, rate, eta, worker_lost=handle.worker_lost)
        self.changes.bump()

    def _sample(self, event: Event) -> None:
        if event.current is None:
            return
        chart = self.chart
        chart.append((event.ts, float(event.current)))
        if len(chart) > CHART_POINTS:  # keep every other point: the shape stays
            del chart[1::2]
            self._chart_thin *= 2

    def since(self, n: int) -> tuple[list[dict[str, Any]], dict[str, Any], int, bool]:
        """Entries after the ``n``-th, the view, the entry count, and whether some entries
        after the ``n``-th were already dropped (the caller starts its reader over)."""
        with self._lock:
            gone = n < self.dropped
            start = 0 if gone else n - self.dropped
            return (self.entries[start:], dict(self.view), self.dropped + len(self.entries),
                    gone)

    def chart_points(self) -> list[tuple[float, float]]:
        with self._lock:
            return list(self.chart)

    def close(self) -> None:
        self.handle.remove_listener(self._on_change)
        try:
            self.handle.app.client.unwatch(self.handle)
        except Exception:  # closing must not fail
            pass


class Feeds:
    """The open task feeds, at most ``limit`` (the least recently opened go first)."""

    def __init__(self, app: App, limit: int = 500) -> None:
        self.app = app
        self.limit = limit
        self._feeds: collections.OrderedDict[str, TaskFeed] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, task_id: str) -> TaskFeed:
        """The feed of ``task_id`` (attaching on first use; blocks up to ~2 s)."""
        with self._lock:
            feed = self._feeds.get(task_id)
            if feed is not None:
                self._feeds.move_to_end(task_id)
                return feed
        feed = TaskFeed(self.app.attach(task_id))
        with self._lock:
            other = self._feeds.setdefault(task_id, feed)
            while len(self._feeds) > self.limit:
                _, old = self._feeds.popitem(last=False)
                old.close()
        if other is not feed:
            feed.close()
        return other

    def close(self) -> None:
        with self._lock:
            feeds, self._feeds = list(self._feeds.values()), collections.OrderedDict()
        for feed in feeds:
            feed.close()


# -- the cluster ------------------------------------------------------------------------


_FINAL = {s.value for s in TaskState if s.is_final}
_EVENT_STATE = {"task-received": "pending", "task-started": "running",
                "task-succeeded": "succeeded", "task-failed": "failed",
                "task-retried": "retry", "task-revoked": "revoked",
                "task-cancelled": "cancelled"}


def _row(item: dict[str, Any]) -> dict[str, Any]:
    progress = item.get("progress")  # an event on the wire: [id, seq, kind, ts, fields, run]
    fields = progress[4] if isinstance(progress, list) and len(progress) > 4 else None
    current = fields.get("current") if isinstance(fields, dict) else None
    total = fields.get("total") if isinstance(fields, dict) else None
    return {
        "id": str(item.get("id") or ""), "name": str(item.get("name") or ""),
        "state": str(item.get("state") or "pending"), "worker": str(item.get("worker") or ""),
        "queue": str(item.get("queue") or ""), "pid": item.get("pid"),
        "received": item.get("received"), "started": item.get("started"),
        "finished": item.get("finished"),
        "current": current if isinstance(current, (int, float)) else None,
        "total": total if isinstance(total, (int, float)) else None,
        "question": bool(item.get("question")),
    }


def _depth(conn: Any, queue: Any) -> int | None:
    """Messages waiting in ``queue`` (0 when the broker has no such queue), or None."""
    channel = conn.channel()  # its own: a refused passive declare closes it on AMQP
    try:
        return int(queue(channel).queue_declare(passive=True).message_count)
    except Exception as exc:
        # Redis keeps no empty list and RabbitMQ may not have declared the queue yet:
        # nothing is waiting in it either way
        if "NOT_FOUND" in str(exc) or getattr(exc, "code", None) == 404:
            return 0
        logger.debug("dashboard: depth of %s: %s", queue.name, exc)
        return None
    finally:
        with contextlib.suppress(Exception):
            channel.close()


class Cluster:
    """Workers, tasks, queue depths and counters, kept current by background threads."""

    def __init__(self, app: App, *, interval: float = 1.0, recent: int = 10_000,
                 monitor: bool = True) -> None:
        self.app = app
        self.interval = interval
        self.recent = recent
        self.changes = Changes()
        self.started_at = time.time()
        self._lock = threading.Lock()
        self._book = WorkerBook(float(app.conf.worker_heartbeat))
        self._tasks: dict[str, dict[str, Any]] = {}
        self.queue_depths: dict[str, int] = {}
        self.dead_letters: int | None = None
        self.event_counts: collections.Counter[str] = collections.Counter()
        self.history: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=HISTORY_POINTS)
        self._finished_total = 0
        self._stop = threading.Event()
        self._poke = threading.Event()
        self._threads: list[threading.Thread] = []
        self._receiver: Any = None
        if monitor:
            from ..monitor import EventReceiver

            self._receiver = EventReceiver(app, self._on_event)

    # -- lifecycle
    def start(self) -> None:
        if self._receiver is not None:
            self._receiver.start()
        for target, name in ((self._poll, "itask-web-poll"),
                             (self._upkeep, "itask-web-queues")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        self._stop.set()
        self._poke.set()
        if self._receiver is not None:
            self._receiver.stop()
        for thread in self._threads:
            thread.join(5)

    # -- feeding
    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        worker = event.get("worker")
        if not isinstance(kind, str):
            return
        with self._lock:
            self.event_counts[kind] += 1
            self._book.on_event(event)
            state = _EVENT_STATE.get(kind)
            task_id = event.get("id")
            if state is not None and isinstance(task_id, str):
                row = self._tasks.get(task_id) or _row(event)
                row["state"] = state
                if isinstance(worker, str):
                    row["worker"] = worker
                if isinstance(event.get("name"), str):
                    row["name"] = event["name"]
                ts = event.get("ts")
                if state in _FINAL and isinstance(ts, (int, float)):
                    row["finished"] = ts
                self._put(row)
        if isinstance(kind, str) and kind.startswith("task-"):
            self._poke.set()
        self.changes.bump()

    def _put(self, row: dict[str, Any]) -> None:
        old = self._tasks.pop(row["id"], None)
        if old is not None and old["state"] in _FINAL and row["state"] not in _FINAL:
            row = {**row, "state": old["state"], "finished": old.get("finished")}
        if row["state"] in _FINAL and (old is None or old["state"] not in _FINAL):
            self._finished_total += 1
        self._tasks[row["id"]] = row  # newest last
        excess = len(self._tasks) - self.recent
        if excess > 0:
            for task_id in [k for k, v in itertools.islice(self._tasks.items(), 4 * excess)
                            if v["state"] in _FINAL][:excess]:
                del self._tasks[task_id]

    def merge(self, items: Iterable[dict[str, Any]]) -> None:
        """Take task summaries (``inspect tasks`` items) into the table."""
        with self._lock:
            for item in items:
                if isinstance(item, dict) and item.get("id"):
                    row = _row(item)
                    old = self._tasks.get(row["id"])
                    if old is not None and old == row:
                        continue
                    if old is not None and old["state"] == row["state"]:
                        self._tasks[row["id"]] = row  # same state: keep its place
                    else:
                        self._put(row)
        self.changes.bump()

    def refresh(self, with_stats: bool = False) -> None:
        """Ask every worker for its tasks (and with ``with_stats`` its stats) once."""
        if with_stats:
            for reply in self.app.inspect("stats", timeout=0.5):
                data = reply.get("data")
                if isinstance(data, dict) and isinstance(data.get("worker"), str):
                    with self._lock:
                        self._book.seen(data["worker"], data)
        for reply in self.app.inspect("tasks", timeout=0.5):
            self.merge(reply.get("data") or ())

    def _poll(self) -> None:
        last_stats = 0.0
        while not self._stop.is_set():
            try:
                stale = time.monotonic() - last_stats > 10
                self.refresh(with_stats=stale)
                if stale:
                    last_stats = time.monotonic()
            except InteractiveTasksError as exc:
                logger.warning("dashboard: asking the workers failed: %s", exc)
            except Exception:
                logger.exception("dashboard: asking the workers failed")
            self._poke.wait(self.interval)
            self._poke.clear()

    def _upkeep(self) -> None:
        while not self._stop.is_set():
            try:
                self._measure_queues()
            except Exception as exc:  # the broker may be away for a while
                logger.debug("dashboard: queue depths failed: %s", exc)
            self._record_history()
            self._stop.wait(HISTORY_STEP)

    def _measure_queues(self) -> None:
        names = self.app.names
        queues = {self.app.conf.task_default_queue}
        for w in self.workers():
            queues.update(q for q in w.get("queues") or () if isinstance(q, str))
        depths: dict[str, int] = {}
        with self.app.connection() as conn:
            for queue in sorted(queues):
                count = _depth(conn, names.task_queue(queue))
                if count is not None:
                    depths[queue] = count
            dead = _depth(conn, names.dead_letter_queue)
        with self._lock:
            self.queue_depths = depths
            self.dead_letters = dead

    def _record_history(self) -> None:
        with self._lock:
            counts = collections.Counter(row["state"] for row in self._tasks.values())
            self.history.append({"ts": time.time(), "finished": self._finished_total,
                                 "states": dict(counts),
                                 "queued": sum(self.queue_depths.values())})
        self.changes.bump()

    # -- reading
    def workers(self) -> list[dict[str, Any]]:
        with self._lock:
            return self._book.workers()

    def tasks(self, *, state: str = "", name: str = "", worker: str = "", queue: str = "",
              search: str = "", page: int = 1, per_page: int = 50
              ) -> tuple[list[dict[str, Any]], int]:
        """One page of tasks, newest first, and how many match the filters."""
        state, name, worker, queue, search = (x.strip().lower() for x in
                                              (state, name, worker, queue, search))
        with self._lock:
            rows = list(self._tasks.values())
        if state == "active":
            rows = [r for r in rows if r["state"] not in _FINAL]
        elif state:
            rows = [r for r in rows if r["state"] == state]
        if name:
            rows = [r for r in rows if name in r["name"].lower()]
        if worker:
            rows = [r for r in rows if worker in r["worker"].lower()]
        if queue:
            rows = [r for r in rows if r["queue"].lower() == queue]
        if search:
            rows = [r for r in rows if r["id"].lower().startswith(search)]
        rows.reverse()
        # running first, then the rest, each newest first
        rows.sort(key=lambda r: r["state"] in _FINAL)
        page = max(1, page)
        start = (page - 1) * per_page
        return rows[start:start + per_page], len(rows)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(collections.Counter(r["state"] for r in self._tasks.values()))

    def by_state_and_name(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(collections.Counter((r["state"], r["name"])
                                            for r in self._tasks.values()))

    def overview(self) -> dict[str, Any]:
        workers = self.workers()
        with self._lock:
            history = list(self.history)
            depths = dict(self.queue_depths)
            dead = self.dead_letters
        return {
            "workers": len(workers), "online": sum(1 for w in workers if w["online"]),
            "counts": self.counts(), "queues": depths, "dead_letters": dead,
            "history": history, "pid": os.getpid(),
        }
