"""The task queue on its own: every broker × every pool, real worker subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from interactive_tasks import TaskFailed, TaskState
from interactive_tasks.errors import PayloadTooLarge

from .conftest import POOLS, ROOT, wait_for


@pytest.mark.parametrize("pool", POOLS)
def test_delay_result_and_failure(tasks, start_worker, pool):
    start_worker(pool=pool)
    assert tasks.add.delay(2, 3).result(timeout=20) == 5
    assert tasks.add.apply_async((4,), {"y": 5}).result(timeout=10) == 9
    assert tasks.add.s(1, 1).delay().result(timeout=10) == 2
    assert tasks.deploy.delay("prod").result(timeout=10) == "deployed prod"

    handle = tasks.fail.delay("boom")
    with pytest.raises(TaskFailed) as info:
        handle.result(timeout=10)
    assert info.value.remote_type == "ValueError"
    assert info.value.remote_message == "boom"
    assert 'raise ValueError(message)' in info.value.remote_traceback
    assert handle.state is TaskState.FAILED


def test_many_tasks_all_results(tasks, start_worker):
    start_worker(concurrency=2)
    handles = [tasks.add.delay(i, i) for i in range(200)]
    assert [h.result(timeout=60) for h in handles] == [2 * i for i in range(200)]


def test_result_from_another_process(tasks, start_worker, broker):
    start_worker()
    handle = tasks.add.delay(20, 22)
    assert handle.result(timeout=20) == 42
    code = (
        "import tests.apps.tasks as t; h = t.app.attach(%r); "
        "print(h.state.value, h.result(timeout=10))" % handle.id
    )
    out = subprocess.run([sys.executable, "-c", code], env=broker.env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["succeeded", "42"]


def test_bind_gives_request(tasks, start_worker):
    w = start_worker()
    info = tasks.whoami.delay().result(timeout=20)
    assert info["hostname"] == w.name
    assert info["delivery"] == 1
    assert len(info["id"]) == 36


def test_ping_and_inspect(tasks, start_worker):
    w = start_worker(concurrency=2)
    replies = tasks.app.ping(timeout=10, expect=1)
    assert [r["worker"] for r in replies] == [w.name]
    registered = tasks.app.inspect("registered", timeout=10, expect=1)[0]["data"]
    assert "tests.apps.tasks.add" in registered and "tests.deploy" in registered
    stats = tasks.app.inspect("stats", timeout=10, expect=1)[0]["data"]
    assert stats["pool"] == "prefork" and stats["concurrency"] == 2
    assert len(stats["children"]) == 2
    assert all(c["pid"] in w.children() for c in stats["children"])

    handle = tasks.sleep_then.delay(2, "x")
    active = wait_for(lambda: tasks.app.inspect("active", timeout=1, expect=1)[0]["data"],
                      message="the task to show as active")
    assert active[0]["id"] == handle.id
    assert handle.result(timeout=10) == "x"


def test_oversized_payload_refused_by_sender(tasks, start_worker):
    with pytest.raises(PayloadTooLarge):
        tasks.add.delay("x" * (2 * 1024 * 1024), "y")


def test_child_killed_mid_task_is_redelivered(tasks, start_worker, tmp_path: Path):
    w = start_worker(concurrency=1)
    marker = str(tmp_path / "ran")
    handle = tasks.slow_marked.delay(marker, 1.0, "k1")
    started = wait_for(lambda: Path(marker + ".started").exists()
                       and Path(marker + ".started").read_text(), message="task start")
    child_pid = int(started.split()[1])
    os.kill(child_pid, signal.SIGKILL)
    assert handle.result(timeout=30) == "k1"
    assert Path(marker).read_text().splitlines() == ["k1"]  # completed exactly once
    assert "killed by SIGKILL" in w.log()
    # the pool was refilled and keeps serving
    assert tasks.add.delay(1, 2).result(timeout=20) == 3


def test_warm_shutdown_finishes_running_task(tasks, start_worker, tmp_path: Path):
    w = start_worker(concurrency=1)
    marker = str(tmp_path / "ran")
    handle = tasks.slow_marked.delay(marker, 1.0, "k3")
    wait_for(lambda: Path(marker + ".started").exists(), message="task start")
    w.signal(signal.SIGTERM)
    assert w.proc.wait(30) == 0
    assert handle.result(timeout=10) == "k3"


def test_unique_task_ids(tasks, start_worker):
    """Each call gets its own id, the task runs under it, and a given id is the one used."""
    start_worker()
    handles = [tasks.whoami.delay() for _ in range(20)]
    ids = [h.id for h in handles]
    assert len(set(ids)) == len(ids), ids
    # each handle gets its own task's result: the task saw the id its handle holds
    assert [h.result(timeout=30)["id"] for h in handles] == ids
    tid = f"order-{uuid.uuid4().hex[:8]}"
    given = tasks.whoami.apply_async(task_id=tid)
    assert given.id == tid
    assert given.result(timeout=20)["id"] == tid
    assert tasks.app.attach(tid).result(timeout=10)["id"] == tid  # stored under that id


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_max_tasks_per_child_replaces_the_pool_process(tasks, start_worker):
    w = start_worker(concurrency=1, extra_args=["--max-tasks-per-child", "2"])
    pids = [tasks.whoami.delay().result(timeout=20)["pid"] for _ in range(5)]
    first, second, third = pids[0], pids[2], pids[4]
    assert pids == [first, first, second, second, third], pids
    assert len({first, second, third}) == 3, pids
    assert "while idle" not in w.log()  # retired on purpose, not taken for a crash


def test_settings_refuse_unknown_names_and_impossible_values():
    from interactive_tasks import App, ConfigurationError

    with pytest.raises(ConfigurationError, match=r"unknown setting.*worker_switch_intervall"):
        App("bad", worker_switch_intervall=0.001)
    for bad in (0, -1.0, "fast"):
        with pytest.raises(ConfigurationError, match="worker_switch_interval must be"):
            App("bad", worker_switch_interval=bad)
    app = App("ok", worker_switch_interval=None)  # None keeps Python's own interval
    with pytest.raises(ConfigurationError, match="worker_switch_interval must be"):
        app.configure(worker_switch_interval=0)
    assert app.conf.worker_switch_interval is None  # the refused change left nothing behind
    for bad in (-1, 20, 2.5, True, "low"):
        with pytest.raises(ConfigurationError, match="worker_task_nice must be"):
            App("bad", worker_task_nice=bad)
    assert App("ok", worker_task_nice=None).conf.worker_task_nice is None
    assert App("ok").conf.worker_task_nice == 5
