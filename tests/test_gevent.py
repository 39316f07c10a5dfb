"""The gevent pool: a thousand interactive tasks at once in one worker, one client."""

from __future__ import annotations

import uuid

import pytest

from interactive_tasks import TaskCancelled, TaskState

from .conftest import IN_CI, wait_for
from .test_interactive import check_async_def_task

pytestmark = pytest.mark.parametrize("broker", ["redis"], indirect=True)


@pytest.fixture(autouse=True)
def _needs_gevent() -> None:
    try:
        import gevent  # noqa: F401
    except ImportError:
        if IN_CI:
            pytest.fail("gevent is missing (it is in the dev extra)")
        pytest.skip("gevent is not installed")


def test_thousand_concurrent_interactive_tasks(tasks, start_worker):
    start_worker(pool="gevent", concurrency=1000)
    key = f"rdv-{uuid.uuid4().hex}"
    handles = [tasks.rendezvous.start(key, 1000, 90) for _ in range(1000)]
    # Each task only returns once all 1000 are running at the same time.
    results = [h.result(timeout=120) for h in handles]
    assert min(results) >= 1000
    # and the one client saw every task's stream to the end
    assert all(h.state is TaskState.SUCCEEDED for h in handles)
    assert all(h.progress is not None and h.progress.current >= 1000 for h in handles)


def test_pause_and_cancel_in_gevent(tasks, start_worker, broker):
    w = start_worker(pool="gevent", concurrency=20)
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
    a.cancel(grace=0)  # forced: Cancelled raised in the greenlet
    b.cancel()
    for h in (a, b):
        with pytest.raises(TaskCancelled):
            h.result(timeout=20)
    assert [r["data"] for r in broker.records(a.id) if r["what"] == "message"] == ["hi"]
    # a warm shutdown exits 0: it exited 120 when the final flush of the pool's
    # replacement sys.stdout asked gevent's (finalized) local which task runs
    assert w.stop() == 0, w.log()[-2000:]


def test_async_def_task_in_gevent(tasks, start_worker):
    start_worker(pool="gevent", concurrency=5)
    check_async_def_task(tasks)


def test_forced_cancel_in_gevent_stops_a_task_that_never_checks(tasks, start_worker, broker):
    w = start_worker(pool="gevent", concurrency=5)
    handle = tasks.sleeper.start(120)
    wait_for(lambda: broker.records(handle.id), message="the sleeper to start")
    handle.cancel(grace=0)  # no checkpoint ever comes: only the forced stage can end it
    with pytest.raises(TaskCancelled):
        handle.result(timeout=20)
    assert "Cancelled raised in greenlet" in w.log()
    assert tasks.add.delay(1, 1).result(timeout=20) == 2  # the slot serves again
