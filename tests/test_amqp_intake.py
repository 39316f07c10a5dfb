"""The worker's RabbitMQ intake past kombu's consumer (``transport/amqp_intake.py``)
against the real server: a delivery carries what kombu's ``Message`` carries for the same
message, it acknowledges and requeues, the prefetch window holds (a larger new one lets
more through, a smaller one takes no more), and the task queues can be stopped, added and
dropped. The whole worker on RabbitMQ runs on it in tests/test_amqp.py and the other
RabbitMQ tests."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from interactive_tasks import App, codec
from interactive_tasks.transport.amqp_intake import AmqpDelivery, AmqpIntake
from interactive_tasks.transport.frames import redeliveries
from interactive_tasks.transport.worker_side import intake_for

from .conftest import AMQP_URL, holds_for, queue_depth, require_broker, wait_for

HOST = "w1@test"


def _after_drain(conn: Any, check: Callable[[], Any]) -> Any:
    """``check()`` once ``conn`` (a kombu connection) handled what it received within
    50 ms (a predicate for ``wait_for`` and ``holds_for``)."""
    try:
        conn.drain_events(timeout=0.05)
    except TimeoutError:
        pass
    return check()


class Intake:
    """An :class:`AmqpIntake` on a connection of its own, with what it hands over kept."""

    def __init__(self, app: App, queues: list[str], prefetch: int) -> None:
        self.tasks: list[AmqpDelivery] = []
        self.control: list[AmqpDelivery] = []
        intake = intake_for(app, HOST, on_task=self.tasks.append,
                            on_garbage=lambda message, reason: None,
                            on_control=self.control.append,
                            on_control_frames=lambda frames: None)
        assert isinstance(intake, AmqpIntake)
        self.intake = intake
        self.conn: Any = app.connection()
        self.conn.ensure_connection(max_retries=1)
        intake.start(self.conn, None, queues, prefetch, take_tasks=True)

    def drained(self, check: Callable[[], Any]) -> Any:
        """``check()`` after handling what arrived (see ``_after_drain``)."""
        return _after_drain(self.conn, check)

    def task(self, index: int) -> AmqpDelivery:
        """The ``index``-th task delivery (0 first), read for."""
        wait_for(lambda: self.drained(lambda: len(self.tasks) > index),
                 message=f"task delivery {index}")
        return self.tasks[index]

    def close(self) -> None:
        if self.conn is not None:
            self.intake.close()
            self.conn.release()
            self.conn = None


@pytest.fixture
def app() -> Iterator[App]:
    require_broker("amqp")
    namespace = f"tai{uuid.uuid4().hex[:8]}"
    made = App("intake", broker=AMQP_URL, namespace=namespace, secret="s3cret")
    yield made
    with made.connection() as conn:
        channel = conn.channel()
        for name in ("default", "extra"):
            channel.queue_delete(made.names.task_queue_name(name))
        channel.queue_delete(made.names.control_queue_name(HOST))
        channel.exchange_delete(made.names.broadcast_exchange.name)


@pytest.fixture
def intake_of(app: App) -> Iterator[Any]:
    made: list[Intake] = []

    def make(queues: list[str] | None = None, prefetch: int = 10) -> Intake:
        intake = Intake(app, queues or ["default"], prefetch)
        made.append(intake)
        return intake

    yield make
    for intake in made:
        intake.close()


def _publish(app: App, queue: str, body: bytes, **extra: Any) -> None:
    from kombu import Producer

    task_queue = app.names.task_queue(queue)
    assert app.secret is not None
    with app.connection() as conn:
        Producer(conn.channel()).publish(
            body, routing_key=task_queue.routing_key, exchange="",
            content_type=codec.CONTENT_TYPE, content_encoding="binary",
            headers={codec.SIGNATURE_HEADER: codec.sign(app.secret, body), "x-n": 7},
            declare=[task_queue], **extra)


def test_a_delivery_carries_what_kombus_message_carries(app: App, intake_of: Any) -> None:
    from kombu import Consumer

    _publish(app, "default", b"same", priority=3)
    _publish(app, "default", b"same", priority=3)
    by_kombu: list[Any] = []
    with app.connection() as conn:
        consumer = Consumer(conn.channel(), queues=[app.names.task_queue("default")],
                            on_message=by_kombu.append, accept=None, prefetch_count=1)
        consumer.consume()
        wait_for(lambda: _after_drain(conn, lambda: by_kombu), message="kombu's delivery")
        consumer.cancel()
        ours = intake_of().task(0)  # the other one
        kombus = by_kombu[0]
        for name in ("body", "headers", "content_type", "content_encoding", "properties"):
            assert getattr(ours, name) == getattr(kombus, name), name
        for key in ("routing_key", "exchange", "redelivered"):
            assert ours.delivery_info[key] == kombus.delivery_info[key], key
        assert isinstance(ours.body, bytes)
        assert ours.delivery_tag == ours.delivery_info["delivery_tag"]
        assert ours.channel.connection is not None
        kombus.ack()
        ours.ack()


def test_ack_settles_and_reject_with_requeue_delivers_again_marked(
        app: App, intake_of: Any) -> None:
    from kombu.exceptions import MessageStateError

    _publish(app, "default", b"again")
    intake = intake_of()
    first = intake.task(0)
    assert not first.delivery_info["redelivered"] and redeliveries(first, "x") == 0
    first.reject(requeue=True)
    assert first.acknowledged
    with pytest.raises(MessageStateError):
        first.ack()
    second = intake.task(1)
    assert second.body == b"again" and second.delivery_info["redelivered"]
    assert redeliveries(second, app.conf.namespace) == 1
    second.ack()
    intake.close()  # an unacknowledged delivery would go back to the queue now
    name = app.names.task_queue_name("default")
    assert wait_for(lambda: queue_depth(AMQP_URL, name) == 0, message="an empty queue")


def test_the_prefetch_window_holds_and_a_larger_one_applies_at_once(
        app: App, intake_of: Any) -> None:
    for body in (b"one", b"two", b"three", b"four"):
        _publish(app, "default", body)
    intake = intake_of(prefetch=1)
    assert intake.task(0).body == b"one"
    name = app.names.task_queue_name("default")
    holds_for(lambda: intake.drained(lambda: len(intake.tasks) == 1
                                     and queue_depth(AMQP_URL, name) == 3),
              0.5, message="one delivery in the window of 1")
    # RabbitMQ applies a per-consumer window to consumers started after it: one more
    # consumer takes the difference, so two are unacknowledged in all, not three
    intake.intake.set_prefetch(2)
    assert intake.task(1).body == b"two"
    holds_for(lambda: intake.drained(lambda: len(intake.tasks) == 2
                                     and queue_depth(AMQP_URL, name) == 2),
              0.3, message="two deliveries in the new window of 2")
    intake.tasks[1].ack()
    assert intake.task(2).body == b"three"


def _unacked(app: App, intake: Intake, count: int, waiting: int) -> Callable[[], bool]:
    name = app.names.task_queue_name("default")
    return lambda: intake.drained(lambda: len(intake.tasks) == count
                                  and queue_depth(AMQP_URL, name) == waiting)


def test_a_smaller_prefetch_window_takes_no_more_and_a_larger_one_more(
        app: App, intake_of: Any) -> None:
    for n in range(8):
        _publish(app, "default", b"%d" % n)
    intake = intake_of(prefetch=2)
    intake.task(1)
    holds_for(_unacked(app, intake, 2, 6), 0.3, message="two held in the window of 2")
    # the consumers started again would not count the two held: 3, then 4 unacked
    intake.intake.set_prefetch(1)
    holds_for(_unacked(app, intake, 2, 6), 0.3, message="still two after shrinking to 1")
    intake.intake.set_prefetch(1)
    holds_for(_unacked(app, intake, 2, 6), 0.3, message="still two after 1 again")
    intake.intake.set_prefetch(4)
    intake.task(3)
    holds_for(_unacked(app, intake, 4, 4), 0.3, message="four held in the window of 4")
    # back to 2: the consumer added for the growth (holding "2" and "3") goes; what it
    # holds still settles, and the first one takes two again once its own are settled
    intake.intake.set_prefetch(2)
    for delivery in intake.tasks[:3]:
        delivery.ack()
    intake.task(5)
    holds_for(_unacked(app, intake, 6, 2), 0.3, message="two in the window of 2")
    intake.tasks[3].ack()  # the last one of the cancelled consumer: none more comes
    holds_for(_unacked(app, intake, 6, 2), 0.3, message="the window of 2 full")
    intake.tasks[4].ack()
    assert intake.task(6).body == b"6"
    holds_for(_unacked(app, intake, 7, 1), 0.3, message="one more in the window of 2")


def test_a_queue_the_broker_refuses_to_declare_leaves_the_task_channel_working(
        app: App, intake_of: Any) -> None:
    from interactive_tasks.transport.worker_side import QueueRefused

    other = app.names.task_queue_name("other")
    with app.connection() as conn:
        # without the x-max-priority of the worker's task queues: its declaration fails
        conn.channel().queue_declare(other, durable=True, auto_delete=False)
    try:
        _publish(app, "default", b"before")
        intake = intake_of()
        before = intake.task(0)
        with pytest.raises(QueueRefused, match=f"{other}: PRECONDITION_FAILED"):
            intake.intake.add_queue("other")
        assert intake.intake.queues == [app.names.task_queue_name("default")]
        before.ack()  # the channel it came on still stands
        _publish(app, "default", b"after")
        assert intake.task(1).body == b"after"
        intake.tasks[1].ack()
        intake.intake.add_queue("extra")  # and a good one is still added
        _publish(app, "extra", b"extra")
        assert intake.task(2).body == b"extra"
    finally:
        with app.connection() as conn:
            conn.channel().queue_delete(other)


def test_stop_add_and_cancel_task_queues(app: App, intake_of: Any) -> None:
    intake = intake_of()
    intake.intake.add_queue("extra")
    _publish(app, "extra", b"extra")
    assert intake.task(0).body == b"extra"
    intake.intake.cancel_queue("extra")
    _publish(app, "extra", b"left")
    _publish(app, "default", b"default")
    assert intake.task(1).body == b"default"
    assert queue_depth(AMQP_URL, app.names.task_queue_name("extra")) == 1
    intake.intake.stop_tasks()
    _publish(app, "default", b"after stop")
    holds_for(lambda: intake.drained(lambda: len(intake.tasks) == 2), 0.3,
              message="no delivery after stop_tasks")


def test_control_and_broadcasts_arrive_unacknowledged_on_queues_declared_as_kombus(
        app: App, intake_of: Any) -> None:
    from kombu import Producer

    intake = intake_of()
    queue = app.names.control_queue(HOST)
    with app.connection() as conn:
        channel = conn.channel()
        # the same arguments as kombu's entities (x-expires, x-max-priority), else the
        # server refuses these declarations
        queue.bind(channel).declare()
        app.names.broadcast_queue(HOST).bind(channel).declare()
        app.names.task_queue("default").bind(channel).declare()
        producer = Producer(channel)
        for body, exchange, key in ((b"ctl", "", queue.routing_key),
                                    (b"all", app.names.broadcast_exchange.name, "")):
            producer.publish(body, routing_key=key, exchange=exchange,
                             content_type=codec.CONTENT_TYPE, content_encoding="binary")
    wait_for(lambda: intake.drained(lambda: len(intake.control) == 2),
             message="a control message and a broadcast")
    assert sorted(m.body for m in intake.control) == [b"all", b"ctl"]
    assert queue_depth(AMQP_URL, queue.name) == 0
    # taken without acks: the connection closing gives nothing back
    intake.close()
    assert queue_depth(AMQP_URL, queue.name) == 0
