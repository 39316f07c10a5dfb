"""The worker's way out on RabbitMQ (transport/outbound.py ``AmqpOutbound``, and
transport/amqp_batch.py): one loop step's acks and inbox messages leave in one socket
write, in order, and a client's inbox takes them (signatures checked); a write that fails
keeps its inbox messages, first and in order, for the reconnect.

Against the real server.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Producer

from interactive_tasks import App, codec
from interactive_tasks.transport.client_side import KombuInbox
from interactive_tasks.transport.outbound import AmqpOutbound, outbound_for

from .conftest import AMQP_URL, require_broker, wait_for


@pytest.fixture
def app() -> Iterator[App]:
    require_broker("amqp")
    yield App("amqp-outbound", broker=AMQP_URL, namespace=f"ob{uuid.uuid4().hex[:8]}",
              secret="s3cret")


@pytest.fixture
def producer(app: App) -> Iterator[Producer]:
    conn = app.connection()
    conn.ensure_connection(max_retries=1)
    yield Producer(conn.channel())
    conn.release()


class CountingWrites:
    """Counts the socket writes of a py-amqp connection's transport."""

    def __init__(self, connection: Any, fail: bool = False) -> None:
        self.transport = connection.transport
        self.own = self.transport.write
        self.fail = fail
        self.count = 0
        self.transport.write = self.write

    def write(self, data: Any) -> None:
        self.count += 1
        if self.fail:
            raise OSError("the link went down")
        self.own(data)

    def restore(self) -> None:
        del self.transport.write


def test_rabbitmq_gets_the_amqp_outbound(app: App, producer: Producer) -> None:
    assert isinstance(outbound_for(app, lambda: producer, lambda delay: None), AmqpOutbound)


def test_one_step_leaves_in_one_write_in_order(app: App, producer: Producer) -> None:
    inbox = app.names.inbox_queue("c1")
    reader = KombuInbox(app, inbox)
    out = outbound_for(app, lambda: producer, lambda delay: None)
    connection = producer.channel.connection
    try:
        out.inbox(inbox.name, {"n": 0})  # declares the inbox (it waits for the broker)
        writes = CountingWrites(connection)
        try:
            assert out.send([], [], [(inbox.name, {"n": n}) for n in range(1, 50)])
        finally:
            writes.restore()
        assert writes.count == 1
        got: list[Any] = []

        def all_read() -> bool:
            got.extend(codec.loads(body) for body in reader.read(0.1))
            return len(got) >= 50

        wait_for(all_read)  # KombuInbox drops what is badly signed
        assert got == [{"n": n} for n in range(50)]
    finally:
        reader.close(delete=True)


def test_a_failed_write_keeps_its_messages_first_for_the_reconnect(
        app: App, producer: Producer) -> None:
    inbox = app.names.inbox_queue("c2")
    out = outbound_for(app, lambda: producer, lambda delay: None)
    channel = producer.channel
    try:
        out.inbox(inbox.name, {"n": 0})
        writes = CountingWrites(channel.connection, fail=True)
        try:
            assert out.send([], [], [(inbox.name, {"n": 1}), (inbox.name, {"n": 2})])
        finally:
            writes.restore()
        assert writes.count == 1
        out.inbox(inbox.name, {"n": 3})  # held behind the unsent ones: order kept
        out.connected(None)  # the reconnect resends them
        got = []
        while len(got) < 4:
            message = wait_for(lambda: channel.basic_get(inbox.name, no_ack=True))
            got.append(codec.loads(message.body))
        assert got == [{"n": n} for n in range(4)]
    finally:
        channel.queue_delete(inbox.name)
