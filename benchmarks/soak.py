"""Soak test: hours of mixed interactive work while workers are restarted under it.

::

    python -m benchmarks.soak --minutes 30 --broker redis
    python -m benchmarks.soak --minutes 2 --broker redis --restart-every 30 --json out.json

Runs ``--workers`` real ``itask worker`` processes on this module's app and keeps
``--drivers`` client threads busy with a mix of interactive tasks: progress streams that
get paused, resumed and sent messages; tasks that ask a question the driver answers;
plain tasks. A second client process-like app keeps attaching watchers to running tasks
and dropping them. Every ``--restart-every`` seconds one worker (never the first, which
stays up to show memory over the whole run) is restarted, alternately with a warm
shutdown (SIGTERM) and a kill (SIGKILL, so its tasks come back by the broker's
redelivery).

Reported (and printed as JSON): tasks submitted, completed, failed visibly (a final
failure state the client saw), **lost** (no final state by the deadline; must be 0),
**duplicated** (ran to the end more than once), re-run (started again after a kill; not
an error), control calls refused during restarts, and each worker incarnation's RSS
(supervisor and pool children) at start and end. ``tests/test_soak.py`` runs the same code
for two minutes.

Tasks are short (under 2 s) against a 10 s Redis visibility timeout, so only killed
workers cause redelivery. The namespace is unique per run and its keys are deleted at the
end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interactive_tasks import App, ControlError, InteractiveTask, TaskFailed, TaskState
from interactive_tasks.errors import InteractiveTasksError

ROOT = Path(__file__).resolve().parent.parent
BROKERS = {
    "redis": "redis://127.0.0.1:6379/0",
    "amqp": "amqp://guest:guest@127.0.0.1:5672//",
}
VISIBILITY = 10.0

# -- the app the soak workers run (``itask worker -A benchmarks.soak``) -------------------------
_NS = os.environ.get("ITASK_SOAK_NS", "itsoak")
_DIR = os.environ.get("ITASK_SOAK_DIR", "")


def transport_options(broker_url: str, namespace: str) -> dict[str, Any]:
    if not broker_url.startswith("redis"):
        return {}
    # Unacknowledged messages in keys of our own: a short visibility timeout must not
    # restore other apps' messages on a shared Redis.
    return {"visibility_timeout": VISIBILITY, "unacked_key": f"{namespace}.unacked",
            "unacked_index_key": f"{namespace}.unacked_index",
            "unacked_mutex_key": f"{namespace}.unacked_mutex",
            "unacked_restore_interval": 1, "unacked_restore_throttle": 1}


app = App("soak", namespace=_NS,
          broker_transport_options=transport_options(os.environ.get("ITASK_BROKER_URL", ""),
                                                     _NS))


def _mark(what: str, key: str) -> None:
    """One line per event in the run directory: how many times a task started / ended."""
    if _DIR:
        with open(os.path.join(_DIR, f"{what}.log"), "a") as fh:
            fh.write(f"{key} {os.getpid()}\n")


@app.task(base=InteractiveTask)
def soak_steps(self: Any, key: str, n: int, delay: float) -> dict[str, Any]:
    """Progress steps; echoes every message; the driver may pause and resume it."""
    _mark("started", key)
    echoed = []
    for i in range(n):
        self.progress(i + 1, n)
        while (msg := self.receive(timeout=0)) is not None:
            echoed.append(msg)
            self.send({"echo": msg})
        time.sleep(delay)
    _mark("done", key)
    return {"key": key, "echoed": echoed}


@app.task(base=InteractiveTask)
def soak_ask(self: Any, key: str) -> str:
    _mark("started", key)
    answer = self.ask(f"value for {key}?", timeout=60)
    _mark("done", key)
    return f"{key}={answer}"


@app.task
def soak_add(key: str, x: int, y: int) -> list[Any]:
    _mark("started", key)
    time.sleep(0.01)
    _mark("done", key)
    return [key, x + y]


# -- the harness ---------------------------------------------------------------------------------
def _rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        return []


@dataclass
class WorkerRun:
    """One incarnation of one worker process."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    started: float
    rss_start_kb: int | None = None
    children_rss_start_kb: int | None = None
    rss_end_kb: int | None = None
    children_rss_end_kb: int | None = None
    ended_by: str | None = None
    ended: float | None = None

    def sample(self) -> tuple[int | None, int | None]:
        kids = [_rss_kb(c) for c in _children(self.proc.pid)]
        return _rss_kb(self.proc.pid), sum(k for k in kids if k)

    def report(self) -> dict[str, Any]:
        return {"name": self.name, "pid": self.proc.pid,
                "rss_start_kb": self.rss_start_kb, "rss_end_kb": self.rss_end_kb,
                "children_rss_start_kb": self.children_rss_start_kb,
                "children_rss_end_kb": self.children_rss_end_kb,
                "ended_by": self.ended_by,
                "seconds": round((self.ended or time.time()) - self.started, 1)}


@dataclass
class Outcome:
    counts: Counter[str] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, what: str, detail: str | None = None) -> None:
        with self.lock:
            self.counts[what] += 1
            if what == "lost" and detail:
                self.lost.append(detail)
            elif what == "wrong" and detail:
                self.wrong.append(detail)
            elif what == "error" and detail and len(self.errors) < 20:
                self.errors.append(detail)


class Soak:
    def __init__(self, *, minutes: float, broker: str, workers: int = 2, concurrency: int = 2,
                 drivers: int = 6, restart_every: float = 180.0, workdir: Path | None = None,
                 warmup: float = 10.0, task_deadline: float = 90.0, seed: int = 1) -> None:
        self.duration = minutes * 60
        self.broker = broker
        self.url = BROKERS.get(broker) or f"embedded://{(workdir or Path('.'))}/broker"
        self.workers = workers
        self.concurrency = concurrency
        self.drivers = drivers
        self.restart_every = restart_every
        self.warmup = warmup
        self.task_deadline = task_deadline
        self.rng = random.Random(seed)
        self.namespace = f"soak{uuid.uuid4().hex[:8]}"
        self.dir = Path(workdir) if workdir else Path(f"/tmp/itask-soak-{self.namespace}")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.result_backend = (f"file://{self.dir / 'results'}" if broker == "amqp" else None)
        self.env = dict(os.environ)
        self.env.update({"ITASK_BROKER_URL": self.url, "ITASK_SOAK_NS": self.namespace,
                         "ITASK_SOAK_DIR": str(self.dir),
                         "PYTHONPATH": str(ROOT) + os.pathsep + self.env.get("PYTHONPATH", ""),
                         "PYTHONUNBUFFERED": "1"})
        if self.result_backend:
            self.env["ITASK_RESULT_BACKEND"] = self.result_backend
        self.runs: list[WorkerRun] = []
        self.current: dict[int, WorkerRun] = {}
        self.out = Outcome()
        self.stop = threading.Event()
        self.keys: list[str] = []
        self.attached = 0
        self.restarts: list[dict[str, Any]] = []

    # -- workers ----------
    def _start_worker(self, index: int) -> WorkerRun:
        name = f"soak{index}-{len(self.runs)}@{socket.gethostname()}"
        log_path = self.dir / f"{name.split('@')[0]}.log"
        log = open(log_path, "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "interactive_tasks.cli.main", "worker", "-A", "benchmarks.soak",
             "--pool", "prefork", "-c", str(self.concurrency), "-n", name, "-l", "info"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT),
            start_new_session=True)
        log.close()
        run = WorkerRun(name, proc, log_path, time.time())
        deadline = time.monotonic() + 30
        while b" ready" not in log_path.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {name} did not start:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.05)
        self.runs.append(run)
        self.current[index] = run
        return run

    def _end_worker(self, run: WorkerRun, how: str) -> None:
        run.rss_end_kb, run.children_rss_end_kb = run.sample()
        run.ended_by = how
        run.ended = time.time()
        if how == "kill":
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.proc.pid, signal.SIGKILL)
            run.proc.wait(10)
        else:
            run.proc.send_signal(signal.SIGTERM)
            try:
                run.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(run.proc.pid, signal.SIGKILL)
                run.proc.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.proc.pid, signal.SIGKILL)

    def _sample_start(self, run: WorkerRun) -> None:
        if run.rss_start_kb is None and time.time() - run.started >= self.warmup:
            run.rss_start_kb, run.children_rss_start_kb = run.sample()

    # -- load ----------
    def _key(self, kind: str) -> str:
        key = f"{kind}-{uuid.uuid4().hex[:10]}"
        with self.out.lock:
            self.keys.append(key)
        return key

    def _await(self, handle: Any, key: str, interact: Any = None) -> Any:
        """Wait for the final state, calling ``interact(handle)`` while it runs."""
        deadline = time.monotonic() + self.task_deadline
        while not handle.ready():
            if time.monotonic() > deadline:
                self.out.add("lost", f"{key} {handle.id} state={handle.state.value}")
                return None
            if interact is not None:
                try:
                    interact(handle)
                except (ControlError, InteractiveTasksError) as exc:
                    self.out.add("control_refused")
                    if not isinstance(exc, ControlError):
                        self.out.add("error", f"{key}: {exc!r}")
            with contextlib.suppress(InteractiveTasksError):
                handle.wait(timeout=0.05)
        return handle

    def _drive_steps(self, client: App) -> None:
        key = self._key("steps")
        rng = random.Random(key)
        handle = soak_steps_by_name(client, key, rng.randint(5, 25), rng.uniform(0.01, 0.04))
        plan: dict[str, Any] = {"paused": False, "sent": [], "pause": rng.random() < 0.3,
                                "send": rng.random() < 0.5}

        def interact(h: Any) -> None:
            if h.state is not TaskState.RUNNING and h.state is not TaskState.PAUSED:
                return
            if plan["send"] and not plan["sent"]:
                plan["sent"].append(f"hi {key}")
                h.send(f"hi {key}")
            if plan["pause"] and not plan["paused"]:
                plan["paused"] = True
                h.pause()
                time.sleep(rng.uniform(0.05, 0.3))
                h.resume()

        if self._await(handle, key, interact) is None:
            return
        self._check(handle, key, lambda r: r["key"] == key)

    def _drive_ask(self, client: App) -> None:
        key = self._key("ask")
        handle = client.send_task("benchmarks.soak.soak_ask", [key], watch="all")
        answered: set[str] = set()

        def interact(h: Any) -> None:
            q = h.question
            if q and q.get("qid") not in answered:
                answered.add(q.get("qid"))
                h.answer("42")

        if self._await(handle, key, interact) is None:
            return
        self._check(handle, key, lambda r: r == f"{key}=42")

    def _drive_add(self, client: App) -> None:
        key = self._key("add")
        x, y = self.rng.randint(0, 1000), self.rng.randint(0, 1000)
        handle = client.send_task("benchmarks.soak.soak_add", [key, x, y])
        if self._await(handle, key) is None:
            return
        self._check(handle, key, lambda r: r == [key, x + y])

    def _check(self, handle: Any, key: str, ok: Any) -> None:
        try:
            value = handle.result(0)
        except TaskFailed as exc:
            self.out.add("failed", f"{key}: {exc}")
            self.out.add("error", f"{key}: {exc.remote_type}: {exc.remote_message}")
            return
        except InteractiveTasksError as exc:
            self.out.add("failed")
            self.out.add("error", f"{key}: {exc!r}")
            return
        if ok(value):
            self.out.add("completed")
        else:
            self.out.add("wrong", f"{key}: {value!r}")

    def _driver(self, client: App, index: int) -> None:
        rng = random.Random(index)
        while not self.stop.is_set():
            choice = rng.random()
            try:
                if choice < 0.5:
                    self._drive_steps(client)
                elif choice < 0.7:
                    self._drive_ask(client)
                else:
                    self._drive_add(client)
            except Exception as exc:  # a harness bug must show, not hide as "lost"
                self.out.add("error", f"driver: {exc!r}")
                time.sleep(0.5)

    def _watcher(self, client: App) -> None:
        """Attach to running tasks and drop them again, over and over."""
        rng = random.Random(99)
        held: list[tuple[float, Any]] = []
        while not self.stop.is_set():
            try:
                tasks = client.inspect("active", timeout=0.5)
                ids = [t["id"] for r in tasks for t in (r.get("data") or [])]
                if ids:
                    handle = client.attach(rng.choice(ids), timeout=1.0)
                    held.append((time.monotonic() + rng.uniform(0.2, 2.0), handle))
                    self.attached += 1
            except Exception as exc:
                self.out.add("error", f"watcher: {exc!r}")
            now = time.monotonic()
            held = [(t, h) for t, h in held if t > now]  # detach: drop the handle
            self.stop.wait(0.2)

    def _restarter(self) -> None:
        if self.workers < 2:
            return
        index, mode = 1, "term"
        while not self.stop.wait(self.restart_every):
            run = self.current[index]
            self._end_worker(run, mode)
            self.restarts.append({"worker": run.name, "how": mode,
                                  "at": round(time.time() - self.t0, 1)})
            if self.stop.is_set():
                return
            self._start_worker(index)
            mode = "kill" if mode == "term" else "term"
            index = index + 1 if index + 1 < self.workers else 1

    # -- run ----------
    def run(self) -> dict[str, Any]:
        self.t0 = time.time()
        for index in range(self.workers):
            self._start_worker(index)
        client = self._app()
        watcher = self._app()
        threads = [threading.Thread(target=self._driver, args=(client, i), daemon=True)
                   for i in range(self.drivers)]
        threads.append(threading.Thread(target=self._watcher, args=(watcher,), daemon=True))
        restarter = threading.Thread(target=self._restarter, daemon=True)
        try:
            for t in threads:
                t.start()
            restarter.start()
            end = time.monotonic() + self.duration
            while time.monotonic() < end:
                for run in list(self.current.values()):
                    self._sample_start(run)
                time.sleep(0.5)
            self.stop.set()
            restarter.join(120)
            for t in threads:  # drivers finish their current task (or call it lost)
                t.join(self.task_deadline + 30)
        finally:
            self.stop.set()
            for run in list(self.current.values()):
                if run.proc.poll() is None:
                    self._end_worker(run, "end")
            client.close()
            watcher.close()
        report = self._report()
        self._cleanup()
        return report

    def _app(self) -> App:
        return App("soak-client", broker=self.url, result_backend=self.result_backend,
                   namespace=self.namespace,
                   broker_transport_options=transport_options(self.url, self.namespace))

    def _report(self) -> dict[str, Any]:
        def tally(what: str) -> Counter[str]:
            path = self.dir / f"{what}.log"
            if not path.exists():
                return Counter()
            return Counter(line.split()[0] for line in path.read_text().splitlines() if line)

        done, started = tally("done"), tally("started")
        c = self.out.counts
        return {
            "broker": self.broker, "minutes": round(self.duration / 60, 2),
            "submitted": len(self.keys), "completed": c["completed"], "failed": c["failed"],
            "wrong_result": c["wrong"], "lost": c["lost"],
            "duplicated": sum(1 for n in done.values() if n > 1),
            "rerun": sum(1 for n in started.values() if n > 1),
            "control_refused": c["control_refused"], "watchers_attached": self.attached,
            "restarts": self.restarts, "workers": [r.report() for r in self.runs],
            "lost_tasks": self.out.lost[:20], "wrong_tasks": self.out.wrong[:20],
            "errors": self.out.errors, "directory": str(self.dir),
        }

    def _cleanup(self) -> None:
        if self.broker == "redis":
            import redis

            r = redis.Redis.from_url(self.url)
            try:
                for pattern in (f"{self.namespace}*", f"_kombu.binding.{self.namespace}*",
                                f"_kombu.binding_permanent.{self.namespace}*"):
                    keys = list(r.scan_iter(pattern, count=1000))
                    if keys:
                        r.delete(*keys)
            finally:
                r.close()


def soak_steps_by_name(client: App, key: str, n: int, delay: float) -> Any:
    return client.send_task("benchmarks.soak.soak_steps", [key, n, delay], watch="all")


def run(**kwargs: Any) -> dict[str, Any]:
    """Run a soak; see :class:`Soak` for the arguments. Returns the report."""
    return Soak(**kwargs).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--broker", choices=["redis", "amqp", "embedded"], default="redis")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--drivers", type=int, default=6)
    parser.add_argument("--restart-every", type=float, default=180.0,
                        help="seconds between worker restarts (default 180)")
    parser.add_argument("--dir", type=Path, default=None, help="run directory (logs, marks)")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    report = run(minutes=args.minutes, broker=args.broker, workers=args.workers,
                 concurrency=args.concurrency, drivers=args.drivers,
                 restart_every=args.restart_every, workdir=args.dir)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0 if report["lost"] == 0 and report["duplicated"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
