"""Worker lifecycle: startup, forced cancel and pool refill, idle memory."""

from __future__ import annotations

import functools
import time
from typing import Any

from ..harness import percentile, tree_memory_mb, wait_until
from ..systems import CelerySystem, System
from .common import result_while_alive, size, wait_itask_started


def startup(system: System, quick: bool) -> dict[str, float]:
    """A task is queued first; then the worker is launched: seconds from Popen to result."""
    handle = system.submit_noop()
    proc = system.launch_worker()
    try:
        result_while_alive(system, handle, proc, 60)
        elapsed = time.perf_counter() - proc.started
    finally:
        proc.stop()
    return {"seconds": elapsed}


def idle_memory(system: System, quick: bool) -> dict[str, float]:
    """RSS of the worker's whole process tree after warm-up and a moment of idleness."""
    with system.worker() as proc:
        time.sleep(0.5 if quick else 2.0)
        return tree_memory_mb(proc.pid)


def cancel(system: System, quick: bool) -> dict[str, Any]:
    n = size(quick, 10, 2)
    if system.name == "itask":
        cancelled, refilled = _itask_cancel(system, n)
    elif isinstance(system, CelerySystem):
        cancelled, refilled = _celery_cancel(system, n)
    else:
        raise NotImplementedError(system.name)
    return {
        "cancel_p50_ms": percentile(cancelled, 50), "cancel_p99_ms": percentile(cancelled, 99),
        "refill_p50_ms": percentile(refilled, 50), "refill_p99_ms": percentile(refilled, 99),
        # the first cancel hits a child older than a second: no crash-loop back-off (itask)
        "refill_first_ms": refilled[0],
        "samples": float(n),
        "cancel_samples_ms": cancelled, "refill_samples_ms": refilled,
    }


def _itask_cancel(system: System, n: int) -> tuple[list[float], list[float]]:
    app = system.bench.app

    def children() -> list[dict[str, Any]] | None:
        replies = app.inspect("stats", timeout=2.0, expect=1)
        return replies[0]["data"]["children"] if replies else None

    def idle_pids() -> set[int] | None:
        kids = children()
        if kids and len(kids) == 2 and all(k["state"] == "idle" for k in kids):
            return {k["pid"] for k in kids}
        return None

    cancelled: list[float] = []
    refilled: list[float] = []
    with system.worker():
        for _ in range(n):
            before = wait_until(idle_pids, 10, what="an idle pool")
            handle = system.bench.spin.start(30)
            wait_itask_started(handle)
            time.sleep(0.05)  # well inside its loop
            start = time.perf_counter()
            handle.cancel(grace=0)
            state = handle.wait(10)
            cancelled.append((time.perf_counter() - start) * 1000.0)
            if state.value != "cancelled":
                raise RuntimeError(f"task ended {state.value}, not cancelled")

            def refill(before: set[int] = before) -> bool:
                now = idle_pids()
                return bool(now and now - before)

            wait_until(refill, 30, what="a new idle pool child")
            refilled.append((time.perf_counter() - start) * 1000.0)
    return cancelled, refilled


def _celery_cancel(system: CelerySystem, n: int) -> tuple[list[float], list[float]]:
    """``revoke(terminate=True)``; the client learns the end from ``get()`` (any backend)."""
    def pool_pids() -> set[int] | None:
        stats = system.stats(timeout=1.0)
        pids = (stats or {}).get("pool", {}).get("processes")
        return set(pids) if pids and len(pids) == 2 else None

    def running(task_id: str) -> bool:
        insp = system.bench.app.control.inspect(destination=[system.hostname], timeout=1.0,
                                                limit=1)
        active = (insp.active() or {}).get(system.hostname) or []
        return any(t.get("id") == task_id and t.get("worker_pid") for t in active)

    cancelled: list[float] = []
    refilled: list[float] = []
    with system.worker():
        for _ in range(n):
            before = wait_until(pool_pids, 10, what="pool processes")
            result = system.bench.spin.delay(30)
            wait_until(functools.partial(running, str(result.id)), 30, interval=0.005,
                       what="task running")
            time.sleep(0.05)
            start = time.perf_counter()
            result.revoke(terminate=True)
            result.get(timeout=10, propagate=False)
            cancelled.append((time.perf_counter() - start) * 1000.0)
            if result.state != "REVOKED":
                raise RuntimeError(f"task ended {result.state}, not REVOKED")

            def refill(before: set[int] = before) -> bool:
                now = pool_pids()
                return bool(now and now - before)

            wait_until(refill, 30, what="a new pool process")
            refilled.append((time.perf_counter() - start) * 1000.0)
    return cancelled, refilled
