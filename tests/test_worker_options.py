"""Celery's worker options on real ``itask worker`` processes: worker-wide time limits,
``-O fair``, ``--max-memory-per-child``, ``--autoscale`` (with ``pool_grow`` /
``pool_shrink``) and ``-B``."""

from __future__ import annotations

import time

import pytest

from interactive_tasks import TaskFailed

from .conftest import wait_for

pytestmark = pytest.mark.parametrize("broker", ["redis"], indirect=True)


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
