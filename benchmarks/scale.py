"""``python -m benchmarks.scale``: how the cost of control grows with load.

Three axes, one fresh ``itask worker`` and namespace per point:

* **gevent tasks**: a gevent worker with ``-c N`` runs N − 1 background interactive tasks
  (``bench.hum``: progress every 0.25 s, waiting in ``self.receive`` in between; started
  with ``watch="final"``, so the client does not stream their events) and one probe task.
* **prefork children**: the same with a prefork worker of N children.
* **watchers**: a prefork worker with 2 children runs the probe alone, followed by W
  clients (each its own ``App``, so its own inbox; the one that measures is one of them).

At each point the client sends ``{"i": i}`` to the probe every 2 ms and times the echo
(``handle.send()`` → ``self.send()`` → ``handle.events()``) — the control round trip — for
at most ``--seconds`` or ``--samples`` messages; meanwhile it reads the worker's CPU time
(every process of its tree, in % of one core) and, at the end, its memory (sum of RSS and
of PSS over the tree). ``--repeat`` runs every point again; the table shows the median and
the min–max over repetitions.

Writes ``<out>.json`` (every repetition), ``<out>.md`` (the table) and, when matplotlib is
installed (the ``bench`` extra), ``<out>.png``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .harness import (
    BROKER_URLS,
    ROOT,
    WorkerProcess,
    base_env,
    broker_reachable,
    cleanup_redis,
    git_commit,
    latency_summary,
    new_namespace,
    process_tree,
    python,
    tree_memory_mb,
    wait_until,
)
from .workloads.common import CONTROL_GAP, echo_round_trip

#: Seconds between two background progress events of one task (4 a second).
HUM_INTERVAL = 0.25
WARMUP = 10
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "scale"
AXES = ("gevent", "prefork", "watchers")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale",
                                     description="Control latency, worker CPU and memory "
                                                 "against tasks, children and watchers.")
    parser.add_argument("--broker", default="redis", choices=("redis", "amqp", "embedded"))
    parser.add_argument("--gevent", default="10,100,1000,5000",
                        help="gevent worker sizes (-c), comma-separated; '' to skip")
    parser.add_argument("--prefork", default="2,8,32",
                        help="prefork children, comma-separated; '' to skip")
    parser.add_argument("--watchers", default="1,10,100",
                        help="watchers of the probe task, comma-separated; '' to skip")
    parser.add_argument("--samples", type=int, default=300, help="round trips per point, at most")
    parser.add_argument("--seconds", type=float, default=8.0,
                        help="measuring time per point, at most")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 2-3 small points, 20 samples, one repetition")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="path without extension; .json, .md and .png are written")
    args = parser.parse_args(argv)
    if args.quick:
        args.gevent, args.prefork, args.watchers = "10", "2", "1,3"
        args.samples, args.seconds, args.repeat = 20, 3.0, 1
    args.points = ([("gevent", n) for n in _ints(args.gevent, parser)]
                   + [("prefork", n) for n in _ints(args.prefork, parser)]
                   + [("watchers", n) for n in _ints(args.watchers, parser)])
    if not args.points or args.repeat < 1:
        parser.error("nothing to measure")
    return args


def _ints(value: str, parser: argparse.ArgumentParser) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        parser.error(f"not a list of integers: {value!r}")
    if any(n < 1 for n in out):
        parser.error(f"sizes must be at least 1: {value!r}")
    return out


# -- the worker's CPU time ----------
def _cpu_seconds(pids: list[int]) -> float:
    """CPU time of the threads of ``pids``, from each thread's ``schedstat`` (nanoseconds).
    ``/proc/<pid>/stat`` counts clock ticks (10 ms): a lean worker over the short window of
    ``--quick`` could read as 0 % there."""
    nanoseconds = 0
    for pid in pids:
        try:
            threads = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in threads:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                    nanoseconds += int(fh.read().split()[0])  # time on a CPU
            except (OSError, ValueError, IndexError):
                continue  # the thread ended in between
    return nanoseconds / 1e9


class CpuMeter:
    """CPU seconds of a process tree between :meth:`start` and :meth:`stop`, including
    children that come and go in between (the tree is re-read every 0.5 s)."""

    def __init__(self, root: int) -> None:
        self.root = root
        self._last: dict[int, float] = {}
        self._spent = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for pid in process_tree(self.root):
            now = _cpu_seconds([pid])
            self._spent += max(0.0, now - self._last.get(pid, now))
            self._last[pid] = now

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._sample()

    def start(self) -> None:
        self._sample()
        self.began = time.perf_counter()
        self._thread.start()

    def stop(self) -> float:
        """The tree's CPU time over the wall time since :meth:`start`, in % of one core."""
        self._stop.set()
        self._thread.join(5)
        self._sample()
        return 100.0 * self._spent / max(1e-9, time.perf_counter() - self.began)


# -- one point ----------
def measure_point(axis: str, n: int, broker: str, samples: int, seconds: float,
                  log_dir: Path) -> dict[str, Any]:
    """One repetition of one point: a fresh worker, the load, the probe, the figures."""
    from .apps.itask_tasks import make_app

    ns = new_namespace(f"scale{axis}", "itask")
    url = BROKER_URLS[broker] + (f"/{ns}" if broker == "embedded" else "")
    pool, slots = ("gevent", n) if axis == "gevent" else (
        ("prefork", n) if axis == "prefork" else ("prefork", 2))
    background = slots - 1 if axis != "watchers" else 0
    env = base_env()
    env.update({"BENCH_NS": ns, "BENCH_BROKER_URL": url, "BENCH_RESULTS_URL": ""})
    cmd = [python(), "-m", "interactive_tasks.cli.main", "worker", "-A",
           "benchmarks.apps.itask_worker", "--pool", pool, "-c", str(slots),
           "-n", f"{ns}@bench", "-l", "warning"]
    worker = WorkerProcess(cmd, env, log_dir / f"{ns}.log")
    bench = make_app(ns, url)
    extra: list[Any] = []
    stop_watchers = threading.Event()
    try:
        wait_until(lambda: _noop_through(bench, worker), 60, 0.05, "the worker to answer")
        until = time.time() + 120 + background / 50  # outlives the point; killed after it
        for _ in range(background):
            bench.hum.apply_async((until, HUM_INTERVAL), watch="final")
        # FIFO delivery: the probe gets the last slot once every background task has one
        probe = bench.hum.start(until, HUM_INTERVAL)
        _wait_started(probe, 60 + background / 50)
        watchers = _watch(probe.id, ns, url, n - 1, stop_watchers, extra) \
            if axis == "watchers" else []
        # let the background tasks settle into their rhythm (their starts are spread over
        # the first seconds; a 1,000-task intake takes a couple of them on 2 cores)
        time.sleep(1.0 + background / 500)
        meter = CpuMeter(worker.pid)
        meter.start()
        events = probe.events(timeout=10)
        round_trips: list[float] = []
        deadline = time.monotonic() + seconds
        for i in range(samples + WARMUP):
            if time.monotonic() > deadline and i > WARMUP:
                break
            round_trips.append(echo_round_trip(probe, events, i))
            time.sleep(CONTROL_GAP)
        cpu = meter.stop()
        memory = tree_memory_mb(worker.pid)
        worker.check_alive()
        seen = [w["events"] for w in watchers]
        summary = latency_summary(round_trips[WARMUP:])
        return {"status": "ok", "axis": axis, "n": n, "pool": pool, "slots": slots,
                "background_tasks": background, "watchers": n if axis == "watchers" else 1,
                "load_before": os.getloadavg()[0], "cpu_pct": cpu,
                "rss_mb": memory["rss_mb"], "pss_mb": memory["pss_mb"],
                "processes": memory["processes"], "watcher_events": seen, **summary}
    finally:
        stop_watchers.set()
        worker.stop(timeout=3)
        for app in [bench.app, *extra]:
            app.close()
        if broker == "redis":
            cleanup_redis(url, [f"*{ns}*"])


def _noop_through(bench: Any, worker: WorkerProcess) -> bool:
    worker.check_alive()
    from interactive_tasks import TaskTimeout

    try:
        bench.noop.delay().result(1.0)
        return True
    except (TaskTimeout, TimeoutError):
        return False


def _wait_started(handle: Any, timeout: float) -> bool:
    for event in handle.events(timeout=timeout):
        if event.kind == "started":
            return True
        if event.is_final:
            raise RuntimeError(f"the probe ended before it started: {event!r}")
    return False


def _watch(task_id: str, ns: str, url: str, count: int, stop: threading.Event,
           apps: list[Any]) -> list[dict[str, int]]:
    """``count`` more clients attach to the task, each reading its events in a thread."""
    from interactive_tasks import App

    out: list[dict[str, int]] = []
    for k in range(count):
        app = App(f"bench-{ns}-w{k}", broker=url, namespace=ns)
        apps.append(app)
        handle = app.attach(task_id, timeout=10)
        tally = {"events": 0}
        out.append(tally)

        def read(handle: Any = handle, tally: dict[str, int] = tally) -> None:
            while not stop.is_set():
                try:
                    for _ in handle.events(timeout=0.2):
                        tally["events"] += 1
                        if stop.is_set():
                            return
                    return  # the task ended
                except TimeoutError:
                    continue

        threading.Thread(target=read, daemon=True).start()
    return out


# -- aggregation and output ----------
METRICS = (("p50_ms", "round trip p50 (ms)"), ("p99_ms", "round trip p99 (ms)"),
           ("cpu_pct", "worker CPU (% of a core)"), ("rss_mb", "RSS sum (MB)"),
           ("pss_mb", "PSS sum (MB)"))


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if r.get("status") == "ok"]
    out: dict[str, Any] = {"runs": runs, "ok": len(ok)}
    for key, _ in (*METRICS, ("samples", "")):
        values = [float(r[key]) for r in ok if isinstance(r.get(key), (int, float))]
        out[key] = ({"median": statistics.median(values), "min": min(values),
                     "max": max(values)} if values else None)
    return out


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "–"
    if entry["min"] == entry["max"]:
        return _fmt(entry["median"])
    return f"{_fmt(entry['median'])} ({_fmt(entry['min'])}–{_fmt(entry['max'])})"


LABELS = {"gevent": ("gevent worker, concurrent tasks (`-c`)", "tasks"),
          "prefork": ("prefork worker, children (`-c`)", "children"),
          "watchers": ("prefork `-c 2`, watchers of the probe task", "watchers")}


def markdown(document: dict[str, Any]) -> str:
    meta = document["meta"]
    lines = [f"Run {meta['started']} ({meta['elapsed_s']} s), {meta['host']}, "
             f"{meta['cpus']} CPUs, load average {meta['load']}, broker {meta['broker']}, "
             f"commit {meta['commit']}, {meta['versions']}. "
             f"`python -m benchmarks.scale {' '.join(meta['argv'])}`. Median (min–max) over "
             f"{meta['repeat']} repetition(s).", "",
             "| axis | n | samples | " + " | ".join(label for _, label in METRICS) + " |",
             "|---|---|---|" + "---|" * len(METRICS)]
    for point in document["points"]:
        failed = len(point["runs"]) - point["ok"]
        note = f" ({failed} failed)" if failed else ""
        samples = point["samples"]
        lines.append(f"| {LABELS[point['axis']][0]} | {point['n']:,}{note} | "
                     f"{'–' if samples is None else int(samples['median'])} | "
                     + " | ".join(_cell(point[key]) for key, _ in METRICS) + " |")
    return "\n".join(lines)


def plot(document: dict[str, Any], path: Path) -> bool:
    """A PNG: latency (top) and CPU/memory (bottom) for each axis. False without
    matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import (
        FixedLocator,
        NullFormatter,
        NullLocator,
        ScalarFormatter,
    )

    axes_present = [a for a in AXES if any(p["axis"] == a for p in document["points"])]
    fig, grid = plt.subplots(2, len(axes_present), figsize=(4.2 * len(axes_present), 6.4),
                             squeeze=False)
    for col, axis in enumerate(axes_present):
        points = [p for p in document["points"] if p["axis"] == axis and p["ok"]]
        xs = [p["n"] for p in points]
        top, bottom = grid[0][col], grid[1][col]
        for key, label, style in (("p50_ms", "p50", "o-"), ("p99_ms", "p99", "s--")):
            med = [p[key]["median"] for p in points]
            err = [[m - p[key]["min"] for m, p in zip(med, points, strict=True)],
                   [p[key]["max"] - m for m, p in zip(med, points, strict=True)]]
            top.errorbar(xs, med, yerr=err, fmt=style, capsize=3, label=label)
        top.set_yscale("log")
        top.yaxis.set_major_formatter(ScalarFormatter())
        low, high = top.get_ylim()
        # label the minor ticks only when the axis spans less than about a decade
        top.yaxis.set_minor_formatter(ScalarFormatter() if high / low < 20
                                      else NullFormatter())
        top.set_title(LABELS[axis][0].replace("`", ""), fontsize=9)
        top.set_ylabel("control round trip (ms)")
        top.legend(fontsize=8)
        top.grid(True, which="both", alpha=0.3)
        bottom.plot(xs, [p["cpu_pct"]["median"] for p in points], "o-", color="tab:red",
                    label="CPU %")
        for ax in (top, bottom):
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(FixedLocator(xs))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_major_formatter(ScalarFormatter())
        bottom.set_ylim(bottom=0)
        bottom.set_xlabel(LABELS[axis][1])
        bottom.set_ylabel("worker CPU (% of a core)", color="tab:red")
        twin = bottom.twinx()
        twin.plot(xs, [p["rss_mb"]["median"] for p in points], "s--", color="tab:blue")
        twin.set_ylim(bottom=0)
        twin.set_ylabel("RSS sum (MB)", color="tab:blue")
        bottom.grid(True, which="both", alpha=0.3)
    meta = document["meta"]
    fig.suptitle(f"python -m benchmarks.scale — {meta['started']}, commit {meta['commit']}, "
                 f"load {meta['load']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not broker_reachable(args.broker):
        print(f"{args.broker} is not reachable", file=sys.stderr)
        return 2
    from .__main__ import versions

    args.out.parent.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"itask-bench-scale-{stamp}"
    log_dir.mkdir(parents=True, exist_ok=True)
    loads: list[float] = []
    begun = time.perf_counter()
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {p: [] for p in args.points}
    for rep in range(args.repeat):
        for axis, n in args.points:
            try:
                result = measure_point(axis, n, args.broker, args.samples, args.seconds,
                                       log_dir)
                loads.append(result["load_before"])
                what = (f"p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, "
                        f"CPU {result['cpu_pct']:.0f} %, RSS {result['rss_mb']:.0f} MB")
            except Exception as exc:  # one point failing does not lose the others
                result = {"status": "error", "axis": axis, "n": n,
                          "error": f"{type(exc).__name__}: {exc}"}
                what = "ERROR " + result["error"].splitlines()[0][:200]
            runs[(axis, n)].append(result)
            print(f"[scale] {axis} {n} {rep + 1}/{args.repeat}: {what}", file=sys.stderr,
                  flush=True)
    meta: dict[str, Any] = {
        "started": started, "elapsed_s": round(time.perf_counter() - begun, 1),
        "host": socket.gethostname(), "cpus": os.cpu_count(), "broker": args.broker,
        "repeat": args.repeat, "quick": args.quick, "commit": git_commit(),
        "versions": versions() + f", {platform.platform()}",
        "load": (f"{statistics.median(loads):.2f} ({min(loads):.2f}–{max(loads):.2f})"
                 if loads else "n/a"),
        "argv": sys.argv[1:] if argv is None else argv, "logs": str(log_dir)}
    document: dict[str, Any] = {
        "meta": meta,
        "points": [{"axis": a, "n": n, **aggregate(runs[(a, n)])} for a, n in args.points]}
    json_path, md_path = args.out.with_suffix(".json"), args.out.with_suffix(".md")
    json_path.write_text(json.dumps(document, indent=1))
    report = markdown(document)
    md_path.write_text(report + "\n")
    print(report)
    png = args.out.with_suffix(".png")
    wrote_png = plot(document, png)
    print(f"\nwrote {json_path}, {md_path}" + (f" and {png}" if wrote_png else
                                                 " (no plot: matplotlib is not installed)"))
    return 0 if all(p["ok"] for p in document["points"]) else 1


if __name__ == "__main__":
    sys.exit(main())
