"""The embedded broker's doorbells: a publish wakes its consumers at once; a ring that is
lost or never sent still delivers within the polling period."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Consumer, Producer
from kombu.asynchronous import Hub

from interactive_tasks.transport.embedded_bells import Ringer, remove_dead_bells
from interactive_tasks.transport.embedded_store import store_for
from tests.embedded_helpers import produce, task_queue

CTX = multiprocessing.get_context("spawn")
#: Long enough that a delivery well inside it can only have come from a ring.
SLOW_POLL = 5.0
#: The safety net's period in the lost-ring tests.
POLL = 0.3


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"embedded://{tmp_path}"


@pytest.fixture
def start() -> Iterator[Callable[..., Any]]:
    procs: list[Any] = []

    def _start(target: Callable[..., Any], *args: Any) -> Any:
        proc = CTX.Process(target=target, args=args, daemon=True)
        proc.start()
        procs.append(proc)
        return proc

    yield _start
    for proc in procs:
        if proc.exitcode is None:
            proc.kill()
        proc.join(5)


def _publish(url: str, name: str, body: dict[str, Any]) -> None:
    with Connection(url) as conn:
        q = task_queue(name)
        producer = Producer(conn.channel())
        producer.maybe_declare(q)
        producer.publish(body, exchange=q.exchange, routing_key=name, serializer="json")


def _hub_consumer(url: str, name: str, poll: float, received: list[Any],
                  ) -> tuple[Connection, Hub, Consumer]:
    conn = Connection(url, transport_options={"polling_interval": poll})
    conn.connect()
    consumer = Consumer(conn.channel(), [task_queue(name)], accept=["json"],
                        callbacks=[lambda body, m: (received.append(body), m.ack())])
    consumer.consume()
    hub = Hub()
    conn.transport.register_with_event_loop(conn.connection, hub)
    return conn, hub, consumer


def _run_hub_until(hub: Hub, until: Callable[[], bool], timeout: float) -> float:
    """Run ``hub`` until ``until()``; seconds it took (fails after ``timeout``)."""
    loop = hub.create_loop()
    begun = time.monotonic()
    while not until():
        if time.monotonic() - begun > timeout:
            pytest.fail(f"not delivered in {timeout} s")
        next(loop)
    return time.monotonic() - begun


def test_a_publish_from_another_process_wakes_the_hub_before_any_poll(
        url: str, start: Callable[..., Any]) -> None:
    received: list[Any] = []
    conn, hub, consumer = _hub_consumer(url, "bell.hub", SLOW_POLL, received)
    try:
        assert list(Path(url.removeprefix("embedded://"), "bells").iterdir())
        proc = start(produce, url, "bell.hub", 0, 20)
        took = _run_hub_until(hub, lambda: len(received) == 20, timeout=3 * SLOW_POLL)
        proc.join(10)
        assert [body["i"] for body in received] == list(range(20))
        # the timer's first look is SLOW_POLL after registration: only a ring is faster
        assert took < SLOW_POLL / 2
    finally:
        consumer.cancel()
        hub.close()
        conn.release()


def test_a_publish_wakes_a_blocking_drain_events(url: str) -> None:
    received: list[Any] = []
    with Connection(url, transport_options={"polling_interval": SLOW_POLL}) as conn:
        consumer = Consumer(conn.channel(), [task_queue("bell.drain")], accept=["json"],
                            callbacks=[lambda body, m: (received.append(body), m.ack())])
        with consumer:
            with pytest.raises(TimeoutError):
                conn.drain_events(timeout=0.05)  # the bell exists from here on
            timer = threading.Timer(0.1, _publish, (url, "bell.drain", {"n": 1}))
            timer.start()
            begun = time.monotonic()
            conn.drain_events(timeout=3 * SLOW_POLL)
            took = time.monotonic() - begun
            timer.join()
    assert received == [{"n": 1}]
    assert took < SLOW_POLL / 2


def test_a_ring_never_sent_still_delivers_within_the_polling_period(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A publisher that never rings (an older version, a bell it has not listed yet).
    monkeypatch.setattr(Ringer, "ring", lambda self, qdir: None)
    received: list[Any] = []
    conn, hub, consumer = _hub_consumer(url, "bell.silent", POLL, received)
    try:
        _publish(url, "bell.silent", {"n": 1})
        took = _run_hub_until(hub, lambda: bool(received), timeout=POLL + 5)
        assert received == [{"n": 1}]
        assert took < POLL + 1.0
    finally:
        consumer.cancel()
        hub.close()
        conn.release()


def test_a_lost_ring_still_delivers_within_the_polling_period(url: str) -> None:
    # The FIFO is gone (removed by hand, by a clean-up, a file system that lost it): the
    # publisher finds no bell to ring, and a blocking drain_events wakes on its poll.
    root = url.removeprefix("embedded://")
    received: list[Any] = []
    with Connection(url, transport_options={"polling_interval": POLL}) as conn:
        consumer = Consumer(conn.channel(), [task_queue("bell.lost")], accept=["json"],
                            callbacks=[lambda body, m: (received.append(body), m.ack())])
        with consumer:
            with pytest.raises(TimeoutError):
                conn.drain_events(timeout=0.05)
            bells = list(Path(root, "bells").iterdir())
            assert len(bells) == 1
            bells[0].unlink()
            store_for(root)._ringer = Ringer(os.path.join(root, "bells"))  # nothing cached
            timer = threading.Timer(0.1, _publish, (url, "bell.lost", {"n": 2}))
            timer.start()
            begun = time.monotonic()
            conn.drain_events(timeout=POLL + 5)
            took = time.monotonic() - begun
            timer.join()
    assert received == [{"n": 2}]
    assert took < POLL + 1.0


def test_closing_removes_the_bell_and_housekeeping_removes_dead_ones(
        url: str, start: Callable[..., Any]) -> None:
    root = Path(url.removeprefix("embedded://"))
    with Connection(url) as conn:
        consumer = Consumer(conn.channel(), [task_queue("bell.close")], accept=["json"])
        with consumer, pytest.raises(TimeoutError):
            conn.drain_events(timeout=0.01)
        assert len(list((root / "bells").iterdir())) == 1
    assert list((root / "bells").iterdir()) == []
    os.mkfifo(root / "bells" / "999999999~1~1")  # a process that is gone
    remove_dead_bells(str(root / "bells"))
    assert list((root / "bells").iterdir()) == []


def test_an_ack_that_makes_room_takes_the_backlog_before_any_poll(url: str) -> None:
    # 20 messages wait, prefetch is 2, acks come after the callback: each ack that frees a
    # place rings this connection's own bell; without it the rest would wait for the poll.
    received: list[Any] = []
    held: list[Any] = []
    conn = Connection(url, transport_options={"polling_interval": SLOW_POLL})
    conn.connect()
    consumer = Consumer(conn.channel(), [task_queue("bell.backlog")], accept=["json"],
                        prefetch_count=2,
                        callbacks=[lambda body, m: (received.append(body), held.append(m))])
    consumer.consume()
    hub = Hub()
    conn.transport.register_with_event_loop(conn.connection, hub)
    try:
        for n in range(20):
            _publish(url, "bell.backlog", {"n": n})
        loop = hub.create_loop()
        begun = time.monotonic()
        while len(received) < 20:
            assert time.monotonic() - begun < 3 * SLOW_POLL, f"got {len(received)}"
            next(loop)
            assert len(held) <= 2
            while held:
                held.pop(0).ack()
        assert [body["n"] for body in received] == list(range(20))
        assert time.monotonic() - begun < SLOW_POLL / 2
    finally:
        consumer.cancel()
        hub.close()
        conn.release()
