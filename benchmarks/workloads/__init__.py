"""The workload registry: what each workload measures, on which systems, and its targets.

A workload function takes a :class:`~benchmarks.systems.System` and ``quick`` and returns
one repetition's metrics (a flat ``{name: number}``). The orchestrator runs each
repetition in a fresh runner process with a fresh worker and namespace.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import control, lifecycle, progress, queue, stream

ALL = ("itask", "celery", "dramatiq")
INTERACTIVE = ("itask", "celery")


@dataclass(frozen=True)
class Target:
    """A goal for the itask median: ``check(itask, celery, dramatiq)`` → met or not."""

    text: str
    check: Callable[[float, float | None, float | None], bool | None]


def at_most(limit: float, unit: str) -> Target:
    return Target(f"≤ {limit:g} {unit}", lambda it, ce, dr: it <= limit)


def at_least(limit: float, unit: str) -> Target:
    return Target(f"≥ {limit:,g} {unit}", lambda it, ce, dr: it >= limit)


def times_celery(factor: float, beat_dramatiq: bool = False) -> Target:
    def check(it: float, ce: float | None, dr: float | None) -> bool | None:
        if ce is None:
            return None
        ok = it >= factor * ce
        if beat_dramatiq and dr is not None:
            ok = ok and it > dr
        return ok

    text = f"≥ {factor:g}× Celery" + (", > Dramatiq" if beat_dramatiq else "")
    return Target(text, check)


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    target: Target | None = None


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    run: Callable[[Any, bool], dict[str, Any]]
    systems: tuple[str, ...]
    metrics: tuple[Metric, ...]
    #: seconds one repetition may take (full size; quick runs get a quarter, at least 60)
    budget: float = 300.0
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def primary(self) -> Metric:
        return self.metrics[0]

    def budget_for(self, quick: bool) -> float:
        return max(60.0, self.budget / 4) if quick else self.budget


def _control_latency(name: str, title: str, run: Callable[[Any, bool], dict[str, Any]],
                     p50_target_ms: float) -> Workload:
    """A control latency workload (itask and Celery): p50 against a target, and p99."""
    return Workload(name, title, run, INTERACTIVE,
                    (Metric("p50_ms", "p50", "ms", False, at_most(p50_target_ms, "ms")),
                     Metric("p99_ms", "p99", "ms", False)),
                    budget=180)


WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("throughput", "5,000 no-op tasks: submit all, then gather every result",
             queue.throughput, ALL,
             (Metric("tasks_per_s", "throughput", "tasks/s", True,
                     times_celery(2, beat_dramatiq=True)),
              Metric("submit_per_s", "submit rate", "tasks/s", True))),
    Workload("drain", "5,000-task backlog published with no worker, then a worker starts",
             queue.drain, ALL,
             (Metric("tasks_per_s", "drain rate (1st→last result)", "tasks/s", True,
                     times_celery(2)),
              Metric("with_startup_per_s", "incl. worker start", "tasks/s", True))),
    Workload("roundtrip", "sequential delay().result(), 500 samples after warm-up",
             queue.roundtrip, ALL,
             (Metric("p50_ms", "p50", "ms", False, at_most(1.0, "ms")),
              Metric("p99_ms", "p99", "ms", False, at_most(2.0, "ms")))),
    Workload("startup", "worker launch → first (pre-queued) task done",
             lifecycle.startup, ALL,
             (Metric("seconds", "launch → result", "s", False, at_most(0.5, "s")),),
             budget=120),
    _control_latency("control_oneway", "client send → task receive in a pool child "
                     "(one way)", control.control_oneway, 0.5),
    _control_latency("control_roundtrip", "client send → task echoes with send → client "
                     "sees it", control.control_roundtrip, 1.0),
    _control_latency("control_oneway_nowait", "the same with handle.send(data, wait=False): "
                     "no acknowledgement awaited (Celery's put awaits none either)",
                     control.control_oneway_nowait, 0.5),
    _control_latency("control_roundtrip_nowait", "the echo round trip with "
                     "handle.send(data, wait=False)", control.control_roundtrip_nowait, 1.0),
    Workload("pause_ack", "pause / resume a CPU-bound task (checkpoint every few µs) until "
             "the watcher sees paused / resumed; 200 cycles (itask only: Celery has no pause)",
             control.pause_ack, ("itask",),
             (Metric("pause_p50_ms", "pause → paused p50", "ms", False),
              Metric("pause_p99_ms", "pause → paused p99", "ms", False),
              Metric("resume_p50_ms", "resume → resumed p50", "ms", False),
              Metric("hard_pause_p50_ms", "hard pause (SIGSTOP) → paused p50", "ms", False),
              Metric("hard_resume_p50_ms", "hard resume → resumed p50", "ms", False)),
             budget=180),
    Workload("stream_in", "50,000 messages from one client into one running task with "
             "handle.send(data, wait=False), in order (itask only)",
             stream.stream_in, ("itask",),
             (Metric("delivered_per_s", "first send → last receive", "messages/s", True,
                     at_least(20000, "/s")),
              Metric("send_per_s", "client send rate", "messages/s", True)),
             budget=180),
    Workload("progress_rate", "a task emits progress as fast as it can (itask 100k, "
             "Celery update_state 10k)",
             progress.progress_rate, INTERACTIVE,
             (Metric("events_per_s", "emitted", "events/s", True, at_least(20000, "/s")),
              Metric("delivery_ok", "watcher got the last one and every non-progress "
                     "event (1 = yes)", "", True),
              Metric("received_pct", "progress events the watcher saw (rest coalesced)", "%",
                     True)),
             budget=240),
    Workload("progress_latency", "progress every 10 ms with a timestamp → watcher, 200 samples",
             progress.progress_latency, INTERACTIVE,
             (Metric("p50_ms", "p50", "ms", False, at_most(1.0, "ms")),
              Metric("p99_ms", "p99", "ms", False)),
             budget=120),
    Workload("cancel", "forced cancel of a CPU-bound task that never checks, 10 samples",
             lifecycle.cancel, INTERACTIVE,
             (Metric("cancel_p50_ms", "→ cancelled p50", "ms", False),
              Metric("cancel_p99_ms", "→ cancelled p99", "ms", False, at_most(15, "ms")),
              Metric("refill_p50_ms", "→ pool refilled p50", "ms", False),
              Metric("refill_p99_ms", "→ pool refilled p99", "ms", False,
                     at_most(100, "ms"))),
             budget=180),
    Workload("idle_memory", "idle worker RSS, main + children (sum of VmRSS)",
             lifecycle.idle_memory, ALL,
             (Metric("rss_mb", "RSS sum", "MB", False, at_most(80, "MB")),
              Metric("pss_mb", "PSS sum", "MB", False)),
             budget=120),
)}
