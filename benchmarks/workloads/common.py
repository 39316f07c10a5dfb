"""Helpers shared by the workload modules."""

from __future__ import annotations

import time
from typing import Any

from ..harness import WorkerProcess
from ..systems import System

#: Pause between two control messages, so no message queues behind the previous one
#: (the same for every system: this measures latency, not control throughput).
CONTROL_GAP = 0.002


def size(quick: bool, full: int, small: int) -> int:
    return small if quick else full


def result_while_alive(system: System, handle: Any, proc: WorkerProcess,
                       timeout: float) -> Any:
    """The result of ``handle``, failing early if the worker dies."""
    deadline = time.monotonic() + timeout
    errors = system.timeout_errors()
    while True:
        proc.check_alive()
        try:
            return system.result(handle, 1.0)
        except errors:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no result in {timeout}s:\n{proc.log_tail()}") from None


def wait_itask_started(handle: Any, timeout: float = 30.0) -> None:
    """Consume a handle's events up to its ``started`` event."""
    for event in handle.events(timeout=timeout):
        if event.kind == "started":
            return
        if event.is_final:
            raise RuntimeError(f"task ended before it started: {event!r}")
    raise RuntimeError("event stream ended without a started event")


def echo_round_trip(handle: Any, events: Any, i: int, wait: bool = True) -> float:
    """One control round trip to an echo task (``bench.echo``, ``bench.hum``): send
    ``{"i": i}``, read ``events`` (the handle's ``events()`` iterator) up to the echo; the
    time in ms. Raises ``RuntimeError`` when the task ends first."""
    start = time.perf_counter()
    handle.send({"i": i}, wait=wait)
    for event in events:
        if event.kind == "message" and event.data == {"i": i}:
            break
        if event.is_final:
            raise RuntimeError(f"echo task ended early: {event!r}")
    return (time.perf_counter() - start) * 1000.0
