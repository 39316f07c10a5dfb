"""The in-memory broker (``memory://``): every duty of the transport contract, in-process.

Each test runs real workers (``worker.testing.start_worker``) on threads of the test
process, and a real client, against the process's in-memory broker; tasks and tests meet
through ordinary Python objects (events, lists), which only an in-process broker allows.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from interactive_tasks import App, InteractiveTask, TaskFailed, TaskState
from interactive_tasks.errors import ConfigurationError
from interactive_tasks.results import MemoryResultStore
from interactive_tasks.transport.memory import MemoryBroker, Transport
from interactive_tasks.transport.memory_upkeep import MemoryUpkeep
from interactive_tasks.transport.upkeep import upkeep_for
from interactive_tasks.worker.testing import InProcessWorker, start_worker

from .conftest import holds_for, wait_for


class Tasks:
    """An app on memory:// in a namespace of its own, with tasks the tests steer."""

    def __init__(self, **conf: Any) -> None:
        self.app = App("memtest", broker="memory://", namespace=f"m{uuid.uuid4().hex[:8]}",
                       **conf)
        self.broker = MemoryBroker.for_app(self.app)
        self.release = threading.Event()
        self.runs: list[tuple[str, int]] = []
        app, release, runs = self.app, self.release, self.runs

        @app.task(name="add")
        def add(x: int, y: int) -> int:
            return x + y

        @app.task(name="held", bind=True)
        def held(self: Any, tag: str) -> str:
            runs.append((tag, self.request.delivery))
            while not release.is_set():  # short waits: a forced cancel lands between them
                release.wait(0.01)
            return tag

        @app.task(name="chatty", base=InteractiveTask)
        def chatty(self: Any, n: int) -> list[Any]:
            got = []
            for i in range(n):
                self.progress(i + 1, n)
                while (msg := self.receive(timeout=0.01)) is None:
                    if release.is_set():
                        break
                got.append(msg)
            return got

        self.add, self.held, self.chatty = add, held, chatty


@pytest.fixture
def tasks() -> Iterator[Tasks]:
    made = Tasks()
    yield made
    made.release.set()
    made.app.close()


def test_memory_url_reaches_the_in_memory_broker_through_every_factory(tasks):
    app = tasks.app
    with app.connection() as conn:
        assert isinstance(conn.transport, Transport)
    assert isinstance(app.results, MemoryResultStore)
    assert isinstance(upkeep_for(app, "w/1", lambda: None), MemoryUpkeep)


def test_a_task_is_published_fetched_run_and_acked_after_its_result_is_stored(tasks):
    with start_worker(tasks.app, concurrency=2):
        handle = tasks.add.delay(2, 3)
        assert handle.get(timeout=5) == 5
        handles = [tasks.add.delay(i, i) for i in range(50)]
        tasks.broker.join(timeout=10)
        # acked only after its result was stored: once the queue is joined every record is in
        for h in handles:
            record = tasks.app.results.get(h.id)
            assert record is not None and record["state"] == "succeeded"
        assert tasks.broker.queue_size() == 0
        assert tasks.broker.dead_letters() == []


def test_join_waits_for_a_delivered_task_and_times_out_while_it_runs(tasks):
    with start_worker(tasks.app):
        handle = tasks.held.delay("a")
        wait_for(lambda: tasks.runs, message="the task started")
        assert tasks.broker.queue_size() == 0  # delivered: only in flight
        with pytest.raises(TimeoutError, match="1 in flight"):
            tasks.broker.join(timeout=0.3)
        tasks.release.set()
        tasks.broker.join(timeout=5)
        assert handle.get(timeout=5) == "a"


def test_an_unknown_task_is_dead_lettered_with_its_reason(tasks):
    with start_worker(tasks.app, hostname="dl@memory"):
        handle = tasks.app.send_task("no.such.task", args=[1])
        with pytest.raises(TaskFailed):
            handle.get(timeout=5)
        tasks.broker.join(timeout=5)
    letters = tasks.broker.dead_letters()
    assert len(letters) == 1
    letter = letters[0]
    assert "no.such.task" in (letter.reason or "")
    assert letter.worker == "dl@memory"
    assert letter.queue == tasks.app.names.task_queue_name("default")
    assert b"no.such.task" in letter.body


def test_a_warm_stop_requeues_tasks_it_has_not_started(tasks):
    app = tasks.app
    worker = InProcessWorker(app, concurrency=1, shutdown_timeout=5)
    worker.start()
    first = tasks.held.delay("first")
    rest = [tasks.held.delay(f"r{i}") for i in range(3)]
    wait_for(lambda: len(worker.ready) == 3, message="three tasks reserved, not started")
    assert tasks.broker.queue_size() == 0
    stopper = threading.Thread(target=worker.stop)
    stopper.start()
    # given back to the queue while the running one finishes
    wait_for(lambda: tasks.broker.queue_size() == 3, message="unstarted tasks requeued")
    tasks.release.set()
    stopper.join(10)
    assert first.get(timeout=5) == "first"
    with start_worker(app):
        assert [h.get(timeout=5) for h in rest] == ["r0", "r1", "r2"]
    assert [tag for tag, _ in tasks.runs] == ["first", "r0", "r1", "r2"]


def test_control_reaches_the_running_task_through_its_workers_channel(tasks):
    with start_worker(tasks.app):
        handle = tasks.chatty.start(2)
        wait_for(lambda: handle.state is TaskState.RUNNING, message="running")
        handle.send({"a": 1})
        handle.send({"b": 2})
        assert handle.result(timeout=5) == [{"a": 1}, {"b": 2}]


def test_the_inbox_carries_every_event_in_order(tasks):
    with start_worker(tasks.app):
        handle = tasks.chatty.start(3)
        for i in range(3):
            handle.send(i)
        assert handle.result(timeout=5) == [0, 1, 2]
        kinds = [e.kind for e in handle.events(timeout=1)]
        progress = [e for e in kinds if e == "progress"]
        assert kinds[-1] == "succeeded" and progress, kinds


def test_a_stream_sent_without_waiting_stops_at_the_window_until_the_task_reads():
    made = Tasks(send_window=16)
    gate = threading.Event()

    @made.app.task(name="gated", base=InteractiveTask)
    def gated(self: Any, n: int) -> list[Any]:
        while not gate.wait(0.01):
            self.checkpoint()
        return [self.receive(timeout=5) for _ in range(n)]

    sent: list[int] = []
    failed: list[BaseException] = []

    def stream(handle: Any) -> None:
        try:
            for i in range(80):
                handle.send(i, wait=False, timeout=30)
                sent.append(i)
        except BaseException as exc:
            failed.append(exc)

    try:
        with start_worker(made.app):
            handle = gated.start(80)
            wait_for(lambda: handle.state is TaskState.RUNNING, message="running")
            sender = threading.Thread(target=stream, args=(handle,))
            sender.start()
            wait_for(lambda: len(sent) == 16, message="a window's worth sent")
            holds_for(lambda: len(sent) == 16 and handle.outstanding == 16, 0.3,
                      message="the sender held at the window")
            gate.set()
            sender.join(10)
            assert not failed and len(sent) == 80
            assert handle.result(timeout=5) == list(range(80))
    finally:
        made.app.close()


def test_cancel_ends_a_running_task(tasks):
    with start_worker(tasks.app):
        handle = tasks.held.start("c")
        wait_for(lambda: tasks.runs, message="the task started")
        handle.cancel(grace=0)
        wait_for(lambda: handle.state is TaskState.CANCELLED, timeout=5, message="cancelled")


def test_a_killed_workers_task_comes_back_when_the_liveness_check_finds_it_dead():
    made = Tasks(worker_heartbeat=0.2, worker_lost_timeout=1.0)
    try:
        first = InProcessWorker(made.app, hostname="doomed@memory")
        first.start()
        handle = made.held.delay("k")
        wait_for(lambda: made.runs, message="started on the first worker")
        first.kill()
        assert made.broker.queue_size() == 0  # still owned by the dead worker
        assert "doomed@memory" in made.broker.workers()
        started = time.monotonic()
        with start_worker(made.app, hostname="survivor@memory"):
            wait_for(lambda: len(made.runs) == 2, timeout=5, message="delivered again")
            took = time.monotonic() - started
            made.release.set()
            assert handle.get(timeout=5) == "k"
        # back after the liveness timeout, not before, and counted as a second delivery
        assert 0.75 <= took < 5.0, took  # lost after 1 s, counted from its last beat
        assert made.runs == [("k", 1), ("k", 2)]
        assert made.broker.workers() == []
    finally:
        made.release.set()
        made.app.close()


class SlowToNoticeAKill(InProcessWorker):
    """A worker whose loop goes on after :meth:`kill` until it has no task left (or for
    ``lag`` seconds at most), as a loop that gets no CPU for a while notices the kill late:
    whatever the kill itself makes a task do reaches the loop first."""

    lag = 1.0
    _killed_at: float | None = None

    @property  # type: ignore[override]
    def _terminate(self) -> bool:
        if self._killed_at is None:
            return False
        return not self.records or time.monotonic() - self._killed_at > self.lag

    @_terminate.setter
    def _terminate(self, value: bool) -> None:
        if value and self._killed_at is None:
            self._killed_at = time.monotonic()


def test_a_killed_worker_stores_no_end_for_the_task_it_was_running(tasks):
    # A SIGKILLed process reports nothing. Had the kill's cancel of the running task
    # reached the result store as "cancelled", the worker the task comes back to would
    # take it for finished and drop it: it would never run again.
    first = SlowToNoticeAKill(tasks.app, hostname="late@memory")
    first.start()
    handle = tasks.held.delay("s")
    wait_for(lambda: tasks.runs, message="started")
    first.kill()
    stored = tasks.app.results.get(handle.id)
    assert stored is None or not TaskState(stored["state"]).is_final, stored
    assert tasks.broker.declare_dead("late@memory") == 1
    tasks.release.set()
    with start_worker(tasks.app):
        assert handle.get(timeout=5) == "s"
    assert tasks.runs == [("s", 1), ("s", 2)]


def test_declare_dead_returns_a_workers_unacknowledged_tasks_at_once(tasks):
    first = InProcessWorker(tasks.app, hostname="gone@memory")
    first.start()
    handle = tasks.held.delay("d")
    wait_for(lambda: tasks.runs, message="started")
    first.kill()
    holds_for(lambda: tasks.broker.queue_size() == 0, 0.3, message="kept while not found dead")
    assert tasks.broker.declare_dead("gone@memory") == 1
    assert tasks.broker.queue_size() == 1
    with pytest.raises(KeyError):
        tasks.broker.declare_dead("gone@memory")
    tasks.release.set()
    with start_worker(tasks.app):
        assert handle.get(timeout=5) == "d"
    assert tasks.runs == [("d", 1), ("d", 2)]


def test_a_live_workers_long_task_is_never_delivered_elsewhere():
    made = Tasks(worker_heartbeat=0.1, worker_lost_timeout=0.5)
    try:
        with start_worker(made.app), start_worker(made.app):
            handle = made.held.delay("long")
            wait_for(lambda: made.runs, message="started")
            holds_for(lambda: len(made.runs) == 1, 1.6, message="one run")  # 3x the timeout
            made.release.set()
            assert handle.get(timeout=5) == "long"
        assert made.runs == [("long", 1)]
    finally:
        made.release.set()
        made.app.close()


def test_a_countdown_waits_in_the_broker_not_in_a_worker(tasks):
    with start_worker(tasks.app) as worker:
        handle = tasks.add.apply_async((4, 5), countdown=1.2)
        sent = time.monotonic()
        scheduled = tasks.broker.scheduled()
        assert [(s.id, s.name) for s in scheduled] == [(handle.id, "add")]
        assert tasks.broker.queue_size() == 0
        assert worker.records == {}  # the worker holds nothing while it waits
        assert handle.get(timeout=5) == 9
        assert time.monotonic() - sent >= 1.0
    assert tasks.broker.scheduled() == []


def test_a_countdown_outlives_the_worker_that_was_running_when_it_was_sent(tasks):
    first = InProcessWorker(tasks.app, hostname="short-lived@memory")
    first.start()
    handle = tasks.add.apply_async((1, 1), countdown=0.8)
    first.kill()
    tasks.broker.declare_dead("short-lived@memory")
    # nothing left anywhere but the broker's delayed set
    assert len(tasks.broker.scheduled()) == 1
    with start_worker(tasks.app):
        assert handle.get(timeout=5) == 2


def test_move_due_puts_a_due_task_on_its_queue(tasks):
    handle = tasks.add.apply_async((1, 2), countdown=30)
    assert tasks.broker.move_due() == 0
    assert tasks.broker.queue_size() == 0
    assert tasks.broker.move_due(time.time() + 31) == 1
    assert tasks.broker.queue_size() == 1 and tasks.broker.scheduled() == []
    assert handle.state is TaskState.PENDING


def test_revoke_takes_a_delayed_task_out_of_the_broker(tasks):
    with start_worker(tasks.app):
        handle = tasks.add.apply_async((1, 2), countdown=30)
        handle.revoke()
        wait_for(lambda: handle.state is TaskState.REVOKED, timeout=5, message="revoked")
        assert tasks.broker.scheduled() == []


def test_results_are_shared_by_every_store_of_the_namespace_and_emptied_by_reset():
    ns = f"r{uuid.uuid4().hex[:8]}"
    one, two = MemoryResultStore(ns, 60), MemoryResultStore(ns, 60)
    record = {"state": "succeeded", "result": [1]}
    one.put("t1", record)
    record["result"].append(2)  # stored as it was when put
    assert two.get("t1") == {"state": "succeeded", "result": [1]}
    assert MemoryResultStore("other", 60).get("t1") is None
    assert one.chord_incr("c") == 1 and two.chord_incr("c") == 2
    one.add_revoked({"gone": [time.time() + 60, None, False],
                     "old": [time.time() - 1, None, False]})
    assert list(two.revoked()) == ["gone"]
    MemoryBroker.reset()
    assert two.get("t1") is None


def test_start_worker_refuses_a_forking_pool(tasks):
    with pytest.raises(ConfigurationError, match="threads or solo"):
        InProcessWorker(tasks.app, pool="prefork")


def test_a_worker_taken_for_dead_while_it_runs_keeps_running_and_is_reported_once():
    """As on Redis: its task goes to another worker, it learns so at its next heartbeat and
    is in the liveness record again, and the task's starter sees one final state."""
    made = Tasks(worker_heartbeat=0.1, worker_lost_timeout=5.0)
    try:
        with start_worker(made.app, hostname="slow@memory") as slow:
            handle = made.held.start("x")
            wait_for(lambda: made.runs, message="started on the first worker")
            with start_worker(made.app, hostname="other@memory"):
                assert made.broker.declare_dead("slow@memory") == 1
                wait_for(lambda: len(made.runs) == 2, timeout=5, message="run elsewhere")
                wait_for(lambda: "slow@memory" in made.broker.workers(), timeout=5,
                         message="back in the record")
                assert all(r.maybe_redelivered for r in slow.records.values())
                made.release.set()
                assert handle.result(timeout=5) == "x"
                made.broker.join(timeout=5)
        assert made.runs == [("x", 1), ("x", 2)]
        finals = [e for e in handle.events(timeout=1) if e.kind in ("succeeded", "failed")]
        assert len(finals) == 1, finals
    finally:
        made.release.set()
        made.app.close()


def test_join_waits_for_delayed_tasks_unless_told_not_to(tasks):
    tasks.add.apply_async((1, 2), countdown=30)
    with pytest.raises(TimeoutError):
        tasks.broker.join(timeout=0.1)
    tasks.broker.join(timeout=0.1, delayed=False)


def test_the_solo_pool_runs_in_process_too(tasks):
    with start_worker(tasks.app, pool="solo") as worker:
        assert worker.concurrency == 1
        assert tasks.add.delay(20, 22).get(timeout=5) == 42


def test_a_request_in_wire_form_without_a_request_id_is_refused_before_sending() -> None:
    # Without its request id no reply could be told apart: the call would wait its whole
    # timeout for nothing. task_verb_wire(..., reply=True) sets one.
    app = App("wire", broker="memory://", namespace=f"w{uuid.uuid4().hex[:8]}")
    client = app.client
    try:
        wire = client.task_verb_wire("t1", "message", {"x": 1}, None)
        assert wire.get("rid") is None
        with pytest.raises(ValueError, match="request id"):
            client.request(wire, None, 5)
        assert isinstance(client.task_verb_wire("t1", "message", 1, None, reply=True)["rid"],
                          str)
    finally:
        client.close()
