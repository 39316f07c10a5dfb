"""Child-process bodies for tests/test_embedded_transport.py.

They live in their own module so the ``spawn`` start method can import them by name.
"""

from __future__ import annotations

import random
import threading
from typing import Any

from kombu import Connection, Consumer, Exchange, Producer, Queue

from interactive_tasks.transport import kombu_transports

# These tests make plain kombu connections to embedded://; the package enters the scheme
# in kombu's table only on its own way to a connection. Spawned children import this
# module by name, so they get it too.
kombu_transports()


def task_queue(name: str, **kwargs: Any) -> Queue:
    return Queue(name, Exchange("tasks", type="direct"), routing_key=name, **kwargs)


def produce(url: str, queue: str, producer_id: int, count: int, pad: int = 0) -> None:
    """Publish ``{"p": producer_id, "i": i}`` for i in range(count), in order."""
    rng = random.Random(producer_id)
    with Connection(url) as conn:
        producer = Producer(conn.channel())
        q = task_queue(queue)
        producer.maybe_declare(q)
        for i in range(count):
            body = {"p": producer_id, "i": i, "pad": "x" * rng.randrange(pad + 1)}
            producer.publish(body, exchange=q.exchange, routing_key=queue, serializer="json")


def consume_until_stopped(url: str, queue: str, stop: Any, out: Any, index: int) -> None:
    """Ack everything from ``queue``; send ``(index, [(p, i), ...])`` to ``out`` until ``stop``.

    The last batch is followed by ``(index, None)``.
    """
    batch: list[tuple[int, int]] = []

    def on_message(body: dict[str, Any], message: Any) -> None:
        assert len(body["pad"]) <= 4096
        batch.append((body["p"], body["i"]))
        message.ack()

    with Connection(url) as conn:
        channel = conn.channel()
        with Consumer(channel, [task_queue(queue)], callbacks=[on_message], prefetch_count=16,
                      accept=["json"]):
            while not stop.is_set():
                try:
                    conn.drain_events(timeout=0.05)
                except TimeoutError:
                    idle = True
                else:
                    idle = False
                if batch and (idle or len(batch) >= 100):
                    out.put((index, list(batch)))
                    batch.clear()
    out.put((index, list(batch)))
    out.put((index, None))


def bind_fanout(url: str, exchange: str, queues: list[str]) -> None:
    """Declare ``queues`` bound to fanout ``exchange``, then exit."""
    with Connection(url) as conn:
        channel = conn.channel()
        ex = Exchange(exchange, type="fanout")
        for name in queues:
            Queue(name, ex)(channel).declare()


def reserve_and_hang(url: str, queue: str, out: Any) -> None:
    """Ack the first message, keep the second unacked, report both, then wait to be killed."""
    with Connection(url) as conn:
        q = task_queue(queue)(conn.channel())
        first = q.get(accept=["json"])
        assert first is not None
        first.ack()
        second = q.get(accept=["json"])
        assert second is not None
        out.put([first.payload, second.payload])
        threading.Event().wait()


def rename_in(directory: str, producer_id: int, count: int) -> None:
    """Rename ``count`` message files into ``directory`` one by one, as a publisher does."""
    import os

    from interactive_tasks.transport.embedded_files import new_stem

    tmp = os.path.join(directory, f".tmp-{producer_id}")
    for _ in range(count):
        with open(tmp, "wb") as f:
            f.write(b"{}")
        os.rename(tmp, os.path.join(directory, new_stem() + ".msg"))
