"""The worker's outcomes (``worker/outcomes.py``) settling deliveries it can no longer
settle: a task that started before a reconnect holds a delivery of the old connection,
whose ``ack`` raises; ending it (a retry, a redelivery, a dead letter) must not raise
into the worker's frame handling, and the broker's redelivery of the task on the new
connection (``record.duplicates``) is acknowledged with it, as a finished task's is."""

from __future__ import annotations

import logging
import uuid
from types import SimpleNamespace
from typing import Any

import pytest

from interactive_tasks.protocol import TaskMessage
from interactive_tasks.worker.outcomes import Outcomes
from interactive_tasks.worker.records import TaskRecord


class Gone(Exception):
    """As py-amqp's RecoverableConnectionError for a channel of a closed connection."""


class Delivery:
    def __init__(self, gone: bool = False) -> None:
        self.gone = gone
        self.settled: list[str] = []
        self.body = b"body"
        self.content_type = None
        self.content_encoding = None
        self.delivery_info = {"routing_key": "ns.tasks.default"}

    def ack(self) -> None:
        if self.gone:
            raise Gone("connection already closed")
        self.settled.append("ack")

    def reject(self, requeue: bool = False) -> None:
        if self.gone:
            raise Gone("connection already closed")
        self.settled.append(f"reject requeue={requeue}")


class Relay:
    def __init__(self) -> None:
        self.pending_acks: list[Any] = []
        self.events: list[str] = []
        self.flushes = 0

    def emit(self, record: TaskRecord, kind: str, fields: dict[str, Any]) -> None:
        self.events.append(kind)

    def schedule_flush(self) -> None:
        self.flushes += 1

    def flush(self) -> None:
        """What the relay's flush does with the acks (outbound.send acks each)."""
        acks, self.pending_acks = self.pending_acks, []
        for message in acks:
            message.ack()


def _outcomes(published: list[TaskMessage], producer: Any = None) -> tuple[Outcomes, Any,
                                                                           Relay]:
    conf = SimpleNamespace(subscription_ttl=60.0, namespace="ns")
    names = SimpleNamespace(dead_letter_queue=SimpleNamespace(routing_key="ns.dead"))
    state = SimpleNamespace(app=SimpleNamespace(conf=conf, names=names), records={},
                            held_subscribers={}, hostname="w1@test", producer=producer)
    relay = Relay()
    outcomes = Outcomes(state, relay=relay, upkeep=SimpleNamespace(),  # type: ignore[arg-type]
                        workflows=SimpleNamespace(),  # type: ignore[arg-type]
                        publish_task=published.append)
    return outcomes, state, relay


def _record(delivery: Delivery) -> TaskRecord:
    message = TaskMessage(id=str(uuid.uuid4()), task="tests.add", args=[1, 2])
    return TaskRecord(message=message, kombu_message=delivery, interactive=False,
                      history_size=0)


@pytest.mark.parametrize("how", ["retry", "redeliver"])
def test_republish_after_a_reconnect_neither_raises_nor_leaves_the_redelivery(
        how: str, caplog: pytest.LogCaptureFixture) -> None:
    published: list[TaskMessage] = []
    outcomes, state, relay = _outcomes(published)
    old, redelivered = Delivery(gone=True), Delivery()
    record = _record(old)
    record.duplicates.append(redelivered)
    state.records[record.id] = record
    with caplog.at_level(logging.WARNING, logger="interactive_tasks.worker"):
        if how == "retry":
            outcomes.retry(record, {"countdown": 5})
        else:
            outcomes.redeliver(record)
    assert [m.id for m in published] == [record.id]
    assert record.id not in state.records and record.kombu_message is None
    assert record.duplicates == []
    assert any(record.id in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records), caplog.text
    relay.flush()
    assert redelivered.settled == ["ack"] and relay.flushes >= 1


def test_republish_acks_a_live_delivery_at_once() -> None:
    outcomes, _, relay = _outcomes([])
    live = Delivery()
    record = _record(live)
    outcomes.redeliver(record)
    assert live.settled == ["ack"] and relay.pending_acks == []


def test_dead_letter_of_a_delivery_from_a_closed_connection_does_not_raise(
        caplog: pytest.LogCaptureFixture) -> None:
    published: list[tuple[bytes, dict[str, Any]]] = []
    producer = SimpleNamespace(publish=lambda body, **kw: published.append((body, kw)))
    outcomes, _, _ = _outcomes([], producer)
    record = _record(Delivery(gone=True))
    with caplog.at_level(logging.WARNING, logger="interactive_tasks.worker"):
        outcomes.dead_letter_record(record, "poison")
    assert len(published) == 1 and record.kombu_message is None
    assert any(record.id in r.getMessage() and "acknowledge" in r.getMessage()
               for r in caplog.records), caplog.text
