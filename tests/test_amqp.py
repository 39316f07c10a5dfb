"""RabbitMQ-only guarantees, against real ``itask worker`` processes and the real server.

* ``consumer_timeout`` (the server closes the channel of a consumer that keeps a delivery
  unacknowledged longer than that) no longer makes a long task run twice: the worker hands
  a long task over to its held queue (``interactive_tasks.transport.amqp_hold``) and gives
  a task that waited as long without starting back to its queue. The held copy is
  renewed while the worker lives, dropped when the task ends, and comes back when the
  worker dies, is frozen past its TTL, or loses its connection.
* AMQP heartbeats: the server drops a frozen worker and gives its task to another; an
  idle client keeps its inbox.
* With a secret, delayed tasks and held copies stay signed.

The two ``consumer_timeout`` tests change the shared server's setting for about a second
(see :func:`lowered_consumer_timeout`); the delay levels are tested in
``test_amqp_delay.py`` and the hold step by step in ``test_amqp_hold.py``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import (
    BrokerEnv,
    delete_amqp_namespace,
    holds_for,
    make_broker_env,
    queue_depth,
    wait_for,
)

#: one process at a time on this machine may change the shared server's global settings
GLOBAL_SETTINGS_LOCK = Path("/tmp/itask-test-rabbitmq-global-settings.lock")


@pytest.fixture
def broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[BrokerEnv]:
    """Every test here runs on RabbitMQ (overrides the parametrised fixture)."""
    env = make_broker_env("amqp", tmp_path)
    env.apply(monkeypatch)
    yield env
    delete_amqp_namespace(env.url, env.namespace)


def configure(broker: BrokerEnv, monkeypatch: pytest.MonkeyPatch,
              request: pytest.FixtureRequest, **settings: Any) -> Any:
    """Extra App settings for this test's workers and for this process; returns ``tasks``."""
    value = json.dumps(settings)
    broker.extra["ITASK_TEST_SETTINGS"] = value
    monkeypatch.setenv("ITASK_TEST_SETTINGS", value)
    return request.getfixturevalue("tasks")


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# -- the server's global settings ------------------------------------------------------------
def rabbit_env(key: str) -> str:
    """The Erlang term of a ``rabbit`` application setting (``{ok,1800000}``)."""
    return subprocess.run(
        ["rabbitmqctl", "eval", f"application:get_env(rabbit, {key})."],
        capture_output=True, text=True, timeout=30, check=True).stdout.strip()


def set_rabbit_env(values: dict[str, str]) -> None:
    """Set ``rabbit`` application settings to Erlang terms, in one ``rabbitmqctl eval``."""
    expr = " ".join(f"ok = application:set_env(rabbit, {k}, {v})," for k, v in values.items())
    subprocess.run(["rabbitmqctl", "eval", expr + " ok."], capture_output=True, text=True,
                   timeout=30, check=True)


def ok_value(term: str) -> str:
    """``{ok,60000}`` → ``60000``; anything else is refused (never guess a value back)."""
    if not (term.startswith("{ok,") and term.endswith("}")):
        raise AssertionError(f"unexpected rabbit setting {term!r}; not touching the server")
    return term[4:-1]


@contextlib.contextmanager
def lowered_consumer_timeout(timeout_ms: int) -> Iterator[Any]:
    """Channels opened inside the block get ``consumer_timeout`` = ``timeout_ms``.

    RabbitMQ 3.10 reads ``consumer_timeout`` when a channel opens and checks it on each
    channel tick (``channel_tick_interval``, 60 s here, read again at every tick), so the
    timeout is put back as soon as the caller's channels are open (``restore()``), while
    the tick stays at 1 s until the block ends: shorter ticks only make the server's
    channels emit their statistics more often. Both go back to the values read before, in
    a ``finally``, under a lock file so that two test runs on this machine cannot
    interleave their changes (the server is shared).
    """
    GLOBAL_SETTINGS_LOCK.touch(exist_ok=True)
    with open(GLOBAL_SETTINGS_LOCK) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        timeout_before = ok_value(rabbit_env("consumer_timeout"))
        tick_before = ok_value(rabbit_env("channel_tick_interval"))
        restored = False

        def restore() -> None:
            nonlocal restored
            if not restored:
                set_rabbit_env({"consumer_timeout": timeout_before})
                restored = True

        try:
            set_rabbit_env({"consumer_timeout": str(timeout_ms), "channel_tick_interval": "1000"})
            yield restore
        finally:
            values = {"channel_tick_interval": tick_before}
            if not restored:
                values["consumer_timeout"] = timeout_before
            set_rabbit_env(values)


# -- consumer_timeout ------------------------------------------------------------------------
@pytest.mark.serial
def test_a_task_longer_than_consumer_timeout_runs_once_and_its_starter_gets_the_result(
        broker, start_worker, monkeypatch, request, tmp_path):
    """Two workers whose channels have a 3 s ``consumer_timeout``; a 10 s interactive task:
    it runs once, and its starter gets its result and a stream without a second run."""
    tasks = configure(broker, monkeypatch, request, worker_hold_after=0.5,
                      worker_heartbeat=0.5)
    with lowered_consumer_timeout(3000) as restore:
        w1 = start_worker(concurrency=1)
        w2 = start_worker(concurrency=1)
        restore()
        marker = tmp_path / "ran"
        started_at = time.monotonic()
        handle = tasks.marked_steps.start(str(marker), 20, 0.5, "long")
        assert handle.result(timeout=60) == "long"
        elapsed = time.monotonic() - started_at
    assert lines(marker) == ["long"]
    runs = lines(Path(str(marker) + ".started"))
    assert len(runs) == 1, runs
    events = list(handle.events(timeout=5))
    kinds = [e.kind for e in events]
    assert "worker-lost" not in kinds and kinds.count("started") == 1, kinds
    assert elapsed > 9.0
    for w in (w1, w2):
        assert "timed out" not in w.log() and "connection lost" not in w.log(), w.log()[-3000:]


@pytest.mark.serial
def test_a_task_waiting_for_a_slot_longer_than_consumer_timeout_goes_back_to_its_queue(
        broker, start_worker, monkeypatch, request, tmp_path):
    """One worker with one pool slot and a 3 s ``consumer_timeout``: a 10 s task runs, a
    second task waits for the slot. The waiting one is given back to its queue (and comes
    back) instead of being held past the timeout; the server never closes the channel,
    and each task runs once."""
    tasks = configure(broker, monkeypatch, request, worker_hold_after=0.5,
                      worker_heartbeat=0.5)
    with lowered_consumer_timeout(3000) as restore:
        w = start_worker(concurrency=1)
        restore()
        long_marker, short_marker = tmp_path / "long", tmp_path / "short"
        long_task = tasks.marked_steps.start(str(long_marker), 20, 0.5, "long")
        wait_for(lambda: task_starts(long_marker), 10, message="the long task to start")
        waiting = tasks.marked_steps.start(str(short_marker), 1, 0.0, "short")
        assert long_task.result(timeout=60) == "long"
        assert waiting.result(timeout=20) == "short"
    assert lines(long_marker) == ["long"] and lines(short_marker) == ["short"]
    assert len(task_starts(long_marker)) == len(task_starts(short_marker)) == 1
    assert f"task {waiting.id} waited" in w.log()
    for line in ("timed out", "connection lost"):
        assert line not in w.log(), w.log()[-3000:]


# -- held tasks --------------------------------------------------------------------------------
def held_queue_of(worker: Any, task_id: str) -> str:
    """The held queue a worker named in its log when it handed task ``task_id`` over."""
    mark = f"task {task_id} held for "
    log = wait_for(lambda: mark in worker.log() and worker.log(), 20,
                   message=f"{worker.name} to hand task {task_id} over")
    return log.split(mark, 1)[1].split("handed over to ", 1)[1].split()[0]


def task_starts(marker: Path) -> list[list[str]]:
    """``marked_steps`` runs: [key, pid, delivery] per start."""
    return [line.split() for line in lines(Path(str(marker) + ".started"))]


def test_a_held_task_outliving_its_ttl_on_a_live_worker_runs_once_and_its_copy_goes_with_it(
        broker, start_worker, monkeypatch, request, tmp_path):
    """A task handed over after 0.5 s runs 7 s, well past its copy's 2 s TTL, on a live
    worker beside an idle one: the renewals keep it from coming back, it runs once, and
    its copy leaves the held queue as soon as the task ends (nothing comes back later)."""
    tasks = configure(broker, monkeypatch, request, worker_hold_after=0.5,
                      worker_heartbeat=0.5, worker_lost_timeout=2.0)
    w1 = start_worker(concurrency=1)
    marker = tmp_path / "ran"
    handle = tasks.marked_steps.start(str(marker), 28, 0.25, "renewed")
    held = held_queue_of(w1, handle.id)
    start_worker(concurrency=1)
    assert queue_depth(broker.url, held) == 1
    assert handle.result(timeout=30) == "renewed"
    wait_for(lambda: queue_depth(broker.url, held) == 0, 1.0,
             message="the finished task's copy to leave the held queue")
    # the copy's TTL (2 s) passes with nothing coming back
    holds_for(lambda: len(task_starts(marker)) == 1, 3.0, message="one start")
    assert lines(marker) == ["renewed"]
    assert queue_depth(broker.url, tasks.app.names.task_queue_name("default")) == 0
    for line in ("already finished", "held copy expired", "delivered again"):
        assert line not in w1.log(), w1.log()[-3000:]


def test_a_held_task_of_a_killed_worker_comes_back_within_the_ttl_and_watchers_follow(
        broker, start_worker, monkeypatch, request, tmp_path):
    """SIGKILL of a worker running a handed-over task: nobody renews its copy, the server
    dead-letters it to the task queue after the TTL (3 s here), the other worker runs it as
    delivery 2, and the starter sees ``worker-lost`` then ``started`` on the new worker."""
    from interactive_tasks import client as client_module

    monkeypatch.setattr(client_module, "WORKER_SILENCE", 1.0)
    monkeypatch.setattr(client_module, "RENEW_INTERVAL", 0.5)
    tasks = configure(broker, monkeypatch, request, worker_hold_after=0.5,
                      worker_heartbeat=0.25, worker_lost_timeout=3.0)
    w1 = start_worker(concurrency=1)
    marker = tmp_path / "ran"
    handle = tasks.marked_steps.start(str(marker), 40, 0.1, "back")
    held_queue_of(w1, handle.id)
    w2 = start_worker(concurrency=1)
    w1.kill()
    killed_at = time.time()
    assert handle.result(timeout=30) == "back"
    starts = task_starts(marker)
    assert [s[2] for s in starts] == ["1", "2"], starts
    assert lines(marker) == ["back"]
    events = list(handle.events(timeout=5))
    kinds = [e.kind for e in events]
    lost_at = kinds.index("worker-lost")
    again = events[lost_at + 1]
    assert again.kind == "started" and again.worker == w2.name and again.run == 2, events
    # the copy lived at most a TTL after the last renewal before the kill
    assert again.ts - killed_at < 3.0 + 1.5, again.ts - killed_at


# -- AMQP heartbeats ---------------------------------------------------------------------------
def test_a_frozen_worker_loses_its_task_to_another_within_three_heartbeats(
        broker, start_worker, monkeypatch, request, tmp_path):
    """SIGSTOP of a worker (its pool too) mid-task: it stops answering the server's AMQP
    heartbeats (2 s here), the server drops its connection and requeues the task, and the
    other worker runs it: RabbitMQ checks for incoming data once per interval and gives up
    after two checks without, so 2 to 3 intervals after the last frame. When the frozen
    worker resumes, its stale run neither reports a second final state nor overwrites the
    stored result."""
    tasks = configure(broker, monkeypatch, request, broker_heartbeat=2.0)
    w1 = start_worker(concurrency=1)
    marker = tmp_path / "ran"
    handle = tasks.marked_steps.start(str(marker), 40, 0.1, "frozen")
    wait_for(lambda: handle.progress, 10, message="progress")
    w2 = start_worker(concurrency=1)
    os.killpg(w1.pid, signal.SIGSTOP)
    frozen_at = time.time()
    try:
        wait_for(lambda: len(task_starts(marker)) == 2, 15, message="the task to start again")
        restarted = time.time() - frozen_at
        assert handle.result(timeout=20) == "frozen"
    finally:
        os.killpg(w1.pid, signal.SIGCONT)
    assert handle.worker == w2.name and handle.snapshot().run == 2
    assert restarted <= 3 * 2.0 + 1.5, restarted
    wait_for(lambda: "broker connection lost" in w1.log(), 10,
             message="the resumed worker to notice it was dropped")
    wait_for(lambda: len(lines(marker)) == 2, 15, message="the stale run to end")
    wait_for(lambda: "dropping this stale run" in w1.log(), 5,
             message="the resumed worker to drop its stale run")
    stored = tasks.app.results.get(handle.id)
    assert stored["run"] == 2 and stored["worker"] == w2.name, stored


def test_an_idle_client_answers_heartbeats_and_keeps_its_inbox(
        broker, start_worker, monkeypatch, request, caplog):
    """A client's inbox connection negotiates heartbeats (1 s here) and its loop answers
    them: idle for four intervals, the server keeps it (it would drop a silent one after
    two or three), and a result still arrives on it."""
    tasks = configure(broker, monkeypatch, request, broker_heartbeat=1.0)
    caplog.set_level("INFO", logger="interactive_tasks.client")
    start_worker(concurrency=1)
    assert tasks.add.delay(1, 1).result(timeout=10) == 2
    holds_for(lambda: "inbox connection lost" not in caplog.text, 4.0, interval=0.1,
              message="the inbox connection")
    assert tasks.add.delay(2, 2).result(timeout=10) == 4
    assert "inbox connection lost" not in caplog.text and "reconnected" not in caplog.text


def test_with_a_secret_delayed_tasks_and_held_copies_stay_signed(
        broker, start_worker, monkeypatch, request, tmp_path):
    """With the operator secret on, a task that waited in the delay levels and a held copy
    that came back from a killed worker still carry their signature, and run."""
    broker.extra["ITASK_SECRET"] = "s3cret-for-this-test"
    monkeypatch.setenv("ITASK_SECRET", "s3cret-for-this-test")
    tasks = configure(broker, monkeypatch, request, worker_hold_after=0.5,
                      worker_heartbeat=0.25, worker_lost_timeout=3.0)
    w1 = start_worker(concurrency=1)
    sent = time.time()
    delayed = tasks.add.apply_async((2, 3), countdown=2)
    assert delayed.result(timeout=10) == 5 and time.time() - sent >= 2.0
    marker = tmp_path / "ran"
    held = tasks.marked_steps.start(str(marker), 30, 0.1, "signed")
    held_queue_of(w1, held.id)
    w2 = start_worker(concurrency=1)
    w1.kill()
    assert held.result(timeout=30) == "signed" and held.worker == w2.name
    assert [s[2] for s in task_starts(marker)] == ["1", "2"]  # its copy came back
    for w in (w1, w2):
        assert "rejected message" not in w.log(), w.log()[-3000:]


def test_a_worker_frozen_past_its_copys_ttl_holds_the_task_again_when_it_comes_back(
        broker, start_worker, monkeypatch, request, tmp_path):
    """SIGSTOP of the only worker, holding a handed-over task, for longer than its copy's
    TTL (3 s) but shorter than the server's heartbeat check: the copy expires back to the
    task queue, and the server delivers it to that same worker. When it resumes it logs
    the expired copy, keeps one run, and hands the task over again — so when it is then
    SIGKILLed, the task still comes back and finishes on another worker."""
    tasks = configure(broker, monkeypatch, request, worker_hold_after=0.5,
                      worker_heartbeat=0.25, worker_lost_timeout=3.0, broker_heartbeat=60)
    w1 = start_worker(concurrency=1)
    marker = tmp_path / "ran"
    handle = tasks.marked_steps.start(str(marker), 100, 0.1, "again")
    held = held_queue_of(w1, handle.id)
    os.killpg(w1.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: queue_depth(broker.url, held) == 0, 10, interval=0.2,
                 message="the frozen worker's copy to expire")
    finally:
        os.killpg(w1.pid, signal.SIGCONT)
    wait_for(lambda: "held copy expired" in w1.log(), 10,
             message="the resumed worker to find its copy gone")
    wait_for(lambda: w1.log().count(f"task {handle.id} held for ") == 2, 10,
             message="the task handed over again")
    assert "delivered again while it runs here" in w1.log()
    w2 = start_worker(concurrency=1)
    w1.kill()
    assert handle.result(timeout=30) == "again" and handle.worker == w2.name
    assert lines(marker) == ["again"]


def test_a_held_task_keeps_its_copy_across_a_dropped_connection(
        broker, start_worker, monkeypatch, request, tmp_path):
    """The server closes a worker's connection while it runs a handed-over task (what a
    broker restart or a network blip does): the worker reconnects and renews the same
    copy, and the task runs once, to the end, on that worker."""
    from .test_reliability import drop_broker_connections

    tasks = configure(broker, monkeypatch, request, worker_hold_after=0.5,
                      worker_heartbeat=0.25, worker_lost_timeout=3.0)
    w1 = start_worker(concurrency=1)
    marker = tmp_path / "ran"
    handle = tasks.marked_steps.start(str(marker), 50, 0.1, "kept")
    held_queue_of(w1, handle.id)
    w2 = start_worker(concurrency=1)
    assert drop_broker_connections(broker, [w1.pid]) >= 1
    wait_for(lambda: w1.log().count(" ready") >= 2, 15, message="the worker to reconnect")
    assert handle.result(timeout=30) == "kept" and handle.worker == w1.name
    holds_for(lambda: len(task_starts(marker)) == 1, 3.5, interval=0.1, message="one start")
    assert lines(marker) == ["kept"]
    for line in ("held copy expired", "delivered again", "rejected message"):
        assert line not in w1.log() + w2.log(), w1.log()[-3000:]


class FreezableProxy:
    """A TCP proxy to RabbitMQ that can go silent (a cut link without a TCP reset: it stops
    passing bytes either way but keeps every socket open)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        import socket
        import threading

        self.upstream = upstream
        self.frozen = threading.Event()
        self.closed = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[Any] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self.sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: Any, dst: Any) -> None:
        import select

        while not self.closed.is_set():
            if self.frozen.is_set():
                self.closed.wait(0.05)
                continue
            try:
                ready, _, _ = select.select([src], [], [], 0.05)
                if not ready:
                    continue
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
            except (OSError, ValueError):  # ValueError: select() on a socket closed meanwhile
                break
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        self.closed.set()
        self.listener.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()


def test_a_worker_and_a_client_behind_a_silent_link_reconnect_within_two_heartbeats(
        broker, start_worker, monkeypatch, request, caplog):
    """The link to the server goes silent without a reset (a partition): the worker's and
    the client's heartbeat checks find the server silent for two intervals (1 s here),
    each drops its connection at once (no closing handshake to wait for on the silent
    link: both try a new connection while it is still silent), connects again once the
    link is back, and tasks run."""
    proxy = FreezableProxy(("127.0.0.1", 5672))
    request.addfinalizer(proxy.close)
    through = broker.url.replace("127.0.0.1:5672", f"127.0.0.1:{proxy.port}")
    broker.extra["ITASK_BROKER_URL"] = through  # the worker's and this client's way in
    monkeypatch.setenv("ITASK_BROKER_URL", through)
    tasks = configure(broker, monkeypatch, request, broker_heartbeat=1.0)
    caplog.set_level("INFO", logger="interactive_tasks.client")
    w = start_worker(concurrency=1)
    assert tasks.add.delay(1, 2).result(timeout=10) == 3
    from .test_reliability import broker_ports

    worker_ports = set(broker_ports(w.pid, proxy.port))
    proxy.frozen.set()
    cut_at = time.monotonic()
    try:
        wait_for(lambda: "broker connection lost" in w.log(), 10, interval=0.05,
                 message="the worker to give up on the silent server")
        noticed = time.monotonic() - cut_at
        wait_for(lambda: "inbox connection lost" in caplog.text, 10, interval=0.05,
                 message="the client to give up on the silent server")
        wait_for(lambda: set(broker_ports(w.pid, proxy.port)) - worker_ports, 5,
                 interval=0.05, message="the worker to try a new connection")
        assert not set(broker_ports(w.pid, proxy.port)) & worker_ports  # the old one is gone
    finally:
        proxy.frozen.clear()
    assert noticed <= 2 * 1.0 + 1.0, noticed  # two intervals, checked four times each
    assert "heartbeats missed" in w.log()
    wait_for(lambda: w.log().count(" ready") >= 2, 20, message="the worker to reconnect")
    assert tasks.add.delay(2, 3).result(timeout=20) == 5
