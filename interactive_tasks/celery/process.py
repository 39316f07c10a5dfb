"""The pool-process side: one channel per process to the relay in Celery's main process.

A prefork child connects when it starts (``worker_process_init``); with the threads and
solo pools the tasks run in the main process, which connects on its first interactive
task. The channel is the itask worker's slot framing (``worker.ipc``) over a Unix socket;
a reader thread hands each control frame to the runtime of the task it names. Frames
(lists): process → relay ``["ready", pid]``, ``["begin", task_id, info]``,
``["ev", task_id, kind, fields, ts]``, ``["rc", task_id, receipt]``, ``["done", task_id,
kind, fields, ts]``; relay → process ``["ctl", task_id, verb, data]`` (``[..., receipt]``
for a message whose sender wants a receipt: ``worker.ipc.ctl_frame``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from interactive_tasks.worker.child import SlotRuntime
    from interactive_tasks.worker.ipc import BlockingChannel

logger = logging.getLogger("interactive_tasks.celery")

#: where the relay of this worker listens; set in the main process before the pool
#: starts, so prefork children inherit it (and the environment, for spawned ones)
RELAY_SOCKET_ENV = "ITASK_CELERY_RELAY"
#: control that arrives before its task registered is kept this long
EARLY_CONTROL_TTL = 30.0


class ProcessChannel:
    """This process's channel to the relay and the tasks running over it."""

    def __init__(self, path: str) -> None:
        from interactive_tasks.worker.ipc import BlockingChannel

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        self.pid = os.getpid()
        self.channel: BlockingChannel = BlockingChannel(sock)
        self._lock = threading.Lock()
        self._running: dict[str, SlotRuntime] = {}
        self._early: dict[str, list[tuple[float, str, Any, Any]]] = {}
        self.closed = False
        self.channel.send(["ready", self.pid])
        threading.Thread(target=self._read_loop, name="itask-celery-ctl",
                         daemon=True).start()

    def _read_loop(self) -> None:
        from interactive_tasks.worker.ipc import ChannelClosed

        try:
            while True:
                frame = self.channel.recv()
                if not isinstance(frame, list) or not frame or frame[0] != "ctl":
                    continue
                task_id, verb, data = frame[1], frame[2], frame[3]
                receipt = frame[4] if len(frame) > 4 else None
                with self._lock:
                    runtime = self._running.get(task_id)
                    if runtime is None:
                        # The relay may answer a "begin" before the task registered here.
                        self._early.setdefault(task_id, []).append(
                            (time.monotonic(), verb, data, receipt))
                        continue
                runtime.control(verb, data, receipt)
        except ChannelClosed:
            self.closed = True

    def register(self, runtime: SlotRuntime) -> None:
        with self._lock:
            self._running[runtime.task_id] = runtime
            early = self._early.pop(runtime.task_id, [])
            now = time.monotonic()
            for key in [k for k, v in self._early.items()
                        if v and now - v[-1][0] > EARLY_CONTROL_TTL]:
                del self._early[key]
        for _, verb, data, receipt in early:
            runtime.control(verb, data, receipt)

    def unregister(self, task_id: str) -> None:
        with self._lock:
            self._running.pop(task_id, None)


_channel: ProcessChannel | None = None
_channel_lock = threading.Lock()


def process_channel(connect: bool = True) -> ProcessChannel | None:
    """This process's channel (connected on first use); None outside a bridged worker or
    when the relay cannot be reached (the task then runs without watchers)."""
    global _channel
    channel = _channel
    if channel is not None and channel.pid == os.getpid() and not channel.closed:
        return channel
    path = os.environ.get(RELAY_SOCKET_ENV)
    if not path or not connect:
        return None
    with _channel_lock:
        channel = _channel
        if channel is not None and channel.pid == os.getpid() and not channel.closed:
            return channel
        try:
            _channel = ProcessChannel(path)
        except OSError as exc:
            logger.warning("cannot reach the interactive_tasks relay at %s: %s", path, exc)
            _channel = None
        return _channel
