"""Shared machinery: broker URLs, worker subprocesses, process memory, timing and statistics.

Every worker runs in its own session (process group) and is stopped in a ``finally``:
SIGTERM to the group, then SIGKILL to the group and to any descendant that left it. The
group id is also appended to a file the orchestrator reads, so a runner that is killed
for overrunning its time budget cannot leave a worker behind.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/1")
AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
#: The embedded broker: one fresh directory under this one per repetition (itask only).
EMBEDDED_DIR = os.environ.get("BENCH_EMBEDDED_DIR",
                              os.path.join(tempfile.gettempdir(), "itask-bench-embedded"))
BROKER_URLS = {"redis": REDIS_URL, "amqp": AMQP_URL, "embedded": f"embedded://{EMBEDDED_DIR}"}
BROKER_PORTS = {"redis": 6379, "amqp": 5672}
BROKERS = ("redis", "amqp", "embedded")


def new_namespace(workload: str, system: str) -> str:
    """A queue/key prefix unique to one run of one workload on one system."""
    return f"bench-{workload.replace('_', '')[:10]}-{system[:2]}-{uuid.uuid4().hex[:8]}"


def broker_reachable(kind: str, timeout: float = 1.0) -> bool:
    import socket

    if kind not in BROKER_PORTS:
        return True  # the embedded broker is a directory

    try:
        with socket.create_connection(("127.0.0.1", BROKER_PORTS[kind]), timeout=timeout):
            return True
    except OSError:
        return False


# -- waiting ----------
def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.001,
               what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# -- processes ----------
def _ppid_map() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: split after the last ')'
        fields = stat[stat.rfind(")") + 2:].split()
        parents[int(entry)] = int(fields[1])
    return parents


def process_tree(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    parents = _ppid_map()
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in parents or pid == root:
            out.append(pid)
        todo.extend(children.get(pid, ()))
    return [p for p in out if p in parents]


def _status_kb(pid: int, field: str, path: str = "status") -> int:
    try:
        with open(f"/proc/{pid}/{path}") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_memory_mb(root: int) -> dict[str, float]:
    """Summed VmRSS (and PSS, which counts shared pages once) of ``root`` and descendants."""
    pids = process_tree(root)
    rss = sum(_status_kb(p, "VmRSS") for p in pids)
    pss = sum(_status_kb(p, "Pss", "smaps_rollup") for p in pids)
    return {"rss_mb": rss / 1024.0, "pss_mb": pss / 1024.0, "processes": float(len(pids))}


class WorkerProcess:
    """A worker command started in its own session, its output captured to a log file."""

    def __init__(self, cmd: Sequence[str], env: dict[str, str], log_path: Path,
                 pgid_file: Path | None = None) -> None:
        self.cmd = list(cmd)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")
        self._log.write(f"$ {' '.join(self.cmd)}\n".encode())
        self._log.flush()
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, env=env, cwd=str(ROOT), stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        if pgid_file is not None:
            with open(pgid_file, "a") as fh:
                fh.write(f"{self.proc.pid}\n")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")

    def log_tail(self, size: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the group, wait, then SIGKILL the group and every straggler."""
        pids = process_tree(self.pid)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        kill_group(self.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._log.close()


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def git_commit() -> str:
    """The short commit id of the checkout the benchmarks run from ("unknown" outside git),
    with "+dirty" when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=str(ROOT),
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=str(ROOT), capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if head and dirty else "")


def python() -> str:
    return sys.executable


def base_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                     else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


# -- broker cleanup ----------
def cleanup_redis(url: str, patterns: Iterable[str]) -> int:
    """Delete every key matching one of ``patterns``; returns how many."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=10)
    removed = 0
    try:
        for pattern in patterns:
            batch = []
            for key in client.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    removed += client.delete(*batch)
                    batch = []
            if batch:
                removed += client.delete(*batch)
    finally:
        client.close()
    return removed


def cleanup_amqp(url: str, queues: Iterable[str], exchanges: Iterable[str] = ()) -> None:
    """Delete queues and exchanges by name, ignoring the ones that do not exist."""
    from kombu import Connection

    with Connection(url, connect_timeout=5) as conn:
        for name in queues:
            try:
                conn.default_channel.queue_delete(name)
            except Exception:
                conn.close()
                conn.ensure_connection(max_retries=1)
        for name in exchanges:
            try:
                conn.default_channel.exchange_delete(name)
            except Exception:
                conn.close()
                conn.ensure_connection(max_retries=1)


# -- statistics ----------
def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), ``q`` in 0..100."""
    if not values:
        return math.nan
    data = sorted(values)
    if len(data) == 1:
        return float(data[0])
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return float(data[lo] + (data[hi] - data[lo]) * (pos - lo))


def latency_summary(samples_ms: Sequence[float], prefix: str = "") -> dict[str, Any]:
    """p50/p99/max of one repetition, plus the raw samples (kept in the JSON)."""
    return {
        f"{prefix}p50_ms": percentile(samples_ms, 50),
        f"{prefix}p99_ms": percentile(samples_ms, 99),
        f"{prefix}max_ms": max(samples_ms) if samples_ms else math.nan,
        f"{prefix}samples": float(len(samples_ms)),
        f"{prefix}samples_ms": list(samples_ms),
    }


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Median and spread of one metric over the repeats."""
    clean = [float(v) for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    if not clean:
        return {"values": list(values), "median": None, "min": None, "max": None,
                "q1": None, "q3": None}
    return {
        "values": clean,
        "median": statistics.median(clean),
        "min": min(clean),
        "max": max(clean),
        "q1": percentile(clean, 25),
        "q3": percentile(clean, 75),
    }


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.elapsed`` (seconds, perf_counter)."""

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        self.elapsed = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.perf_counter() - self.start
