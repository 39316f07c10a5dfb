"""What RabbitMQ's held tasks and delay levels cost, on the real server.

::

    python -m benchmarks.amqp_upkeep [--url amqp://guest:guest@127.0.0.1:5672//]

* **Hand-over**: ``TaskHold.renew`` when N deliveries are due (one transaction on the held
  queue, then the acks of the deliveries), for N = 1 and 8.
* **Renewal**: ``TaskHold.renew`` with N copies held: take them, publish fresh ones,
  acknowledge, commit — what a worker with N long tasks spends every ``worker_heartbeat``.
* **Delayed publish**: ``DelayedPublisher.publish`` (confirmed) — the first on a namespace
  (it declares the 28 levels), the first on a new connection (a look at the marker
  exchange), and the ones after.
* **Delay accuracy**: how late 1-3 s delays reach their queue (ms after the whole second).

Each figure: median (min-max) over the samples. The namespace's queues and exchanges are
deleted at the end.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import amqp
from kombu import Connection, Consumer, Producer, Queue

from interactive_tasks import codec
from interactive_tasks.transport.amqp_delay import (
    LEVELS,
    DelayedPublisher,
    complete_marker,
    deliver_exchange,
    level_name,
)
from interactive_tasks.transport.amqp_hold import TaskHold


@dataclass
class _Message:
    queue: str


@dataclass
class _Record:
    """The fields of a worker's task record that the hold reads."""

    id: str
    kombu_message: Any
    message: _Message
    received: float = 0.0
    started: float | None = 0.0
    is_final: bool = False
    duplicates: list[Any] = field(default_factory=list)


def fmt(samples: list[float]) -> str:
    ms = [s * 1000 for s in samples]
    return f"{statistics.median(ms):.2f} ms ({min(ms):.2f}-{max(ms):.2f}, n={len(ms)})"


def held_records(conn: Connection, ns: str, n: int) -> list[_Record]:
    """``n`` real deliveries of ``<ns>.tasks.bench``, unacknowledged, wrapped as worker
    records (also used by tests/test_amqp_hold.py)."""
    queue = Queue(f"{ns}.tasks.bench", routing_key=f"{ns}.tasks.bench", durable=True)
    producer = Producer(conn.channel())
    for i in range(n):
        producer.publish(codec.dumps({"id": f"t{i}"}), routing_key=queue.name, exchange="",
                         declare=[queue], content_type=codec.CONTENT_TYPE,
                         content_encoding="binary")
    got: list[Any] = []
    consumer = Consumer(conn.channel(), queues=[queue], on_message=got.append, accept=None,
                        prefetch_count=n)
    consumer.consume()
    while len(got) < n:
        conn.drain_events(timeout=5)
    consumer.cancel()  # the deliveries stay unacknowledged; no more come
    return [_Record(f"t{i}-{uuid.uuid4().hex[:6]}", m, _Message("bench"))
            for i, m in enumerate(got)]


def bench_hold(url: str, ns: str, n: int, rounds: int) -> tuple[list[float], list[float]]:
    """(hand-over times, renewal times) of a hold with ``n`` tasks."""
    handover, renewal = [], []
    for _ in range(rounds):
        with Connection(url, heartbeat=0) as conn:
            conn.ensure_connection()
            records = {r.id: r for r in held_records(conn, ns, n)}
            hold = TaskHold(namespace=ns, incarnation=f"bench/{uuid.uuid4().hex[:8]}",
                            task_queue=lambda q: f"{ns}.tasks.{q}", hold_after=0.0,
                            ttl=30.0, records=records, call_soon=lambda cb: None,
                            on_lapsed=lambda: None, give_back=lambda record: None)
            hold.attach(conn)
            started = time.perf_counter()
            hold.renew()
            handover.append(time.perf_counter() - started)
            for _ in range(10):
                started = time.perf_counter()
                hold.renew()
                renewal.append(time.perf_counter() - started)
            for record in records.values():
                record.kombu_message.ack()  # drops the copies
            hold.renew()
            for state in hold.queues.values():
                hold.channel.queue_delete(state.name)
    return handover, renewal


def bench_delay(url: str, ns: str) -> dict[str, list[float]]:
    host = url.split("@", 1)[1].split("/", 1)[0]
    user, password = url.split("://", 1)[1].split("@", 1)[0].split(":", 1)

    def connect() -> Any:
        conn = amqp.Connection(host, userid=user, password=password, heartbeat=0)
        conn.connect()
        return conn

    def declare(channel: Any, name: str) -> None:
        channel.queue_declare(name, durable=True, auto_delete=False)

    queue = f"{ns}.tasks.delayed"
    out: dict[str, list[float]] = {"first": [], "new connection": [], "later": [],
                                   "lateness": []}
    conn = connect()
    pub = DelayedPublisher(conn, conn.channel(), ns, declare)
    body = codec.dumps({"id": "x"})
    started = time.perf_counter()
    pub.publish(queue, body, {}, None, 1)
    out["first"].append(time.perf_counter() - started)
    for _ in range(3):
        other = connect()
        fresh = DelayedPublisher(other, other.channel(), ns, declare)
        started = time.perf_counter()
        fresh.publish(queue, body, {}, None, 1)
        out["new connection"].append(time.perf_counter() - started)
        other.close()
    for _ in range(50):
        started = time.perf_counter()
        pub.publish(queue, body, {}, None, 1)
        out["later"].append(time.perf_counter() - started)
    channel = conn.channel()
    channel.queue_purge(queue)
    for level in range(LEVELS):
        channel.queue_purge(level_name(ns, level))
    sent: dict[str, tuple[float, int]] = {}
    for i in range(30):
        tag, delay = f"m{i}", 1 + i % 3
        sent[tag] = (time.time(), delay)
        pub.publish(queue, codec.dumps({"id": tag}), {}, None, delay)

    def on_message(msg: Any) -> None:
        tag = codec.loads(msg.body)["id"]
        at, delay = sent.pop(tag)
        out["lateness"].append(time.time() - at - delay)

    channel.basic_consume(queue, callback=on_message, no_ack=True)
    deadline = time.monotonic() + 15
    while sent and time.monotonic() < deadline:
        try:
            conn.drain_events(timeout=0.5)
        except TimeoutError:
            pass
    conn.close()
    return out


def cleanup(url: str, ns: str) -> None:
    with Connection(url, heartbeat=0) as conn:
        channel = conn.channel()
        for level in range(LEVELS):
            channel.queue_delete(level_name(ns, level))
            channel.exchange_delete(level_name(ns, level))
        for name in (deliver_exchange(ns), complete_marker(ns)):
            channel.exchange_delete(name)
        for queue in ("bench", "delayed"):
            channel.queue_delete(f"{ns}.tasks.{queue}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.amqp_upkeep",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672//")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    ns = f"bench{uuid.uuid4().hex[:8]}"
    try:
        for n in (1, 8):
            handover, renewal = bench_hold(args.url, ns, n, args.rounds)
            print(f"hand-over of {n} task(s): {fmt(handover)}")
            print(f"renewal with {n} held:    {fmt(renewal)}")
        for name, samples in bench_delay(args.url, ns).items():
            print(f"delayed publish, {name}: {fmt(samples)}" if name != "lateness" else
                  f"delay lateness (1-3 s delays): {fmt(samples)}")
    finally:
        cleanup(args.url, ns)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
