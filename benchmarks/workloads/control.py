"""Control of a running task: one-way latency and echo round trip.

interactive_tasks: ``handle.send(data)`` → the worker → the pool child → ``self.receive()``;
by default ``send`` waits for the worker's acknowledgement, the ``_nowait`` workloads use
``send(data, wait=False)``. ``pause_ack`` times pause and resume of a CPU-bound task until
the watcher sees them happen (itask only: Celery cannot pause a task).
Celery has no way to talk to a running task; its closest workaround is a kombu queue per
task that the task consumes itself (and a second one for replies). ``celery-bridge`` is
Celery's worker with the Celery bridge: the same handle calls as itask's.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

from kombu import Connection

from interactive_tasks.transport import kombu_transports

from ..harness import latency_summary, percentile
from ..systems import CelerySystem, System
from .common import CONTROL_GAP, echo_round_trip, size, wait_itask_started


def control_oneway(system: System, quick: bool, wait: bool = True) -> dict[str, Any]:
    """Client puts ``time.time()`` in the message; the task records receive − sent."""
    n = size(quick, 300, 30)
    warm = size(quick, 20, 5)
    total = n + warm
    if system.name in ("itask", "celery-bridge"):  # the same handle API
        samples = _itask_oneway(system, total, wait)
    elif isinstance(system, CelerySystem):
        samples = _celery_oneway(system, total)
    else:
        raise NotImplementedError(system.name)
    if len(samples) != total:
        raise RuntimeError(f"task saw {len(samples)} of {total} messages")
    return latency_summary(samples[warm:])


def control_oneway_nowait(system: System, quick: bool) -> dict[str, Any]:
    """:func:`control_oneway` with ``handle.send(..., wait=False)`` (itask)."""
    return control_oneway(system, quick, wait=False)


def _itask_oneway(system: System, total: int, wait: bool) -> list[float]:
    with system.worker():
        handle = system.bench.ctl_sink.start(total)
        wait_itask_started(handle)
        for _ in range(total):
            handle.send({"t": time.time()}, wait=wait)
            time.sleep(CONTROL_GAP)
        return list(handle.result(60))


def _celery_oneway(system: CelerySystem, total: int) -> list[float]:
    ctl, reply = system.control_queue("ctl"), system.control_queue("reply")
    kombu_transports()  # a plain kombu connection to the Celery app's broker
    with system.worker(), Connection(system.broker_url) as conn:
        inq = conn.SimpleQueue(ctl, no_ack=True)
        outq = conn.SimpleQueue(reply, no_ack=True)
        try:
            result = system.bench.ctl_sink.apply_async((total, ctl, reply))
            outq.get(block=True, timeout=30)  # the task consumes its queue now
            for _ in range(total):
                inq.put({"t": time.time()})
                time.sleep(CONTROL_GAP)
            return list(result.get(timeout=60))
        finally:
            inq.close()
            outq.close()


def control_roundtrip(system: System, quick: bool, wait: bool = True) -> dict[str, Any]:
    """Client sends ``{"i": i}``; the task sends it back; time until the client sees it."""
    n = size(quick, 300, 30)
    warm = size(quick, 20, 5)
    if system.name in ("itask", "celery-bridge"):  # the same handle API
        samples = _itask_roundtrip(system, n + warm, wait)
    elif isinstance(system, CelerySystem):
        samples = _celery_roundtrip(system, n + warm)
    else:
        raise NotImplementedError(system.name)
    return latency_summary(samples[warm:])


def control_roundtrip_nowait(system: System, quick: bool) -> dict[str, Any]:
    """:func:`control_roundtrip` with ``handle.send(..., wait=False)`` (itask)."""
    return control_roundtrip(system, quick, wait=False)


def _itask_roundtrip(system: System, total: int, wait: bool) -> list[float]:
    samples: list[float] = []
    with system.worker():
        handle = system.bench.echo.start(total)
        wait_itask_started(handle)
        events = handle.events(timeout=10)
        for i in range(total):
            samples.append(echo_round_trip(handle, events, i, wait))
            time.sleep(CONTROL_GAP)
        handle.result(30)
    return samples


def _celery_roundtrip(system: CelerySystem, total: int) -> list[float]:
    samples: list[float] = []
    ctl, reply = system.control_queue("ctl"), system.control_queue("reply")
    kombu_transports()  # a plain kombu connection to the Celery app's broker
    with system.worker(), Connection(system.broker_url) as conn:
        inq = conn.SimpleQueue(ctl, no_ack=True)
        outq = conn.SimpleQueue(reply, no_ack=True)
        try:
            result = system.bench.echo.apply_async((total, ctl, reply))
            outq.get(block=True, timeout=30)  # the task consumes its queue now
            for i in range(total):
                start = time.perf_counter()
                inq.put({"i": i})
                msg: Any = outq.get(block=True, timeout=10)
                if msg.payload.get("i") != i:
                    raise RuntimeError(f"echo out of order: {msg.payload!r} for {i}")
                samples.append((time.perf_counter() - start) * 1000.0)
                time.sleep(CONTROL_GAP)
            result.get(timeout=30)
        finally:
            inq.close()
            outq.close()
    return samples


def pause_ack(system: System, quick: bool) -> dict[str, Any]:
    """``handle.pause()`` → the watcher sees ``paused``; the same for ``resume()`` and for
    ``pause(hard=True)`` (SIGSTOP of the pool child, acknowledged by the worker).

    The task is CPU-bound and reaches a checkpoint after every few microseconds of work,
    so the soft figures are the message path plus the wait for the child's interpreter
    lock, not the task's checkpoint interval.
    """
    if system.name != "itask":
        raise NotImplementedError(system.name)
    n = size(quick, 200, 20)
    warm = size(quick, 10, 3)
    timings: dict[str, list[float]] = {"pause": [], "resume": [], "hard_pause": [],
                                       "hard_resume": []}
    with system.worker():
        handle = system.bench.busy.start(0.0)
        wait_itask_started(handle)
        events = handle.events(timeout=10)

        def timed(name: str, verb: Callable[[], None], kind: str, keep: bool) -> None:
            start = time.perf_counter()
            verb()
            for event in events:
                if event.kind == kind:
                    break
                if event.is_final:
                    raise RuntimeError(f"busy task ended early: {event!r}")
            if keep:
                timings[name].append((time.perf_counter() - start) * 1000.0)
            time.sleep(CONTROL_GAP)

        for i in range(warm + n):
            keep = i >= warm
            timed("pause", handle.pause, "paused", keep)
            timed("resume", handle.resume, "resumed", keep)
            timed("hard_pause", functools.partial(handle.pause, hard=True), "paused", keep)
            timed("hard_resume", handle.resume, "resumed", keep)
        handle.send("stop")
        handle.result(30)
    out: dict[str, Any] = {}
    for name, samples in timings.items():
        out[f"{name}_p50_ms"] = percentile(samples, 50)
        out[f"{name}_p99_ms"] = percentile(samples, 99)
        out[f"{name}_samples_ms"] = samples
    return out
