"""Control on a saturated worker: round trips while many tasks emit progress.

One worker, one namespace. First the *idle* figure: an echo task on an otherwise idle
worker, ``handle.send()`` → the task's reply seen by the client. Then a second client
process starts ``--tasks`` load tasks (watched, so their progress is published) and the
same round trips are timed again, *loaded*. The figure of merit is the loaded p99 as a
multiple of the idle p50 (issue target: ≤ 20×). Prefork runs also report the voluntary
context switches a second of the pool processes' threads while loaded
(``pool_switches_per_s``: task, control reader, other).

Profiles:

* ``gevent``: ``--pool gevent -c tasks+2``; each load task emits ``--rate`` progress
  events a second (``bench.ticking``).
* ``prefork``: ``--pool prefork -c tasks+1``; each load task is CPU-bound and emits
  progress as fast as it can (``bench.burn``).

    python -m benchmarks.saturation --profile gevent --tasks 5000 --out r.json
    python -m benchmarks.saturation --profile prefork --tasks 8 --out r.json

An A/B on a shared machine runs each side from its own checkout (``PYTHONPATH``), one run
at a time, alternated, then merges the runs, keeping them whole, with per-side medians and
min–max::

    python -m benchmarks.saturation --combine base='/tmp/ab/base-*.json' \
        --combine new='/tmp/ab/new-*.json' --note "..." --out results/x_ab.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from .harness import BROKER_URLS, latency_summary, python
from .systems import Itask
from .workloads.common import CONTROL_GAP, echo_round_trip, wait_itask_started


class _Worker(Itask):
    def __init__(self, pool: str, concurrency: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pool, self.concurrency = pool, concurrency

    def worker_command(self) -> list[str]:
        return [python(), "-m", "interactive_tasks.cli.main", "worker",
                "-A", "benchmarks.apps.itask_worker", "--pool", self.pool,
                "-c", str(self.concurrency), "-n", self.hostname, "-l", "warning"]


def _roundtrips(handle: Any, total: int) -> list[float]:
    samples: list[float] = []
    events = handle.events(timeout=30)
    for i in range(total):
        samples.append(echo_round_trip(handle, events, i))
        time.sleep(CONTROL_GAP)
    return samples


def _load_client(ns: str, broker: str, profile: str, tasks: int, rate: float,
                 seconds: float) -> None:
    """Child process: start the load tasks, keep watching them, print ``started``."""
    from .apps.itask_tasks import make_app

    bench = make_app(ns, BROKER_URLS[broker])
    if profile == "gevent":
        handles = [bench.ticking.start(rate, seconds) for _ in range(tasks)]
    else:
        handles = [bench.burn.start(seconds) for _ in range(tasks)]
    # Every load task running: its started event reached this client.
    for handle in handles:
        wait_itask_started(handle, timeout=120)
    print("started", flush=True)
    sys.stdin.readline()  # the parent says stop
    for handle in handles:
        handle.send("stop", wait=False)
    for handle in handles:
        handle.result(60)
    bench.app.close()


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pool_switches(worker_pid: int) -> dict[tuple[int, int], int]:
    """Voluntary context switches of each thread of the worker's child processes (the
    prefork pool), by (pid, tid); empty for other pools or without ``/proc``."""
    counts: dict[tuple[int, int], int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != worker_pid:
                continue
            for task in (entry / "task").iterdir():
                for line in (task / "status").read_text().splitlines():
                    if line.startswith("voluntary_ctxt_switches:"):
                        counts[(int(entry.name), int(task.name))] = int(line.split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return counts


def _switch_rates(before: dict[tuple[int, int], int], after: dict[tuple[int, int], int],
                  seconds: float) -> dict[str, float]:
    """Voluntary context switches a second, summed over the pool processes, of their main
    threads (the task's), their first other thread (the control reader ``Slot.serve``
    starts first) and the rest (the progress flush thread)."""
    first: dict[int, int] = {}
    for pid, tid in after:
        if tid != pid:
            first[pid] = min(first.get(pid, tid), tid)
    rates = {"task": 0.0, "reader": 0.0, "other": 0.0}
    for (pid, tid), count in after.items():
        if (pid, tid) not in before:
            continue
        kind = "task" if tid == pid else "reader" if tid == first[pid] else "other"
        rates[kind] += (count - before[(pid, tid)]) / seconds
    return rates


def run(broker: str, profile: str, tasks: int, rate: float, samples: int) -> dict[str, Any]:
    ns = f"sat{uuid.uuid4().hex[:8]}"
    pool = "gevent" if profile == "gevent" else "prefork"
    concurrency = tasks + (2 if profile == "gevent" else 1)
    log_dir = Path(tempfile.mkdtemp(prefix="itask-sat-"))
    system = _Worker(pool, concurrency, broker=broker, ns=ns, log_dir=log_dir)
    out: dict[str, Any] = {"broker": broker, "profile": profile, "tasks": tasks,
                           "rate": rate if profile == "gevent" else None,
                           "concurrency": concurrency}
    try:
        with system.worker(timeout=120) as proc:
            bench = system.bench
            echo = bench.echo.start(2 * samples + 10)
            wait_itask_started(echo)
            idle = _roundtrips(echo, samples)
            seconds = 600.0
            load = subprocess.Popen(
                [python(), "-m", "benchmarks.saturation", "--load-client", ns,
                 "--broker", broker, "--profile", profile, "--tasks", str(tasks),
                 "--rate", str(rate), "--seconds", str(seconds)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                cwd=Path(__file__).resolve().parent.parent)
            assert load.stdout is not None and load.stdin is not None
            t0 = time.monotonic()
            line = load.stdout.readline()
            if line.strip() != "started":
                raise RuntimeError(f"load client failed: {line!r}")
            out["load_start_s"] = time.monotonic() - t0
            time.sleep(2.0)  # into the steady state
            pid = proc.proc.pid
            cpu0, wall0 = _cpu_seconds(pid), time.monotonic()
            switches0 = _pool_switches(pid)
            loaded = _roundtrips(echo, samples)
            out["worker_cpu_pct"] = 100.0 * (_cpu_seconds(pid) - cpu0) / (
                time.monotonic() - wall0)
            out["pool_switches_per_s"] = _switch_rates(
                switches0, _pool_switches(pid), time.monotonic() - wall0)
            load.stdin.write("stop\n")
            load.stdin.flush()
            load.wait(120)
            echo.send("x")  # let the echo task finish: it waits for n messages
            out["idle"] = latency_summary(idle)
            out["loaded"] = latency_summary(loaded)
            out["ratio_p99_to_idle_p50"] = out["loaded"]["p99_ms"] / out["idle"]["p50_ms"]
            out["ratio_p50_to_idle_p50"] = out["loaded"]["p50_ms"] / out["idle"]["p50_ms"]
    finally:
        system.close()
        system.cleanup()
    return out


#: per-run figures summarised by --combine
SUMMARISED = ("idle.p50_ms", "loaded.p50_ms", "loaded.p99_ms", "ratio_p99_to_idle_p50",
              "worker_cpu_pct")


def combine(sides: list[str], note: str | None) -> dict[str, Any]:
    """``SIDE=GLOB`` pairs: every run of each side's result files, and their summary."""
    out: dict[str, Any] = {"script": "python -m benchmarks.saturation", "note": note,
                           "sides": {}}
    for spec in sides:
        side, _, pattern = spec.partition("=")
        files = sorted(glob.glob(pattern))
        runs = [run for f in files for run in json.loads(Path(f).read_text())["runs"]]
        summary: dict[str, Any] = {}
        for key in SUMMARISED:
            values = []
            for run in runs:
                value: Any = run
                for part in key.split("."):
                    value = value[part]
                values.append(float(value))
            summary[key.replace(".", "_")] = {
                "median": statistics.median(values), "min": min(values),
                "max": max(values), "n": len(values)}
        out["sides"][side] = {"files": [Path(f).name for f in files], "summary": summary,
                              "runs": runs}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.saturation")
    parser.add_argument("--broker", default="redis")
    parser.add_argument("--profile", choices=("gevent", "prefork"), default="gevent")
    parser.add_argument("--tasks", type=int, default=500)
    parser.add_argument("--rate", type=float, default=4.0)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--combine", action="append", metavar="SIDE=GLOB",
                        help="merge result files of alternated runs instead of running")
    parser.add_argument("--note", help="with --combine: how the runs were made")
    parser.add_argument("--load-client", metavar="NS", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=600.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load_client:
        _load_client(args.load_client, args.broker, args.profile, args.tasks, args.rate,
                     args.seconds)
        return 0
    if args.combine:
        merged = json.dumps(combine(args.combine, args.note), indent=1) + "\n"
        if args.out:
            args.out.write_text(merged)
        else:
            sys.stdout.write(merged)
        return 0
    runs = []
    for _ in range(args.repeat):
        result = run(args.broker, args.profile, args.tasks, args.rate, args.samples)
        brief = {k: v for k, v in result.items() if k not in ("idle", "loaded")}
        for phase in ("idle", "loaded"):
            brief[phase] = {k: round(v, 3) for k, v in result[phase].items()
                            if k.endswith("_ms") and not k.startswith("samples")}
        print(json.dumps(brief), flush=True)
        runs.append(result)
    if args.out:
        args.out.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
