"""``itask web`` under load: a big task table, and a task that reports as fast as it can.

::

    python -m benchmarks.web_load [--running 500] [--recent 10000] [--repeat 5]
                                  [--steps 100000] [--out benchmarks/results/web_load]

* **Tasks page**: a dashboard whose table holds ``--running`` running tasks and
  ``--recent`` finished ones (put into its table directly, as ``inspect tasks`` replies
  would), served by uvicorn on this machine. ``/api/tasks`` timed for the first page, a
  state filter, a name filter, an id search and a deep page (30 requests each, p50/p95);
  then the page itself in headless Chromium, ``--repeat`` fresh loads from navigation to
  its 50 rows drawn.
* **Task page**: a real ``itask worker`` (prefork, ``-c 1``) runs
  ``examples.tasks.crunch(--steps, 0)`` (a progress event per step, nothing else between),
  ``itask web`` follows it and a Chromium page shows it. Every 50 ms the page's count is
  read next to the count this process's own handle shows at that moment; the difference
  is how far the page trails a watcher of its own. Then: how long after the task's final
  event the page says ``succeeded``; and how many stream messages the page took per
  second (progress is coalesced: the latest value wins).

Needs the ``web`` extra, playwright and /usr/bin/chromium. Runs on the embedded broker.
Writes ``<out>.json`` and ``<out>.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from .harness import ROOT, percentile, python, wait_until

CHROMIUM = os.environ.get("ITASK_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
NAMES = [f"proj.jobs.step{i:02d}" for i in range(20)]
# counts the task page's stream messages (installed before the page's own script)
COUNT_MESSAGES = """
const Native = window.EventSource;
window.__messages = 0;
window.EventSource = class extends Native {
  constructor(...args) {
    super(...args);
    this.addEventListener("message", () => { window.__messages += 1; });
  }
};
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rows(running: int, recent: int) -> list[dict[str, Any]]:
    now = time.time()
    rows = []
    for i in range(recent):
        rows.append({"id": f"{i:08x}-done-{i:06d}", "name": NAMES[i % len(NAMES)],
                     "state": "failed" if i % 17 == 0 else "succeeded",
                     "worker": f"w{i % 8}@host", "queue": "io" if i % 3 == 0 else "default",
                     "received": now - 3600 + i * 0.3, "started": now - 3600 + i * 0.3,
                     "finished": now - 3600 + i * 0.3 + 0.2,
                     "progress": ["x", 1, "progress", now, {"current": 10, "total": 10}, 1]})
    for i in range(running):
        rows.append({"id": f"{i:08x}-live-{i:06d}", "name": NAMES[i % len(NAMES)],
                     "state": "paused" if i % 25 == 0 else "running",
                     "worker": f"w{i % 8}@host", "queue": "default",
                     "received": now - 60, "started": now - 60,
                     "progress": ["x", 1, "progress", now, {"current": i, "total": 1000}, 1]})
    return rows


def tasks_page(running: int, recent: int, repeat: int, home: Path) -> dict[str, Any]:
    """The Tasks API and page with ``running`` + ``recent`` tasks in the table."""
    import uvicorn
    from playwright.sync_api import sync_playwright

    from interactive_tasks import App
    from interactive_tasks.web.server import Dashboard, create_app
    from interactive_tasks.web.state import Cluster

    app = App("bench-web", broker=f"embedded://{home / 'table-broker'}")
    cluster = Cluster(app, recent=running + recent)
    started = time.perf_counter()
    cluster.merge(_rows(running, recent))
    fill_ms = (time.perf_counter() - started) * 1000
    board = Dashboard(app, cluster=cluster)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(app, dashboard=board), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 20, 0.01, "uvicorn to start")
    url = f"http://127.0.0.1:{port}"
    out: dict[str, Any] = {"tasks_in_table": running + recent, "fill_ms": round(fill_ms, 1)}
    try:
        queries = {"first page": "", "state=running": "state=running",
                   "name filter": "name=step07", "id search": "q=0000002a",
                   "page 150": "page=150"}
        api: dict[str, Any] = {}
        for label, query in queries.items():
            samples = []
            for _ in range(30):
                t0 = time.perf_counter()
                with urllib.request.urlopen(f"{url}/api/tasks?{query}", timeout=10) as resp:
                    body = json.loads(resp.read())
                samples.append((time.perf_counter() - t0) * 1000)
            api[label] = {"p50_ms": round(percentile(samples, 50), 2),
                          "p95_ms": round(percentile(samples, 95), 2),
                          "matching": body["total"]}
        out["api"] = api
        loads = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            for _ in range(repeat):
                # Playwright's waits evaluate strings, which the page's CSP forbids
                context = browser.new_context(bypass_csp=True)
                page = context.new_page()
                t0 = time.perf_counter()
                page.goto(f"{url}/#/tasks")
                page.wait_for_function(
                    "document.querySelectorAll('tr.task-row').length === 50", timeout=30_000)
                loads.append((time.perf_counter() - t0) * 1000)
                context.close()
            browser.close()
        out["page_load_ms"] = {"median": round(percentile(loads, 50), 1),
                               "max": round(max(loads), 1), "all": [round(x, 1) for x in loads]}
    finally:
        server.should_exit = True
        thread.join(10)
        board.close()
        app.close()
    return out


def task_page(steps: int, home: Path) -> dict[str, Any]:
    """A task reporting progress as fast as it can, watched by the dashboard."""
    from playwright.sync_api import sync_playwright

    env = dict(os.environ, ITASK_HOME=str(home), PYTHONPATH=str(ROOT),
               ITASK_BROKER_URL=f"embedded://{home / 'task-broker'}")
    port = _free_port()
    itask = [python(), "-m", "interactive_tasks.cli.main"]
    procs = [
        subprocess.Popen([*itask, "worker", "-A", "examples.tasks", "-c", "1", "-n",
                          "bench@web", "-l", "warning"], env=env, cwd=ROOT,
                         start_new_session=True),
        subprocess.Popen([*itask, "web", "-A", "examples.tasks", "--port", str(port),
                          "--read-only"], env=env, cwd=ROOT, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    os.environ.update(ITASK_HOME=env["ITASK_HOME"], ITASK_BROKER_URL=env["ITASK_BROKER_URL"])
    sys.path.insert(0, str(ROOT))
    from examples.tasks import app, crunch

    try:
        wait_until(lambda: app.ping(timeout=0.5, expect=1), 30, 0.01, "the worker")

        def listening() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return True
            except OSError:
                return False

        wait_until(listening, 30, 0.01, "itask web to listen")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            page = browser.new_context(bypass_csp=True).new_page()
            page.add_init_script(COUNT_MESSAGES)
            handle = crunch.start(steps, 0)
            page.goto(f"http://127.0.0.1:{port}/#/task/{handle.id}")
            page.wait_for_selector("#progress", timeout=30_000)
            trail: list[float] = []
            while not handle.state.is_final:
                mine = handle.progress.current if handle.progress is not None else 0
                text = page.inner_text("#progress").split("/")[0].strip()
                if text and mine:
                    trail.append(float(mine) - float(text))
                time.sleep(0.05)
            final_ts = handle.snapshot().finished or time.time()
            page.wait_for_function(
                "document.querySelector('#state').textContent === 'succeeded'",
                timeout=60_000, polling=5)
            shown = time.time()
            messages = page.evaluate("window.__messages")
            browser.close()
        snap = handle.snapshot()
        runtime = (snap.finished or final_ts) - (snap.started or final_ts)
        rate = steps / runtime if runtime > 0 else 0.0
        return {
            "steps": steps, "task_seconds": round(runtime, 2),
            "progress_events_per_s": round(rate),
            "page_messages": messages,
            "page_messages_per_s": round(messages / runtime, 1) if runtime else None,
            "trail_items_p50": round(percentile(trail, 50)),
            "trail_items_max": round(max(trail)) if trail else None,
            "trail_ms_p50": round(percentile(trail, 50) / rate * 1000, 1) if rate else None,
            "trail_ms_max": round(max(trail) / rate * 1000, 1) if rate and trail else None,
            "samples": len(trail),
            "end_to_page_ms": round((shown - final_ts) * 1000, 1),
        }
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(20)
        app.close()


def report(result: dict[str, Any]) -> str:
    t, k = result["tasks_page"], result["task_page"]
    lines = [
        "# `itask web` under load",
        "",
        f"`{result['command']}`, {result['when']}; {result['cpus']} CPUs, "
        f"load average {result['load']} at the start; embedded broker.",
        "",
        f"**Tasks page**, {t['tasks_in_table']} tasks in the table "
        f"({result['running']} running, {result['recent']} recent):",
        "",
        "| `/api/tasks` | p50 (ms) | p95 (ms) | matching |",
        "|---|---|---|---|",
    ]
    for label, row in t["api"].items():
        lines.append(f"| {label} | {row['p50_ms']} | {row['p95_ms']} | {row['matching']} |")
    lines += [
        "",
        f"The page in headless Chromium, navigation to its 50 rows drawn: median "
        f"{t['page_load_ms']['median']} ms, max {t['page_load_ms']['max']} ms "
        f"({len(t['page_load_ms']['all'])} fresh loads).",
        "",
        f"**Task page**, `crunch({k['steps']}, 0)`: {k['progress_events_per_s']} progress "
        f"events/s for {k['task_seconds']} s. The page trailed a handle in the benchmark "
        f"process by {k['trail_items_p50']} items at the median ({k['trail_ms_p50']} ms of "
        f"progress), {k['trail_items_max']} at most ({k['trail_ms_max']} ms), over "
        f"{k['samples']} samples; it took {k['page_messages']} stream messages "
        f"({k['page_messages_per_s']}/s: progress is coalesced, the latest wins) and showed "
        f"`succeeded` {k['end_to_page_ms']} ms after the task's final event.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--running", type=int, default=500)
    parser.add_argument("--recent", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "web_load")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="itask-web-bench-"))
    try:
        result: dict[str, Any] = {
            "command": " ".join(["python -m benchmarks.web_load", *sys.argv[1:]]),
            "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "cpus": os.cpu_count(), "load": round(os.getloadavg()[0], 2),
            "python": platform.python_version(),
            "running": args.running, "recent": args.recent,
        }
        result["tasks_page"] = tasks_page(args.running, args.recent, args.repeat, home)
        result["task_page"] = task_page(args.steps, home)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    text = report(result)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
