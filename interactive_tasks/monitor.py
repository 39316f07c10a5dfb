"""The monitoring stream: worker heartbeats and task events, for dashboards.

Workers publish on the fanout exchange ``<ns>.events``: ``worker-online``,
``worker-heartbeat`` (every ``worker_heartbeat`` seconds, with the worker's stats),
``worker-offline``, and with ``-E`` batches of task events (``task-received``,
``task-started``, ``task-succeeded``, ``task-failed``, ``task-retried``, ``task-revoked``,
``task-cancelled``). :class:`EventReceiver` consumes it through a private queue that the
broker deletes when the receiver goes away.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from kombu import Consumer, Queue

from . import codec

if TYPE_CHECKING:
    from .app import App

logger = logging.getLogger("interactive_tasks.monitor")


class WorkerBook:
    """Which workers exist and which are online, from the monitoring stream.

    Heartbeats (with the worker's stats) keep a worker online; a worker that missed three
    heartbeats, or said ``worker-offline``, is offline. ``itask top`` and ``itask web``
    keep one each. Not thread-safe on its own: callers hold their lock around it.
    """

    def __init__(self, heartbeat: float) -> None:
        self.heartbeat = heartbeat
        self._stats: dict[str, dict[str, Any]] = {}
        self._last_seen: dict[str, float] = {}
        self._freq: dict[str, float] = {}

    def on_event(self, event: dict[str, Any]) -> None:
        """Take one monitoring event into account (other kinds are ignored)."""
        kind = event.get("type")
        worker = event.get("worker")
        if not isinstance(worker, str):
            return
        if kind == "worker-heartbeat" and isinstance(event.get("stats"), dict):
            self.seen(worker, event["stats"])
            if isinstance(event.get("freq"), (int, float)):
                self._freq[worker] = float(event["freq"])
        elif kind == "worker-offline":
            self._last_seen[worker] = 0.0
        elif kind == "worker-online":
            self._last_seen[worker] = time.monotonic()

    def seen(self, worker: str, stats: dict[str, Any]) -> None:
        """A worker's stats (from a heartbeat or ``inspect stats``): it is online now."""
        self._stats[worker] = dict(stats)
        self._last_seen[worker] = time.monotonic()

    def workers(self) -> list[dict[str, Any]]:
        """Every worker's last stats plus ``online``, sorted by name."""
        now = time.monotonic()
        out = []
        for name, data in sorted(self._stats.items()):
            item = dict(data)
            freq = self._freq.get(name, self.heartbeat)
            item["online"] = now - self._last_seen.get(name, 0.0) < 3 * freq + 1
            out.append(item)
        return out


class EventReceiver:
    """Receive monitoring events in a background thread.

    Use as a context manager; events go to ``callback(event)`` when given, else they
    can be read with :meth:`events`. Every event is a dict with a ``type`` key.
    """

    def __init__(self, app: App, callback: Callable[[dict[str, Any]], None] | None = None
                 ) -> None:
        self.app = app
        self.callback = callback
        self.queue: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=100_000)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="itask-events", daemon=True)
        name = f"{app.names.namespace}.evq.{uuid.uuid4().hex[:12]}"
        self._queue = Queue(name, app.names.events_exchange, durable=False,
                            auto_delete=True, expires=60)

    def __enter__(self) -> EventReceiver:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 10.0) -> None:
        """Start consuming; returns once the private queue is bound."""
        self._thread.start()
        self._ready.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def events(self, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Events as they arrive; stops after ``timeout`` seconds without one."""
        while True:
            try:
                yield self.queue.get(timeout=timeout)
            except queue.Empty:
                return

    def _deliver(self, event: dict[str, Any]) -> None:
        if self.callback is not None:
            try:
                self.callback(event)
            except Exception:
                logger.exception("event callback failed")
            return
        try:
            self.queue.put_nowait(event)
        except queue.Full:
            pass  # a reader that stopped reading loses the oldest view, not memory

    def _on_message(self, message: Any) -> None:
        secret = self.app.secret
        if secret is not None and not codec.verify(
                secret, message.body, (message.headers or {}).get(codec.SIGNATURE_HEADER)):
            return
        try:
            payload = codec.loads(message.body)
        except Exception:
            return
        if not isinstance(payload, dict):
            return
        kind = payload.get("t")
        if kind == "task-events":
            for event in payload.get("e") or ():
                if isinstance(event, dict):
                    self._deliver(event)
        elif isinstance(kind, str):
            self._deliver({"type": kind, **{k: v for k, v in payload.items() if k != "t"}})

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self.app.connection() as conn:
                    consumer = Consumer(conn.channel(), queues=[self._queue], no_ack=True,
                                        on_message=self._on_message, accept=None)
                    consumer.consume()
                    self._ready.set()
                    while not self._stop.is_set():
                        try:
                            conn.drain_events(timeout=0.5)
                        except TimeoutError:
                            pass
                    consumer.cancel()
            except Exception as exc:
                logger.warning("event stream interrupted (%s); reconnecting", exc)
                self._ready.set()
                self._stop.wait(1.0)
