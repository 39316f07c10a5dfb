"""A watcher that misses events (lost in flight on a dropped broker connection) asks the
worker for a snapshot and shows the whole stream; coalesced progress is not a gap."""

from __future__ import annotations

import time
from typing import Any

import pytest

from interactive_tasks import App
from interactive_tasks.handle import RESYNC_WAIT, TaskHandle
from interactive_tasks.protocol import Event, EventKind, TaskSnapshot, TaskState


class RecordingClient:
    def __init__(self) -> None:
        self.resyncs: list[tuple[str, str | None, str | None]] = []

    def resync(self, task_id: str, worker: str | None, token: str | None) -> None:
        self.resyncs.append((task_id, worker, token))


@pytest.fixture
def client() -> RecordingClient:
    return RecordingClient()


def handle_with(client: RecordingClient, *, streaming: bool = True) -> TaskHandle[Any]:
    app = App("gaps-unit", broker="embedded:///nonexistent-gaps-unit")
    app._client = client  # type: ignore[assignment]
    return TaskHandle(app, "t1", name="job", token="tok", watch=False, streaming=streaming)


def ev(seq: int, kind: str, first: int = 0, **fields: Any) -> Event:
    return Event("t1", seq, kind, 1000.0 + seq, fields, 1, first)


def test_event_wire_carries_the_coalesced_range() -> None:
    plain = ev(3, EventKind.PROGRESS, current=3)
    coalesced = ev(5, EventKind.PROGRESS, first=3, current=5)
    assert len(plain.to_wire()) == 6 and Event.from_wire(plain.to_wire()) == plain
    assert Event.from_wire(coalesced.to_wire()) == coalesced
    assert coalesced.covers_from == 3 and plain.covers_from == 3


def test_coalesced_progress_is_not_a_gap(client: RecordingClient) -> None:
    h = handle_with(client)
    h._on_event(ev(1, EventKind.STARTED, worker="w1", pid=7))
    h._on_event(ev(4, EventKind.PROGRESS, first=2, current=4))
    assert client.resyncs == []
    assert h.seq == 4 and h.progress is not None and h.progress.current == 4


def test_a_gap_asks_its_worker_for_a_snapshot_and_holds_events_until_it_lands(
        client: RecordingClient) -> None:
    h = handle_with(client)
    h._on_event(ev(1, EventKind.STARTED, worker="w1", pid=7))
    h._on_event(ev(4, EventKind.MESSAGE, data="late"))  # 2 and 3 were lost
    h._on_event(ev(5, EventKind.MESSAGE, data="later"))
    assert client.resyncs == [("t1", "w1", "tok")]
    assert h.seq == 1  # held, not applied past the gap
    h._on_snapshot(TaskSnapshot(
        task_id="t1", name="job", state=TaskState.RUNNING, seq=4, run=1, worker="w1",
        events=(ev(1, EventKind.STARTED, worker="w1", pid=7), ev(2, EventKind.LOG, text="x"),
                ev(3, EventKind.MESSAGE, data="lost"), ev(4, EventKind.MESSAGE, data="late")),
    ))
    kinds = [(e.seq, e.kind) for e in h._buffer]
    assert kinds == [(1, "started"), (2, "log"), (3, "message"), (4, "message"), (5, "message")]
    assert h.seq == 5


def test_a_snapshot_puts_its_latest_progress_before_the_final_event(
        client: RecordingClient) -> None:
    # The client's broker connection dropped with progress 3-5 in flight; the final event
    # came after the reconnect and showed the gap. The worker's snapshot of the finished
    # task carries the latest progress apart from its events: it must go into the stream
    # where its seq puts it, before "succeeded", or events() ends without it.
    h = handle_with(client)
    h._on_event(ev(1, EventKind.STARTED, worker="w1", pid=7))
    h._on_event(ev(2, EventKind.PROGRESS, current=1))
    h._on_event(ev(3, EventKind.PROGRESS, current=2))
    h._on_event(ev(7, EventKind.SUCCEEDED, result="k1"))
    assert client.resyncs == [("t1", "w1", "tok")]
    h._on_snapshot(TaskSnapshot(
        task_id="t1", name="job", state=TaskState.SUCCEEDED, seq=7, run=1, worker="w1",
        progress=ev(6, EventKind.PROGRESS, current=5), result="k1",
        events=(ev(1, EventKind.STARTED, worker="w1", pid=7),
                ev(7, EventKind.SUCCEEDED, result="k1")),
    ))
    events = list(h.events(timeout=0))
    # unread consecutive progress collapses in the handle's buffer: latest wins
    assert [(e.seq, e.kind) for e in events] == [
        (1, "started"), (6, "progress"), (7, "succeeded")]
    assert events[1].current == 5 and h.progress is not None and h.progress.current == 5
    assert h.result(0) == "k1"


def test_the_result_store_fills_the_latest_progress_in_before_the_end(tmp_path: Any) -> None:
    # The same loss, found by result()'s fallback to the result store instead.
    app = App("gaps-store-progress", broker="embedded:///nonexistent-gaps-store-progress",
              result_backend=f"file://{tmp_path}")
    app.results.put("t1", TaskSnapshot(
        task_id="t1", name="job", state=TaskState.SUCCEEDED, seq=7, run=1, worker="w1",
        progress=ev(6, EventKind.PROGRESS, current=5), result="k1",
        events=(ev(1, EventKind.STARTED, worker="w1", pid=7),
                ev(7, EventKind.SUCCEEDED, result="k1")),
    ).to_wire())
    h: TaskHandle[Any] = TaskHandle(app, "t1", name="job", watch=False)
    h._on_event(ev(1, EventKind.STARTED, worker="w1", pid=7))
    h._on_event(ev(3, EventKind.PROGRESS, first=2, current=2))
    assert h.result(timeout=5) == "k1"
    events = list(h.events(timeout=0))
    # unread consecutive progress collapses in the handle's buffer: latest wins
    assert [(e.seq, e.kind) for e in events] == [
        (1, "started"), (6, "progress"), (7, "succeeded")]


def test_a_gap_before_the_worker_is_known_locates_the_task(client: RecordingClient) -> None:
    h = handle_with(client)
    h._on_event(ev(2, EventKind.PROGRESS, current=1))  # "started" lost in flight
    assert client.resyncs == [("t1", None, "tok")]
    assert h.state is TaskState.PENDING


def test_without_a_snapshot_the_held_events_apply_after_the_wait(
        client: RecordingClient) -> None:
    h = handle_with(client)
    h._on_event(ev(1, EventKind.STARTED, worker="w1", pid=7))
    h._on_event(ev(3, EventKind.SUCCEEDED, result=42))
    h._check_resync(time.monotonic())
    assert not h.ready()
    h._check_resync(time.monotonic() + RESYNC_WAIT + 0.1)
    assert h.ready() and h.state is TaskState.SUCCEEDED and h.result(0) == 42


def test_a_final_only_handle_never_resyncs(client: RecordingClient) -> None:
    h = handle_with(client, streaming=False)
    h._on_event(ev(9, EventKind.SUCCEEDED, result="done"))
    assert client.resyncs == [] and h.result(0) == "done"


def test_a_loop_of_short_waits_still_falls_back_to_the_result_store(tmp_path: Any) -> None:
    # The final event never reaches this handle (lost with its inbox); the result store
    # has it. Each wait() used to restart the store's schedule, so short waits never got
    # there.
    from interactive_tasks import TaskTimeout

    app = App("gaps-store", broker="embedded:///nonexistent-gaps-store",
              result_backend=f"file://{tmp_path}")
    app.results.put("t9", TaskSnapshot(task_id="t9", name="job", state=TaskState.SUCCEEDED,
                                       seq=3, result="from the store").to_wire())
    h: TaskHandle[Any] = TaskHandle(app, "t9", name="job", watch=True)
    deadline = time.monotonic() + 5
    while not h.ready() and time.monotonic() < deadline:
        try:
            h.wait(timeout=0.05)
        except TaskTimeout:
            pass
    assert h.ready() and h.result(0) == "from the store"


def test_a_stored_end_of_an_earlier_run_does_not_end_the_wait(tmp_path: Any) -> None:
    # A worker taken for dead (frozen past its broker's liveness check) may store the end
    # of its stale run 1 while the handle follows run 2 on another worker. The handle
    # ignores the older run, and wait() used to stop there anyway and return "running",
    # which result() reported as TaskRevoked.
    from interactive_tasks import TaskTimeout

    app = App("gaps-stale", broker="embedded:///nonexistent-gaps-stale",
              result_backend=f"file://{tmp_path}")
    app.results.put("t8", TaskSnapshot(task_id="t8", name="job", state=TaskState.SUCCEEDED,
                                       seq=3, run=1, result="stale").to_wire())
    h: TaskHandle[Any] = TaskHandle(app, "t8", name="job", watch=True)
    h._on_event(Event("t8", 1, EventKind.STARTED, 1000.0, {"worker": "w2", "pid": 8}, 2))
    with pytest.raises(TaskTimeout):
        h.result(timeout=0.8)
    h._on_event(Event("t8", 2, EventKind.SUCCEEDED, 1001.0, {"result": "fresh"}, 2))
    assert h.result(0) == "fresh"


def test_a_handle_collected_while_the_client_lock_is_held_does_not_deadlock() -> None:
    # The garbage collector runs TaskHandle.__del__ at any allocation, also inside the
    # client's own locked sections (watch() appending a weakref, say). A 10,000-task
    # stress run hung that way: the main thread blocked on the lock it held, the inbox
    # thread behind it, and the worker deleted the silent client's inbox.
    import gc
    import threading

    app = App("gc", broker="redis://127.0.0.1:1/0", namespace="gcdeadlock")
    client = app.client
    handle = TaskHandle(app, "t-collected", token="tok")
    assert client._watchers_of("t-collected") == [handle]
    finished = threading.Event()

    def collect_under_the_lock() -> None:
        nonlocal handle
        with client._lock:
            del handle  # the last reference: __del__ runs here, lock held
            gc.collect()
        finished.set()

    thread = threading.Thread(target=collect_under_the_lock, daemon=True)
    thread.start()
    assert finished.wait(5), "unwatch from __del__ blocked on the client's own lock"
    with client._lock:
        client._prune_unwatched()
    assert "t-collected" not in client._watchers


class WatchingClient(RecordingClient):
    """A client whose inbox delivers only what a test hands the handle."""

    def __init__(self) -> None:
        super().__init__()
        self.watched: list[TaskHandle[Any]] = []

    def watch(self, handle: TaskHandle[Any]) -> None:
        self.watched.append(handle)


def test_events_of_a_watched_handle_end_from_the_result_store_when_the_final_event_is_lost(
        tmp_path) -> None:
    app = App("gaps-events-store", broker="embedded:///nonexistent-gaps-events-store",
              result_backend=f"file://{tmp_path}")
    client = WatchingClient()
    app._client = client  # type: ignore[assignment]
    h: TaskHandle[Any] = TaskHandle(app, "t1", name="job", token="tok")
    assert client.watched == [h]
    h._on_event(ev(1, EventKind.STARTED, worker="w1", pid=7))
    # the task ends; its final event never reaches the inbox, its record is stored
    app.results.put("t1", TaskSnapshot(
        task_id="t1", name="job", state=TaskState.SUCCEEDED, seq=2, run=1, worker="w1",
        result="k1", events=(ev(1, EventKind.STARTED, worker="w1", pid=7),
                             ev(2, EventKind.SUCCEEDED, result="k1")),
    ).to_wire())
    events = list(h.events(timeout=5))  # no event at all for 5 s: TaskTimeout
    assert [(e.seq, e.kind) for e in events] == [(1, "started"), (2, "succeeded")]
    assert h.result(0) == "k1"
