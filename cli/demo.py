"""``itask demo``: a worker on the embedded broker, an interactive task, and an attach.

Needs no server. In a terminal it opens the attach view, where the user can type
``pause``, ``resume``, a message, ``answer yes`` or ``cancel``; without a terminal it
streams the events and answers the question itself, so it also runs in scripts and CI.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from interactive_tasks import Event, TaskFailed, TaskHandle
from interactive_tasks.errors import InteractiveTasksError, TransportError


def _start_worker(broker: str, log_path: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, ITASK_BROKER_URL=broker)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "interactive_tasks.cli.main", "worker", "-A",
             "interactive_tasks.cli.demo_tasks", "-c", "2", "-n", f"demo{os.getpid()}@%h",
             "-l", "warning"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )


def _describe(event: Event) -> str:
    if event.kind == "progress":
        return f"progress {event.current}/{event.total} {event.message or ''}".rstrip()
    if event.kind == "log":
        return f"log     {event.text}"
    if event.kind == "message":
        return f"message {event.data!r}"
    if event.kind == "question":
        return f"question {event.prompt!r}"
    if event.kind == "succeeded":
        return f"succeeded -> {event.result!r}"
    if event.kind == "failed":
        return f"failed: {(event.error or {}).get('message')}"
    return event.kind


def _stop_worker(worker: subprocess.Popen[bytes]) -> bool:
    """SIGTERM (a warm shutdown), SIGKILL to its process group after 10 s; True when the
    worker stopped on its own with exit code 0."""
    worker.send_signal(signal.SIGTERM)
    try:
        return worker.wait(10) == 0
    except subprocess.TimeoutExpired:
        _kill_group(worker)
        worker.wait()
        return False


def run_demo(broker: str | None = None, color: bool = True, interactive: bool = True) -> int:
    """Run the demo; returns the exit code of the attach (0 when the task succeeded).

    The worker is the demo's own: when the demo ends (the task ended, the user left with
    ``q``/Ctrl-C, or SIGTERM) a task still running is cancelled and the worker stopped.
    Its log file is deleted then, unless something failed (its path is printed).
    """
    broker = broker or os.environ.get("ITASK_BROKER_URL") or "embedded://"
    os.environ["ITASK_BROKER_URL"] = broker
    from . import demo_tasks

    app = demo_tasks.app
    app.broker_url = broker
    log_path = Path(tempfile.gettempdir()) / f"itask-demo-{os.getpid()}.log"
    print(f"Starting a worker on {app.broker_url_display} (log: {log_path})")
    if app.embedded_directory is not None:
        print(f"The embedded broker keeps its files in {app.embedded_directory}")
    # SIGTERM ends the demo as Ctrl-C does (in the attach view: leave it; elsewhere:
    # KeyboardInterrupt), so the worker is stopped below instead of left running.
    previous_int = signal.getsignal(signal.SIGINT)
    previous_term = signal.signal(signal.SIGTERM,
                                  lambda signum, frame: signal.raise_signal(signal.SIGINT))
    worker = _start_worker(broker, log_path)
    handle: TaskHandle[Any] | None = None
    failed = True  # until the demo gets through, or the user ends it
    try:
        deadline = time.monotonic() + 30
        while not app.ping(timeout=0.5, expect=1):
            if worker.poll() is not None or time.monotonic() > deadline:
                print("itask: the demo worker did not start", file=sys.stderr)
                return 3
        steps, delay = (40, 0.15) if interactive else (10, 0.02)
        handle = demo_tasks.build.start(steps, delay)
        print(f"Started task {handle.id}")
        if interactive:
            from .attach import attach

            code = attach(handle, color=color, left_note=(
                f"Left task {handle.id[:8]}; stopping the demo worker, and the task ends "
                f"with it (cancelled)."))
        else:
            code = 0
            for event in handle.events(timeout=60):
                print(_describe(event))
                if event.kind == "progress" and event.current == steps // 2:
                    handle.send("hello from the demo")
                if event.kind == "question":
                    handle.answer("yes")
            try:
                handle.result(timeout=10)
            except TaskFailed:
                code = 1
        print()
        print("Next steps (from a clone of the repository, where examples/ is):")
        print("  itask worker -A examples.tasks -c 2    # a worker for the examples' tasks")
        print("  python -m examples.progress            # in a second terminal: stream a task")
        print(f"  itask attach {handle.id}   # this task again (its end), from any terminal")
        print("  itask top                              # every worker and task, live")
        failed = False
        return code
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM outside the attach view: not a failure
        failed = False
        raise
    except TransportError as exc:
        print(f"itask: {exc}", file=sys.stderr)
        return 3
    except InteractiveTasksError as exc:
        print(f"itask: {exc}", file=sys.stderr)
        return 1
    finally:
        # A second Ctrl-C or SIGTERM while stopping kills the worker at once instead of
        # interrupting this clean-up (which would leave the worker running).
        signal.signal(signal.SIGINT, lambda signum, frame: _kill_group(worker))
        signal.signal(signal.SIGTERM, lambda signum, frame: _kill_group(worker))
        stopped = False
        try:
            if handle is not None and worker.poll() is None and not handle.state.is_final:
                try:
                    handle.cancel(grace=2.0)
                except InteractiveTasksError:
                    pass
            stopped = _stop_worker(worker)
            app.close()
        finally:
            signal.signal(signal.SIGINT, previous_int)
            signal.signal(signal.SIGTERM, previous_term)
        if not failed and stopped:
            log_path.unlink(missing_ok=True)
        else:
            print(f"itask: the demo worker's log is {log_path}", file=sys.stderr)


def _kill_group(worker: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(worker.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
