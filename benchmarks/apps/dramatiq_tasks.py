"""Dramatiq side of the benchmarks: a broker per namespace with the Results middleware."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import dramatiq
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend


def pika_url(url: str) -> str:
    """kombu's ``amqp://u:p@host:5672//`` as pika spells it (vhost ``/`` is ``%2F``)."""
    if url.endswith("//"):
        return url[:-1] + "%2F"
    return url


def make_broker(ns: str, broker_url: str, results_url: str) -> SimpleNamespace:
    broker: Any
    if broker_url.startswith("redis"):
        from dramatiq.brokers.redis import RedisBroker

        broker = RedisBroker(url=broker_url, namespace=ns)
    else:
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        broker = RabbitmqBroker(url=pika_url(broker_url))
    backend = RedisBackend(url=results_url, namespace=f"{ns}-results")
    broker.add_middleware(Results(backend=backend))

    def noop() -> None:
        return None

    # store_results is the Results middleware's actor option (typed as **options)
    options: dict[str, Any] = {"store_results": True}
    noop_actor = dramatiq.actor(actor_name="bench_noop", queue_name=ns, broker=broker,
                                **options)(noop)
    return SimpleNamespace(broker=broker, backend=backend, noop=noop_actor)
