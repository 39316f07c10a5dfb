"""RabbitMQ publishes past kombu's producer (``transport/amqp_fast.py``) against the real
server: what arrives is what kombu's producer sends, and a publish on a connection the
broker has dropped raises (so the caller reconnects and sends again) instead of writing
into a dead socket; the client's task and control publishes take that path and still
arrive after their connection was dropped."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from interactive_tasks import codec
from interactive_tasks.transport.amqp_fast import FastPublisher

from .conftest import AMQP_URL, queue_depth, require_broker, wait_for


@pytest.fixture
def connection() -> Iterator[Any]:
    """A kombu connection to the test RabbitMQ and a fresh queue name on it."""
    from kombu import Connection

    require_broker("amqp")
    conn = Connection(AMQP_URL)
    conn.connect()
    yield conn
    conn.release()


def _queue(conn: Any) -> Any:
    from kombu import Queue

    name = f"itest.fast.{uuid.uuid4().hex[:8]}"
    queue = Queue(name, routing_key=name, durable=False, auto_delete=False,
                  max_priority=9)
    queue(conn.default_channel).declare()
    return queue


def _take(conn: Any, name: str) -> Any:
    """The next message of queue ``name`` (py-amqp's message), polled for."""
    channel = conn.default_channel
    return wait_for(lambda: channel.basic_get(name, no_ack=True), message=f"a message in {name}")


@pytest.mark.parametrize(("signature", "priority"), [
    (None, None), ("ab" * 32, None), (None, 0), ("cd" * 32, 7),
])
def test_a_fast_publish_carries_what_kombus_producer_sends(
        connection: Any, signature: str | None, priority: int | None) -> None:
    from kombu import Producer

    queue = _queue(connection)
    channel = connection.default_channel
    try:
        headers = {} if signature is None else {codec.SIGNATURE_HEADER: signature}
        Producer(channel).publish(b"kombu", routing_key=queue.name, exchange="",
                                  content_type=codec.CONTENT_TYPE,
                                  content_encoding="binary", headers=headers,
                                  priority=priority)
        FastPublisher().publish(channel, queue.name, b"fast", signature, priority)
        by_kombu, fast = _take(connection, queue.name), _take(connection, queue.name)
        assert (by_kombu.body, fast.body) == (b"kombu", b"fast")
        assert fast.properties == by_kombu.properties
        assert fast.delivery_info["routing_key"] == queue.name
    finally:
        channel.queue_delete(queue.name)


def test_a_body_larger_than_a_frame_arrives_whole(connection: Any) -> None:
    queue = _queue(connection)
    channel = connection.default_channel
    body = bytes(range(256)) * (connection.connection.frame_max // 128)
    try:
        FastPublisher().publish(channel, queue.name, body, "ef" * 32)
        assert _take(connection, queue.name).body == body
    finally:
        channel.queue_delete(queue.name)


def test_a_publish_on_a_dropped_connection_raises(connection: Any) -> None:
    """The broker closing the connection (here: the socket's read side ends, as when the
    server goes away) fails the next publish, as py-amqp's own read before a publish
    would, instead of writing into a dead socket."""
    import socket

    queue = _queue(connection)
    other = connection.clone()
    other.connect()
    try:
        channel = other.default_channel
        publisher = FastPublisher()
        publisher.publish(channel, queue.name, b"before", None)
        sock = other.connection.transport.sock
        sock.shutdown(socket.SHUT_RD)  # reads now see the end of the stream
        with pytest.raises(Exception):  # noqa: B017 - py-amqp's connection errors vary
            publisher.publish(channel, queue.name, b"after", None)
    finally:
        connection.default_channel.queue_delete(queue.name)
        try:
            other.collect()
        except Exception:
            pass


def test_the_client_publishes_fast_and_sends_again_after_its_connection_dropped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from kombu import Connection

    from interactive_tasks import App

    require_broker("amqp")
    namespace = f"itf{uuid.uuid4().hex[:8]}"
    app = App("fast", broker=AMQP_URL, namespace=namespace, secret="s3cret")
    client = app.client
    fast = client._fast
    assert fast is not None
    calls: list[str] = []
    original = fast.publish

    def counting(channel: Any, routing_key: str, *args: Any) -> None:
        calls.append(routing_key)
        original(channel, routing_key, *args)

    monkeypatch.setattr(fast, "publish", counting)
    queue = app.names.task_queue("fastq")
    try:
        client.publish_raw(b"one", routing_key=queue.routing_key, exchange=queue.exchange,
                           declare=[queue])  # declares: through kombu
        client.publish_raw(b"two", routing_key=queue.routing_key, exchange=queue.exchange,
                           declare=[queue])
        assert calls == [queue.name]
        # both in the queue before the cut (RabbitMQ may drop an unconfirmed publish
        # still in its channel when the connection under it goes, whoever wrote it)
        wait_for(lambda: queue_depth(AMQP_URL, queue.name) == 2, message="two messages")
        conn = client._pub_conn
        assert conn is not None
        conn.connection.transport.sock.shutdown(socket.SHUT_RDWR)
        client.publish_raw(b"three", routing_key=queue.routing_key,
                           exchange=queue.exchange, declare=[queue])
        with Connection(AMQP_URL) as reader:
            bodies = [_take(reader, queue.name) for _ in range(3)]
        assert [m.body for m in bodies] == [b"one", b"two", b"three"]
        for message in bodies:
            signature = message.properties["application_headers"][codec.SIGNATURE_HEADER]
            assert app.secret is not None
            assert codec.verify(app.secret, message.body, signature)
            assert message.properties["delivery_mode"] == 2
    finally:
        client.close()
        with Connection(AMQP_URL) as conn:
            conn.default_channel.queue_delete(queue.name)


def test_the_inbox_read_on_py_amqps_channel_keeps_signed_messages_only() -> None:
    from kombu import Connection

    from interactive_tasks import App
    from interactive_tasks.transport.client_side import AmqpInbox, client_side_for

    require_broker("amqp")
    app = App("fast", broker=AMQP_URL, namespace=f"itf{uuid.uuid4().hex[:8]}",
              secret="s3cret")
    assert app.secret is not None
    inbox_queue = app.names.inbox_queue(uuid.uuid4().hex[:16])
    inbox = client_side_for(app, lambda *a, **k: None).open_inbox(inbox_queue)
    assert isinstance(inbox, AmqpInbox)
    try:
        with Connection(AMQP_URL) as conn:
            channel = conn.default_channel
            publisher = FastPublisher()
            publisher.publish(channel, inbox_queue.name, b"unsigned", None)
            publisher.publish(channel, inbox_queue.name, b"forged", "00" * 32)
            publisher.publish(channel, inbox_queue.name, b"signed",
                              codec.sign(app.secret, b"signed"))
            arrived: list[bytes] = []
            wait_for(lambda: arrived.extend(inbox.read(0.05)) or b"signed" in arrived,
                     message="the signed message")
        assert arrived == [b"signed"]
    finally:
        inbox.close(delete=True)
