"""The worker bootstep that runs the relay, and the hook that connects pool processes."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any

from celery import bootsteps
from celery.signals import task_revoked

from .process import RELAY_SOCKET_ENV, process_channel

logger = logging.getLogger("interactive_tasks.celery")


class RelayStep(bootsteps.StartStopStep):
    """Runs the interactive_tasks relay in Celery's main process.

    The relay's socket is bound when the worker's blueprint is built, before the pool
    starts, so prefork children inherit its path and connect as they start.
    """

    label = "interactive_tasks relay"
    # Started after the pool: the first pool processes fork before the relay's threads
    # exist, so none inherits a lock one of them held (their import locks included).
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        from interactive_tasks.celery.enabling import bridge_app

        from .relay import Relay

        self.directory = tempfile.mkdtemp(prefix="itask-celery-")
        path = os.path.join(self.directory, "relay.sock")
        # Hard pause and forced cancel signal a pool process: only prefork has one per task.
        prefork = getattr(worker.pool_cls, "__module__", "") == "celery.concurrency.prefork"
        pool = getattr(worker.pool_cls, "__module__", "").rsplit(".", 1)[-1]
        queues = sorted(getattr(worker.app.amqp.queues, "consume_from", None) or {}) or \
            [worker.app.conf.task_default_queue]
        self.relay = Relay(bridge_app(worker.app), worker.hostname, path,
                           supports_hard_pause=prefork,
                           pool={"thread": "threads"}.get(pool, pool),
                           concurrency=int(worker.concurrency or 1), queues=queues)
        os.environ[RELAY_SOCKET_ENV] = path

    def start(self, worker: Any) -> None:
        # Celery runs a kombu Hub where the broker's transport can (Redis, RabbitMQ)
        # outside gevent and eventlet. The solo pool runs the task on that loop, so a
        # task waiting for the relay (``ask``, ``receive``) would wait for itself: there
        # the relay keeps its threads.
        hub = getattr(worker, "hub", None)
        if hub is not None and self.relay.pool == "solo":
            hub = None
        self.relay.start(hub)
        task_revoked.connect(self._on_revoked, weak=False)
        logger.info("interactive_tasks relay for %s on %s (pool channels %s)",
                    worker.hostname, self.relay.socket_path,
                    "on the worker's event loop" if hub is not None else "on threads")

    def stop(self, worker: Any) -> None:
        task_revoked.disconnect(self._on_revoked)
        self.relay.stop()

    def _on_revoked(self, request: Any = None, terminated: bool = False,
                    expired: bool = False, **kwargs: Any) -> None:
        """Celery's ``task_revoked`` (in this, the main process): tell the watchers."""
        from .task import bridge_header

        if request is None or request.id is None:
            return
        reason = "expired" if expired else ("terminated" if terminated else "revoked")
        self.relay.revoked(str(request.id), str(getattr(request, "task", "") or ""),
                           bridge_header(request), reason)

    def shutdown(self, worker: Any) -> None:
        self.relay.stop()
        os.environ.pop(RELAY_SOCKET_ENV, None)
        shutil.rmtree(self.directory, ignore_errors=True)


def connect_pool_process(**kwargs: Any) -> None:
    """``worker_process_init``: a prefork child registers its channel as it starts."""
    process_channel()
