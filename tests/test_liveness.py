"""Worker liveness and delayed delivery kept by the broker, against real workers.

* A worker SIGKILLed mid-task, with default settings: its task finishes on another worker
  within 15 s (Redis: a live worker restores a dead worker's unacknowledged tasks once its
  heartbeat is ``worker_lost_timeout`` old; RabbitMQ: requeue on connection loss; embedded:
  the lease of a dead owner).
* A task that runs three times longer than the liveness timeout on a live worker runs once:
  nothing depends on how long a task runs.
* A countdown survives the death of every worker: it waits in the broker, runs once and on
  time after a new worker starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from interactive_tasks import TaskRevoked, TaskState

from .conftest import REDIS_URL, ROOT, wait_for

ALL_BROKERS = pytest.mark.parametrize("broker", ["embedded", "redis", "amqp"], indirect=True)


def use_settings(broker: Any, request: pytest.FixtureRequest, **settings: Any) -> Any:
    """Extra App settings for this test's workers and this process; returns ``tasks``."""
    broker.extra["ITASK_TEST_SETTINGS"] = json.dumps(settings)
    import os

    os.environ["ITASK_TEST_SETTINGS"] = json.dumps(settings)
    request.addfinalizer(lambda: os.environ.pop("ITASK_TEST_SETTINGS", None))
    return request.getfixturevalue("tasks")


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@ALL_BROKERS
def test_worker_killed_mid_task_finishes_elsewhere_within_15s_by_default(
        broker, start_worker, tasks, tmp_path):
    victim = start_worker(concurrency=1)
    marker = tmp_path / "ran"
    handle = tasks.marked_steps.start(str(marker), 10, 0.1, "x")  # 1 s
    wait_for(lambda: handle.progress is not None, message="the task to start")
    survivor = start_worker(concurrency=1)
    victim.kill()
    wait_for(lambda: handle.state is TaskState.SUCCEEDED, 15,
             message="the task to finish on the other worker within 15 s of the SIGKILL")
    assert handle.result(0) == "x" and handle.worker == survivor.name
    assert lines(marker) == ["x"]  # ran to the end exactly once


@pytest.mark.parametrize("broker", ["redis", "amqp"], indirect=True)
def test_task_longer_than_the_liveness_timeout_runs_once_on_a_live_worker(
        broker, start_worker, request, tmp_path):
    tasks = use_settings(broker, request, worker_heartbeat=0.2, worker_lost_timeout=1.0)
    w1 = start_worker(concurrency=1)
    w2 = start_worker(concurrency=1)
    marker = tmp_path / "ran"
    handle = tasks.marked_steps.start(str(marker), 30, 0.1, "long")  # 3 s: 3x the timeout
    assert handle.result(timeout=30) == "long"
    assert lines(marker) == ["long"]
    started = lines(Path(str(marker) + ".started"))
    assert len(started) == 1, started  # never started a second time, anywhere
    for w in (w1, w2):
        assert "delivered again" not in w.log() and "stopped beating" not in w.log()


def test_a_restored_task_is_flagged_redelivered(redis_ns):
    """The liveness script restores a dead worker's messages onto the lists they came
    from (by priority, as kombu's restore) and flags them; a live worker is left alone."""
    import redis
    from kombu import Connection

    from interactive_tasks.transport import incarnation
    from interactive_tasks.transport.frames import kombu_envelope
    from interactive_tasks.transport.redis_fast import TaskPublisher
    from interactive_tasks.transport.redis_fetch import TaskFetcher
    from interactive_tasks.transport.redis_liveness import (
        WorkerLiveness,
        priority_list,
        redelivered_key,
        unacked_keys,
    )

    ns = redis_ns
    queue = f"{ns}.tasks.q"
    pub = TaskPublisher(REDIS_URL)
    for body, pri in ((b"p0", 0), (b"p6", 7)):
        pub.publish(priority_list(queue, pri),
                    kombu_envelope(body, queue, "application/x-test", {}, pri))
    pub.close()
    r = redis.Redis.from_url(REDIS_URL)
    dead, alive = incarnation("dead@test"), incarnation("alive@test")
    conn = Connection(REDIS_URL, transport_options=unacked_keys(ns, dead))
    channel = conn.channel()
    got: list[Any] = []
    fetcher = TaskFetcher(REDIS_URL, channel, [queue], got.append, lambda m, w: None,
                          redelivered_key(ns))
    WorkerLiveness(r, ns, dead, 0.3).beat()
    assert fetcher.fetch(10) == 2 and not any(m.delivery_info.get("redelivered") for m in got)
    fetcher.close()
    channel.qos._delivered.clear()  # vanish like a SIGKILLed worker: nothing restored
    conn.release()
    watcher = WorkerLiveness(r, ns, alive, 0.3)
    known, restored = watcher.beat()
    assert known and restored == {}  # 'dead' beat a moment ago: still alive
    restored = wait_for(lambda: watcher.beat()[1], 5, message="the dead worker's tasks back")
    assert restored == {dead: 2}
    assert r.llen(queue) == 1 and r.llen(priority_list(queue, 7)) == 1
    assert not r.exists(unacked_keys(ns, dead)["unacked_key"])
    assert r.hkeys(f"{ns}.workers") == [alive.encode()]
    conn2 = Connection(REDIS_URL, transport_options=unacked_keys(ns, alive))
    channel2 = conn2.channel()
    again: list[Any] = []
    f2 = TaskFetcher(REDIS_URL, channel2, [queue], again.append, lambda m, w: None,
                     redelivered_key(ns))
    assert f2.fetch(10) == 2
    assert sorted(m.body for m in again) == [b"p0", b"p6"]
    assert all(m.delivery_info.get("redelivered") for m in again)
    for m in again:
        m.ack()
    f2.close()
    conn2.release()
    assert watcher.leave() and not r.exists(f"{ns}.workers")
    r.close()


def redis_ports_of(pid: int) -> list[int]:
    """The local ports of process ``pid``'s TCP connections to Redis (/proc: its socket
    inodes, matched in /proc/net/tcp)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        if inode in inodes and int(remote.split(":")[1], 16) == 6379:
            ports.append(int(local.split(":")[1], 16))
    return ports


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_a_fetch_whose_reply_was_lost_returns_to_the_queue_on_reconnect(
        broker, start_worker, tasks, tmp_path):
    """The fetch script pops a task and records it for the worker in one step; when its
    reply is lost with the connection (a primary that crashes, a link that breaks) the
    worker never got the task, and while it beats nobody else restores it. On its new
    connection the worker returns such strays to their queues before it fetches."""
    import redis

    from interactive_tasks.transport.redis_fetch import FETCH_SCRIPT
    from interactive_tasks.transport.redis_liveness import redelivered_key, unacked_keys

    worker = start_worker(concurrency=1)
    ns = broker.namespace
    r = redis.Redis.from_url(REDIS_URL)
    mine = [n.decode() for n in r.hkeys(f"{ns}.workers")
            if n.decode().startswith(worker.name + "/")]
    assert len(mine) == 1, mine
    keys = unacked_keys(ns, mine[0])
    marker = tmp_path / "ran"
    worker.signal(signal.SIGSTOP)  # it fetches nothing until the script below has run
    try:
        handle = tasks.marked_steps.start(str(marker), 1, 0.01, "stray")
        queue = f"{ns}.tasks.default"
        taken = r.register_script(FETCH_SCRIPT)(
            keys=[keys["unacked_key"], keys["unacked_index_key"], redelivered_key(ns),
                  queue], args=[time.time(), 10])
        assert len(taken) == 2 and r.llen(queue) == 0  # recorded for the worker, not sent
        ports = redis_ports_of(worker.pid)
        assert ports
        for port in ports:  # the worker's connections break, its fetch reply with them
            with contextlib.suppress(redis.ResponseError):
                r.execute_command("CLIENT", "KILL", "ADDR", f"127.0.0.1:{port}")
    finally:
        worker.signal(signal.SIGCONT)
    assert handle.result(timeout=10) == "stray"
    assert lines(marker) == ["stray"]
    assert "never received returned to their queues" in worker.log()
    assert wait_for(lambda: r.hlen(keys["unacked_key"]) == 0, 5,
                    message="the worker's unacked hash to be empty after the ack")
    r.close()


@ALL_BROKERS
def test_countdown_survives_sigkill_of_every_worker_and_runs_once_on_time(
        broker, start_worker, tasks, tmp_path):
    w1 = start_worker(concurrency=1)
    w2 = start_worker(concurrency=1)
    countdown = 30.0
    sent = time.time()
    handle = tasks.add_recorded.apply_async((20, 22), countdown=countdown)
    eta = sent + countdown
    scheduled = wait_for(lambda: [t for t in tasks.app.scheduled() if t.id == handle.id],
                         5, message="the task listed as scheduled in the broker")
    assert scheduled[0].name == tasks.add_recorded.name and abs(scheduled[0].eta - eta) < 1
    out = subprocess.run([sys.executable, "-m", "interactive_tasks.cli.main", "inspect",
                          "scheduled", "-A", "tests.apps.tasks", "--json"],
                         capture_output=True, text=True, cwd=str(ROOT), env=broker.env(),
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert handle.id in [t["id"] for t in json.loads(out.stdout)]
    w1.kill()
    w2.kill()
    start_worker(concurrency=1)
    assert handle.result(timeout=countdown + 15) == 42
    starts = [r for r in broker.records(handle.id) if r["what"] == "start"]
    assert len(starts) == 1, starts  # once
    assert starts[0]["data"] == 1  # its first delivery: the delay cost it none
    assert eta - 0.05 <= starts[0]["t"] <= eta + 1.0, starts[0]["t"] - eta  # on time, ±1 s
    assert [t for t in tasks.app.scheduled() if t.id == handle.id] == []


def test_embedded_scheduled_directory_moves_due_tasks_once_and_returns_dead_claims(tmp_path):
    """Due entries go to their queue in eta order, later ones stay; an entry claimed by a
    process that died before publishing it is returned and published by the next mover."""
    import os

    from interactive_tasks.transport.embedded_delay import MOVING, EmbeddedDelayed
    from interactive_tasks.transport.embedded_files import process_start_time
    from interactive_tasks.transport.embedded_store import Store

    store = Store(str(tmp_path / "broker"))
    delayed = EmbeddedDelayed(store)
    now = time.time()
    for i, eta in enumerate((now - 2, now - 1, now + 60)):
        delayed.schedule("q", f"t{i}", json.dumps({"n": i}).encode(), eta)
    assert [round(t.eta - now) for t in delayed.listing()] == [-2, -1, 60]
    # a mover that claimed the first entry, then died (a pid that is not running)
    first = sorted(n for n in os.listdir(delayed.path) if n.endswith(".msg"))[0]
    dead_pid = 2**22 + 17
    assert process_start_time(dead_pid) is None
    os.rename(os.path.join(delayed.path, first),
              os.path.join(delayed.path, MOVING, f"{first}~{dead_pid}~123"))
    assert delayed.move_due(now) == 2
    assert delayed.move_due(now) == 0  # nothing moves twice
    qdir = store.queue_path("q")
    bodies = [json.loads(Path(qdir, n).read_text())["n"]
              for n in sorted(os.listdir(qdir)) if n.endswith(".msg")]
    assert sorted(bodies) == [0, 1]
    assert [round(t.eta - now) for t in delayed.listing()] == [60]
    assert os.listdir(os.path.join(delayed.path, MOVING)) == []


@pytest.mark.parametrize("broker", ["embedded", "redis"], indirect=True)
def test_revoking_a_scheduled_task_ends_it_at_once(broker, start_worker, tasks):
    """A revoke takes a task out of the broker's wait and ends it now (not at its eta);
    without the task's token (and no operator secret) it is refused and the task stays."""
    start_worker(concurrency=1)
    handle = tasks.add_recorded.apply_async((1, 2), countdown=60)

    def waiting() -> bool:
        return any(t.id == handle.id for t in tasks.app.scheduled())

    wait_for(waiting, 5, message="the task waiting in the broker")
    if broker.name == "redis":  # the embedded broker's processes share a secret
        replies = tasks.app.revoke([handle.id], tokens={handle.id: "0" * 32})
        assert [r["data"]["refused"] for r in replies] == [[handle.id]], replies
        assert waiting()
    handle.revoke()
    with pytest.raises(TaskRevoked, match="was revoked: revoked"):
        handle.result(timeout=5)
    assert not waiting()
    assert tasks.app.results.get(handle.id)["state"] == "revoked"
    assert broker.records(handle.id) == []  # it never ran
