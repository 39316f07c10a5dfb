"""Redis URLs (transport.redis_urls): ``sentinel://`` parsing, clients that follow the
primary, and ``wait_replicas``; the server tests run on Redis servers of their own
(tests/redis_servers.py)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection

from interactive_tasks import App
from interactive_tasks.errors import ConfigurationError
from interactive_tasks.results import RedisResultStore, result_store_for
from interactive_tasks.transport import is_redis, redis_fast, redis_urls
from interactive_tasks.transport.frames import kombu_envelope
from interactive_tasks.transport.redis_fast import InboxReader, TaskPublisher, WorkerPipeline
from interactive_tasks.transport.redis_fetch import TaskFetcher
from interactive_tasks.transport.redis_liveness import redelivered_key
from interactive_tasks.transport.redis_urls import (
    SentinelTarget,
    parse_sentinel_url,
    redis_client,
    replica_wait,
)

from .conftest import wait_for
from .redis_servers import RedisProcess, SentinelSetup, free_port, replica_online

OPTIONS = {"master_name": "mymaster"}


# -- URLs, no server -----------------------------------------------------------------------------
def test_sentinel_urls_are_read_as_kombu_reads_them() -> None:
    target = parse_sentinel_url(
        "sentinel://:s%40cret@s1:26380/2;sentinel://s2;sentinel://[::1]:26390",
        {**OPTIONS, "sentinel_kwargs": {"password": "sp"}, "min_other_sentinels": 1})
    assert target == SentinelTarget(
        sentinels=(("s1", 26380), ("s2", 26379), ("::1", 26390)), master_name="mymaster",
        db=2, username=None, password="s@cret", sentinel_kwargs={"password": "sp"},
        min_other_sentinels=1)
    assert parse_sentinel_url("sentinel://u:p@h", OPTIONS).username == "u"
    assert is_redis("sentinel://h:26379") and is_redis("rediss://h") and is_redis("redis://h")
    assert not is_redis("amqp://h") and not is_redis("embedded://")


@pytest.mark.parametrize("url, options, message", [
    ("sentinel://h:26379", {}, "master_name"),
    ("sentinel://h:26379", {"master_name": ""}, "master_name"),
    ("sentinel://h:26379;redis://h:6379", OPTIONS, "every part"),
    ("sentinel://h:notaport", OPTIONS, "bad sentinel URL"),
    ("sentinel://h:26379/zero", OPTIONS, "bad database"),
])
def test_a_bad_sentinel_url_is_a_clear_configuration_error(url: str, options: dict[str, Any],
                                                           message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        parse_sentinel_url(url, options)


def test_the_app_refuses_a_sentinel_broker_without_its_master_name() -> None:
    app = App("t", broker="sentinel://127.0.0.1:1")
    with pytest.raises(ConfigurationError, match="master_name"):
        app.connection()
    app.configure(broker_transport_options=OPTIONS)
    conn = app.connection()  # not connected: kombu's sentinel transport with our keys
    assert conn.transport_options["unacked_key"] == "it.unacked"
    conn.release()


def test_a_password_is_masked_in_every_sentinel_of_the_url() -> None:
    app = App("t", broker="sentinel://:pw1@h1:26379;sentinel://:pw2@h2:26379",
              broker_transport_options=OPTIONS)
    assert app.broker_url_display == "sentinel://:**@h1:26379;sentinel://:**@h2:26379"


@pytest.mark.parametrize("options, wait", [
    ({}, None), ({"wait_replicas": 0}, None), ({"wait_replicas": 2}, (2, 1000)),
    ({"wait_replicas": 1, "wait_replicas_timeout": 0.25}, (1, 250)),
])
def test_wait_replicas_options(options: dict[str, Any], wait: Any) -> None:
    assert replica_wait(options) == wait


@pytest.mark.parametrize("options", [{"wait_replicas": "1"}, {"wait_replicas": -1},
                                     {"wait_replicas": 1, "wait_replicas_timeout": 0}])
def test_bad_wait_replicas_options_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError, match="wait_replicas"):
        replica_wait(options)
    with pytest.raises(ConfigurationError, match="wait_replicas"):
        App("t", broker="redis://127.0.0.1:1", broker_transport_options=options).connection()


def test_a_sentinel_result_backend_takes_its_own_transport_options() -> None:
    store = result_store_for("amqp://h//", "sentinel://127.0.0.1:1", "ns", 60.0,
                             {}, {"master_name": "results"})
    assert isinstance(store, RedisResultStore)
    assert store._client.connection_pool.service_name == "results"
    store.close()
    with pytest.raises(ConfigurationError, match="result_backend_transport_options"):
        result_store_for("amqp://h//", "sentinel://127.0.0.1:1", "ns", 60.0, OPTIONS, {})


# -- servers of our own --------------------------------------------------------------------------
@pytest.fixture
def servers(request: pytest.FixtureRequest) -> Iterator[list[Any]]:
    things: list[Any] = []
    yield things
    failed = getattr(getattr(request.node, "rep_call", None), "failed", False)
    for thing in things:
        if failed:
            print(thing.logs() if isinstance(thing, SentinelSetup) else thing.log_tail())
        if isinstance(thing, SentinelSetup):
            thing.stop()
        else:
            thing.kill()


def test_wait_replicas_holds_each_write_until_the_replica_has_it(
        tmp_path: Path, servers: list[Any], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With the replica frozen (SIGSTOP), the client's publish, the worker's packet and
    the worker's fetch each wait ``wait_replicas_timeout`` and say so; with it running,
    the replica has a published task as soon as the publish returns."""
    monkeypatch.setattr(redis_urls, "_warned", {})
    primary = RedisProcess(tmp_path / "p", free_port())
    servers.append(primary)
    primary.start()
    replica = RedisProcess(tmp_path / "r", free_port(),
                           ["--replicaof", "127.0.0.1", str(primary.port)])
    servers.append(replica)
    replica.start()
    wait_for(lambda: replica_online(primary, replica), 10, message="the replica to sync")
    options = {"wait_replicas": 1, "wait_replicas_timeout": 0.3}
    queue = f"q{uuid.uuid4().hex[:6]}"
    envelope = kombu_envelope(b"body", queue, "application/x-test", {})
    publisher = TaskPublisher(primary.url, options)
    failed: list[Any] = []
    pipeline = WorkerPipeline(primary.url, failed.extend, options=options)
    conn = Connection(primary.url, transport_options=options)
    channel = conn.channel()
    channel.basic_qos(0, 10, False)
    fetched: list[Any] = []
    fetcher = TaskFetcher(primary.url, channel, [queue], fetched.append,
                          lambda message, why: None, redelivered_key(queue))

    def took(action: Any) -> float:
        start = time.monotonic()
        action()
        return time.monotonic() - start

    os.kill(replica.proc.pid, signal.SIGSTOP)
    try:
        with caplog.at_level(logging.WARNING, logger="interactive_tasks.transport.redis_urls"):
            assert took(lambda: publisher.publish(queue, envelope)) >= 0.3
            assert took(lambda: pipeline.submit(
                results=[], result_key=None, result_expire_at=0, acks=[],
                frames=[(f"{queue}.inbox", b"frame")])) >= 0.3
            assert took(lambda: fetcher.fetch(10)) >= 0.3
    finally:
        os.kill(replica.proc.pid, signal.SIGCONT)
    assert len(fetched) == 1 and not failed
    warned = [r.getMessage() for r in caplog.records]
    for what in ("publish", "worker pipeline", "task fetch"):
        assert any(m.startswith(f"{what}: 0 of 1 replica(s)") for m in warned), warned
    wait_for(lambda: replica.client().llen(f"{queue}.inbox") == 1, 10,
             message="the replica to catch up")
    assert took(lambda: publisher.publish(queue, envelope)) < 0.3
    assert replica.client().llen(queue) == 1  # there when the publish returned
    for closeable in (fetcher, pipeline, publisher):
        closeable.close()
    conn.release()


def test_a_demoted_primary_sends_the_fast_path_to_the_new_one(
        tmp_path: Path, servers: list[Any]) -> None:
    """``SENTINEL FAILOVER``, then the sentinel demotes the old primary: an inbox reader
    on it sees the sentinels name another primary at once, its blocked read fails when
    the old one drops its clients, and a publisher connected to it publishes to the new
    primary through the sentinel."""
    setup = SentinelSetup(tmp_path / "redis")
    servers.append(setup)
    setup.start()
    options = setup.transport_options
    publisher = TaskPublisher(setup.url, options)
    publisher.publish("q", b"before")
    reader = InboxReader(setup.url, "inbox", options)
    assert reader.read(0.01) == []  # connected to the primary
    assert not reader.primary_in_doubt()
    outcome: dict[str, Any] = {}

    def read_until_broken() -> None:
        try:
            while True:
                reader.read(1.0)
        except Exception as exc:
            outcome["error"] = exc

    old = setup.primary.client()
    setup.hand_over()
    wait_for(reader.primary_in_doubt, 5, message="the reader to see the new primary")
    thread = threading.Thread(target=read_until_broken, daemon=True)
    thread.start()
    wait_for(lambda: old.info("replication")["role"] == "slave", 30, interval=0.1,
             message="the sentinel to demote the old primary")
    thread.join(10)
    assert isinstance(outcome.get("error"), redis.ConnectionError), outcome
    publisher.publish("q", b"after")
    new = setup.replica.client()
    assert new.lrange("q", 0, -1) == [b"after", b"before"]
    fresh = InboxReader(setup.url, "inbox", options)
    new.lpush("inbox", b"frame")
    assert fresh.read(1.0) == [b"frame"]
    for closeable in (fresh, publisher):
        closeable.close()
    reader.close(delete=False)
    client = redis_client(setup.url, options)
    assert client.connection_pool.get_master_address()[1] == setup.replica.port
    client.close()


def test_a_readonly_refusal_sends_the_publish_to_the_primary(
        tmp_path: Path, servers: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection that reached a replica (a sentinel's answer from just before a
    failover; an operator's ``REPLICAOF``) gets ``READONLY`` for a write: the fast path
    takes it as a broken connection, asks the sentinels again and publishes there."""
    setup = SentinelSetup(tmp_path / "redis")
    servers.append(setup)
    setup.start()
    publisher = TaskPublisher(setup.url, setup.transport_options)
    publisher._conn.redis.connection.disconnect()
    publisher._conn.redis.connection.connect_to(("127.0.0.1", setup.replica.port))
    refusals: list[str] = []

    def spy(reply: Any) -> bool:
        moved = redis_urls.primary_moved(reply)
        refusals.append(str(reply))
        return moved

    monkeypatch.setattr(redis_fast, "primary_moved", spy)
    publisher.publish("q", b"task")
    assert refusals and refusals[0].startswith("READONLY")
    assert setup.primary.client().lrange("q", 0, -1) == [b"task"]
    publisher.close()
