"""Signals (``interactive_tasks.signals``) on a real prefork worker: each fires once, in
the process Celery fires it in, with Celery's arguments; a receiver that raises never
changes a task's outcome; a database connection opened in ``worker_process_init`` serves
the tasks of its own pool process."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from interactive_tasks import EventKind, TaskFailed, signals
from tests.conftest import BrokerEnv, WorkerProcess, wait_for

APP = ["-A", "tests.apps.everyday"]


@pytest.fixture
def everyday(broker: BrokerEnv) -> Iterator[Any]:
    import tests.apps.everyday as module

    _disconnect_all()
    module = importlib.reload(module)  # its receivers, connected once
    yield module
    module.app.close()
    _disconnect_all()


def _disconnect_all() -> None:
    for name in signals.__all__:
        sig = getattr(signals, name)
        if isinstance(sig, signals.Signal):
            for receiver in sig.receivers:
                sig.disconnect(receiver)


def _of(notes: list[dict[str, Any]], what: str, task_id: str | None = None
        ) -> list[dict[str, Any]]:
    return [n for n in notes if n["what"] == what and
            (task_id is None or n.get("task_id") == task_id)]


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_every_signal_fires_once_in_the_right_process(
        broker: BrokerEnv, everyday: Any, start_worker: Callable[..., WorkerProcess]
) -> None:
    import os

    worker = start_worker(pool="prefork", concurrency=2, extra_args=APP)
    children = set(worker.children())
    assert len(children) == 2

    ok = everyday.double.delay(21)
    value = ok.result(timeout=20)
    assert value["value"] == 42
    run_pid = value["pid"]
    assert run_pid in children
    # before_task_publish's headers travel with the task (the tracing pattern)
    assert value["trace"] == f"trace-{ok.id}"

    failed = everyday.boom.delay("bad input")
    with pytest.raises(TaskFailed):
        failed.result(timeout=20)
    retried = everyday.flaky.delay()
    assert retried.result(timeout=20) == 1
    survived = everyday.double.delay(1, prerun_raises=True)
    assert survived.result(timeout=20)["value"] == 2
    expired = everyday.double.apply_async((3,), countdown=1.0, expires=0.5)
    expired.wait(timeout=20)
    assert expired.state == "revoked"
    cancelled = everyday.waits.start(30)
    events = cancelled.events(timeout=20)
    first = next(e for e in events if e.kind == EventKind.MESSAGE)
    assert first.data == "hello from task_prerun"  # the receiver used the task
    assert cancelled.cancel()
    cancelled.wait(timeout=20)
    assert cancelled.state == "cancelled"

    notes = wait_for(lambda: (n := everyday.notes(broker.record_dir)) and
                     _of(n, "task_revoked", cancelled.id) and n, 10,
                     message="task_revoked of the cancelled task")

    # publishing: in this process, once per task, with the task's name and queue
    for handle in (ok, failed, retried, survived, expired, cancelled):
        before = _of(notes, "before_task_publish", handle.id)
        after = _of(notes, "after_task_publish", handle.id)
        assert len(before) == 1 and len(after) == 1, handle
        assert before[0]["pid"] == after[0]["pid"] == os.getpid()
        assert before[0]["sender"] == handle.name
        assert before[0]["routing_key"] == f"{broker.namespace}.tasks.default"
        assert before[0]["body_id"] == handle.id

    # a success: prerun, success, postrun, once each, in the pool process that ran it
    for what in ("task_prerun", "task_success", "task_postrun"):
        [fired] = _of(notes, what, ok.id)
        assert fired["pid"] == run_pid, what
        assert fired["sender"] == "tests.apps.everyday.double"
    [prerun] = _of(notes, "task_prerun", ok.id)
    assert prerun["same"] and prerun["args"] == [21] and prerun["kwargs"] == {}
    assert prerun["request_id"] == ok.id  # self.request is the running task's
    [success] = _of(notes, "task_success", ok.id)
    assert success["result"]["value"] == 42
    [postrun] = _of(notes, "task_postrun", ok.id)
    assert postrun["state"] == "succeeded" and "42" in postrun["retval"]

    # a failure
    [failure] = _of(notes, "task_failure", failed.id)
    assert failure["exception"] == "ValueError: bad input"
    assert failure["has_traceback"] and failure["einfo_ok"]
    assert failure["pid"] in children
    [postrun] = _of(notes, "task_postrun", failed.id)
    assert postrun["state"] == "failed" and "bad input" in postrun["retval"]
    assert not _of(notes, "task_success", failed.id)

    # a retry: two runs, one task_retry with the reason, then a success
    assert len(_of(notes, "task_prerun", retried.id)) == 2
    [retry] = _of(notes, "task_retry", retried.id)
    assert "first try" in retry["reason"] and retry["retries"] == 0
    assert [p["state"] for p in _of(notes, "task_postrun", retried.id)] == \
        ["retry", "succeeded"]
    assert len(_of(notes, "task_success", retried.id)) == 1

    # a receiver that raised: logged, the task ran and succeeded anyway
    assert len(_of(notes, "task_success", survived.id)) == 1
    assert "signal task_prerun: receiver" in worker.log()
    assert "a receiver that fails" in worker.log()

    # revoked: in the worker process, never run
    [rev] = _of(notes, "task_revoked", expired.id)
    assert rev["expired"] and not rev["terminated"]
    assert rev["pid"] == worker.pid
    assert rev["sender"] == "tests.apps.everyday.double"
    assert not _of(notes, "task_prerun", expired.id)
    [rev] = _of(notes, "task_revoked", cancelled.id)
    assert rev["terminated"] and not rev["expired"] and rev["pid"] == worker.pid
    [postrun] = _of(notes, "task_postrun", cancelled.id)
    assert postrun["state"] == "cancelled"

    # the worker's own signals: in the worker process, once
    for what in ("worker_init", "worker_ready"):
        [fired] = _of(notes, what)
        assert fired["pid"] == worker.pid and fired["hostname"] == worker.name
    wait_for(lambda: sorted(n["pid"] for n in _of(everyday.notes(broker.record_dir),
                                                  "worker_process_init")) == sorted(children),
             10, message="worker_process_init in each pool process")
    assert worker.stop() == 0
    notes = everyday.notes(broker.record_dir)
    [fired] = _of(notes, "worker_shutdown")
    assert fired["pid"] == worker.pid
    assert sorted(n["pid"] for n in _of(notes, "worker_process_shutdown")) == \
        sorted(children)


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_a_database_connection_per_prefork_process(
        broker: BrokerEnv, everyday: Any, start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker(pool="prefork", concurrency=2, extra_args=APP)
    children = set(worker.children())
    handles = [everyday.query_db.delay() for _ in range(40)]
    seen = set()
    for handle in handles:
        row = handle.result(timeout=20)
        # each process queries the connection it opened itself
        assert row["pid"] == row["db_pid"] == row["row"]
        seen.add(row["pid"])
    assert seen <= children
    wait_for(lambda: sorted(n["pid"] for n in _of(everyday.notes(broker.record_dir),
                                                  "worker_process_init")) == sorted(children),
             10, message="worker_process_init in each pool process")


def test_signal_api() -> None:
    """connect as a decorator, with a sender, once per dispatch_uid; a raising receiver
    is reported as its response and the others still run."""
    sig = signals.Signal("test_signal")
    heard: list[tuple[str, Any]] = []

    @sig.connect
    def everyone(sender: Any, **kwargs: Any) -> str:
        heard.append(("everyone", sender))
        return "ok"

    @sig.connect(sender="proj.add")
    def only_add(sender: Any, value: int, **kwargs: Any) -> None:
        heard.append(("only_add", value))

    def broken(**kwargs: Any) -> None:
        raise RuntimeError("broken receiver")

    sig.connect(broken, dispatch_uid="b")
    sig.connect(broken, dispatch_uid="b")  # a second connect with the same uid: no-op

    class FakeTask:
        name = "proj.add"

    responses = sig.send(sender=FakeTask(), value=1)
    assert responses[0][1] == "ok"
    assert isinstance(responses[-1][1], RuntimeError) and len(responses) == 3
    sig.send(sender="proj.other", value=2)
    assert [h[0] for h in heard] == ["everyone", "only_add", "everyone"]
    assert sig.disconnect(dispatch_uid="b")
    assert sig.disconnect(everyone)
    assert len(sig.receivers) == 1

    def local(**kwargs: Any) -> None:
        pass

    sig.connect(local, weak=True)
    assert len(sig.receivers) == 2
    del local
    import gc

    gc.collect()
    assert len(sig.receivers) == 1  # a weak receiver goes with its function
