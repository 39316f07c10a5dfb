"""Plain task-queue workloads: throughput, backlog drain, sequential round trip."""

from __future__ import annotations

import time
from typing import Any

from ..harness import latency_summary
from ..systems import System
from .common import result_while_alive, size


def throughput(system: System, quick: bool) -> dict[str, float]:
    """Submit ``n`` no-ops, then gather every result; tasks/s over the whole span."""
    n = size(quick, 5000, 200)
    with system.worker():
        start = time.perf_counter()
        handles = [system.submit_noop() for _ in range(n)]
        submitted = time.perf_counter()
        system.gather(handles, timeout=300)
        end = time.perf_counter()
    return {"tasks_per_s": n / (end - start), "submit_per_s": n / (submitted - start),
            "seconds": end - start, "tasks": float(n)}


def drain(system: System, quick: bool) -> dict[str, float]:
    """Backlog first, worker second; the rate from the first result to the last.

    ``with_startup_per_s`` counts from the worker's launch instead (startup included).
    """
    n = size(quick, 5000, 200)
    handles = [system.submit_noop() for _ in range(n)]
    with system.worker(ready=False) as proc:
        result_while_alive(system, handles[0], proc, 120)
        first = time.perf_counter()
        system.gather(handles[1:], timeout=300)
        end = time.perf_counter()
        launched = proc.started
    return {"tasks_per_s": (n - 1) / (end - first),
            "with_startup_per_s": n / (end - launched),
            "first_result_s": first - launched, "tasks": float(n)}


def roundtrip(system: System, quick: bool) -> dict[str, Any]:
    """``delay().result()`` one after another; latency of each in ms."""
    n = size(quick, 500, 30)
    warm = size(quick, 50, 5)
    samples: list[float] = []
    with system.worker():
        for _ in range(warm):
            system.result(system.submit_noop(), 10)
        for _ in range(n):
            start = time.perf_counter()
            system.result(system.submit_noop(), 10)
            samples.append((time.perf_counter() - start) * 1000.0)
    return latency_summary(samples)
