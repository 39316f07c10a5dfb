"""Celery's worker options on real ``itask worker`` processes: worker-wide time limits,
``-O fair``, ``--max-memory-per-child``, ``--autoscale`` (with ``pool_grow`` /
``pool_shrink``) and ``-B``."""

from __future__ import annotations

import time

import pytest

from interactive_tasks import TaskFailed

from .conftest import wait_for
from .test_remote_control import operator  # noqa: F401 (a fixture)

#: the worker options do not depend on the broker: Redis stands for all
on_redis = pytest.mark.parametrize("broker", ["redis"], indirect=True)


@on_redis
def test_worker_time_limits_apply_to_tasks_without_their_own(tasks, start_worker, broker):
    start_worker(pool="prefork", concurrency=2,
                 extra_args=["--time-limit", "2", "--soft-time-limit", "0.5", "-O", "fair"])
    started = time.monotonic()
    plain = tasks.outlive_soft.delay(30)
    own = tasks.own_limits.delay(3)  # its own limits (30 s / 20 s) win over the worker's
    with pytest.raises(TaskFailed) as info:
        plain.result(timeout=20)
    assert info.value.remote_type == "TimeLimitExceeded"
    assert time.monotonic() - started < 15
    soft = [r for path in broker.record_dir.glob("*.jsonl")
            for r in broker.records(path.stem) if r["what"] == "soft"]
    assert len(soft) == 1  # the soft limit came first, at 0.5 s
    assert own.result(timeout=20) == "finished"


@on_redis
def test_beat_inside_the_worker(broker, start_worker, tmp_path):
    """``-B``: the worker runs the app's beat beside it; it stops with the worker."""
    label = "embedded"
    broker.extra.update({"BEAT_TEST_EVERY": "0.5", "BEAT_TEST_LABEL": label})
    w = start_worker(pool="threads", concurrency=2,
                     extra_args=["-A", "tests.apps.beat_app", "-B"])
    path = broker.record_dir / f"runs-{label}.txt"

    def runs() -> int:
        return len(path.read_text().splitlines()) if path.exists() else 0

    wait_for(lambda: runs() >= 3, 15, message="three runs sent by the embedded beat")
    assert len(w.children()) == 1  # the threads pool forks nothing: that is the beat
    assert "beat beat-tests starting" in w.log()
    assert w.stop() == 0
    assert "beat beat-tests stopped" in w.log()  # stopped cleanly (its lock released)


@on_redis
def test_max_memory_per_child_replaces_the_process_after_its_task(tasks, start_worker):
    from interactive_tasks import TaskState

    w = start_worker(pool="prefork", concurrency=1,
                     extra_args=["--max-memory-per-child", "100000"])  # 100 MB
    small = tasks.grow.delay(1).result(timeout=20)
    assert tasks.grow.delay(1).result(timeout=20) == {"pid": small["pid"], "kept": 2}
    # This task takes its process past the limit: it completes, then the process goes.
    big = tasks.grow.delay(120)
    assert big.result(timeout=30) == {"pid": small["pid"], "kept": 122}
    assert big.state is TaskState.SUCCEEDED
    after = tasks.grow.delay(1).result(timeout=20)
    assert after["pid"] != small["pid"] and after["kept"] == 1  # a fresh process
    assert f"pool process {small['pid']} uses" in w.log()
    stats = wait_for(lambda: tasks.app.inspect("stats"), message="stats")
    assert [c["pid"] for c in stats[0]["data"]["children"]] == [after["pid"]]


def _children(tasks, name: str) -> list[dict]:
    replies = [r for r in tasks.app.inspect("stats", timeout=1.0)
               if r.get("worker") == name]
    return replies[0]["data"]["children"] if replies else []


@pytest.mark.parametrize("broker", ["redis", "amqp"], indirect=True)
def test_autoscale_grows_under_a_backlog_and_shrinks_when_idle(tasks, start_worker, broker):
    import json
    import subprocess
    import sys

    from .conftest import ROOT

    w = start_worker(pool="prefork", concurrency=1,
                     extra_args=["--autoscale", "4,1", "--autoscale-keepalive", "2"])
    first = wait_for(lambda: _children(tasks, w.name), message="stats")
    assert len(first) == 1
    handles = [tasks.sleep_then.delay(3, i) for i in range(4)]
    # A backlog of 4: the pool grows to 4 and runs them all at once.
    grown = wait_for(lambda: [c for c in _children(tasks, w.name) if c["state"] == "busy"]
                     if len([c for c in _children(tasks, w.name) if c["state"] == "busy"]) == 4
                     else None, timeout=15, message="four busy pool processes")
    assert len({c["pid"] for c in grown}) == 4
    # itask inspect stats shows the same pids
    out = subprocess.run([sys.executable, "-m", "interactive_tasks.cli.main", "inspect",
                          "stats", "-A", "tests.apps.tasks", "--json"],
                         env=broker.env(), cwd=str(ROOT),
                         capture_output=True, text=True, timeout=30)
    stats = json.loads(out.stdout)
    shown = next(v for k, v in stats.items() if k == w.name)
    assert {c["pid"] for c in shown["children"]} == {c["pid"] for c in grown}
    assert shown["autoscaler"]["max"] == 4 and shown["autoscaler"]["min"] == 1
    assert [h.result(timeout=20) for h in handles] == [0, 1, 2, 3]
    # Idle: back to one process after the keepalive, a process that was there before.
    wait_for(lambda: len(_children(tasks, w.name)) == 1, timeout=15, message="shrunk to 1")
    [left] = _children(tasks, w.name)
    assert left["pid"] in {c["pid"] for c in grown}
    assert "growing the pool from 1 to" in w.log() and "pool shrunk to 1" in w.log()
    assert tasks.add.delay(2, 3).result(timeout=20) == 5  # and it still serves


def test_autoscaler_decisions() -> None:
    from interactive_tasks.worker.autoscale import Autoscaler, parse_autoscale

    now = [100.0]
    scaler = Autoscaler(4, 1, keepalive=30, clock=lambda: now[0])
    assert scaler.grow_by(size=1, demand=3) == 2
    assert scaler.grow_by(size=3, demand=9) == 1  # never past MAX
    assert scaler.grow_by(size=4, demand=2) == 0
    now[0] += 29
    assert scaler.shrink_by(size=4, demand=0) == 0  # not before the keepalive
    now[0] += 2
    assert scaler.shrink_by(size=4, demand=2) == 2  # down to what the work needs
    assert scaler.shrink_by(size=4, demand=0) == 3  # never below MIN
    assert parse_autoscale("10,3") == (10, 3)
    assert parse_autoscale("3,10") == (10, 3)  # either order, as Celery
    assert parse_autoscale("5") == (5, 0)
    for bad in ("", "a,b", "0", "1,2,3", "-1,2"):
        with pytest.raises(ValueError):
            parse_autoscale(bad)


# the reservation follows the pool's size: kombu's QoS on RabbitMQ, the fetch's on Redis
@pytest.mark.parametrize("broker", ["redis", "amqp"], indirect=True)
@pytest.mark.usefixtures("operator")
def test_pool_grow_and_shrink_by_remote_control(tasks, start_worker, broker):
    from .test_remote_control import itask

    w = start_worker(pool="prefork", concurrency=1)
    [first] = wait_for(lambda: _children(tasks, w.name), message="stats")
    out = itask(broker, "control", "pool_grow", "5", "-d", w.name, "--timeout", "5")
    assert out.returncode == 0 and f"{w.name}: OK pool grew by 5 to 6" in out.stdout, out
    # Six at once: the worker reserves for six slots now (it reserved 4 with one).
    handles = [tasks.sleep_then.delay(3, i) for i in range(6)]
    busy = wait_for(lambda: (lambda cs: cs if len(cs) == 6 else None)(
        [c for c in _children(tasks, w.name) if c["state"] == "busy"]),
        timeout=20, message="six busy pool processes")
    assert len({c["pid"] for c in busy}) == 6 and first["pid"] in {c["pid"] for c in busy}
    with_all_busy = tasks.app.control.pool_shrink(2, destination=w.name, timeout=5)
    assert "no idle slot" in with_all_busy[0][w.name]["error"]
    assert [h.result(timeout=20) for h in handles] == list(range(6))
    replies = tasks.app.control.pool_shrink(4, destination=w.name, timeout=5)
    assert replies == [{w.name: {"ok": "pool shrank by 4 to 2"}}]
    left = wait_for(lambda: (lambda cs: cs if len(cs) == 2 else None)(
        _children(tasks, w.name)), message="two pool processes left")
    assert {c["pid"] for c in left} <= {c["pid"] for c in busy}
    wait_for(lambda: len(w.children()) == 2, message="the stopped processes gone")
    assert tasks.add.delay(1, 2).result(timeout=20) == 3
    refused = tasks.app.control.autoscale(4, 1, destination=w.name, timeout=5)
    assert "not started with --autoscale" in refused[0][w.name]["error"]


@on_redis
@pytest.mark.usefixtures("operator")
def test_autoscale_range_by_remote_control(tasks, start_worker):
    w = start_worker(pool="threads", concurrency=1, extra_args=["--autoscale", "3,1"])
    refused = tasks.app.control.pool_grow(1, destination=w.name, timeout=5)
    assert "not supported with --autoscale" in refused[0][w.name]["error"]
    replies = tasks.app.control.autoscale(5, 2, destination=w.name, timeout=5)
    assert replies == [{w.name: {"ok": "autoscale now max=5 min=2"}}]
    wait_for(lambda: len(_children(tasks, w.name)) == 2, message="grown to the new minimum")
    stats = tasks.app.control.inspect(destination=w.name, timeout=5).stats()[w.name]
    assert stats["autoscaler"]["max"] == 5 and stats["concurrency"] == 5


@on_redis
def test_fair_no_task_waits_behind_a_busy_process(tasks, start_worker):
    """``-O fair`` (and this worker's only way): a reserved task goes to an idle process,
    never into the queue of a busy one, so short tasks pass a long one."""
    from interactive_tasks import TaskState

    start_worker(pool="prefork", concurrency=2, extra_args=["-O", "fair"])
    long = tasks.sleep_then.apply_async((6, "long"), watch="all")
    wait_for(lambda: long.state is TaskState.RUNNING, message="the long task running")
    short = [tasks.sleep_then.delay(0.2, i) for i in range(6)]
    assert [h.result(timeout=4) for h in short] == list(range(6))  # all on the free one
    assert long.state is TaskState.RUNNING
    assert long.result(timeout=20) == "long"
