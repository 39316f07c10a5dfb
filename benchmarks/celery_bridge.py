"""Control of a running Celery task through the Celery bridge, against Celery's own
workaround and the itask worker, in one run.

::

    python -m benchmarks.celery_bridge [--repeat 3] [--broker both|redis|amqp] [--quick]
                                       [--out benchmarks/results/celery_bridge]
                                       [--systems celery-bridge,celery,itask]

The four control workloads of the main suite (``control_oneway``, ``control_roundtrip``
and their ``_nowait`` forms, see README.md "Workloads") on three systems:

* ``celery-bridge``: ``celery worker -P prefork -c 2`` with ``enable(app)``; the client
  uses ``task.start()`` handles (``handle.send`` → ``self.receive``, ``self.send`` →
  ``handle.events()``), the same code as for itask;
* ``celery``: the same Celery worker configuration without the bridge, and Celery's
  workaround (a kombu queue per task that the task consumes itself, another for replies);
* ``itask``: ``itask worker --pool prefork -c 2``.

The main suite's method: one runner process and a fresh worker and namespace per
repetition, repetitions interleaved across systems, p50/p99 inside each repetition, then
the median (min–max) over repetitions, the 1-minute load average beside each. Writes
``<out>.json`` (every repetition's figures) and ``<out>.md`` (the table), and prints the
table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import tempfile
from pathlib import Path
from typing import Any

from .__main__ import run_one, versions
from .harness import ROOT, broker_reachable
from .report import aggregate, cell
from .workloads import WORKLOADS

WORKLOAD_NAMES = ("control_oneway", "control_roundtrip", "control_oneway_nowait",
                  "control_roundtrip_nowait")
SYSTEMS = ("celery-bridge", "celery", "itask")
LABELS = {"celery-bridge": "Celery + bridge", "celery": "Celery workaround",
          "itask": "itask worker"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.celery_bridge")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--broker", choices=["redis", "amqp", "both"], default="both")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "celery_bridge")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help="comma-separated, of " + ", ".join(SYSTEMS))
    args = parser.parse_args(argv)
    systems = tuple(s for s in SYSTEMS if s in args.systems.split(","))
    if not systems:
        parser.error(f"--systems: none of {', '.join(SYSTEMS)}")
    brokers = ["redis", "amqp"] if args.broker == "both" else [args.broker]
    results: dict[str, Any] = {}
    log_dir = Path(tempfile.mkdtemp(prefix="itask-bridge-bench-logs-"))
    with tempfile.TemporaryDirectory(prefix="itask-bridge-bench-") as scratch:
        for broker in brokers:
            if not broker_reachable(broker):
                raise SystemExit(f"{broker} is not reachable on 127.0.0.1")
            results[broker] = {}
            for name in WORKLOAD_NAMES:
                runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
                for rep in range(args.repeat):
                    for system in systems:
                        result = run_one(name, system, broker, args.quick, log_dir,
                                         Path(scratch))
                        runs[system].append(result)
                        print(f"[{broker}] {name} {system} {rep + 1}/{args.repeat}: "
                              f"{result.get('metrics', {}).get('p50_ms', result.get('error'))}",
                              flush=True)
                for result in (r for rs in runs.values() for r in rs):
                    # a committed file: per-repetition figures, not every sample or the
                    # scratch paths of the logs
                    result.pop("samples", None)
                    result.pop("log", None)
                spec = WORKLOADS[name]
                results[broker][name] = {
                    "title": spec.title,
                    "systems": {s: aggregate(spec, runs[s]) for s in systems}}
    loads = [run["load_before"] for workloads in results.values()
             for data in workloads.values() for entry in data["systems"].values()
             for run in entry["runs"] if isinstance(run.get("load_before"), (int, float))]
    meta = {"date": dt.datetime.now().isoformat(timespec="seconds"),
            "host": socket.gethostname(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "versions": versions(),
            "repeat": args.repeat, "quick": args.quick, "systems": list(systems),
            "load": {"min": min(loads), "max": max(loads)} if loads else None,
            "logs": str(log_dir)}
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "brokers": results},
                                                        indent=1))
    table = markdown(results, meta)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)
    return 0


def markdown(results: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [f"# Celery bridge: control latency ({meta['date']})", "",
             f"`python -m benchmarks.celery_bridge --repeat {meta['repeat']}"
             f"{' --quick' if meta['quick'] else ''}` on {meta['cpus']} CPUs, "
             f"{meta['versions']}. Median over repetitions (min–max); load average "
             f"{meta['load']['min']:.1f}–{meta['load']['max']:.1f} while it ran. "
             "Systems: README.md (\"Celery bridge\")." if meta["load"] else "", ""]
    systems = meta.get("systems", SYSTEMS)
    for broker, workloads in results.items():
        lines += [f"## {broker}", "",
                  "| workload | metric | " + " | ".join(LABELS[s] for s in systems) + " |",
                  "|---|---|" + "---|" * len(systems)]
        for name, data in workloads.items():
            for metric in WORKLOADS[name].metrics:
                cells = " | ".join(cell(data["systems"][s], metric.key) for s in systems)
                lines.append(f"| `{name}` | {metric.label} ({metric.unit}) | {cells} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
