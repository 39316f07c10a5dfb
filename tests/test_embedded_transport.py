"""The embedded broker (``embedded://``) with real processes: no loss, order, leases."""

from __future__ import annotations

import multiprocessing
import os
import queue as stdqueue
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.asynchronous import Hub

from interactive_tasks.transport import embedded_directory
from interactive_tasks.transport.embedded import (
    Transport,
    process_start_time,
    safe_name,
)
from interactive_tasks.transport.embedded_files import producer_of
from interactive_tasks.transport.embedded_store import store_for
from tests.embedded_helpers import (
    bind_fanout,
    consume_until_stopped,
    produce,
    rename_in,
    reserve_and_hang,
    task_queue,
)

CTX = multiprocessing.get_context("spawn")


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Poll ``predicate`` until it is truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what or predicate}")
        time.sleep(0.005)


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"embedded://{tmp_path}"


@pytest.fixture
def start() -> Iterator[Callable[..., Any]]:
    """``start(target, *args)`` runs ``target`` in a child process; leftovers are killed."""
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


@pytest.fixture
def conn(url: str) -> Iterator[Connection]:
    with Connection(url, transport_options={"housekeeping_interval": 0.05}) as c:
        yield c


def queue_dir(url: str, name: str) -> Path:
    return embedded_directory(url) / "queues" / safe_name(name)


def get_body(conn: Connection, name: str, timeout: float = 5.0) -> Any:
    simple = conn.SimpleQueue(task_queue(name))
    message = simple.get(timeout=timeout)
    message.ack()
    return message.payload


# -- basics ------------------------------------------------------------------------------


def test_url_and_capabilities(url: str, tmp_path: Path) -> None:
    c = Connection(url)
    assert isinstance(c.transport, Transport)
    assert c.transport.directory == str(tmp_path)
    assert c.as_uri() == url
    assert c.is_evented
    assert not c.supports_heartbeats
    assert c.transport.implements.exchange_type == frozenset({"direct", "fanout"})
    assert c.transport.driver_version()
    c.connect()
    assert (tmp_path / "queues").stat().st_mode & 0o777 == 0o700
    c.release()


def test_safe_names_stay_inside_the_directory() -> None:
    for name in ["../../etc", ".hidden", "a/b", "", "é ü", "x" * 400, "a~b+c%d"]:
        safe = safe_name(name)
        assert "/" not in safe and not safe.startswith(".") and len(safe) <= 200
        assert "~" not in safe
    assert safe_name("it.tasks.default") == "it.tasks.default"
    assert len({safe_name("x" * 400), safe_name("x" * 401)}) == 2


def test_producer_consumer_and_simple_queue(conn: Connection) -> None:
    exchange = Exchange("ex", type="direct")
    q1, q2 = Queue("one", exchange, routing_key="k1"), Queue("two", exchange, routing_key="k2")
    producer = Producer(conn.channel(), exchange=exchange)
    for q in (q1, q2):
        q(producer.channel).declare()
    producer.publish({"n": 1}, routing_key="k1")
    producer.publish(b"\x00\xffbinary", routing_key="k2", content_type="application/data",
                     content_encoding="binary")

    received: list[Any] = []

    def on_message(body: Any, message: Any) -> None:
        received.append(body)
        message.ack()

    consumer = Consumer(conn.channel(), [q1, q2], accept=["json", "application/data"],
                        callbacks=[on_message])
    with consumer:
        while len(received) < 2:
            conn.drain_events(timeout=5)
    assert sorted(received, key=repr) == sorted([{"n": 1}, b"\x00\xffbinary"], key=repr)

    simple = conn.SimpleQueue("simple.queue")
    simple.put({"hello": "world"})
    assert simple.qsize() == 1
    message = simple.get(timeout=5)
    assert message.payload == {"hello": "world"}
    assert message.delivery_info["redelivered"] is False
    message.ack()
    with pytest.raises(simple.Empty):
        simple.get_nowait()
    simple.close()


def test_declare_passive_purge_delete_and_no_ack(conn: Connection, url: str) -> None:
    channel = conn.channel()
    q = task_queue("life")(channel)
    q.declare()
    Producer(channel).publish({"a": 1}, exchange=q.exchange, routing_key="life")
    Producer(channel).publish({"a": 2}, exchange=q.exchange, routing_key="life")
    assert q.queue_declare(passive=True).message_count == 2
    assert q.get(no_ack=True).payload == {"a": 1}
    assert q.queue_declare(passive=True).message_count == 1
    assert not os.listdir(queue_dir(url, "life") / ".reserved")  # no_ack settles at once
    assert q.purge() == 1
    q.delete()
    assert not queue_dir(url, "life").exists()
    assert channel.get_table("tasks") == []
    with pytest.raises(conn.channel_errors):
        task_queue("life")(conn.channel()).queue_declare(passive=True)


# -- order and loss ----------------------------------------------------------------------


def test_single_producer_order_across_processes(
    url: str, conn: Connection, start: Callable[..., Any]
) -> None:
    task_queue("ordered")(conn.channel()).declare()
    proc = start(produce, url, "ordered", 0, 2000)
    simple = conn.SimpleQueue(task_queue("ordered"))
    seen: list[int] = []
    deadline = time.monotonic() + 30
    while len(seen) < 2000 and time.monotonic() < deadline:
        try:
            message = simple.get(timeout=1)
        except simple.Empty:
            continue
        seen.append(message.payload["i"])
        message.ack()
    proc.join(10)
    assert proc.exitcode == 0
    assert seen == list(range(2000))


def test_listing_never_skips_a_producers_earlier_message(
    tmp_path: Path, start: Callable[..., Any]
) -> None:
    # readdir is not a snapshot (ext4 returns hash order): a file renamed in mid-read can be
    # missed while a later one is returned. Every listing must still hold, per producer, a
    # prefix of what it published, or consumers would take its messages out of order.
    qdir = tmp_path / "q"
    qdir.mkdir()
    writers = [start(rename_in, str(qdir), p, 5000) for p in range(2)]
    store = store_for(str(tmp_path))
    listings = gappy = 0
    while any(w.exitcode is None for w in writers) or listings < 20:
        names = store.list_ready(str(qdir))
        listings += 1
        per_producer: dict[str, list[str]] = {}
        for name in names:
            per_producer.setdefault(producer_of(name), []).append(name)
        for mine in per_producer.values():
            counters = [int(n[30:42]) for n in mine]
            if counters != list(range(1, len(counters) + 1)):
                gappy += 1
    assert all(w.exitcode == 0 for w in writers)
    assert len(store.list_ready(str(qdir))) == 10_000
    assert gappy == 0, f"{gappy} of {listings} listings skipped an earlier message"


def test_no_loss_with_concurrent_producers_and_consumers(
    url: str, conn: Connection, start: Callable[..., Any]
) -> None:
    producers, per_producer = 4, 2500
    task_queue("busy")(conn.channel()).declare()
    stop, out = CTX.Event(), CTX.Queue()
    consumers = [start(consume_until_stopped, url, "busy", stop, out, n) for n in range(2)]
    writers = [start(produce, url, "busy", p, per_producer, 4096) for p in range(producers)]

    qdir = queue_dir(url, "busy")

    def drained() -> bool:
        return all(w.exitcode is not None for w in writers) and not any(
            n.endswith(".msg") for n in os.listdir(qdir)
        ) and not os.listdir(qdir / ".reserved")

    per_consumer: list[list[tuple[int, int]]] = [[], []]
    finished = 0
    deadline = time.monotonic() + 60
    while finished < 2 and time.monotonic() < deadline:
        if drained():
            stop.set()  # consumers send what they hold, then None
        try:
            index, batch = out.get(timeout=0.1)
        except stdqueue.Empty:
            continue
        if batch is None:
            finished += 1
        else:
            per_consumer[index].extend(batch)
    for proc in writers + consumers:
        proc.join(10)
        assert proc.exitcode == 0
    received = Counter(per_consumer[0] + per_consumer[1])
    expected = {(p, i) for p in range(producers) for i in range(per_producer)}
    assert set(received) == expected
    assert max(received.values()) == 1, "a message was delivered twice"
    for seen in per_consumer:  # each consumer sees each producer's messages in order
        for p in range(producers):
            mine = [i for q, i in seen if q == p]
            assert mine == sorted(mine)
    assert conn.SimpleQueue(task_queue("busy")).qsize() == 0
    assert not os.listdir(queue_dir(url, "busy") / ".reserved")


# -- fanout ------------------------------------------------------------------------------


def test_fanout_to_queues_bound_by_another_process(
    url: str, conn: Connection, start: Callable[..., Any]
) -> None:
    exchange = Exchange("bcast", type="fanout")
    producer = Producer(conn.channel(), exchange=exchange)
    exchange(producer.channel).declare()
    exdir = embedded_directory(url) / "exchanges" / "bcast"
    old = time.time() - 3600
    os.utime(exdir, (old, old))  # an old, trusted bindings table is cached by this publish
    producer.publish({"n": -1})
    proc = start(bind_fanout, url, "bcast", ["fan.a", "fan.b"])
    proc.join(20)
    assert proc.exitcode == 0
    for n in range(20):
        producer.publish({"n": n})
    for name in ("fan.a", "fan.b"):
        simple = conn.SimpleQueue(Queue(name, exchange))
        got = []
        for _ in range(20):
            message = simple.get(timeout=5)
            got.append(message.payload["n"])
            message.ack()
        assert got == list(range(20))
        assert simple.qsize() == 0


# -- leases ------------------------------------------------------------------------------


def test_killed_consumer_message_is_redelivered_acked_one_is_not(
    url: str, conn: Connection, start: Callable[..., Any]
) -> None:
    q = task_queue("lease")(conn.channel())
    q.declare()
    producer = Producer(conn.channel())
    for n in range(3):
        producer.publish({"n": n}, exchange=q.exchange, routing_key="lease")
    out = CTX.Queue()
    proc = start(reserve_and_hang, url, "lease", out)
    assert out.get(timeout=20) == [{"n": 0}, {"n": 1}]
    assert proc.pid is not None
    pid = proc.pid
    assert len(os.listdir(queue_dir(url, "lease") / ".reserved")) == 1
    os.kill(pid, signal.SIGKILL)
    # Not reaped yet: a zombie still has /proc/<pid>, and must count as dead.
    wait_for(lambda: process_start_time(pid) is None, what="the child to die")

    simple = conn.SimpleQueue(task_queue("lease"))
    first = simple.get(timeout=10)
    assert first.payload == {"n": 1}  # back at its original position, before n=2
    assert first.delivery_info["redelivered"] is True
    assert first.delivery_info["delivery_count"] == 2
    first.ack()
    second = simple.get(timeout=5)
    assert second.payload == {"n": 2}
    second.ack()
    with pytest.raises(simple.Empty):
        simple.get(timeout=0.3)  # n=0 was acked by the dead consumer: never again
    proc.join(5)


def test_reused_pid_does_not_keep_a_lease(url: str, conn: Connection) -> None:
    q = task_queue("reused")(conn.channel())
    q.declare()
    Producer(conn.channel()).publish({"n": 7}, exchange=q.exchange, routing_key="reused")
    qdir = queue_dir(url, "reused")
    (name,) = [n for n in os.listdir(qdir) if n.endswith(".msg")]
    # Our own pid with another start time: the owner that reserved it is gone.
    os.rename(qdir / name, qdir / ".reserved" / f"{name}~{os.getpid()}~1")
    assert get_body(conn, "reused") == {"n": 7}


def test_reject_with_requeue_keeps_position(conn: Connection) -> None:
    q = task_queue("requeue")(conn.channel())
    q.declare()
    producer = Producer(conn.channel())
    for n in range(3):
        producer.publish({"n": n}, exchange=q.exchange, routing_key="requeue")
    simple = conn.SimpleQueue(task_queue("requeue"))
    first = simple.get(timeout=5)
    assert first.payload == {"n": 0}
    first.requeue()
    again = simple.get(timeout=5)
    assert again.payload == {"n": 0}
    assert again.delivery_info["delivery_count"] == 2
    again.reject()  # without requeue: gone
    assert [get_body(conn, "requeue") for _ in range(2)] == [{"n": 1}, {"n": 2}]
    assert simple.qsize() == 0


def test_closing_the_connection_returns_unacked_messages(url: str) -> None:
    with Connection(url) as first:
        q = task_queue("unacked")(first.channel())
        q.declare()
        producer = Producer(first.channel())
        for n in range(3):
            producer.publish({"n": n}, exchange=q.exchange, routing_key="unacked")
        assert q.get().payload == {"n": 0}  # never acked
    with Connection(url) as second:
        assert [get_body(second, "unacked") for _ in range(3)] == [
            {"n": 0}, {"n": 1}, {"n": 2}
        ]


# -- expiry ------------------------------------------------------------------------------


def test_idle_queue_with_expires_is_deleted(url: str, conn: Connection) -> None:
    channel = conn.channel()
    exchange = Exchange("exp.x", type="direct")
    expiring = Queue("exp.idle", exchange, routing_key="idle", expires=1)
    polled = Queue("exp.polled", exchange, routing_key="polled", expires=1)
    consumed = Queue("exp.consumed", exchange, routing_key="consumed", expires=1)
    forever = Queue("exp.forever", exchange, routing_key="forever")
    for q in (expiring, polled, consumed, forever):
        q(channel).declare()
    # A registered consumer keeps its queue even though nothing here ever reads from it.
    Consumer(conn.channel(), [consumed]).consume()
    for q in (expiring, forever):
        Producer(channel).publish({"q": q.name}, exchange=exchange, routing_key=q.routing_key)
    assert queue_dir(url, "exp.idle").exists()
    start = time.monotonic()

    def idle_queue_gone() -> bool:
        # Polling exp.polled is activity for it, and runs housekeeping for the directory.
        assert channel.basic_get("exp.polled") is None
        return not queue_dir(url, "exp.idle").exists() and time.monotonic() - start > 2

    wait_for(idle_queue_gone, timeout=15, what="exp.idle to expire")
    routes = {queue for _, _, queue in channel.get_table("exp.x")}
    assert routes == {"exp.polled", "exp.consumed", "exp.forever"}
    assert queue_dir(url, "exp.polled").exists()
    assert queue_dir(url, "exp.consumed").exists()
    assert forever(channel).get(no_ack=True).payload == {"q": "exp.forever"}


def test_queue_expired_while_this_process_was_suspended_is_declared_again(
    url: str, conn: Connection
) -> None:
    channel = conn.channel()
    inbox = Queue("inbox.me", Exchange("direct.x", type="direct"), routing_key="inbox.me",
                  expires=1)
    inbox(channel).declare()
    qdir = queue_dir(url, "inbox.me")
    old = time.time() - 3600
    for path in (qdir, qdir / ".active", qdir / ".reserved"):
        os.utime(path, (old, old))  # as if everything here had been asleep for an hour

    def expired() -> bool:
        assert channel.basic_get("some.other.queue") is None  # runs housekeeping
        return not qdir.exists()

    wait_for(expired, what="inbox.me to expire")
    assert channel.basic_get("inbox.me") is None  # the consumer's poll declares it again
    assert qdir.exists()
    Producer(channel).publish({"back": True}, exchange="direct.x", routing_key="inbox.me")
    assert inbox(channel).get(no_ack=True).payload == {"back": True}


def test_garbage_and_dead_writers_temp_files(url: str, conn: Connection) -> None:
    q = task_queue("junk")(conn.channel())
    q.declare()
    qdir = queue_dir(url, "junk")
    (qdir / "00000000000000000001-00000001-000000000001.msg").write_bytes(b"{not json")
    (qdir / ".tmp" / f"00000000000000000002-00000001-000000000002~{os.getpid()}~1").write_bytes(
        b"half a mess"
    )
    Producer(conn.channel()).publish({"ok": 1}, exchange=q.exchange, routing_key="junk")
    assert get_body(conn, "junk") == {"ok": 1}
    assert len(os.listdir(qdir / ".bad")) == 1  # moved aside, never blocks the queue
    channel = conn.channel()
    wait_for(lambda: channel.basic_get("other") is None and not os.listdir(qdir / ".tmp"),
             what="housekeeping to remove the dead writer's temp file")


# -- event loop --------------------------------------------------------------------------


def run_hub(hub: Hub, until: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = hub.create_loop()
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            pytest.fail("hub did not deliver in time")
        next(loop)


def test_hub_delivers_messages_from_another_process(
    url: str, conn: Connection, start: Callable[..., Any]
) -> None:
    received: list[int] = []

    def on_message(body: Any, message: Any) -> None:
        received.append(body["i"])
        message.ack()

    queues = [task_queue(f"hub.{n}") for n in range(5)]
    consumer = Consumer(conn.channel(), queues, accept=["json"], callbacks=[on_message])
    hub = Hub()
    try:
        conn.transport.register_with_event_loop(conn.connection, hub)
        with consumer:
            proc = start(produce, url, "hub.0", 0, 200)
            run_hub(hub, lambda: len(received) == 200, timeout=20)
            proc.join(10)
        assert received == list(range(200))
        conn.transport.unregister_from_event_loop(conn.connection, hub)
    finally:
        hub.close()


def test_hub_respects_prefetch(conn: Connection) -> None:
    q = task_queue("prefetch")
    producer = Producer(conn.channel())
    q(producer.channel).declare()
    for n in range(5):
        producer.publish({"n": n}, exchange=q.exchange, routing_key="prefetch")
    held: list[Any] = []
    consumer = Consumer(conn.channel(), [q], accept=["json"], prefetch_count=2,
                        callbacks=[lambda body, m: held.append(m)])
    hub = Hub()
    ticks = [0]
    try:
        conn.transport.register_with_event_loop(conn.connection, hub)
        hub.call_repeatedly(0.01, lambda: ticks.__setitem__(0, ticks[0] + 1))
        with consumer:
            run_hub(hub, lambda: len(held) == 2)
            start = ticks[0]
            run_hub(hub, lambda: ticks[0] - start >= 10)  # ten more polls: nothing new
            assert [m.payload["n"] for m in held] == [0, 1]
            held[0].ack()
            run_hub(hub, lambda: len(held) == 3)
            assert held[2].payload == {"n": 2}
            for m in held[1:]:
                m.ack()
    finally:
        conn.transport.unregister_from_event_loop(conn.connection, hub)
        hub.close()


def test_blocking_drain_events_times_out(conn: Connection) -> None:
    consumer = Consumer(conn.channel(), [task_queue("quiet")], accept=["json"])
    with consumer, pytest.raises(socket.timeout):
        conn.drain_events(timeout=0.05)
