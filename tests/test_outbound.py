"""The worker's way out (transport/outbound.py) on the in-memory broker: results before
acks, acks before inbox messages, a batch the result store failed kept and sent first
next time, a refused result dropped without holding its ack back, and inbox messages held
in order while disconnected and sent after the reconnect.

Every message here is published into ``memory://`` and fetched as kombu delivers it; the
acks and the inbox are the broker's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Producer

from interactive_tasks import App, codec
from interactive_tasks.errors import ConfigurationError
from interactive_tasks.results import MemoryResultStore
from interactive_tasks.transport.memory import MemoryBroker
from interactive_tasks.transport.outbound import (
    RETRY_AFTER,
    KombuOutbound,
    Outbound,
    outbound_for,
)

APP = App("outbound", broker="memory://", namespace="ob")
INBOX = APP.names.inbox_name("c1")
TASK_QUEUE = APP.names.task_queue_name("default")


class OrderedStore(MemoryResultStore):
    """The in-memory store, noting what the broker held when results came in; it fails
    or refuses the next ``fail`` / ``refuse`` calls."""

    def __init__(self, broker: Broker) -> None:
        super().__init__(APP.conf.namespace, APP.conf.result_expires)
        self.broker = broker
        self.seen: list[tuple[int, int]] = []  # (unacked tasks, inbox messages) per call
        self.fail = 0
        self.refuse = 0

    def put_many(self, records: list[tuple[str, dict[str, Any]]]) -> None:
        self.seen.append((self.broker.memory.in_flight(), self.broker.inbox_size()))
        if self.fail:
            self.fail -= 1
            raise OSError("the store is down")
        if self.refuse:
            self.refuse -= 1
            raise ConfigurationError("the store refuses these ids")
        super().put_many(records)


class Broker:
    def __init__(self) -> None:
        self.memory = MemoryBroker.for_app(APP)
        self.conn = APP.connection()
        self.conn.connect()
        self.channel = self.conn.channel()
        APP.names.task_queue("default").bind(self.channel).declare()
        APP.names.inbox_queue("c1").bind(self.channel).declare()
        self.producer: Producer | None = Producer(self.conn.channel())
        self.wakes: list[float] = []

    def task(self, body: bytes = b"task") -> Any:
        """A task message as a worker holds it: delivered, not acknowledged."""
        raw = self.channel.prepare_message(body, None, codec.CONTENT_TYPE, "binary", {})
        self.channel.basic_publish(raw, exchange="", routing_key=TASK_QUEUE)
        message = self.channel.basic_get(TASK_QUEUE, no_ack=False)
        assert message is not None
        return message

    def inbox_size(self) -> int:
        return int(self.channel.queue_declare(INBOX, passive=True).message_count)

    def inbox(self) -> list[Any]:
        """What reached the client's inbox, oldest first (taken out)."""
        got = []
        while (message := self.channel.basic_get(INBOX, no_ack=True)) is not None:
            got.append(codec.loads(message.body))
        return got

    def outbound(self) -> Outbound:
        return outbound_for(APP, lambda: self.producer, self.wakes.append)


@pytest.fixture
def broker() -> Iterator[Broker]:
    b = Broker()
    store = OrderedStore(b)
    APP._results = store
    yield b
    APP._results = None
    b.channel.queue_purge(TASK_QUEUE)
    b.channel.queue_purge(INBOX)
    qos = b.channel.qos
    for tag in list(qos.in_flight):
        qos.ack(tag)
    b.conn.release()


def store_of() -> OrderedStore:
    store = APP.results
    assert isinstance(store, OrderedStore)
    return store


def result(task_id: str) -> tuple[str, dict[str, Any]]:
    return task_id, {"task_id": task_id, "state": "succeeded", "result": task_id}


def test_memory_broker_gets_the_kombu_outbound(broker: Broker) -> None:
    assert isinstance(broker.outbound(), KombuOutbound)


def test_results_go_before_acks_and_acks_before_inbox_messages(broker: Broker) -> None:
    out = broker.outbound()
    message = broker.task()
    assert out.send([result("t1")], [message], [(INBOX, {"n": 1})])
    # when the store took the result, the task was still unacknowledged and the
    # watcher had nothing: a client that sees the final event can read the result
    assert store_of().seen == [(1, 0)]
    assert broker.memory.in_flight() == 0
    assert APP.results.get("t1") == result("t1")[1]
    assert broker.inbox() == [{"n": 1}]


def test_a_batch_the_store_failed_is_kept_whole_and_sent_first_next_time(
        broker: Broker) -> None:
    out = broker.outbound()
    first, second = broker.task(b"first"), broker.task(b"second")
    store_of().fail = 1
    assert not out.send([result("t1")], [first], [(INBOX, {"n": 1})])
    # nothing after the results went: no ack, no event ahead of its stored result
    assert broker.memory.in_flight() == 2 and broker.inbox() == []
    assert out.pending and broker.wakes == [RETRY_AFTER]
    assert out.send([result("t2")], [second], [(INBOX, {"n": 2})])
    assert APP.results.get("t1") and APP.results.get("t2")
    assert broker.memory.in_flight() == 0
    assert broker.inbox() == [{"n": 1}, {"n": 2}]
    assert not out.pending


def test_a_refused_result_is_dropped_and_its_ack_still_goes(broker: Broker) -> None:
    out = broker.outbound()
    message = broker.task()
    store_of().refuse = 1
    assert out.send([result("bad id")], [message], [(INBOX, {"n": 1})])
    assert broker.memory.in_flight() == 0 and not out.pending
    assert broker.inbox() == [{"n": 1}]
    assert APP.results.get("bad id") is None


def test_inbox_messages_wait_in_order_while_disconnected(broker: Broker) -> None:
    out = broker.outbound()
    out.inbox(INBOX, {"n": 1})
    producer, broker.producer = broker.producer, None  # the connection went down
    out.inbox(INBOX, {"n": 2})
    out.send([], [], [(INBOX, {"n": 3})])
    assert broker.inbox() == [{"n": 1}]
    broker.producer = producer
    out.inbox(INBOX, {"n": 4})  # reconnected, not yet told: still behind the others
    assert broker.inbox() == []
    out.connected(None)
    assert broker.inbox() == [{"n": 2}, {"n": 3}, {"n": 4}]
