"""``/metrics``: the dashboard's view of the cluster in the Prometheus text format (0.0.4).

Written by hand (a few gauges and counters) so the ``web`` extra needs no client library.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .state import Cluster


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _family(name: str, kind: str, help_: str,
            samples: Iterable[tuple[dict[str, object], float]]) -> list[str]:
    lines = [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
        lines.append(f"{name}{{{text}}} {value:g}" if text else f"{name} {value:g}")
    return lines


def render_metrics(cluster: Cluster) -> str:
    """Tasks by state and name, queue depths, workers, pool processes, events, dead letters."""
    workers = cluster.workers()
    overview = cluster.overview()
    lines: list[str] = []
    lines += _family("itask_tasks", "gauge",
                     "Tasks the dashboard knows (running and recent), by state and name.",
                     (({"state": s, "name": n}, c)
                      for (s, n), c in sorted(cluster.by_state_and_name().items())))
    lines += _family("itask_queue_depth", "gauge", "Messages waiting in a task queue.",
                     (({"queue": q}, d) for q, d in sorted(overview["queues"].items())))
    lines += _family("itask_dead_letters", "gauge", "Messages in the dead-letter queue.",
                     [({}, overview["dead_letters"] or 0)])
    online = sum(1 for w in workers if w.get("online"))
    lines += _family("itask_workers", "gauge", "Workers seen, online or offline.",
                     [({"status": "online"}, online),
                      ({"status": "offline"}, len(workers) - online)])
    procs: dict[tuple[str, str], int] = {}
    for w in workers:
        if not w.get("online"):
            continue
        for child in w.get("children") or ():
            key = (str(w.get("worker")), str(child.get("state") or "idle"))
            procs[key] = procs.get(key, 0) + 1
    lines += _family("itask_pool_processes", "gauge", "Pool processes of online workers "
                     "by state (idle, busy, paused, stopped).",
                     (({"worker": w, "state": s}, n) for (w, s), n in sorted(procs.items())))
    lines += _family("itask_worker_processed_total", "counter",
                     "Tasks a worker has finished since it started.",
                     (({"worker": w.get("worker")}, float(w.get("processed") or 0))
                      for w in workers))
    lines += _family("itask_monitor_events_total", "counter",
                     "Events received on the monitoring stream, by type.",
                     (({"type": t}, n) for t, n in sorted(cluster.event_counts.items())))
    return "\n".join(lines) + "\n"
