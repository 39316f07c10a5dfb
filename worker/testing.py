"""A worker inside the test process, for unit tests on the in-memory broker (``memory://``).

Celery's ``celery.contrib.testing.worker.start_worker`` in this project's terms
(docs/testing.md)::

    app = App("proj", broker="memory://")
    with start_worker(app) as worker:
        assert add.delay(2, 3).get(timeout=5) == 5

The worker is the real one — the same loop, relay, control and outcomes as ``itask
worker`` — on a thread of the test process, with the ``threads`` or ``solo`` pool (a
prefork child cannot be forked from a process that runs other threads). Signals are the
main thread's, so :meth:`InProcessWorker.stop` (a warm shutdown) and
:meth:`InProcessWorker.kill` (the process gone at once, as by SIGKILL) stand in for them.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from interactive_tasks.app import App
from interactive_tasks.errors import ConfigurationError
from interactive_tasks.transport import memory

from .main import Worker

_names = itertools.count(1)


class InProcessWorker(Worker):
    """A :class:`~.main.Worker` run on a thread: :meth:`start`, then :meth:`stop` or
    :meth:`kill`. Raises ConfigurationError for a pool other than threads or solo."""

    def __init__(self, app: App, *, pool: str = "threads", **kwargs: Any) -> None:
        if pool not in ("threads", "solo"):
            raise ConfigurationError(f"a worker inside the test process runs the threads or "
                                     f"solo pool, not {pool!r}")
        kwargs.setdefault("hostname", f"test-{next(_names)}@memory")
        super().__init__(app, pool=pool, **kwargs)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.exit_code: int | None = None

    def _install_signals(self) -> None:
        """Only the main thread may set signal handlers: stop() and kill() replace them."""

    def _main(self) -> None:
        try:
            self.exit_code = self.run()
        except BaseException as exc:  # handed to the thread that stops the worker
            self._error = exc
        finally:
            for slot in self.slots:  # a process's exit would close them
                if not slot.closed:
                    slot.closed = True
                    if slot.sock is not None:
                        slot.sock.close()

    def start(self, timeout: float = 10.0) -> None:
        """Run on a new thread and return once every slot is ready; raises TimeoutError
        (and stops the worker) when it is not ready within ``timeout`` seconds."""
        self._thread = threading.Thread(target=self._main, name=f"itask-{self.hostname}",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.serving:
            if self._error is not None or not self._thread.is_alive():
                self._finish(timeout)
                raise RuntimeError(f"worker {self.hostname} ended before it was ready")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"worker {self.hostname} not ready after {timeout}s")
            time.sleep(0.002)

    @property
    def serving(self) -> bool:
        """Connected, and every pool slot ready for a task."""
        return self.hub is not None and self.connection is not None and bool(self.slots) \
            and all(slot.ready for slot in self.slots)

    def _wake(self) -> None:
        conn = self.connection
        transport = getattr(conn, "transport", None) if conn is not None else None
        if isinstance(transport, memory.Transport):
            transport.wake()

    def stop(self, timeout: float | None = None) -> None:
        """Warm shutdown, as on SIGTERM: take no more tasks, give back those not started,
        wait for running ones (up to ``shutdown_timeout``). Re-raises what ended the
        worker's thread, if anything did."""
        if self._thread is None:
            return
        if not self._stopping:
            self._stop_deadline = time.monotonic() + self.shutdown_timeout
            self._stopping = True
        self._wake()
        self._finish(self.shutdown_timeout + 10.0 if timeout is None else timeout)

    def kill(self, timeout: float = 10.0) -> None:
        """The process gone at once, as by SIGKILL: from now on its connection takes,
        sends and acknowledges nothing, and its unacknowledged tasks stay with the broker
        until the liveness check of another worker (after ``worker_lost_timeout``) or
        :meth:`~interactive_tasks.transport.memory.MemoryBroker.declare_dead` returns
        them. Tasks running on its threads are cancelled once its loop has ended, so their
        ends reach nothing, as a killed process reports none."""
        # In this order: the loop stops before it could take the cut connection for a
        # broken one and reconnect; and the tasks are cancelled only after it has ended.
        # A task cancelled while the loop still runs (a loop that gets no CPU for a while
        # notices _terminate late) ends as "cancelled", and the loop stores that in the
        # result store (no connection needed on memory://): the worker the task is
        # delivered to next takes it for finished and drops it.
        self._terminate = True
        conn = self.connection
        transport = getattr(conn, "transport", None) if conn is not None else None
        if isinstance(transport, memory.Transport):
            memory.kill_connection(transport)
        self._wake()
        try:
            self._finish(timeout)
        finally:
            for slot in list(self.slots):  # what SIGKILL does to the tasks of a process
                if slot.task_id is not None:  # closed by now: the process's exit
                    self.pool.force_stop(slot, 1)

    def _finish(self, timeout: float) -> None:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                raise TimeoutError(f"worker {self.hostname} still running after {timeout}s")
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error


@contextmanager
def start_worker(app: App, *, pool: str = "threads", concurrency: int = 1,
                 queues: list[str] | None = None, hostname: str | None = None,
                 shutdown_timeout: float = 10.0,
                 ready_timeout: float = 10.0) -> Iterator[InProcessWorker]:
    """A worker for ``app`` on a thread of this process while the block runs, stopped
    warmly at its end (unless the block killed it). Meant for ``memory://``; raises
    ConfigurationError for a pool other than threads or solo, TimeoutError when the
    worker is not ready within ``ready_timeout`` seconds."""
    kwargs: dict[str, Any] = {}
    if hostname is not None:
        kwargs["hostname"] = hostname
    worker = InProcessWorker(app, pool=pool, concurrency=concurrency, queues=queues,
                             shutdown_timeout=shutdown_timeout, **kwargs)
    worker.start(ready_timeout)
    try:
        yield worker
    finally:
        worker.stop()
