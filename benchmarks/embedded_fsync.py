"""What the embedded broker's ``fsync`` option costs, on this machine's disk.

::

    python -m benchmarks.embedded_fsync [--repeat 5] [--publishes 300] [--tasks 200]
                                        [--dir /tmp] [--out benchmarks/results/embedded_fsync]

Repetitions alternate ``fsync`` off and on, each on a fresh broker directory under
``--dir`` (its file system is in the report: the figures are that disk's):

* **publish**: ``apply_async`` of a no-op task, ``--publishes`` in a row after a first
  one (which starts the client), no worker running — what a client waits for; p50 and
  p99 of each repetition.
* **tasks**: one prefork worker (``-c 2``, the app of ``benchmarks/apps/itask_worker.py``);
  ``--tasks`` no-op tasks submitted at once, from the first submit to the last result —
  every publish, ack and result goes through the option; tasks per second.

Before them, **the disk**: one file written and fsynced then its directory fsynced, 200
times — what ``fsync`` adds to a publish at the least, on this disk (p50 and p99).

Each figure: median (min–max) over the repetitions. Writes ``<out>.json`` (every value)
and ``<out>.md`` (the table), and prints the table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from .harness import (
    ROOT,
    WorkerProcess,
    base_env,
    percentile,
    python,
    summarize,
    wait_until,
)

MODES = {"off": {}, "on": {"fsync": True}}


def file_system(path: Path) -> str:
    """``<type> on <device> (<mount point>)`` of the mount holding ``path``."""
    best = ("?", "?", "")
    target = str(path.resolve())
    with open("/proc/mounts") as fh:
        for line in fh:
            device, mount, kind = line.split()[:3]
            inside = target == mount or target.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best[2]):
                best = (kind, device, mount)
    return f"{best[0]} on {best[1]} ({best[2]})"


def disk_fsync_ms(base: Path, count: int = 200) -> dict[str, float]:
    """p50/p99 (ms) of writing a small file, fsyncing it and fsyncing its directory."""
    from interactive_tasks.transport.embedded_files import fsync_dir, write_file

    directory = Path(tempfile.mkdtemp(prefix="fsync-disk-", dir=base))
    samples = []
    try:
        for i in range(count):
            start = time.perf_counter()
            write_file(str(directory / f"{i}.msg"), b"x" * 200, fsync=True)
            fsync_dir(str(directory))
            samples.append((time.perf_counter() - start) * 1000.0)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return {"p50_ms": percentile(samples, 50), "p99_ms": percentile(samples, 99)}


def one_repetition(mode: str, base: Path, publishes: int, tasks: int) -> dict[str, Any]:
    from .apps.itask_tasks import make_app

    options = MODES[mode]
    directory = Path(tempfile.mkdtemp(prefix=f"fsync-{mode}-", dir=base))
    os.environ["ITASK_HOME"] = str(directory / "home")  # the per-user secret, shared
    url = f"embedded://{directory / 'broker'}"
    ns = f"bench-fsync-{uuid.uuid4().hex[:8]}"
    out: dict[str, Any] = {"mode": mode}
    worker = None
    bench = make_app(ns, url)
    bench.app.configure(broker_transport_options=options)
    try:
        bench.noop.delay()  # the first publish also starts the client and declares the queue
        latencies = []
        for _ in range(publishes):
            start = time.perf_counter()
            bench.noop.delay()
            latencies.append((time.perf_counter() - start) * 1000.0)
        out["publish_p50_ms"] = percentile(latencies, 50)
        out["publish_p99_ms"] = percentile(latencies, 99)
        env = {**base_env(), "BENCH_NS": ns, "BENCH_BROKER_URL": url,
               "BENCH_SETTINGS": json.dumps({"broker_transport_options": options}),
               "ITASK_HOME": os.environ["ITASK_HOME"]}
        worker = WorkerProcess(
            [python(), "-m", "interactive_tasks.cli.main", "worker", "-A",
             "benchmarks.apps.itask_worker", "--pool", "prefork", "-c", "2", "-n",
             f"fsync-{mode}@bench", "-l", "info"], env, directory / "worker.log")
        wait_until(lambda: "ready" in worker.log_tail(20000) or not worker.alive(), 60,
                   0.05, "the worker")
        worker.check_alive()
        # the queue is FIFO: once a task published now is done, so are the ones above
        bench.noop.delay().result(timeout=120)
        start = time.perf_counter()
        handles = [bench.noop.delay() for _ in range(tasks)]
        for handle in handles:
            handle.result(timeout=120)
        out["tasks_per_s"] = tasks / (time.perf_counter() - start)
    finally:
        if worker is not None:
            worker.stop()
        bench.app.close()
        shutil.rmtree(directory, ignore_errors=True)
    return out


def table(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    rows = [("`apply_async` p50 (ms)", "publish_p50_ms", 3),
            ("`apply_async` p99 (ms)", "publish_p99_ms", 3),
            ("tasks/s (-c 2, no-op tasks)", "tasks_per_s", 0)]
    lines = ["| | fsync off | fsync on |", "|---|---|---|"]
    for label, key, digits in rows:
        cells = []
        for mode in MODES:
            s = summary[mode][key]
            cells.append(f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})")
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.embedded_fsync",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--publishes", type=int, default=300)
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "embedded_fsync")
    args = parser.parse_args(argv)
    disk = disk_fsync_ms(args.dir)
    runs: list[dict[str, Any]] = []
    for rep in range(args.repeat):
        for mode in (("off", "on") if rep % 2 == 0 else ("on", "off")):
            result = one_repetition(mode, args.dir, args.publishes, args.tasks)
            result["repetition"] = rep + 1
            result["load_1m"] = os.getloadavg()[0]
            runs.append(result)
            print(json.dumps(result), flush=True)
    keys = ("publish_p50_ms", "publish_p99_ms", "tasks_per_s")
    summary = {mode: {k: summarize([r[k] for r in runs if r["mode"] == mode]) for k in keys}
               for mode in MODES}
    where = file_system(args.dir)
    report = {
        "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "kernel": platform.release(), "file_system": where},
        "args": {"repeat": args.repeat, "publishes": args.publishes, "tasks": args.tasks},
        "disk_write_fsync_file_and_dir": disk,
        "runs": runs, "summary": summary,
    }
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    text = (f"# Embedded broker: `fsync` off and on\n\n"
            f"`python -m benchmarks.embedded_fsync --repeat {args.repeat} --publishes "
            f"{args.publishes} --tasks {args.tasks}`, {report['when']}; broker directory on "
            f"{where}; {os.cpu_count()} CPUs. Median (min–max) over {args.repeat} "
            f"repetitions per mode, alternating.\n\n{table(summary)}\n\n"
            f"The disk: a 200-byte file written and fsynced, then its directory fsynced: "
            f"p50 {disk['p50_ms']:.3f} ms, p99 {disk['p99_ms']:.3f} ms (200 times).\n")
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
