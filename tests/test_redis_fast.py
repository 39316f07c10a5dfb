"""The hand-packed Redis commands and the worker's asynchronous pipeline, against a real
Redis server (transport.redis_fast)."""

from __future__ import annotations

import atexit
import gc
import os
import time
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu.asynchronous import Hub

from interactive_tasks.transport import redis_fast
from interactive_tasks.transport.redis_fast import (
    InboxReader,
    RespConnection,
    TaskPublisher,
    WorkerPipeline,
    pack_commands,
    send_packed,
)

from .conftest import REDIS_URL, redis_sockets, wait_for

pytestmark = pytest.mark.usefixtures("redis_available")


@pytest.fixture
def redis_available() -> None:
    from .conftest import require_broker

    require_broker("redis")


@pytest.fixture
def r() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


@pytest.fixture
def ns(r: redis.Redis) -> Iterator[str]:
    namespace = f"rf{uuid.uuid4().hex[:8]}"
    yield namespace
    keys = list(r.scan_iter(f"{namespace}*"))
    if keys:
        r.delete(*keys)


def test_packed_commands_carry_every_argument_type_exactly(r: redis.Redis, ns: str) -> None:
    one = RespConnection(REDIS_URL, socket_timeout=5)
    value = bytes(range(256)) + b"\r\n$3\r\n"  # binary, with RESP's own delimiters inside
    packet = pack_commands((b"LPUSH", f"{ns}.l", value), (b"PEXPIRE", f"{ns}.l", 60_000),
                           (b"SET", f"{ns}.f", 2.5), ("SET", f"{ns}.s", "é"))
    send_packed(one, packet, 4)
    assert r.lrange(f"{ns}.l", 0, -1) == [value]
    assert 0 < r.pttl(f"{ns}.l") <= 60_000
    assert r.get(f"{ns}.f") == b"2.5" and r.get(f"{ns}.s") == "é".encode()
    one.close()


def test_an_error_reply_is_raised_after_every_reply_is_read(r: redis.Redis, ns: str) -> None:
    r.set(f"{ns}.str", "x")
    one = RespConnection(REDIS_URL, socket_timeout=5)
    packet = pack_commands((b"LPUSH", f"{ns}.str", b"1"), (b"LPUSH", f"{ns}.l", b"2"))
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        send_packed(one, packet, 2)
    assert r.lrange(f"{ns}.l", 0, -1) == [b"2"]
    send_packed(one, pack_commands((b"PING",)), 1)  # still in step: PING reads its own reply
    assert not one.can_read()
    assert one.redis.ping()  # and redis-py can go on using the same connection
    one.close()


def test_a_connection_killed_while_waiting_fails_then_reconnects(r: redis.Redis, ns: str) -> None:
    conn = RespConnection(REDIS_URL, socket_timeout=None)
    connection_id = conn.redis.client_id()  # redis-py's command on the same connection
    conn.send(pack_commands((b"BLPOP", f"{ns}.never", 10)))
    wait_for(lambda: "cmd=blpop" in _client_list(r, connection_id), message="BLPOP blocked")
    r.client_kill_filter(_id=connection_id)
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        conn.read_reply()
    assert time.monotonic() - started < 5  # the kill ended the wait, not the BLPOP timeout
    with pytest.raises(redis.ConnectionError):
        conn.read_reply()  # nothing is due on a reset connection
    send_packed(conn, pack_commands((b"SET", f"{ns}.k", b"v")), 1)  # a fresh connection
    assert r.get(f"{ns}.k") == b"v"
    conn.close()


def _client_list(r: redis.Redis, connection_id: int) -> str:
    """``CLIENT LIST``'s line for one connection ("" once it is gone)."""
    lines = r.execute_command("CLIENT", "LIST").decode().splitlines()
    return "\n".join(line for line in lines if line.startswith(f"id={connection_id} "))


def test_a_reply_slower_than_the_socket_timeout_is_a_timeout_error(ns: str) -> None:
    conn = RespConnection(REDIS_URL, socket_timeout=0.2)
    conn.send(pack_commands((b"BLPOP", f"{ns}.never", 5)))
    with pytest.raises(redis.TimeoutError):
        conn.read_reply()
    assert conn.fileno is None  # dropped: the late reply can never be read as another's
    conn.close()


def test_publisher_survives_a_killed_connection(r: redis.Redis, ns: str) -> None:
    pub = TaskPublisher(REDIS_URL)
    pub.publish(f"{ns}.q", b"a", 60_000)
    r.client_kill_filter(_id=pub._conn.redis.client_id())
    pub.publish(f"{ns}.q", b"b", 60_000)
    assert r.lrange(f"{ns}.q", 0, -1) == [b"b", b"a"]
    pub.close()


def test_publisher_push_packs_once_per_queue_and_survives_a_killed_connection(
        r: redis.Redis, ns: str) -> None:
    pub = TaskPublisher(REDIS_URL)
    value = bytes(range(256)) + b"\r\n$3\r\n"  # binary, with RESP's own delimiters inside
    pub.push(f"{ns}.ctl", value, 60_000)
    r.client_kill_filter(_id=pub._conn.redis.client_id())
    pub.push(f"{ns}.ctl", b"second", 60_000)  # same cached packets, a fresh connection
    pub.push(f"{ns}.other", b"third", 5_000)
    assert r.lrange(f"{ns}.ctl", 0, -1) == [b"second", value]
    assert 50_000 < r.pttl(f"{ns}.ctl") <= 60_000 and 0 < r.pttl(f"{ns}.other") <= 5_000
    pub.close()


def test_unsettled_pushes_keep_order_owe_a_bounded_number_of_replies_and_settle_on_close(
        r: redis.Redis, ns: str) -> None:
    pub = TaskPublisher(REDIS_URL)
    n = 3 * redis_fast.PIPELINE_REPLIES + 7
    for i in range(n):
        pub.push(f"{ns}.ctl", b"%d" % i, 60_000, settle=False)
        assert pub._owed < redis_fast.PIPELINE_REPLIES
    assert pub._owed > 0  # the last ones were not waited for
    pub.close()  # reads what is owed: Redis runs every push before the socket closes
    assert r.lrange(f"{ns}.ctl", 0, -1) == [b"%d" % i for i in reversed(range(n))]
    assert 50_000 < r.pttl(f"{ns}.ctl") <= 60_000


def test_an_unsettled_push_refused_by_redis_is_raised_by_a_later_call(
        r: redis.Redis, ns: str) -> None:
    pub = TaskPublisher(REDIS_URL)
    r.set(f"{ns}.str", b"not a list")
    pub.push(f"{ns}.str", b"x", 60_000, settle=False)  # WRONGTYPE, not read yet
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        pub.push(f"{ns}.ctl", b"next", 60_000)  # reads what it owed first, sends nothing
    pub.push(f"{ns}.ctl", b"after", 60_000)  # the connection stayed in step
    assert r.lrange(f"{ns}.ctl", 0, -1) == [b"after"]
    pub.close()


def test_unsettled_pushes_leave_no_socket_behind_closed_or_collected(
        r: redis.Redis, ns: str) -> None:
    before = redis_sockets()
    pub = TaskPublisher(REDIS_URL)
    for i in range(300):
        pub.push(f"{ns}.ctl", b"%d" % i, 60_000, settle=False)
    assert pub._owed and len(redis_sockets() - before) == 1
    pub.close()
    assert redis_sockets() <= before  # closed, not left for the collector

    # Dropped without close (no reference cycle keeps it): the socket is closed as the
    # object goes, never found unclosed by the collector later.
    dropped = TaskPublisher(REDIS_URL)
    for i in range(300):
        dropped.push(f"{ns}.ctl2", b"%d" % i, 60_000, settle=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        del dropped
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
    assert redis_sockets() <= before


def test_a_forked_child_leaves_the_parents_unsettled_replies_alone(
        r: redis.Redis, ns: str) -> None:
    # The child inherits the publisher and its exit hook; reading the replies owed would
    # take them from the parent, whose next read would then wait for replies never due.
    pub = TaskPublisher(REDIS_URL)
    for i in range(100):
        pub.push(f"{ns}.ctl", b"%d" % i, 60_000, settle=False)
    pid = os.fork()
    if pid == 0:  # the child: what an ordinary exit runs, then out without pytest's own
        code = 0
        try:
            atexit._run_exitfuncs()
            pub.close()
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    pub.push(f"{ns}.ctl", b"settled", 60_000)  # reads the 200 replies owed, then its own
    assert r.lrange(f"{ns}.ctl", 0, -1) == [b"settled"] + [
        b"%d" % i for i in reversed(range(100))]
    pub.close()


def test_inbox_reader_reads_in_order_and_times_out(r: redis.Redis, ns: str) -> None:
    reader = InboxReader(REDIS_URL, f"{ns}.inbox")
    r.lpush(f"{ns}.inbox", b"1", b"2", b"3")
    assert reader.read(0.5) == [b"1", b"2", b"3"]
    started = time.monotonic()
    assert reader.read(0.1) == []
    assert time.monotonic() - started >= 0.09
    reader.close()


class _Loop:
    """Runs a kombu Hub the way the worker does."""

    def __init__(self) -> None:
        self.hub = Hub()
        self._loop = self.hub.create_loop()

    def run_until(self, predicate: Any, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "the loop did not get there in time"
            next(self._loop)

    def close(self) -> None:
        self.hub.close()


def test_pipeline_on_a_loop_does_not_wait_and_keeps_order(r: redis.Redis, ns: str) -> None:
    failed: list[Any] = []
    answered: list[int] = []
    pipe = WorkerPipeline(REDIS_URL, failed.extend, lambda: answered.append(1))
    loop = _Loop()
    pipe.attach(loop.hub)
    key = f"{ns}.inbox"
    for i in range(50):
        pipe.submit(results=[], result_key=None, result_expire_at=0, acks=[],
                    frames=[(key, b"%d" % i)], context=i)
    assert pipe.in_flight > 0  # submit returned before Redis answered
    loop.run_until(lambda: pipe.in_flight == 0)
    assert answered and not failed
    assert r.lrange(key, 0, -1)[::-1] == [b"%d" % i for i in range(50)]
    assert 0 < r.pttl(key) <= redis_fast.INBOX_EXPIRES_MS
    pipe.close()
    loop.close()


def test_pipeline_resends_what_a_dropped_connection_left_unanswered(
        r: redis.Redis, ns: str) -> None:
    failed: list[Any] = []
    pipe = WorkerPipeline(REDIS_URL, failed.extend)
    loop = _Loop()
    pipe.attach(loop.hub)
    key = f"{ns}.inbox"
    connection_id = pipe._conn.redis.client_id()
    pipe.submit(results=[], result_key=None, result_expire_at=0, acks=[],
                frames=[(key, b"first")], context="first")
    r.client_kill_filter(_id=connection_id)  # maybe before, maybe after it ran
    loop.run_until(lambda: pipe.in_flight == 0)
    assert not failed
    frames = r.lrange(key, 0, -1)
    assert frames and set(frames) == {b"first"}  # at least once (a repeat is dropped by seq)
    pipe.close()
    loop.close()


def test_pipeline_hands_back_what_redis_refused(r: redis.Redis, ns: str) -> None:
    r.set(f"{ns}.inbox", "not a list")
    failed: list[Any] = []
    pipe = WorkerPipeline(REDIS_URL, failed.extend)
    loop = _Loop()
    pipe.attach(loop.hub)
    pipe.submit(results=[], result_key=None, result_expire_at=0, acks=[],
                frames=[(f"{ns}.inbox", b"x")], context="ctx")
    loop.run_until(lambda: pipe.in_flight == 0)
    assert failed == ["ctx"]
    pipe.close()
    loop.close()


def test_a_stalled_pipeline_counts_as_a_broken_connection(
        r: redis.Redis, ns: str, monkeypatch: pytest.MonkeyPatch) -> None:
    failed: list[Any] = []
    pipe = WorkerPipeline(REDIS_URL, failed.extend)
    loop = _Loop()
    pipe.attach(loop.hub)
    monkeypatch.setattr(redis_fast, "STALLED_AFTER", 0.0)  # any wait is too long now
    r.client_pause(400, all=False)  # write commands wait: no answer for 0.4 s
    try:
        pipe.submit(results=[], result_key=None, result_expire_at=0, acks=[],
                    frames=[(f"{ns}.inbox", b"x")], context="ctx")
        assert pipe.in_flight == 1
        pipe.check_stalled()  # resends on a fresh connection and waits for the answer
    finally:
        r.client_unpause()
    wait_for(lambda: pipe.in_flight == 0, message="answered")
    assert not failed and set(r.lrange(f"{ns}.inbox", 0, -1)) == {b"x"}
    pipe.close()
    loop.close()


def test_a_client_inherited_through_fork_takes_an_inbox_of_its_own(ns: str) -> None:
    # After a fork the parent's inbox thread is gone; sharing its inbox name would let
    # both processes take each other's replies and events off the same list.
    from interactive_tasks import App

    app = App("forked", broker=REDIS_URL, namespace=ns)
    client = app.client
    inherited = client.inbox.name
    client._id_pid = 1  # as if a parent process had made this object, then forked
    try:
        client.ensure_started()
        assert client.inbox.name != inherited and client.id in client.inbox.name
        rids = {client.new_rid() for _ in range(1000)}
        assert len(rids) == 1000 and all(rid.startswith(client.id) for rid in rids)
    finally:
        app.close()
