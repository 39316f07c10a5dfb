"""Fixtures: one per real broker, and real ``itask worker`` subprocesses.

A broker that cannot be reached is skipped locally and fails the run under CI
(``CI=true``), so a green CI always means every broker was tested.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REDIS_URL = os.environ.get("ITASK_TEST_REDIS", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("ITASK_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
BROKERS = ["embedded", "redis", "amqp"]
POOLS = ["prefork", "threads", "solo"]
ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_broker(name: str) -> None:
    """Skip (locally) or fail (CI) when the broker is down."""
    port = {"redis": 6379, "amqp": 5672}.get(name)
    if port is None or _reachable("127.0.0.1", port):
        return
    message = f"{name} is not reachable on 127.0.0.1:{port}"
    if IN_CI:
        pytest.fail(message + " (CI=true: every broker must be tested)")
    pytest.skip(message)


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
             message: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def holds_for(predicate: Callable[[], Any], duration: float, interval: float = 0.02,
              message: str = "condition") -> None:
    """Check ``predicate`` stays true for ``duration`` seconds (to prove nothing moves)."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        if not predicate():
            raise AssertionError(f"{message} stopped holding")
        time.sleep(interval)


def stream_into(handle: Any, n: int) -> tuple[int, float]:
    """``send(wait=False)`` ``{"i": 0}`` … ``{"i": n - 1}`` to ``handle``'s task; returns
    the most messages it had outstanding at once and the seconds the sending took."""
    most = 0
    started = time.monotonic()
    for i in range(n):
        handle.send({"i": i}, wait=False, timeout=30)
        most = max(most, handle.outstanding)
    return most, time.monotonic() - started


def redis_sockets() -> set[int]:
    """Inodes of this process's open TCP sockets to the test Redis's port (Linux /proc):
    a connection closed is gone from here at once, one merely unreferenced stays until the
    garbage collector finds it."""
    port = int(REDIS_URL.rsplit(":", 1)[1].split("/")[0])
    mine = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith("socket:["):
                mine.add(int(link[8:-1]))
    found = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == port and int(fields[9]) in mine:
                    found.add(int(fields[9]))
    return found


def isolated_env(home: Path) -> dict[str, str]:
    """This environment without ITASK_ settings, ITASK_HOME at ``home`` (so the default
    embedded broker is a private one) and the repository importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ITASK_")}
    env["ITASK_HOME"] = str(home)
    env["PYTHONPATH"] = str(ROOT)
    return env


@dataclass
class BrokerEnv:
    """Everything a test process and its workers need to share one isolated broker space."""

    name: str
    url: str
    namespace: str
    home: Path
    record_dir: Path
    result_backend: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "ITASK_BROKER_URL": self.url,
            "ITASK_TEST_NS": self.namespace,
            "ITASK_HOME": str(self.home),
            "ITASK_TEST_RECORD": str(self.record_dir),
            "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
            "PYTHONUNBUFFERED": "1",
        })
        if self.result_backend:
            env["ITASK_RESULT_BACKEND"] = self.result_backend
        env.update(self.extra)
        return env

    def apply(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for key, value in self.env().items():
            if os.environ.get(key) != value:
                monkeypatch.setenv(key, value)

    def records(self, task_id: str) -> list[dict[str, Any]]:
        import json

        path = self.record_dir / f"{task_id}.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]


def make_broker_env(name: str, tmp_path: Path) -> BrokerEnv:
    require_broker(name)
    ns = f"t{uuid.uuid4().hex[:10]}"
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    records = tmp_path / "records"
    records.mkdir(exist_ok=True)
    if name == "embedded":
        return BrokerEnv(name, f"embedded://{tmp_path / 'broker'}", ns, home, records)
    if name == "redis":
        return BrokerEnv(name, REDIS_URL, ns, home, records)
    return BrokerEnv(name, AMQP_URL, ns, home, records,
                     result_backend=f"file://{tmp_path / 'results'}")


def queue_depth(url: str, name: str) -> int | None:
    """Messages ready in queue ``name`` (None: it does not exist)."""
    import amqp

    host = url.split("@", 1)[1].split("/", 1)[0]
    conn = amqp.Connection(host, userid="guest", password="guest", heartbeat=0)
    conn.connect()
    try:
        channel = conn.channel()
        try:
            return channel.queue_declare(name, passive=True).message_count
        except amqp.exceptions.NotFound:
            return None
    finally:
        conn.close()


def delete_amqp_namespace(url: str, namespace: str,
                          task_queues: tuple[str, ...] = ("default",)) -> None:
    """Delete the durable queues and exchanges a test namespace leaves on the shared
    RabbitMQ: its delay levels (``transport.amqp_delay``), task and dead-letter queues.
    Names that do not exist are skipped by the server."""
    import amqp

    from interactive_tasks.transport.amqp_delay import (
        LEVELS,
        complete_marker,
        deliver_exchange,
        level_name,
    )

    host = url.split("@", 1)[1].split("/", 1)[0]
    conn = amqp.Connection(host, userid="guest", password="guest", heartbeat=0)
    conn.connect()
    try:
        channel = conn.channel()
        for level in range(LEVELS):
            channel.queue_delete(level_name(namespace, level))
            channel.exchange_delete(level_name(namespace, level))
        channel.exchange_delete(deliver_exchange(namespace))
        channel.exchange_delete(complete_marker(namespace))
        for queue in task_queues:
            channel.queue_delete(f"{namespace}.tasks.{queue}")
        channel.queue_delete(f"{namespace}.dead")
    finally:
        conn.close()


@pytest.fixture
def redis_ns() -> Iterator[str]:
    """A fresh key prefix on the test Redis (skipped locally when Redis is down), whose
    keys are deleted afterwards."""
    import redis

    require_broker("redis")
    namespace = f"tr{uuid.uuid4().hex[:8]}"
    yield namespace
    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(f"{namespace}*"))
    if keys:
        r.delete(*keys)
    r.close()


@pytest.fixture(params=BROKERS)
def broker(request: pytest.FixtureRequest, tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[BrokerEnv]:
    env = make_broker_env(request.param, tmp_path)
    env.apply(monkeypatch)
    yield env
    if env.name == "amqp":
        delete_amqp_namespace(env.url, env.namespace)


class WorkerProcess:
    """A real ``itask worker`` subprocess with its log captured to a file."""

    def __init__(self, env: BrokerEnv, log_dir: Path, *, pool: str = "prefork",
                 concurrency: int = 2, name: str | None = None,
                 extra_args: list[str] | None = None,
                 extra_env: dict[str, str] | None = None) -> None:
        self.env = env
        self.pool = pool
        self.name = name or f"w{uuid.uuid4().hex[:6]}@test"
        self.log_path = log_dir / f"{self.name.replace('@', '_')}.log"
        args = [sys.executable, "-m", "interactive_tasks.cli.main", "worker",
                "-A", "tests.apps.tasks", "--pool", pool, "-c", str(concurrency),
                "-n", self.name, "-l", "info", *(extra_args or [])]
        run_env = env.env()
        run_env.update(extra_env or {})
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, env=run_env, stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=str(ROOT),
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 20.0) -> WorkerProcess:
        wait_for(lambda: "ready" in self.log() or self.proc.poll() is not None, timeout,
                 message=f"worker {self.name} to start")
        if self.proc.poll() is not None:
            raise AssertionError(f"worker exited early:\n{self.log()[-3000:]}")
        return self

    def children(self) -> list[int]:
        try:
            out = subprocess.run(["pgrep", "-P", str(self.pid)], capture_output=True,
                                 text=True).stdout
        except FileNotFoundError:
            return []
        return [int(p) for p in out.split()]

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(5)
        # Children of a killed worker die with it (PDEATHSIG); make sure.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
def start_worker(broker: BrokerEnv, tmp_path: Path,
                 request: pytest.FixtureRequest) -> Iterator[Callable[..., WorkerProcess]]:
    workers: list[WorkerProcess] = []

    def start(**kwargs: Any) -> WorkerProcess:
        w = WorkerProcess(broker, tmp_path, **kwargs)
        workers.append(w)
        return w.wait_ready()

    yield start
    for w in workers:
        w.stop()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for w in workers:
            sys.stderr.write(f"\n--- log of {w.name} ---\n{w.log()[-4000:]}\n")


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def tasks(broker: BrokerEnv) -> Iterator[Any]:
    """The tests' app, configured for this broker, closed after the test."""
    import importlib

    import tests.apps.tasks as tasks_module

    tasks_module = importlib.reload(tasks_module)
    yield tasks_module
    tasks_module.app.close()
