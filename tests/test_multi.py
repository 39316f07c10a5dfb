"""``itask multi``: argument parsing, and a real cluster of workers on Redis.

The cluster test starts two nodes in the background, checks status and ping, restarts them
one by one while a task runs (it must complete exactly once and no queued task may be
lost), then stops them with ``stopwait``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from interactive_tasks.cli.multi import (
    MultiUsageError,
    expand_node_name,
    is_alive,
    node_format,
    parse_args,
)

from .conftest import ROOT, BrokerEnv, make_broker_env, wait_for

HOST = socket.gethostname()


# -- parsing (no processes) ----------
def test_node_names_and_file_name_formats(tmp_path: Path):
    assert expand_node_name("w1", "box") == "w1@box"
    assert expand_node_name("w1@%h", "box") == "w1@box"
    assert expand_node_name("w1@other", "box") == "w1@other"
    assert node_format("%n.pid", "w1@box.example.com") == "w1.pid"
    assert node_format("%n%I.log", "w1@box.example.com") == "w1.log"
    assert node_format("%p-%h-%d-%i-%%.x", "w1@box.example.com") == \
        "w1@box.example.com-box.example.com-example.com-0-%.x"
    args = parse_args(["start", "w1", "w2", "-A", "proj"], hostname="box", cwd=tmp_path)
    assert [n.name for n in args.nodes] == ["w1@box", "w2@box"]
    assert [n.pidfile for n in args.nodes] == [tmp_path / "w1.pid", tmp_path / "w2.pid"]
    assert [n.logfile for n in args.nodes] == [tmp_path / "w1.log", tmp_path / "w2.log"]
    args = parse_args(["stop", "3"], hostname="box", cwd=tmp_path)
    assert [n.name for n in args.nodes] == ["w1@box", "w2@box", "w3@box"]
    args = parse_args(["start", "a", "--piddir", "/run/it", "--logdir", "logs",
                       "--logfile", "/var/log/%p.log"], hostname="box", cwd=tmp_path)
    assert args.nodes[0].pidfile == Path("/run/it/a.pid")
    assert args.nodes[0].logfile == Path("/var/log/a@box.log")  # absolute wins over --logdir


def test_options_common_and_per_node(tmp_path: Path):
    args = parse_args(["start", "w1", "w2", "w3", "-A", "proj", "-c", "2", "-P", "threads",
                       "-c:w2", "4", "--queues:1,3=a,b", "-l", "debug", "--no-wait",
                       "--timeout", "9"], hostname="h", cwd=tmp_path)
    w1, w2, w3 = args.nodes
    assert args.app == "proj" and not args.wait and args.timeout == 9.0
    assert w1.options == ["-A", "proj", "-c", "2", "-P", "threads", "-l", "debug",
                          "--queues", "a,b"]
    assert w2.options == ["-A", "proj", "-P", "threads", "-l", "debug", "-c", "4"]
    assert w3.options == w1.options
    assert w2.argv()[:6] == [sys.executable, "-m", "interactive_tasks.cli.main", "worker",
                             "-n", "w2@h"]
    # a range of positions; the long form replaces the short one
    args = parse_args(["start", "w1", "-E", "-c", "3", "--task-events:w1"], hostname="h")
    assert args.nodes[0].options == ["-c", "3", "--task-events"]  # -E == --task-events
    args = parse_args(["start", "x", "y", "z", "-c", "1", "--concurrency:2-3", "8"],
                      hostname="h", cwd=tmp_path)
    assert [n.options for n in args.nodes] == [["-c", "1"], ["--concurrency", "8"],
                                               ["--concurrency", "8"]]


@pytest.mark.parametrize("argv, message", [
    (["launch", "w1"], "unknown multi command"),
    (["start"], "give node names"),
    (["start", "w1", "-c:w9", "2"], "selects no node"),
    (["start", "w1", "-n", "x@y"], "not with -n"),
    (["start", "w1", "w1"], "repeat"),
    (["start", "w1", "--timeout", "soon"], "--timeout needs seconds"),
    (["start", "w1", "-A", "proj", "w2"], "node names come before the options"),
    (["start", "w1", "--piddir:w1", "x"], "cannot be given per node"),
])
def test_usage_errors(argv: list[str], message: str):
    with pytest.raises(MultiUsageError, match=message):
        parse_args(argv, hostname="h")


# -- a real cluster ----------
def _multi(env: BrokerEnv, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "interactive_tasks.cli.main", "multi", *argv],
        env=env.env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest):
    """A Redis broker space, the tests' app, and cleanup of every node multi started."""
    env = make_broker_env("redis", tmp_path)
    env.apply(monkeypatch)
    import tests.apps.tasks as tasks_module

    tasks = importlib.reload(tasks_module)
    run_dir, log_dir = tmp_path / "run", tmp_path / "log"
    seen: set[int] = set()

    def note_pids() -> None:
        for path in run_dir.glob("*.pid"):
            pid = _pid(path)
            if pid:
                seen.add(pid)

    state: dict[str, Any] = {"env": env, "tasks": tasks, "run": run_dir, "log": log_dir,
                             "note": note_pids}
    yield state
    note_pids()
    tasks.app.close()
    for pid in seen:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for log in sorted(log_dir.glob("*.log")):
            sys.stderr.write(f"\n--- {log.name} ---\n{log.read_text()[-4000:]}\n")


def test_cluster_start_status_ping_restart_stopwait(cluster: dict[str, Any], tmp_path: Path):
    env, tasks, run_dir, log_dir = (cluster[k] for k in ("env", "tasks", "run", "log"))
    opts = ["-A", "tests.apps.tasks", "-c", "1", "-c:w2", "2", "--piddir", str(run_dir),
            "--logdir", str(log_dir)]
    names = [f"w1@{HOST}", f"w2@{HOST}"]

    out = _multi(env, "start", "w1", "w2", *opts)
    cluster["note"]()
    assert out.returncode == 0, out.stdout + out.stderr
    for name in names:
        assert f"{name}: OK" in out.stdout, out.stdout
    first = {n: _pid(run_dir / f"{n.split('@')[0]}.pid") for n in names}
    assert all(pid and is_alive(pid) for pid in first.values()), first
    assert (log_dir / "w1.log").exists() and (log_dir / "w2.log").exists()

    again = _multi(env, "start", "w1", "w2", *opts)
    assert again.returncode == 0 and again.stdout.count("already running") == 2, again.stdout

    status = _multi(env, "status", "w1", "w2", *opts)
    assert status.returncode == 0, status.stdout + status.stderr
    for name in names:
        assert f"{name}: running (pid {first[name]}), answers ping" in status.stdout

    replies = tasks.app.ping(timeout=5, expect=2)
    assert sorted(r["worker"] for r in replies) == names
    stats = {r["worker"]: r["data"] for r in tasks.app.inspect("stats", timeout=5, expect=2)}
    assert stats[names[0]]["concurrency"] == 1 and stats[names[1]]["concurrency"] == 2
    assert stats[names[0]]["pid"] == first[names[0]]

    # Restart while a task runs: it must finish exactly once, and tasks queued around the
    # restart must all run.
    marker = str(tmp_path / "ran")
    slow = tasks.slow_marked.delay(marker, 2.0, "r1")
    wait_for(lambda: Path(marker + ".started").exists(), 20, message="the slow task to start")
    queued = [tasks.add.delay(i, i) for i in range(20)]
    restart = _multi(env, "restart", "w1", "w2", *opts)
    cluster["note"]()
    assert restart.returncode == 0, restart.stdout + restart.stderr
    lines = restart.stdout.splitlines()

    def at(text: str) -> int:
        return next(i for i, line in enumerate(lines) if text in line)

    # one node at a time: w1 is back and answering before w2 is stopped
    assert at(f"{names[0]}: TERM") < at(f"{names[0]}: stopped") < at(f"{names[0]}: OK") \
        < at(f"{names[1]}: TERM") < at(f"{names[1]}: stopped") < at(f"{names[1]}: OK"), \
        restart.stdout
    assert slow.result(timeout=30) == "r1"
    assert Path(marker).read_text().splitlines() == ["r1"]  # completed exactly once
    assert len(Path(marker + ".started").read_text().splitlines()) == 1  # never re-run
    assert [h.result(timeout=30) for h in queued] == [2 * i for i in range(20)]
    second = {n: _pid(run_dir / f"{n.split('@')[0]}.pid") for n in names}
    for name in names:
        assert second[name] and second[name] != first[name]
        assert not is_alive(first[name])
    replies = tasks.app.ping(timeout=5, expect=2)
    assert sorted(r["worker"] for r in replies) == names

    stop = _multi(env, "stopwait", "w1", "w2", *opts)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert stop.stdout.count(": stopped") == 2, stop.stdout
    for name in names:
        pid = second[name]
        assert pid is not None and not is_alive(pid)
    assert list(run_dir.glob("*.pid")) == []
    status = _multi(env, "status", "w1", "w2", *opts, "--timeout", "0.5")
    assert status.returncode == 1
    assert f"{names[0]}: stopped" in status.stdout and f"{names[1]}: stopped" in status.stdout


def test_failed_start_is_reported_and_stale_pidfile_removed(cluster: dict[str, Any]):
    env, run_dir, log_dir = (cluster[k] for k in ("env", "run", "log"))
    dirs = ["--piddir", str(run_dir), "--logdir", str(log_dir)]
    # an app that cannot be imported: usage error, no worker started
    out = _multi(env, "start", "bad", "-A", "tests.apps.no_such_module", *dirs)
    assert out.returncode == 2 and "no_such_module" in out.stderr, out.stdout + out.stderr
    assert not (run_dir / "bad.pid").exists()
    # a worker that exits during start: reported with its log tail
    out = _multi(env, "start", "bad", "-A", "tests.apps.tasks", "-P", "nonsense", *dirs,
                 "--timeout", "20")
    cluster["note"]()
    assert out.returncode == 1
    assert f"bad@{HOST}: FAILED: exited during start" in out.stdout, out.stdout
    assert "invalid choice: 'nonsense'" in out.stdout  # the log tail says why
    # a pid file naming a live process that is not this node's worker is stale
    (run_dir / "ghost.pid").write_text(f"{os.getpid()}\n")
    status = _multi(env, "status", "ghost", "-A", "tests.apps.tasks", *dirs, "--timeout", "0.5")
    assert status.returncode == 1 and f"ghost@{HOST}: stopped" in status.stdout
    assert not (run_dir / "ghost.pid").exists()
    stop = _multi(env, "stop", "ghost", *dirs)
    assert stop.returncode == 0 and "not running" in stop.stdout
