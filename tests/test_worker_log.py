"""The worker's per-task log lines, in Celery's words: received and succeeded at INFO, a
failure with its traceback at ERROR."""

from __future__ import annotations

import re

import pytest

from interactive_tasks import TaskFailed

from .conftest import WorkerProcess, wait_for

BROKERS = pytest.mark.parametrize("broker", ["redis", "amqp"], indirect=True)


@BROKERS
def test_worker_logs_each_task_as_celery_does(tasks, start_worker):
    w = start_worker()  # -l info
    ok = tasks.add.delay(2, 3)
    assert ok.result(timeout=20) == 5
    bad = tasks.fail.delay("no such file")
    with pytest.raises(TaskFailed):
        bad.result(timeout=20)
    name = tasks.add.name
    wait_for(lambda: f"Task {name}[{ok.id}] succeeded in" in w.log(), 10,
             message="the succeeded line")
    log = w.log()
    assert f"INFO/MainProcess] interactive_tasks.worker: Task {name}[{ok.id}] received" in log
    assert re.search(rf"Task {re.escape(name)}\[{ok.id}\] succeeded in \d+\.\d+s: 5\n", log)
    wait_for(lambda: f"Task {tasks.fail.name}[{bad.id}] raised" in w.log(), 10,
             message="the failure line")
    failure = w.log().split(f"Task {tasks.fail.name}[{bad.id}] raised", 1)[1]
    assert failure.startswith(" ValueError: no such file\nTraceback (most recent call last):")
    assert "ERROR/MainProcess] interactive_tasks.worker: Task " in w.log()


@BROKERS
def test_the_default_level_logs_failures_only(tasks, broker, tmp_path):
    w = WorkerProcess(broker, tmp_path, extra_args=["-l", "warning"])  # no "ready" line
    try:
        wait_for(lambda: tasks.app.ping(timeout=0.5, expect=1) or w.proc.poll() is not None,
                 20, message="the worker to answer a ping")
        assert tasks.add.delay(1, 1).result(timeout=20) == 2
        bad = tasks.fail.delay("x")
        with pytest.raises(TaskFailed):
            bad.result(timeout=20)
        wait_for(lambda: f"[{bad.id}] raised ValueError" in w.log(), 10,
                 message="the failure line")
        assert "received" not in w.log() and "succeeded in" not in w.log(), w.log()
    finally:
        w.stop()


def test_result_repr_is_cut_to_about_100_characters():
    from interactive_tasks.worker.outcomes import RESULT_REPR_MAX, result_repr

    assert result_repr({"a": 1}) == "{'a': 1}"
    long = result_repr("y" * 1000)
    assert len(long) <= RESULT_REPR_MAX and "..." in long
    assert len(result_repr(list(range(10**6)))) <= RESULT_REPR_MAX
