"""The Celery bridge side of the benchmarks: the Celery app of ``celery_tasks`` (same
isolation settings), with the control tasks as ``InteractiveTask``s, the same bodies as
``itask_tasks`` (``self.receive`` / ``self.send``), and ``enable(app)``."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

from celery import Celery

from interactive_tasks.celery import InteractiveTask, enable


def make_app(ns: str, broker_url: str, backend_url: str) -> SimpleNamespace:
    app = Celery(f"bench-{ns}", broker=broker_url, backend=backend_url, set_as_current=False)
    app.conf.update(
        task_default_queue=ns,
        control_exchange=f"{ns}.ctl",
        event_exchange=f"{ns}.ev",
        result_expires=3600,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    enable(app, namespace=ns)

    @app.task(name="bench.noop")
    def noop() -> None:
        return None

    @app.task(base=InteractiveTask, bind=True, name="bench.ctl_sink")
    def ctl_sink(self: Any, n: int) -> list[float]:
        """Receives ``n`` messages ``{"t": sent}``; returns receive − sent in ms for each."""
        out: list[float] = []
        for _ in range(n):
            msg = self.receive(timeout=30)
            now = time.time()
            if msg is None:
                break
            out.append((now - msg["t"]) * 1000.0)
        return out

    @app.task(base=InteractiveTask, bind=True, name="bench.echo")
    def echo(self: Any, n: int) -> int:
        """Sends every message it receives straight back (``n`` of them)."""
        for i in range(n):
            msg = self.receive(timeout=30)
            if msg is None:
                return i
            self.send(msg)
        return n

    return SimpleNamespace(app=app, noop=noop, ctl_sink=ctl_sink, echo=echo)
