"""The RabbitMQ hold (``interactive_tasks.transport.amqp_hold.TaskHold``) step by step,
against the real server with real deliveries: what each renewal leaves in the held queue
when tasks are handed over, renewed, settled, given back, or their copies vanish."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import amqp
import pytest
from kombu import Connection

from benchmarks.amqp_upkeep import held_records
from interactive_tasks.transport.amqp_hold import HeldDelivery, TaskHold
from interactive_tasks.transport.frames import redeliveries

from .conftest import AMQP_URL, require_broker, wait_for


class Harness:
    """A hold over ``n`` real deliveries of ``<ns>.tasks.bench``, with the worker's loop
    replaced by a list of callbacks run on demand."""

    def __init__(self, conn: Connection, ns: str, n: int) -> None:
        self.conn, self.ns = conn, ns
        self.records = {r.id: r for r in held_records(conn, ns, n)}
        self.soon: list[Callable[[], None]] = []
        self.lapsed = 0
        self.hold = TaskHold(namespace=ns, incarnation=f"test/{uuid.uuid4().hex[:8]}",
                             task_queue=lambda q: f"{ns}.tasks.{q}", hold_after=0.0,
                             ttl=30.0, records=self.records, call_soon=self.soon.append,
                             on_lapsed=self._on_lapsed, give_back=lambda record: None)
        self.hold.attach(conn)

    def _on_lapsed(self) -> None:
        self.lapsed += 1

    def run_soon(self) -> None:
        while self.soon:
            self.soon.pop(0)()

    @property
    def held_queue(self) -> str:
        return self.hold._state("bench").name

    def depth(self, queue: str) -> tuple[int, int]:
        """(ready, consumers) of ``queue`` as the server counts them."""
        declared = self.conn.channel().queue_declare(queue, passive=True)
        return declared.message_count, declared.consumer_count


@pytest.fixture
def harness_of() -> Iterator[Callable[[int], Harness]]:
    require_broker("amqp")
    ns = f"th{uuid.uuid4().hex[:10]}"
    conn = Connection(AMQP_URL, heartbeat=0)
    conn.ensure_connection()
    made: list[Harness] = []

    def make(n: int) -> Harness:
        made.append(Harness(conn, ns, n))
        return made[-1]

    yield make
    channel = conn.channel()
    for harness in made:
        channel.queue_delete(harness.held_queue)
    channel.queue_delete(f"{ns}.tasks.bench")
    conn.release()


def test_hand_over_renewal_and_settling(harness_of):
    h = harness_of(2)
    h.hold.renew()
    assert all(isinstance(r.kombu_message, HeldDelivery) for r in h.records.values())
    assert h.depth(h.held_queue)[0] == 2
    # the deliveries were acknowledged: nothing left unacknowledged in the task queue
    wait_for(lambda: h.conn.channel().queue_declare(
        f"{h.ns}.tasks.bench", passive=True).message_count == 0, 2, message="acks")
    for _ in range(3):
        h.hold.renew()
        assert h.depth(h.held_queue)[0] == 2  # renewed, not doubled, not lost
    first = next(iter(h.records.values()))
    first.kombu_message.ack()  # what the relay does once the task's result is stored
    assert h.soon, "settling schedules a renewal at once"
    h.run_soon()
    assert h.depth(h.held_queue)[0] == 1
    assert h.lapsed == 0


def test_reject_with_requeue_puts_the_task_back_in_its_queue(harness_of):
    h = harness_of(1)
    h.hold.renew()
    [record] = h.records.values()
    record.kombu_message.reject(requeue=True)
    h.run_soon()
    assert h.depth(h.held_queue)[0] == 0
    assert h.depth(f"{h.ns}.tasks.bench")[0] == 1


def test_a_copy_gone_from_the_held_queue_is_given_away_and_no_longer_renewed(harness_of):
    h = harness_of(1)
    h.hold.renew()
    h.conn.channel().queue_purge(h.held_queue)  # as if it had expired
    h.hold.renew()
    [record] = h.records.values()
    assert record.kombu_message.given_away and h.lapsed == 1
    h.hold.renew()
    assert h.depth(h.held_queue)[0] == 0 and h.lapsed == 1


def test_after_a_reconnect_copies_it_does_not_know_are_dropped(harness_of):
    """A transaction whose outcome the worker never learnt (the connection dropped during
    the commit) may have left copies behind; the first renewal on the new connection
    drains them, keeping only the copies of tasks still held — also when none is."""
    h = harness_of(2)
    h.hold.renew()
    kept, settled = h.records.values()
    settled.kombu_message.ack()
    h.run_soon()
    ghost = amqp.Message(b"{}", delivery_mode=2, message_id="ghost")
    h.conn.channel().basic_publish(ghost, exchange="", routing_key=h.held_queue)
    h.hold.attach(h.conn)  # a new channel, as after a reconnect
    h.hold.renew()
    channel = h.conn.channel()
    left = channel.basic_get(h.held_queue, no_ack=True)
    assert left.properties["message_id"] == kept.id
    assert channel.basic_get(h.held_queue, no_ack=True) is None
    kept.kombu_message.ack()
    h.run_soon()
    h.conn.channel().basic_publish(ghost, exchange="", routing_key=h.held_queue)
    h.hold.attach(h.conn)
    h.hold.renew()  # nothing held here any more: the queue is drained all the same
    assert h.depth(h.held_queue)[0] == 0


class _Message:
    def __init__(self, headers: dict[str, Any], redelivered: bool = False) -> None:
        self.headers = headers
        self.delivery_info = {"redelivered": redelivered}


def test_redeliveries_count_held_deaths_not_delay_levels():
    held = {"queue": "ns.held.w@h/1234.default", "reason": "expired", "count": 2}
    delay = {"queue": "ns.delay.03", "reason": "expired", "count": 1}
    assert redeliveries(_Message({"x-death": [delay]}), "ns") == 0
    assert redeliveries(_Message({"x-death": [held, delay]}), "ns") == 2
    assert redeliveries(_Message({"x-death": [held]}, redelivered=True), "ns") == 3
    assert redeliveries(_Message({"x-death": "junk"}), "ns") == 0
    assert redeliveries(_Message({"x-death": [held]}), "other") == 0
