"""Celery side of the benchmarks: one app per namespace, configured for throughput.

Everything is Celery's default except what isolates one run from another (queue, control
and event exchange names) and a result expiry of an hour (Celery sets an expiry on every
result anyway; its default is a day).
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

from celery import Celery
from kombu import Connection

from interactive_tasks.transport import kombu_transports

# Celery's connections and the tasks' own are plain kombu ones: embedded:// and memory://
# are entered in kombu's table here (the package does so only on its own way to one).
kombu_transports()


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

    @app.task(name="bench.noop")
    def noop() -> None:
        return None

    @app.task(bind=True, name="bench.ctl_sink")
    def ctl_sink(self: Any, n: int, ctl_queue: str, reply_queue: str) -> list[float]:
        """The workaround for control: the task consumes a kombu queue of its own.

        It says "ready" on a second queue once it consumes (result-backend states cannot
        be polled on every backend: ``rpc://`` only delivers them to a blocking ``get``).
        """
        out: list[float] = []
        with Connection(self.app.conf.broker_url) as conn:
            inq = conn.SimpleQueue(ctl_queue, no_ack=True)
            outq = conn.SimpleQueue(reply_queue, no_ack=True)
            try:
                outq.put({"ready": True})
                for _ in range(n):
                    msg = inq.get(block=True, timeout=30)
                    now = time.time()
                    out.append((now - msg.payload["t"]) * 1000.0)
            finally:
                inq.close()
                outq.close()
        return out

    @app.task(bind=True, name="bench.echo")
    def echo(self: Any, n: int, ctl_queue: str, reply_queue: str) -> int:
        """Control in on one kombu queue, echoed back on another."""
        with Connection(self.app.conf.broker_url) as conn:
            inq = conn.SimpleQueue(ctl_queue, no_ack=True)
            outq = conn.SimpleQueue(reply_queue, no_ack=True)
            try:
                outq.put({"ready": True})
                for _ in range(n):
                    msg = inq.get(block=True, timeout=30)
                    outq.put(msg.payload)
            finally:
                inq.close()
                outq.close()
        return n

    @app.task(bind=True, name="bench.chatty")
    def chatty(self: Any, n: int) -> dict[str, float]:
        """``update_state`` as fast as it can: Celery's way to report progress."""
        start = time.perf_counter()
        for i in range(n):
            self.update_state(state="PROGRESS", meta={"current": i + 1, "total": n})
        return {"emit_s": time.perf_counter() - start, "n": n}

    @app.task(bind=True, name="bench.ticker")
    def ticker(self: Any, n: int, interval: float) -> int:
        for i in range(n):
            self.update_state(state="PROGRESS", meta={"i": i, "t": time.time()})
            time.sleep(interval)
        return n

    @app.task(bind=True, name="bench.spin")
    def spin(self: Any, seconds: float) -> str:
        end = time.monotonic() + seconds
        x = 0
        while time.monotonic() < end:
            x += 1
        return "spun"

    return SimpleNamespace(app=app, noop=noop, ctl_sink=ctl_sink, echo=echo, chatty=chatty,
                           ticker=ticker, spin=spin)
