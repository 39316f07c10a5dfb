"""Make docs/attach.png and docs/top.png from real terminal screens.

Starts a worker on a private embedded broker, runs interactive tasks, opens
``itask attach`` and ``itask top`` in tmux, captures the screens with their colours
(``capture-pane -e``), turns the ANSI text into SVG with rich and the SVG into PNG with
headless Chromium. Needs tmux and chromium (Debian packages)::

    python docs/screenshots.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from rich.console import Console
from rich.text import Text

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                  "--hide-scrollbars"]


def tmux(sock: str, *args: str) -> str:
    return subprocess.run(["tmux", "-L", sock, "-f", "/dev/null", *args],
                          capture_output=True, text=True, timeout=10).stdout


def capture(command: str, env: dict[str, str], wait_for: str, settle: float,
            width: int = 100, height: int = 24) -> str:
    sock = f"it-shot-{uuid.uuid4().hex[:6]}"
    exports = " ".join(f"{k}={v}" for k, v in env.items() if k.startswith(("ITASK_",
                                                                             "PYTHONPATH")))
    tmux(sock, "new-session", "-d", "-s", "s", "-x", str(width), "-y", str(height),
         f"cd {ROOT} && env {exports} TERM=xterm-256color {command}; sleep 600")
    try:
        deadline = time.monotonic() + 20
        while wait_for not in tmux(sock, "capture-pane", "-p", "-t", "s"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{wait_for!r} never appeared")
            time.sleep(0.1)
        time.sleep(settle)  # let the live view advance a little for a representative shot
        return tmux(sock, "capture-pane", "-e", "-p", "-t", "s")
    finally:
        tmux(sock, "kill-server")


def to_png(ansi: str, out: Path, title: str, width: int = 100) -> None:
    console = Console(record=True, width=width, force_terminal=True, color_system="truecolor",
                      file=open(os.devnull, "w"))
    console.print(Text.from_ansi(ansi.rstrip("\n")))
    svg = console.export_svg(title=title)
    with tempfile.TemporaryDirectory() as tmp:
        svg_path = Path(tmp) / "shot.svg"
        svg_path.write_text(svg)
        html = Path(tmp) / "shot.html"
        html.write_text(f"<html><body style='margin:0;background:#fff'>"
                        f"<img src='{svg_path.name}' style='width:1000px'></body></html>")
        lines = ansi.rstrip("\n").count("\n") + 1
        height = int(60 + lines * 24.5 * (1000 / (width * 12.2 + 140)) * 1.0 + 40)
        subprocess.run(["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={tmp}/profile",
                        f"--screenshot={out}", f"--window-size=1000,{height}",
                        html.as_uri()], check=True, capture_output=True, timeout=60)


def main() -> int:
    for tool in ("tmux", "chromium"):
        if shutil.which(tool) is None:
            print(f"{tool} is needed (apt-get install -y {tool})", file=sys.stderr)
            return 2
    home = Path(tempfile.mkdtemp(prefix="itask-shots-"))
    env = dict(os.environ, ITASK_HOME=str(home), ITASK_BROKER_URL="",
               PYTHONPATH=str(ROOT))
    env.pop("ITASK_BROKER_URL")
    worker = subprocess.Popen(
        [sys.executable, "-m", "interactive_tasks.cli.main", "worker", "-A",
         "examples.tasks", "-c", "2", "-n", "shots@demo", "-l", "warning"],
        env=env, cwd=ROOT, start_new_session=True)
    try:
        sys.path.insert(0, str(ROOT))
        os.environ.update(ITASK_HOME=str(home))
        from examples.tasks import app, crunch, greet

        while not app.ping(timeout=0.5, expect=1):
            time.sleep(0.2)
        job = crunch.start(400, 0.05)
        asker = greet.start()
        while job.progress is None or (job.progress.current or 0) < 60:
            time.sleep(0.05)
        job.send("faster please")
        itask = f"{sys.executable} -m interactive_tasks.cli.main"
        attach = capture(f"{itask} attach {job.id} -A examples.tasks", env, "RUNNING", 1.5)
        to_png(attach, DOCS / "attach.png", "itask attach")
        top = capture(f"{itask} top -A examples.tasks", env, "greet", 1.0, height=22)
        to_png(top, DOCS / "top.png", "itask top")
        job.cancel(grace=0)
        asker.answer("Ada")
        print("wrote", DOCS / "attach.png", "and", DOCS / "top.png")
        return 0
    finally:
        worker.terminate()
        worker.wait(20)
        app.close()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
