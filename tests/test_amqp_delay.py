"""The RabbitMQ delay levels (``interactive_tasks.transport.amqp_delay``) against the real
server: a delayed message reaches its task queue on time and not before, a short delay is
never held up behind a long one, and what waits can be counted and read without moving it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from interactive_tasks import codec
from interactive_tasks.transport.amqp_delay import (
    LEVELS,
    MAX_DELAY,
    DelayedPublisher,
    delay_seconds,
    level_counts,
    peek,
    routing_key,
)

from .conftest import AMQP_URL, delete_amqp_namespace, require_broker, wait_for


def test_routing_key_spells_the_delay_in_bits_most_significant_first():
    key = routing_key(5, "ns.tasks.default")
    words = key.split(".")
    assert len(words) == LEVELS + 3
    assert "".join(words[:LEVELS]) == "0" * (LEVELS - 3) + "101"
    assert words[LEVELS:] == ["ns", "tasks", "default"]
    assert routing_key(MAX_DELAY, "q").startswith("1." * LEVELS)
    with pytest.raises(ValueError, match="outside"):
        routing_key(MAX_DELAY + 1, "q")
    with pytest.raises(ValueError, match="outside"):
        routing_key(-1, "q")


def test_delay_seconds_rounds_down_and_never_goes_negative():
    assert delay_seconds(100.9, now=90.0) == 10
    assert delay_seconds(89.0, now=90.0) == 0
    assert delay_seconds(1e12, now=0.0) == MAX_DELAY


@pytest.fixture
def amqp_conn() -> Iterator[Any]:
    import amqp

    require_broker("amqp")
    host = AMQP_URL.split("@", 1)[1].split("/", 1)[0]
    conn = amqp.Connection(host, userid="guest", password="guest", heartbeat=0)
    conn.connect()
    yield conn
    conn.close()


@pytest.fixture
def namespace() -> Iterator[str]:
    ns = f"td{uuid.uuid4().hex[:10]}"
    yield ns
    delete_amqp_namespace(AMQP_URL, ns, task_queues=("q",))


def publisher(conn: Any, ns: str) -> DelayedPublisher:
    def declare(channel: Any, name: str) -> None:
        channel.queue_declare(name, durable=True, auto_delete=False)

    return DelayedPublisher(conn, conn.channel(), ns, declare)


def message(tag: str) -> bytes:
    return codec.dumps({"id": tag, "task": "t.sleepy", "queue": "q", "eta": 0.0})


def arrivals(conn: Any, queue: str, expect: int, timeout: float) -> dict[str, float]:
    """{id: arrival time} of the first ``expect`` messages to reach ``queue``."""
    channel = conn.channel()
    seen: dict[str, float] = {}

    def on_message(msg: Any) -> None:
        seen[codec.loads(msg.body)["id"]] = time.time()

    channel.basic_consume(queue, callback=on_message, no_ack=True)

    def more() -> bool:
        try:
            conn.drain_events(timeout=0.05)
        except TimeoutError:
            pass
        return len(seen) >= expect

    wait_for(more, timeout, interval=0, message=f"{expect} message(s) in {queue}")
    channel.close()
    return seen


def test_a_delayed_message_arrives_on_time_and_not_before(amqp_conn, namespace):
    pub = publisher(amqp_conn, namespace)
    queue = f"{namespace}.tasks.q"
    sent = time.time()
    pub.publish(queue, message("three"), {}, None, 3)
    got = arrivals(amqp_conn, queue, 1, 10)
    assert 3.0 <= got["three"] - sent <= 4.0, got["three"] - sent


def test_a_short_delay_is_not_held_up_behind_a_longer_one(amqp_conn, namespace):
    """A 7 s delay published after a 30 s one arrives after 7 s (one queue with per-message
    TTLs would keep it behind the 30 s message); the 30 s one still waits, at level 4."""
    pub = publisher(amqp_conn, namespace)
    queue = f"{namespace}.tasks.q"
    pub.publish(queue, message("long"), {}, None, 30)
    sent = time.time()
    pub.publish(queue, message("short"), {}, None, 7)
    counts = level_counts(amqp_conn.channel(), namespace)
    assert counts == {4: 1, 2: 1}, counts  # 30 = 0b11110 starts at 16 s, 7 = 0b111 at 4 s
    got = arrivals(amqp_conn, queue, 1, 12)
    assert list(got) == ["short"] and 7.0 <= got["short"] - sent <= 8.0, got
    assert sum(level_counts(amqp_conn.channel(), namespace).values()) == 1


def test_peek_reads_waiting_tasks_and_leaves_them_in_place(amqp_conn, namespace):
    pub = publisher(amqp_conn, namespace)
    queue = f"{namespace}.tasks.q"
    sent = time.time()
    for tag in ("a", "b"):
        pub.publish(queue, message(tag), {"x-tag": tag}, 5, 2)
    seen = peek(amqp_conn, namespace, per_level=10)
    assert sorted(t.id for t in seen) == ["a", "b"]
    assert {(t.name, t.queue, t.level) for t in seen} == {("t.sleepy", "q", 1)}
    assert peek(amqp_conn, namespace, per_level=1)[0].id == "a"  # order kept
    got = arrivals(amqp_conn, queue, 2, 10)
    assert all(2.0 <= t - sent <= 3.0 for t in got.values()), got
