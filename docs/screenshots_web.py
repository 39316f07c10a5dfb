"""Make docs/web-tasks.png, web-task.png, web-workers.png and web-overview.png.

Starts a worker (with task events, ``-E``) and ``itask web`` on a private embedded broker,
runs a few of ``examples/tasks.py``'s tasks (one crunching, one paused, one asking a
question, some finished) and photographs each page in headless Chromium through
Playwright. Needs the ``web`` extra, playwright and chromium (the Debian package; never
``playwright install``)::

    python docs/screenshots_web.py
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CHROMIUM = os.environ.get("ITASK_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                  "--hide-scrollbars"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _until(predicate, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out")
        time.sleep(0.05)


def main() -> int:
    from playwright.sync_api import sync_playwright

    home = Path(tempfile.mkdtemp(prefix="itask-web-shots-"))
    env = dict(os.environ, ITASK_HOME=str(home), PYTHONPATH=str(ROOT))
    env.pop("ITASK_BROKER_URL", None)
    port = _free_port()
    itask = [sys.executable, "-m", "interactive_tasks.cli.main"]
    procs = [
        subprocess.Popen([*itask, "worker", "-A", "examples.tasks", "-c", "4", "-E",
                          "-n", "shots@demo", "-l", "warning"],
                         env=env, cwd=ROOT, start_new_session=True),
        subprocess.Popen([*itask, "web", "-A", "examples.tasks", "--port", str(port)],
                         env=env, cwd=ROOT, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    sys.path.insert(0, str(ROOT))
    os.environ.update(ITASK_HOME=str(home))
    os.environ.pop("ITASK_BROKER_URL", None)
    from examples.tasks import app, crunch, greet

    try:
        _until(lambda: bool(app.ping(timeout=0.5, expect=1)))
        for n in (5, 8, 12):
            crunch.start(n, 0.01).wait(20)
        job = crunch.start(600, 0.03)
        held = crunch.start(300, 0.03)
        asker = greet.start()
        _until(lambda: (held.progress is not None and (held.progress.current or 0) > 40))
        held.pause(wait=True)
        _until(lambda: job.progress is not None and (job.progress.current or 0) > 120)
        job.send("faster please")
        url = f"http://127.0.0.1:{port}"
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1100, "height": 640})
            for name, where, ready in (
                    ("web-tasks", "tasks", f'tr[data-id="{job.id}"]'),
                    ("web-task", f"task/{job.id}", ".chart"),
                    ("web-workers", "workers", "tr.child"),
                    ("web-overview", "overview", "#dead-letters")):
                page.goto(f"{url}/#/{where}")
                page.wait_for_selector(ready, timeout=20_000)
                time.sleep(2.5 if name == "web-overview" else 1.0)
                page.screenshot(path=str(DOCS / f"{name}.png"))
                print("wrote", DOCS / f"{name}.png")
            browser.close()
        for handle in (job, held):
            handle.cancel(grace=0)
        asker.answer("Ada")
        return 0
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(20)
        app.close()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
