"""The eventlet pool: a thousand interactive tasks at once in one worker, steered from one
client; pause, messages, cooperative and forced cancel as in the gevent pool."""

from __future__ import annotations

import importlib.util
import uuid

import pytest

from interactive_tasks import TaskCancelled, TaskState

from .conftest import IN_CI, wait_for
from .test_interactive import check_async_def_task

redis_only = pytest.mark.parametrize("broker", ["redis"], indirect=True)


@pytest.fixture(autouse=True)
def _needs_eventlet() -> None:
    # find_spec, not import: importing eventlet warns that it is deprecated (an error here)
    if importlib.util.find_spec("eventlet") is None:
        if IN_CI:
            pytest.fail("eventlet is missing (it is in the dev extra)")
        pytest.skip("eventlet is not installed")


@redis_only
def test_thousand_concurrent_interactive_tasks_with_control(tasks, start_worker):
    """``-P eventlet -c 1000``: 1,000 interactive tasks run at once in one worker, and
    each is steered while they all run: messages, pause/resume, cooperative and forced
    cancel."""
    w = start_worker(pool="eventlet", concurrency=1000)
    n = 1000
    key = f"rdv-{uuid.uuid4().hex}"
    handles = [tasks.gather_and_wait.start(key, n, 150) for _ in range(n)]
    # Each one reports the counter at 1000 only while all 1000 are running.
    wait_for(lambda: all(h.progress is not None and h.progress.current >= n
                         for h in handles), timeout=90, interval=0.2,
             message="all 1000 tasks running at once")
    told, paused = handles[:700], handles[700:800]
    cancelled, forced = handles[800:900], handles[900:]
    for h in paused:
        h.pause()
    wait_for(lambda: all(h.state is TaskState.PAUSED for h in paused), timeout=30,
             message="100 tasks paused")
    for i, h in enumerate(told):
        h.send(f"go-{i}")
    for h in cancelled:
        h.cancel()  # cooperative: Cancelled at the task's next checkpoint
    for h in forced:
        h.cancel(grace=0)  # forced: Cancelled raised in its green thread at once
    for i, h in enumerate(paused):
        h.send(f"later-{i}")  # kept until the task reads it, after the resume
    assert all(h.state is TaskState.PAUSED for h in paused)
    for i, h in enumerate(told):
        assert h.result(timeout=60) == {"seen": n, "message": f"go-{i}"}
    for h in cancelled + forced:
        with pytest.raises(TaskCancelled):
            h.result(timeout=60)
    for h in paused:
        h.resume()
    for i, h in enumerate(paused):
        assert h.result(timeout=60) == {"seen": n, "message": f"later-{i}"}
    assert "pool=eventlet concurrency=1000" in w.log()
    assert w.log().count("Cancelled raised in green thread") >= len(forced)


# every broker: eventlet's patched os.read waits where the embedded broker's doorbell
# expects EAGAIN (an eventlet worker on it never took a task)
@pytest.mark.parametrize("broker", ["embedded", "redis", "amqp"], indirect=True)
def test_pause_and_cancel_in_eventlet(tasks, start_worker, broker):
    w = start_worker(pool="eventlet", concurrency=20)
    a = tasks.steerable.start(100000, 0.01)
    b = tasks.steerable.start(100000, 0.01)
    wait_for(lambda: a.progress and b.progress, message="both running")
    a.pause()
    wait_for(lambda: a.state is TaskState.PAUSED, message="a paused")
    moved = b.progress.current
    wait_for(lambda: b.progress.current > moved + 5, message="b keeps running")
    a.send("hi")
    a.resume()
    wait_for(lambda: a.state is TaskState.RUNNING, message="a resumed")
    a.cancel(grace=0)  # forced: Cancelled raised in the green thread
    b.cancel()
    for h in (a, b):
        with pytest.raises(TaskCancelled):
            h.result(timeout=20)
    assert [r["data"] for r in broker.records(a.id) if r["what"] == "message"] == ["hi"]
    assert w.stop() == 0, w.log()[-2000:]


@redis_only
def test_async_def_task_in_eventlet(tasks, start_worker):
    start_worker(pool="eventlet", concurrency=5)
    check_async_def_task(tasks)


@redis_only
def test_forced_cancel_in_eventlet_stops_a_task_that_never_checks(tasks, start_worker, broker):
    w = start_worker(pool="eventlet", concurrency=5)
    handle = tasks.sleeper.start(120)
    wait_for(lambda: broker.records(handle.id), message="the sleeper to start")
    handle.cancel(grace=0)  # no checkpoint ever comes: only the forced stage can end it
    with pytest.raises(TaskCancelled):
        handle.result(timeout=20)
    assert "Cancelled raised in green thread" in w.log()
    assert tasks.add.delay(1, 1).result(timeout=20) == 2  # the slot serves again
