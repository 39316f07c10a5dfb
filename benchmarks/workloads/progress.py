"""Progress reporting: how fast a task can emit, and how soon a watcher sees it.

Celery's counterpart is ``self.update_state(state="PROGRESS", meta=...)``, which a client
can only poll (``AsyncResult.info``, last value only).
"""

from __future__ import annotations

import time
from typing import Any

from ..harness import latency_summary
from ..systems import CelerySystem, System
from .common import size


def progress_rate(system: System, quick: bool) -> dict[str, float]:
    if system.name == "itask":
        return _itask_rate(system, size(quick, 100_000, 2000))
    if isinstance(system, CelerySystem):
        return _celery_rate(system, size(quick, 10_000, 200))
    raise NotImplementedError(system.name)


def _itask_rate(system: System, n: int) -> dict[str, float]:
    with system.worker():
        start = time.perf_counter()
        handle = system.bench.chatty.start(n)
        received = 0
        last = None
        seen_end = False
        kinds: set[str] = set()
        for event in handle.events(timeout=60):
            if event.kind == "progress":
                received += 1
                last = event.current
            else:
                kinds.add(event.kind)
                if event.kind == "message" and event.data == "end":
                    seen_end = True
        result = handle.result(30)
        wall = time.perf_counter() - start
    nonprogress_ok = seen_end and {"started", "message", "succeeded"} <= kinds
    return {
        "events_per_s": n / result["emit_s"],
        "received_pct": 100.0 * received / n,
        "received": float(received),
        "delivery_ok": 1.0 if (last == n and nonprogress_ok) else 0.0,
        "last_ok": 1.0 if last == n else 0.0,
        "nonprogress_ok": 1.0 if nonprogress_ok else 0.0,
        "delivered_per_s": received / wall,
        "wall_s": wall,
        "n": float(n),
    }


def _celery_rate(system: CelerySystem, n: int) -> dict[str, float]:
    with system.worker():
        result = system.bench.chatty.delay(n).get(timeout=180)
    return {"events_per_s": n / result["emit_s"], "n": float(n)}


def progress_latency(system: System, quick: bool) -> dict[str, Any]:
    n = size(quick, 200, 20)
    interval = 0.01
    if system.name == "itask":
        samples = _itask_latency(system, n, interval)
    elif isinstance(system, CelerySystem):
        samples = _celery_latency(system, n, interval)
    else:
        raise NotImplementedError(system.name)
    out = latency_summary(samples)
    out["received_pct"] = 100.0 * len(samples) / n
    return out


def _itask_latency(system: System, n: int, interval: float) -> list[float]:
    samples: list[float] = []
    with system.worker():
        handle = system.bench.ticker.start(n, interval)
        for event in handle.events(timeout=30):
            if event.kind == "progress":
                samples.append((time.time() - float(event.message)) * 1000.0)
        handle.result(10)
    return samples


def _celery_latency(system: CelerySystem, n: int, interval: float) -> list[float]:
    """Redis backend: poll ``AsyncResult.info`` every 1 ms (last value only).

    ``rpc://`` (RabbitMQ) cannot be polled: its states reach only a blocking ``get``, so
    there the client takes them from ``get(on_message=...)`` as they arrive.
    """
    samples: list[float] = []
    with system.worker():
        result = system.bench.ticker.delay(n, interval)
        if system.broker != "redis":
            def on_message(body: dict[str, Any]) -> None:
                meta = body.get("result")
                if body.get("status") == "PROGRESS" and isinstance(meta, dict):
                    samples.append((time.time() - meta["t"]) * 1000.0)

            result.get(timeout=60 + n * interval, on_message=on_message)
            return samples
        seen = -1
        deadline = time.monotonic() + 60 + n * interval
        while time.monotonic() < deadline:
            info = result.info  # one backend read per poll
            now = time.time()
            if isinstance(info, dict) and "i" in info:
                if info["i"] != seen:
                    seen = info["i"]
                    samples.append((now - info["t"]) * 1000.0)
            elif result.ready():
                break
            time.sleep(0.001)
        result.get(timeout=10)
    return samples
