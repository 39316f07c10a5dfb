"""The client's publishing connection after a failed publish."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from interactive_tasks import App
from interactive_tasks.errors import TransportError


def test_a_failed_publish_lets_its_connection_go_and_the_next_opens_another(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from kombu import Producer

    app = App("publish", broker="memory://", namespace=f"itp{uuid.uuid4().hex[:8]}")
    client = app.client
    queue = app.names.task_queue("pubq")
    client.publish_raw(b"one", routing_key=queue.routing_key, exchange=queue.exchange,
                       declare=[queue])
    first = client._pub_conn
    assert first is not None
    collected: list[Any] = []
    monkeypatch.setattr(type(first), "collect",
                        lambda self, *a, **k: collected.append(self))

    def refuse(self: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError("broker went away")

    with monkeypatch.context() as patch:
        patch.setattr(Producer, "publish", refuse)
        with pytest.raises(TransportError, match="broker went away"):
            client.publish_raw(b"two", routing_key=queue.routing_key,
                               exchange=queue.exchange, declare=[queue])
    assert collected == [first]
    assert client._pub_conn is None
    client.publish_raw(b"three", routing_key=queue.routing_key, exchange=queue.exchange,
                       declare=[queue])
    assert client._pub_conn is not None and client._pub_conn is not first
    client.close()
