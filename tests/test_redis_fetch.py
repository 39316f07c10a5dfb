"""The worker's Redis task fetch (transport.redis_fetch) against a real Redis server.

kombu's consumer pops a message, then records it unacked in a second round trip: a worker
killed in between loses it (1 of 3,000 tasks under 48 SIGKILLs, measured). The fetch pops
and records in one script, so a message is always in the queue or in the unacked hash.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis
from kombu import Connection
from kombu.asynchronous import Hub

from interactive_tasks.transport.frames import kombu_envelope
from interactive_tasks.transport.redis_fast import TaskPublisher
from interactive_tasks.transport.redis_fetch import POLL_INTERVAL, TaskFetcher, bell_key
from interactive_tasks.transport.redis_liveness import (
    WorkerLiveness,
    redelivered_key,
    unacked_keys,
)

from .conftest import REDIS_URL, wait_for

pytestmark = pytest.mark.usefixtures("redis_available")


@pytest.fixture
def redis_available() -> None:
    from .conftest import require_broker

    require_broker("redis")


@pytest.fixture
def ns(redis_ns: str) -> str:
    return redis_ns




def publish(ns: str, bodies: list[bytes], bell: bool = True) -> None:
    pub = TaskPublisher(REDIS_URL)
    try:
        for body in bodies:
            pub.publish(f"{ns}.q", kombu_envelope(body, f"{ns}.q", "application/x-test", {}),
                        bell=bell)
    finally:
        pub.close()


class Fetching:
    """A worker's fetch on ``<ns>.q``, with unacked keys and a heartbeat of its own (as
    a worker process has); records what arrives."""

    def __init__(self, ns: str, prefetch: int = 10, name: str = "f") -> None:
        keys = unacked_keys(ns, name)
        self.unacked, self.unacked_index = keys["unacked_key"], keys["unacked_index_key"]
        self.conn = Connection(REDIS_URL, transport_options=keys)
        self.channel = self.conn.channel()
        self.channel.basic_qos(0, prefetch, False)
        self.messages: list[Any] = []
        self.garbage: list[tuple[Any, str]] = []
        self.fetcher = TaskFetcher(REDIS_URL, self.channel, [f"{ns}.q"], self.messages.append,
                                   lambda m, why: self.garbage.append((m, why)),
                                   redelivered_key(ns))
        self.liveness = WorkerLiveness(redis.Redis.from_url(REDIS_URL), ns, name, 0.5)
        self.liveness.beat()

    def bodies(self) -> list[bytes]:
        return [m.body for m in self.messages]

    def die(self) -> None:
        """Vanish like a SIGKILLed worker: no ack, no restore on close."""
        self.fetcher.close()
        self.channel.qos._delivered.clear()
        self.conn.release()


def test_a_fetched_message_is_recorded_unacked_before_the_worker_sees_it(ns: str) -> None:
    publish(ns, [b"m1", b"m2", b"m3"])
    r = redis.Redis.from_url(REDIS_URL)
    seen_in_hash: list[int] = []
    f = Fetching(ns)
    f.fetcher.on_message = lambda m: (seen_in_hash.append(r.hlen(f.unacked)),
                                      f.messages.append(m))
    assert f.fetcher.fetch(2) == 2
    assert f.bodies() == [b"m1", b"m2"]
    assert seen_in_hash[0] == 2  # both recorded on the server before the first delivery
    assert r.llen(f"{ns}.q") == 1 and r.zcard(f.unacked_index) == 2
    f.die()
    # A live worker brings them back once the dead one's heartbeat is 0.5 s old.
    g = Fetching(ns, name="g")
    wait_for(lambda: g.liveness.beat()[1], 5, message="restored after the dead one's "
             "0.5 s liveness timeout")
    assert r.hlen(f.unacked) == 0
    assert g.fetcher.fetch(10) == 3
    assert sorted(g.bodies()) == [b"m1", b"m2", b"m3"]
    assert [bool(m.delivery_info.get("redelivered")) for m in g.messages].count(True) == 2
    for m in g.messages:
        m.ack()
    assert r.hlen(g.unacked) == 0 and r.zcard(g.unacked_index) == 0
    g.die()
    r.close()


def test_reject_with_requeue_and_channel_close_give_messages_back(ns: str) -> None:
    publish(ns, [b"a", b"b"])
    f = Fetching(ns)
    assert f.fetcher.fetch(10) == 2
    f.messages[0].reject(requeue=True)
    f.fetcher.close()
    f.channel.close()  # kombu restores what it delivered and nobody acked
    f.conn.release()
    g = Fetching(ns, name="g")
    assert g.fetcher.fetch(10) == 2 and sorted(g.bodies()) == [b"a", b"b"]
    for m in g.messages:
        m.ack()
    g.die()


def test_strays_go_back_and_what_the_worker_holds_stays(ns: str) -> None:
    """A fetch whose reply never arrived left ``lost`` recorded for the worker; the next
    connection's fetcher (sharing what the process holds) returns it to the queue and
    keeps ``held`` (received, not acked) and forgets ``done`` (acked)."""
    publish(ns, [b"held", b"done", b"lost"])
    r = redis.Redis.from_url(REDIS_URL)
    f = Fetching(ns)
    assert f.fetcher.fetch(2) == 2
    f.messages[1].ack()
    qos = f.channel.qos
    lost = f.fetcher._run_script(keys=[qos.unacked_key, qos.unacked_index_key,
                                       redelivered_key(ns), f"{ns}.q"], args=[time.time(), 1])
    assert len(lost) == 2 and r.llen(f"{ns}.q") == 0 and r.hlen(f.unacked) == 2
    f.fetcher.close()
    again = TaskFetcher(REDIS_URL, f.channel, [f"{ns}.q"], f.messages.append,
                        lambda m, why: None, redelivered_key(ns), f.fetcher.held)
    again.return_strays()
    assert list(again.held) == [f.messages[0].delivery_tag]  # the acked one forgotten
    assert r.hlen(f.unacked) == 1 and r.zcard(f.unacked_index) == 1
    assert again.fetch(10) == 1 and f.bodies() == [b"held", b"done", b"lost"]
    assert not f.messages[2].delivery_info.get("redelivered")  # it never ran
    for m in (f.messages[0], f.messages[2]):
        m.ack()
    assert r.hlen(f.unacked) == 0
    again.close()
    f.die()
    r.close()


def test_prefetch_count_bounds_each_fetch(ns: str) -> None:
    publish(ns, [b"1", b"2", b"3"])
    f = Fetching(ns, prefetch=2)
    assert f.fetcher.room() == 2
    f.fetcher.pump()
    assert f.bodies() == [b"1", b"2"] and f.fetcher.room() == 0
    f.messages[0].ack()
    f.fetcher.pump()
    assert f.bodies() == [b"1", b"2", b"3"]
    for m in f.messages[1:]:
        m.ack()
    f.die()


def test_an_idle_fetcher_wakes_on_a_bell_and_polls_without_one(ns: str) -> None:
    f = Fetching(ns)
    hub = Hub()
    f.channel.connection.register_with_event_loop(f.conn.connection, hub)
    f.fetcher.register(hub)
    loop = hub.create_loop()

    def spin_until(n: int, timeout: float) -> float:
        start = time.monotonic()
        while len(f.messages) < n:
            f.fetcher.pump()
            next(loop)
            assert time.monotonic() - start < timeout, "not fetched in time"
        return time.monotonic() - start

    for _ in range(5):
        next(loop)
    publish(ns, [b"belled"])
    assert spin_until(1, 5) < POLL_INTERVAL  # the bell, not the poll
    publish(ns, [b"silent"], bell=False)  # e.g. another publisher: no bell
    spin_until(2, POLL_INTERVAL * 3)
    assert f.bodies() == [b"belled", b"silent"]
    assert redis.Redis.from_url(REDIS_URL).llen(bell_key(f"{ns}.q")) == 0
    for m in f.messages:
        m.ack()
    hub.close()
    f.die()


def test_garbage_in_the_queue_goes_to_the_dead_letter_handler(ns: str) -> None:
    r = redis.Redis.from_url(REDIS_URL)
    r.lpush(f"{ns}.q", b"\x00not json")
    r.lpush(f"{ns}.q", b'{"json": "but no properties"}')
    publish(ns, [b"ok"])
    f = Fetching(ns)
    assert f.fetcher.fetch(10) == 3
    assert f.bodies() == [b"ok"]
    assert [g[0].body for g in f.garbage] == [b"\x00not json", b'{"json": "but no properties"}']
    assert all("not a kombu message" in why for _, why in f.garbage)
    assert r.hlen(f.unacked) == 1  # only the real message is held
    f.garbage[0][0].reject(requeue=True)  # dead-lettering failed: it goes back
    assert r.lrange(f"{ns}.q", 0, -1) == [b"\x00not json"]
    f.messages[0].ack()
    wait_for(lambda: r.hlen(f.unacked) == 0, message="acked")
    f.die()
    r.close()
