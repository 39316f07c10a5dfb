"""Several machines, made on this one with Linux network namespaces.

Four test hosts: ``b`` runs a Redis server (started by the test, on 10.213.0.1:6390), ``1``
and ``2`` run a worker each, ``c`` runs the clients: the one that starts an interactive
task and a second process that attaches to it. They are joined by veth pairs on a bridge
inside ``b``; the 10.213.0.0/24 addresses exist only inside the namespaces, so nothing
here can reach any other network. Mid-task, the link of the worker running the task is
cut (``ip link set … down``: a partition, no TCP reset). Once the cut-off worker's
heartbeat in Redis is ``worker_lost_timeout`` old, the other worker must restore the task
and run it, and both clients must follow it there to its result.

Needs root, ``ip`` (iproute2) and ``redis-server``. Skipped with the reason otherwise; under
``CI=true`` it fails instead, so a green CI run always includes it.

This module is also the app the namespaced processes load (``-A tests.test_netns``) and
the client program they run (``python -m tests.test_netns starter|watcher …``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from interactive_tasks import App, InteractiveTask

#: seconds without a heartbeat before a worker's tasks go to another worker
LOST_AFTER = 4.0

app = App(
    "netns",
    namespace=os.environ.get("ITASK_TEST_NS", "it-netns"),
    worker_heartbeat=1.0,
    worker_lost_timeout=LOST_AFTER,
    broker_transport_options={
        # a broker behind a dead link never answers: give up instead of hanging
        "socket_timeout": 5,
        "socket_connect_timeout": 3,
    },
)

STEPS, STEP_DELAY = 32, 0.25


@app.task(base=InteractiveTask)
def journey(self: Any, n: int, delay: float) -> dict[str, Any]:
    """Reports progress for ``n * delay`` seconds; says where and in which delivery it ran."""
    for i in range(n):
        self.progress(i + 1, n)
        time.sleep(delay)
    return {"worker": self.request.hostname, "delivery": self.request.delivery}


# -- the client programs (run inside the client namespace) ----------
def _writer(path: str) -> Any:
    fh = open(path, "a", buffering=1)

    def emit(**data: Any) -> None:
        fh.write(json.dumps({"t": time.time(), **data}, default=str) + "\n")

    return emit


def _follow(handle: Any, emit: Any) -> None:
    for event in handle.events(timeout=90):
        emit(kind=event.kind, run=event.run, seq=event.seq, worker=handle.worker,
             current=event.current if event.kind == "progress" else None)
    emit(final=handle.state.value, result=handle.result(timeout=10), worker=handle.worker)


def _starter(out: str) -> None:
    emit = _writer(out)
    handle = journey.start(STEPS, STEP_DELAY)
    emit(id=handle.id)
    _follow(handle, emit)


def _watcher(task_id: str, out: str) -> None:
    emit = _writer(out)
    handle = app.attach(task_id, timeout=5)
    emit(attached=handle.state.value, worker=handle.worker)
    _follow(handle, emit)


# -- the test hosts ----------
SUBNET = "10.213.0"
REDIS_PORT = 6390
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ROOT = Path(__file__).resolve().parent.parent


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30,
                          check=check)


def _unavailable() -> str | None:
    """Why namespaces cannot be used here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (euid is %d)" % os.geteuid()
    for tool in ("ip", "redis-server", "redis-cli"):
        if shutil.which(tool) is None:
            return f"{tool!r} is not installed"
    probe = f"itprobe{os.getpid()}"
    out = _ip("netns", "add", probe, check=False)
    if out.returncode != 0:
        return f"'ip netns add' failed: {out.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _require_netns() -> None:
    reason = _unavailable()
    if reason is None:
        return
    message = f"test hosts need Linux network namespaces: {reason}"
    if IN_CI:
        pytest.fail(message + " (CI=true: this test must run)")
    pytest.skip(message)


@dataclass
class NetLab:
    """Namespaces ``<prefix>b/1/2/c`` on one bridge, and the processes started in them."""

    prefix: str
    tmp: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: dict[str, Path] = field(default_factory=dict)

    HOSTS = {"b": 1, "1": 11, "2": 12, "c": 20}

    def ns(self, host: str) -> str:
        return f"{self.prefix}{host}"

    def addr(self, host: str) -> str:
        return f"{SUBNET}.{self.HOSTS[host]}"

    def link(self, host: str) -> str:
        """The broker-side end of ``host``'s cable."""
        return f"{self.prefix}v{host}"

    def setup(self) -> None:
        b = self.ns("b")
        for host in self.HOSTS:
            _ip("netns", "add", self.ns(host))
            _ip("-n", self.ns(host), "link", "set", "lo", "up")
        _ip("-n", b, "link", "add", "br0", "type", "bridge")
        _ip("-n", b, "addr", "add", f"{self.addr('b')}/24", "dev", "br0")
        _ip("-n", b, "link", "set", "br0", "up")
        for host in ("1", "2", "c"):
            inner = f"{self.prefix}e{host}"
            _ip("link", "add", self.link(host), "netns", b, "type", "veth", "peer", "name",
                inner, "netns", self.ns(host))
            _ip("-n", b, "link", "set", self.link(host), "master", "br0")
            _ip("-n", b, "link", "set", self.link(host), "up")
            _ip("-n", self.ns(host), "addr", "add", f"{self.addr(host)}/24", "dev", inner)
            _ip("-n", self.ns(host), "link", "set", inner, "up")

    def start(self, host: str, name: str, argv: list[str],
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = self.tmp / f"{name}.log"
        self.logs[name] = log
        with open(log, "ab") as fh:
            proc = subprocess.Popen(["ip", "netns", "exec", self.ns(host), *argv], env=env,
                                    stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def run(self, host: str, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.ns(host), *argv],
                              capture_output=True, text=True, timeout=30)

    def cut(self, host: str) -> None:
        _ip("-n", self.ns("b"), "link", "set", self.link(host), "down")

    def log(self, name: str) -> str:
        path = self.logs.get(name)
        return path.read_text(errors="replace") if path and path.exists() else ""

    def teardown(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        for host in self.HOSTS:
            _ip("netns", "del", self.ns(host), check=False)


def _remove_stale_labs() -> None:
    """Namespaces left by a run that was killed (their creator pid is gone)."""
    out = _ip("netns", "list", check=False).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith("itn") and name[3:-1].isdigit():
            pid = int(name[3:-1])
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                _ip("netns", "del", name, check=False)
            except PermissionError:
                pass


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wait(predicate: Any, timeout: float, message: str, lab: NetLab) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {name} ---\n{lab.log(name)[-2500:]}" for name in lab.logs)
            raise AssertionError(f"timed out after {timeout}s waiting for {message}\n{logs}")
        time.sleep(0.05)


@dataclass
class Scenario:
    """What happened: the two clients' records and the names of the two workers."""

    first: str
    other: str
    starter: list[dict[str, Any]]
    watcher: list[dict[str, Any]]
    lab: NetLab


@pytest.fixture(scope="module")
def partition(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    """Run the scenario once: start, attach, cut the running worker's link, follow."""
    _require_netns()
    _remove_stale_labs()
    tmp = tmp_path_factory.mktemp("netns")
    lab = NetLab(f"itn{os.getpid()}", tmp)
    try:
        lab.setup()
        broker = f"redis://{lab.addr('b')}:{REDIS_PORT}/0"
        lab.start("b", "redis", ["redis-server", "--port", str(REDIS_PORT), "--bind",
                                 lab.addr("b"), "--save", "", "--appendonly", "no",
                                 "--protected-mode", "no", "--dir", str(tmp)])
        _wait(lambda: lab.run("c", "redis-cli", "-h", lab.addr("b"), "-p", str(REDIS_PORT),
                              "ping").stdout.strip() == "PONG", 15, "redis from host c", lab)
        home = tmp / "home"
        home.mkdir()
        env = dict(os.environ, ITASK_BROKER_URL=broker, ITASK_TEST_NS=f"n{uuid.uuid4().hex[:8]}",
                   ITASK_HOME=str(home), PYTHONUNBUFFERED="1",
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("ITASK_RESULT_BACKEND", None)
        workers = {"1": "wa@host1", "2": "wb@host2"}
        for host, name in workers.items():
            lab.start(host, name, [sys.executable, "-m", "interactive_tasks.cli.main", "worker",
                                   "-A", "tests.test_netns", "-n", name, "-c", "1", "-l",
                                   "info"], env)
        for name in workers.values():
            _wait(lambda name=name: f"worker {name} ready" in lab.log(name), 30,
                  f"{name} to start", lab)

        starter_out, watcher_out = tmp / "starter.jsonl", tmp / "watcher.jsonl"
        lab.start("c", "starter", [sys.executable, "-m", "tests.test_netns", "starter",
                                   str(starter_out)], env)
        started = _wait(lambda: next((r for r in _lines(starter_out)
                                      if r.get("kind") == "started"), None),
                        30, "the task to start", lab)
        first = started["worker"]
        task_id = _lines(starter_out)[0]["id"]
        lab.start("c", "watcher", [sys.executable, "-m", "tests.test_netns", "watcher",
                                   task_id, str(watcher_out)], env)
        _wait(lambda: any(r.get("kind") == "progress" for r in _lines(watcher_out)), 30,
              "the watcher to see progress", lab)
        _wait(lambda: any((r.get("current") or 0) >= 4 for r in _lines(starter_out)), 30,
              "the task to be under way", lab)
        host = next(h for h, name in workers.items() if name == first)
        lab.cut(host)
        cut_at = time.time()
        other = next(name for name in workers.values() if name != first)
        for out in (starter_out, watcher_out):
            with contextlib.suppress(AssertionError):
                _wait(lambda out=out: any("final" in r for r in _lines(out)), 75,
                      f"{out.name} to see the end", lab)
        scenario = Scenario(first, other, _lines(starter_out), _lines(watcher_out), lab)
        scenario.starter.insert(0, {"cut_at": cut_at})
        yield scenario
    finally:
        lab.teardown()


def _after_cut(records: list[dict[str, Any]], cut_at: float) -> list[dict[str, Any]]:
    return [r for r in records if r.get("t", 0) > cut_at]


def test_task_is_delivered_again_to_the_other_worker(partition: Scenario):
    cut_at = partition.starter[0]["cut_at"]
    records = partition.starter[1:]
    runs = {(r["run"], r["worker"]) for r in records if r.get("kind") == "started"}
    assert (1, partition.first) in runs, records
    assert (2, partition.other) in runs, (
        f"no second run on {partition.other}:\n{json.dumps(records, indent=1)}\n"
        f"{partition.lab.log(partition.other)[-3000:]}")
    final = records[-1]
    assert final.get("final") == "succeeded", records[-5:]
    assert final["result"] == {"worker": partition.other, "delivery": 2}
    # the starter followed the second run's progress, not only its result
    assert any(r.get("kind") == "progress" and r["run"] == 2
               for r in _after_cut(records, cut_at)), records


def test_a_watcher_that_attached_follows_the_task_to_the_other_worker(partition: Scenario):
    records = partition.watcher
    assert records and records[0].get("worker") in (partition.first, None), records[:3]
    assert any(r.get("kind") == "progress" and r.get("run") == 1 for r in records)
    final = records[-1] if records else {}
    assert final.get("final") == "succeeded", json.dumps(records[-8:], indent=1)
    assert final["result"] == {"worker": partition.other, "delivery": 2}
    assert final["worker"] == partition.other


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "starter":
        _starter(sys.argv[2])
    elif role == "watcher":
        _watcher(sys.argv[2], sys.argv[3])
    else:
        sys.exit(f"unknown role {role!r}")
    app.close()
