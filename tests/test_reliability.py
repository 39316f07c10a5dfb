"""Fault injection against real worker processes: kills, freezes, broker drops, limits.

Each test breaks something on purpose (SIGKILL, SIGSTOP, dropped broker connections, a
task that kills its pool process, a client that vanishes, a watcher that never reads) and
checks the promise of docs/reliability.md: every accepted task completes exactly once or
is visibly failed, no result is lost, and the worker heals itself and says so in its log.

Brokers are parametrised only where the broker decides the behaviour (how a dead worker's
task comes back, how a dropped connection heals); everything else runs on one broker:
Redis where the test looks at broker keys, the embedded broker where nothing
broker-specific is involved.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from interactive_tasks import App, TaskFailed, TaskState
from interactive_tasks import client as client_module
from interactive_tasks.errors import TransportError

from .conftest import REDIS_URL, ROOT, holds_for, wait_for

redis_only = pytest.mark.parametrize("broker", ["redis"], indirect=True)
server_brokers = pytest.mark.parametrize("broker", ["redis", "amqp"], indirect=True)
#: where the broker makes no difference: the quickest one
one_broker = pytest.mark.parametrize("broker", ["embedded"], indirect=True)


# -- helpers -----------------------------------------------------------------------------------
def check(ok: bool, detail: str) -> None:
    """An assertion with a long explanation."""
    assert ok, detail


def redis_client() -> Any:
    import redis

    return redis.Redis.from_url(REDIS_URL)


def configure(broker: Any, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest,
              **settings: Any) -> Any:
    """Extra App settings for this test's workers and for this process; returns ``tasks``.

    Must run before anything else asks for the ``tasks`` fixture (it reloads the app).
    """
    value = json.dumps(settings)
    broker.extra["ITASK_TEST_SETTINGS"] = value
    monkeypatch.setenv("ITASK_TEST_SETTINGS", value)
    return request.getfixturevalue("tasks")


def second_client(broker: Any) -> App:
    """Another client of the same broker space, with its own inbox (like another process)."""
    return App("tests", broker=broker.url, result_backend=broker.result_backend,
               namespace=broker.namespace)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def broker_ports(pid: int, remote_port: int) -> list[int]:
    """Local ports of the TCP connections process ``pid`` holds to ``remote_port``."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as fh:
            for line in fh.readlines()[1:]:
                parts = line.split()
                local, remote, state, inode = parts[1], parts[2], parts[3], parts[9]
                if inode in inodes and state == "01" and \
                        int(remote.rsplit(":", 1)[1], 16) == remote_port:
                    ports.append(int(local.rsplit(":", 1)[1], 16))
    return ports


def drop_broker_connections(broker: Any, pids: list[int]) -> int:
    """Make the broker close every connection of ``pids`` (what a broker restart does).

    Only these processes' connections: the broker is shared with other test runs.
    Returns how many connections were closed.
    """
    if broker.name == "redis":
        client = redis_client()
        try:
            closed = 0
            for pid in pids:
                for port in broker_ports(pid, 6379):
                    closed += client.client_kill_filter(_type=None, addr=f"127.0.0.1:{port}")
            return closed
        finally:
            client.close()
    ports = {port for pid in pids for port in broker_ports(pid, 5672)}
    out = subprocess.run(["rabbitmqctl", "-q", "list_connections", "pid", "peer_port"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    closed = 0
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and int(parts[1]) in ports:
            subprocess.run(["rabbitmqctl", "-q", "close_connection", parts[0],
                            "test: broker restart"], capture_output=True, timeout=30)
            closed += 1
    return closed


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def kinds(events: list[Any]) -> list[str]:
    return [e.kind for e in events]


# -- a worker dies mid-task ----------------------------------------------------------------------
@pytest.mark.parametrize("broker", ["embedded", "redis", "amqp"], indirect=True)
def test_worker_killed_mid_task_task_comes_back_once_and_watchers_follow(
        broker, start_worker, monkeypatch, request, tmp_path):
    """SIGKILL of the whole worker: watchers are told, the task is delivered again (embedded:
    lease of a dead owner; Redis: a live worker restores a dead one's tasks; RabbitMQ: requeue
    on connection loss),
    runs to the end exactly once, and both the starter and a watcher in another client
    follow it to its new worker."""
    monkeypatch.setattr(client_module, "WORKER_SILENCE", 1.0)
    monkeypatch.setattr(client_module, "RENEW_INTERVAL", 0.5)
    tasks = configure(broker, monkeypatch, request, worker_heartbeat=0.2,
                      worker_lost_timeout=1.5)
    w1 = start_worker(concurrency=1)
    marker = tmp_path / "ran"
    handle = tasks.marked_steps.start(str(marker), 20, 0.05, "k")
    other = second_client(broker)
    try:
        wait_for(lambda: handle.progress and handle.progress.current >= 2, message="progress")
        watcher = other.attach(handle.id)
        lost_seen: list[bool] = []
        watcher.add_listener(lambda h: lost_seen.append(h.worker_lost))
        wait_for(lambda: watcher.state is TaskState.RUNNING, message="watcher attached")

        w1.kill()
        wait_for(lambda: handle.worker_lost and watcher.worker_lost, 5,
                 message="both watchers told the worker is lost")
        w2 = start_worker(concurrency=1)

        assert handle.result(timeout=30) == "k"
        assert watcher.result(timeout=10) == "k"
        assert lines(marker) == ["k"]  # ran to the end exactly once
        started = [line.split() for line in lines(Path(str(marker) + ".started"))]
        assert [s[2] for s in started] == ["1", "2"], started  # the second run is delivery 2
        assert True in lost_seen
        events = list(handle.events(timeout=5))
        assert "worker-lost" in kinds(events)
        lost_at = kinds(events).index("worker-lost")
        after = events[lost_at + 1:]
        assert after[0].kind == "started" and after[0].worker == w2.name and after[0].run == 2
        assert after[-1].kind == "succeeded" and after[-1].run == 2
        assert handle.worker == w2.name and watcher.worker == w2.name
    finally:
        other.close()


@redis_only
def test_prefork_child_killed_watchers_see_worker_lost_and_follow(
        broker, start_worker, monkeypatch, request, tmp_path):
    tasks = configure(broker, monkeypatch, request)
    w = start_worker(concurrency=1)
    marker = tmp_path / "ran"
    handle = tasks.marked_steps.start(str(marker), 20, 0.03, "c")
    other = second_client(broker)
    try:
        watcher = other.attach(handle.id)
        wait_for(lambda: handle.progress and handle.progress.current >= 2, message="progress")
        first_pid = handle.pid
        assert first_pid in w.children()
        os.kill(first_pid, signal.SIGKILL)
        assert handle.result(timeout=20) == "c"
        assert watcher.result(timeout=10) == "c"
        assert lines(marker) == ["c"]
        events = list(handle.events(timeout=5))
        lost = [e for e in events if e.kind == "worker-lost"]
        assert len(lost) == 1 and "killed by SIGKILL" in lost[0].fields["reason"]
        assert events[-1].run == 2 and handle.pid != first_pid
        assert [e.kind for e in watcher.snapshot().events].count("worker-lost") == 1
        assert f"pool process {first_pid} killed by SIGKILL" in w.log()
        wait_for(lambda: len(w.children()) == 1 and first_pid not in w.children(),
                 message="the child replaced")
        assert tasks.add.delay(1, 2).result(timeout=10) == 3
    finally:
        other.close()


@pytest.mark.parametrize("broker", ["embedded", "redis", "amqp"], indirect=True)
def test_acks_late_false_task_is_lost_with_its_worker(broker, start_worker, monkeypatch,
                                                      request, tmp_path):
    """``acks_late=False`` acks a task when it starts: SIGKILL of its worker loses it, while
    the task acked late (the default) that ran beside it is delivered again."""
    tasks = configure(broker, monkeypatch, request, worker_heartbeat=0.2,
                      worker_lost_timeout=1.5)
    w1 = start_worker(concurrency=2)
    marker = tmp_path / "late"
    early = tasks.early_ack.apply_async((60,), watch="all")
    late = tasks.marked_steps.start(str(marker), 10, 0.1, "late")
    # A worker flushes the acks of a step before its events: an early-acked task seen
    # running has been acked by the broker. `started` comes from the worker as it hands the
    # task to a pool process: its body records its start later (much later on a loaded
    # machine), and a kill before that would leave nothing to count below.
    wait_for(lambda: early.state is TaskState.RUNNING and late.state is TaskState.RUNNING,
             message="both running")
    wait_for(lambda: broker.records(early.id), message="the early-acked task's body to start")
    w1.kill()
    start_worker(concurrency=2)
    assert late.result(timeout=30) == "late"  # the broker gave the unacked task back
    assert lines(marker) == ["late"]
    # ... and not the acked one, which would have started again with it
    assert [r["data"] for r in broker.records(early.id) if r["what"] == "start"] == [1]


@redis_only
def test_lost_pool_process_delivers_an_early_acked_task_again(broker, start_worker,
                                                               monkeypatch, request):
    """``reject_on_worker_lost`` (the default) covers ``acks_late=False`` too: the worker saw
    the pool process die and publishes the task again itself."""
    tasks = configure(broker, monkeypatch, request)
    w = start_worker(concurrency=1)
    handle = tasks.early_ack.delay(60)
    first = wait_for(lambda: broker.records(handle.id), message="the task to start")[0]
    os.kill(first["pid"], signal.SIGKILL)
    assert handle.result(timeout=20) == "done"
    assert [r["data"] for r in broker.records(handle.id)] == [1, 2]
    assert f"pool process {first['pid']} killed by SIGKILL" in w.log()


@redis_only
def test_reject_on_worker_lost_false_fails_the_task_of_a_lost_pool_process(
        broker, start_worker, monkeypatch, request, tmp_path):
    tasks = configure(broker, monkeypatch, request, reject_on_worker_lost=False)
    start_worker(concurrency=1)
    marker = tmp_path / "ran"
    handle = tasks.marked_steps.start(str(marker), 1000, 0.02, "x")
    wait_for(lambda: handle.progress, message="progress")
    pid = handle.pid
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(TaskFailed) as info:
        handle.result(timeout=20)
    assert info.value.remote_type == "WorkerLost"
    assert f"pool process {pid} killed by SIGKILL" in info.value.remote_message
    assert "worker-lost" not in kinds(handle.snapshot().events)  # no redelivery announced
    assert tasks.add.delay(1, 2).result(timeout=20) == 3  # the queue behind it moves on
    assert len(lines(Path(f"{marker}.started"))) == 1 and lines(marker) == []


def active_on(app: App, worker: str) -> list[Any] | None:
    """What ``inspect active`` says runs on ``worker`` (None: it did not answer)."""
    for reply in app.inspect("active", timeout=2.0, expect=2):
        if reply.get("worker") == worker:
            return list(reply.get("data") or [])
    return None


def spy_inbox_events(app: App, task_id: str, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every event for ``task_id`` that reaches this client's inbox, before any filtering."""
    from interactive_tasks.protocol import Event

    seen: list[Any] = []
    client = app.client
    original = client._dispatch

    def spy(payload: dict[str, Any]) -> None:
        if payload.get("t") == "events":
            seen.extend(e for e in map(Event.from_wire, payload.get("e") or ())
                        if e.task_id == task_id)
        original(payload)

    monkeypatch.setattr(client, "_dispatch", spy)
    return seen


@redis_only
def test_frozen_worker_taken_for_dead_does_not_report_twice(
        broker, start_worker, monkeypatch, request, tmp_path):
    """Redis only: a worker frozen past ``worker_lost_timeout`` is taken for dead and its
    task goes to another worker. The task body may run twice (at-least-once), but the
    client must see one final state, and the stored result must be the run it saw."""
    tasks = configure(broker, monkeypatch, request, worker_heartbeat=0.2,
                      worker_lost_timeout=1.5)
    w1 = start_worker(concurrency=1)
    marker = tmp_path / "ran"
    handle = tasks.marked_steps.start(str(marker), 10, 0.1, "f")
    inbox = spy_inbox_events(tasks.app, handle.id, monkeypatch)
    wait_for(lambda: handle.progress, message="progress")
    os.killpg(w1.pid, signal.SIGSTOP)  # the worker and its pool: a frozen machine
    try:
        w2 = start_worker(concurrency=1)
        assert handle.result(timeout=20) == "f"
        assert handle.worker == w2.name and handle.snapshot().run == 2
    finally:
        os.killpg(w1.pid, signal.SIGCONT)
    # The resumed worker deals with its stale copy (finishes or drops it); then anything it
    # had to say has been said.
    wait_for(lambda: active_on(tasks.app, w1.name) == [], 15,
             message="the resumed worker to be done with its copy")
    holds_for(lambda: w1.proc.poll() is None, 0.5, message="resumed worker alive")
    finals = [(e.run, e.kind) for e in inbox if e.is_final]
    stored = tasks.app.results.get(handle.id)
    assert handle.state is TaskState.SUCCEEDED and handle.result(0) == "f"
    check(finals == [(2, "succeeded")] and stored["run"] == 2
                    and stored["worker"] == w2.name,
                    f"final events that reached the client: {finals}; stored record: run "
                    f"{stored['run']} from {stored['worker']} (the client saw run 2 from "
                    f"{w2.name}); the task body ran to the end {len(lines(marker))} times")


# -- the broker goes away ------------------------------------------------------------------------
@pytest.mark.parametrize("broker", ["amqp"], indirect=True)
def test_retry_of_a_task_started_before_a_reconnect(broker, start_worker, monkeypatch,
                                                    request, tmp_path):
    """A task running while the worker's connection drops retries afterwards: its
    delivery from the old connection cannot be acknowledged (logged, no second
    reconnect), and the broker's redelivery on the new connection is acknowledged with
    the retry, so the task runs twice (the run and its retry), not three times."""
    tasks = configure(broker, monkeypatch, request)
    w = start_worker(concurrency=1)
    counter = tmp_path / "runs"
    handle = tasks.retry_once_after_go.delay(str(counter))
    wait_for(lambda: counter.exists(), 15, message="the first run")
    assert drop_broker_connections(broker, [w.pid]) >= 1
    wait_for(lambda: w.log().count(" ready") >= 2, 30, message="the worker to reconnect")
    # the broker gave the task to the worker again on the new connection (a duplicate)
    wait_for(lambda: "delivered again while it runs here" in w.log(), 15,
             message="the redelivery")
    Path(str(counter) + ".go").write_text("")
    assert handle.result(timeout=20) == 2
    holds_for(lambda: counter.read_text() == "2", 1.0, message="no third run")
    assert w.log().count("broker connection lost") == 1, w.log()
    assert "could not acknowledge a delivery" in w.log(), w.log()
    assert "Traceback" not in w.log(), w.log()


@pytest.mark.parametrize("broker", ["redis", "amqp"], indirect=True)
def test_broker_connections_dropped_under_load(broker, start_worker, monkeypatch, request,
                                                tmp_path):
    """The broker drops every connection of the worker and of this client twice while 24
    interactive tasks run: each completes exactly once, every starter gets its result and
    its whole stream, and the worker reconnects by itself and logs it."""
    tasks = configure(broker, monkeypatch, request)
    w = start_worker(concurrency=2)
    marker = tmp_path / "ran"
    keys = [f"k{i}" for i in range(24)]
    handles = [tasks.marked_steps.start(str(marker), 5, 0.04, key) for key in keys]
    for round_ in (1, 2):
        wait_for(lambda n=round_: len(lines(marker)) >= 6 * n, 30, message="some tasks done")
        closed = drop_broker_connections(broker, [w.pid, os.getpid()])
        assert closed >= 2
        wait_for(lambda n=round_: w.log().count("broker connection lost") >= n, 20,
                 message="the worker to notice")
        wait_for(lambda n=round_: w.log().count(" ready") >= n + 1, 30,
                 message="the worker to reconnect")
    results = [h.result(timeout=60) for h in handles]
    assert results == keys
    assert sorted(lines(marker)) == sorted(keys)  # each ran to the end exactly once
    for h in handles:
        events = list(h.events(timeout=10))
        assert events[0].kind == "started" and events[-1].kind == "succeeded"
        assert [e.current for e in events if e.kind == "progress"][-1] == 5
    assert w.proc.poll() is None
    try:
        after = tasks.add.delay(2, 3)  # the first publish since the drop
    except TransportError as exc:
        raise AssertionError(f"the client's first publish after the drop failed: {exc}") from None
    assert after.result(timeout=20) == 5


# -- a task that kills its pool process every time ----------------------------------------------
def read_dead_letters(app: App, expect: int, timeout: float = 10.0) -> list[Any]:
    """Take ``expect`` messages off the dead-letter queue (fails if fewer arrive)."""
    got: list[Any] = []
    with app.connection() as conn:
        simple = conn.SimpleQueue(app.names.dead_letter_queue, no_ack=True)
        try:
            def more() -> bool:
                try:
                    got.append(simple.get(timeout=0.2))
                except simple.Empty:
                    pass
                return len(got) >= expect

            wait_for(more, timeout, interval=0, message=f"{expect} dead letter(s)")
        finally:
            simple.close()
    return got


@redis_only
def test_task_that_always_crashes_its_child_is_dead_lettered(broker, start_worker, monkeypatch,
                                                             request):
    tasks = configure(broker, monkeypatch, request, max_deliveries=3)
    w = start_worker(concurrency=1)
    handle = tasks.crash_counted.delay()
    with pytest.raises(TaskFailed) as info:
        handle.result(timeout=30)
    assert info.value.remote_type == "WorkerLost"
    assert "delivered 3 times" in info.value.remote_message
    assert "max_deliveries=3" in info.value.remote_message
    assert [r["data"] for r in broker.records(handle.id)] == [1, 2, 3]  # no fourth try
    [letter] = read_dead_letters(tasks.app, 1)
    assert "max_deliveries=3" in letter.headers["itask-reason"]
    assert letter.headers["itask-worker"] == w.name
    assert f"rejected message from {tasks.app.names.task_queue_name('default')}" in w.log()
    holds_for(lambda: len(broker.records(handle.id)) == 3, 0.5, message="no more deliveries")
    assert tasks.add.delay(2, 2).result(timeout=20) == 4
    assert w.proc.poll() is None


# -- clients that vanish, stall or never read ---------------------------------------------------
CLIENT_SCRIPT = r"""
import json, sys, time
import interactive_tasks.client as client_module
client_module.RENEW_INTERVAL = 0.4
client_module.WORKER_SILENCE = 1.0
import tests.apps.tasks as t
h = t.steerable.start(100000, 0.01)
h.send("m1")
h.send("m2")
echoes = []
told = False
for ev in h.events(timeout=60):
    if ev.kind == "message":
        echoes.append(ev.data["echo"])
    if len(echoes) == 2 and not told:
        print(json.dumps({"id": h.id, "token": h.token, "inbox": t.app.client.inbox.name}),
              flush=True)
        told = True
print(json.dumps({"echoes": echoes, "final": h.state.value, "lost": h.worker_lost}), flush=True)
t.app.close()
"""


def start_client_process(broker: Any) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """A client in its own process that starts a steerable task; returns it and the task."""
    proc = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT], env=broker.env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        _, err = proc.communicate(timeout=10)
        raise AssertionError(f"client process failed: {err[-2000:]}")
    return proc, json.loads(line)


def settled_length(r: Any, key: str, quiet: float = 0.6, timeout: float = 10.0) -> int:
    """Wait until list ``key`` stops growing for ``quiet`` seconds; returns its length."""
    state = {"n": -1, "since": time.monotonic()}

    def quiet_now() -> bool:
        n = r.llen(key)
        if n != state["n"]:
            state["n"], state["since"] = n, time.monotonic()
        return time.monotonic() - state["since"] >= quiet

    wait_for(quiet_now, timeout, interval=0.1, message=f"{key} to stop growing")
    return state["n"]


def echoes_of(handle: Any) -> list[Any]:
    return [e.data["echo"] for e in handle.snapshot().events if e.kind == "message"]


@redis_only
def test_client_killed_mid_stream_subscription_expires_nothing_piles_up_and_reattach_misses_nothing(
        broker, start_worker, monkeypatch, request):
    monkeypatch.setattr(client_module, "RENEW_INTERVAL", 0.4)
    tasks = configure(broker, monkeypatch, request, subscription_ttl=1.5, worker_heartbeat=0.3)
    w = start_worker(concurrency=1)
    proc, info = start_client_process(broker)
    proc.kill()  # no goodbye: its inbox stays, nobody renews its subscription
    proc.communicate(timeout=10)
    r = redis_client()
    try:
        inbox = info["inbox"]
        wait_for(lambda: r.llen(inbox) > 0, 3,  # the worker still streams to the dead client
                 message="events for the dead client")
        settled = settled_length(r, inbox)
        handle = tasks.app.attach(info["id"], token=info["token"])  # re-attach, new client
        assert handle.state is TaskState.RUNNING
        start = handle.progress.current
        wait_for(lambda: handle.progress.current > start + 20, message="the task goes on")
        holds_for(lambda: r.llen(inbox) == settled, 1.0, message="dead inbox unchanged")
        ttl_ms = r.pttl(inbox)
        assert 0 < ttl_ms <= 60_000, f"the dead client's inbox never expires (PTTL {ttl_ms})"

        # snapshot + tail: the messages sent before the client died, then a new one
        assert echoes_of(handle) == ["m1", "m2"]
        handle.send("m3")
        wait_for(lambda: echoes_of(handle) == ["m1", "m2", "m3"], message="echo of m3")
        handle.cancel(grace=0)
        events = list(handle.events(timeout=10))
        seqs = [e.seq for e in events]
        assert seqs == sorted(set(seqs))
        assert [e.data["echo"] for e in events if e.kind == "message"] == ["m1", "m2", "m3"]
        assert events[-1].kind == "cancelled"
        assert [x["data"] for x in broker.records(info["id"]) if x["what"] == "message"] == [
            "m1", "m2", "m3"]
        keys = sorted(k.decode() for k in r.keys(f"{broker.namespace}*"))
        assert len(keys) <= 6, keys
        assert w.proc.poll() is None
    finally:
        r.close()


# -- time limits ---------------------------------------------------------------------------------
@one_broker
def test_soft_time_limit_fires_and_does_not_count_a_soft_pause(broker, start_worker, monkeypatch,
                                                               request):
    tasks = configure(broker, monkeypatch, request)
    start_worker(concurrency=1)
    quick = tasks.soft_limited.start(5)
    result = quick.result(timeout=10)
    assert result["soft_limit"] and 0.75 <= result["after"] < 1.6, result  # limit 0.8 s

    paused = tasks.soft_limited.start(5)
    wait_for(lambda: paused.state is TaskState.RUNNING, message="running")
    paused.pause()
    wait_for(lambda: paused.state is TaskState.PAUSED, message="paused")
    holds_for(lambda: paused.state is TaskState.PAUSED, 1.0, message="still paused")
    paused.resume()
    result = paused.result(timeout=10)
    assert result["soft_limit"] and result["after"] >= 1.75, result  # 0.8 s + 1 s paused


@one_broker
def test_soft_time_limit_does_not_count_a_hard_pause(broker, start_worker, monkeypatch,
                                                     request):
    tasks = configure(broker, monkeypatch, request)
    start_worker(pool="prefork", concurrency=1)
    frozen = tasks.soft_limited.start(5)
    wait_for(lambda: frozen.state is TaskState.RUNNING, message="running")
    frozen.pause(hard=True)
    wait_for(lambda: frozen.state is TaskState.PAUSED, message="hard paused")
    holds_for(lambda: frozen.state is TaskState.PAUSED, 1.2, message="still frozen")
    frozen.resume()
    result = frozen.result(timeout=10)
    assert result["soft_limit"], result
    check(result["after"] >= 1.9,
                    f"the soft limit (0.8 s) fired {result['after']:.2f} s after the start, "
                    "of which 1.2 s frozen: the frozen time was counted")


@one_broker
def test_hard_time_limit_kills_and_replaces_the_child_not_counting_a_hard_pause(
        broker, start_worker, monkeypatch, request):
    tasks = configure(broker, monkeypatch, request)
    w = start_worker(pool="prefork", concurrency=1)
    handle = tasks.hard_limited_spin.start(60)  # time_limit=1.0, never checks
    wait_for(lambda: broker.records(handle.id), message="spinning")
    old_pid = handle.pid
    handle.pause(hard=True)
    wait_for(lambda: handle.state is TaskState.PAUSED, message="hard paused")
    holds_for(lambda: handle.state is TaskState.PAUSED, 1.5, message="frozen, not killed")
    handle.resume()
    with pytest.raises(TaskFailed) as info:
        handle.result(timeout=15)
    assert info.value.remote_type == "TimeLimitExceeded"
    assert "hard time limit of 1.0s exceeded" in info.value.remote_message
    events = handle.snapshot().events
    ran_for = events[-1].ts - events[0].ts
    assert 2.4 <= ran_for < 4.5, ran_for  # 1 s of running + 1.5 s frozen, not counted
    assert "killing its pool process" in w.log()
    wait_for(lambda: not Path(f"/proc/{old_pid}").exists(), message="old child gone")
    wait_for(lambda: len(w.children()) == 1, message="a new child")
    assert old_pid not in w.children()
    assert tasks.whoami.delay().result(timeout=10)["pid"] not in (old_pid, None)


@one_broker
def test_hard_time_limit_on_the_threads_pool_is_reported_as_a_time_limit(
        broker, start_worker, monkeypatch, request):
    tasks = configure(broker, monkeypatch, request)
    start_worker(pool="threads", concurrency=1)
    handle = tasks.hard_limited_spin.start(60)
    with pytest.raises(TaskFailed) as info:  # not TaskCancelled
        handle.result(timeout=15)
    assert info.value.remote_type == "TimeLimitExceeded"
    assert tasks.add.delay(1, 1).result(timeout=10) == 2


@redis_only
def test_stalled_client_resumes_and_misses_nothing(broker, start_worker, monkeypatch, request):
    """A client frozen (SIGSTOP) longer than subscription_ttl loses its subscription; when it
    runs again it must get back everything it missed, not only what comes next."""
    monkeypatch.setattr(client_module, "RENEW_INTERVAL", 0.4)
    tasks = configure(broker, monkeypatch, request, subscription_ttl=1.5, worker_heartbeat=0.3)
    start_worker(concurrency=1)
    proc, info = start_client_process(broker)
    r = redis_client()
    try:
        proc.send_signal(signal.SIGSTOP)
        settled_length(r, info["inbox"])  # the worker dropped the frozen client
        handle = tasks.app.attach(info["id"], token=info["token"])
        handle.send("while-frozen")
        wait_for(lambda: echoes_of(handle) == ["m1", "m2", "while-frozen"], message="echo")
        proc.send_signal(signal.SIGCONT)  # its own renewals bring the subscription back
        wait_for(lambda: r.llen(info["inbox"]) == 0, 10, message="the client reads again")
        handle.send("after")
        wait_for(lambda: "after" in echoes_of(handle), message="echo of after")
        handle.cancel(grace=0)
        out, err = proc.communicate(timeout=20)
        summary = json.loads(out.splitlines()[-1])
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.communicate(timeout=10)
        r.close()
    assert summary["final"] == "cancelled", (summary, err[-2000:])
    check(summary["echoes"] == ["m1", "m2", "while-frozen", "after"],
                    f"the client saw echoes {summary['echoes']}")


@redis_only
def test_watcher_that_never_reads_cannot_block_the_task_or_grow_the_worker(
        broker, start_worker, monkeypatch, request):
    """A chatty task (as many progress events as it can for 3 s) watched by a handle nobody
    iterates: the task is not slowed down by it, progress coalesces in the handle, the last
    progress arrives, and the worker's memory stays flat."""
    tasks = configure(broker, monkeypatch, request)
    w = start_worker(concurrency=1)
    assert tasks.chatty.delay(2000).result(timeout=20) == 2000  # warm up the pool and relay
    baseline = rss_kb(w.pid)
    handle = tasks.chatty_for.start(3.0)
    peak = baseline
    started = time.monotonic()
    while not handle.ready():
        peak = max(peak, rss_kb(w.pid))
        assert time.monotonic() - started < 15, "the chatty task was held up"
        time.sleep(0.05)  # the RSS sampling period while the task runs
    emitted = handle.result(0)
    assert emitted > 3000  # it really was chatty
    assert handle.progress.current == emitted  # the last progress always arrives
    buffered = handle.events_nowait()  # everything the handle holds for a reader
    assert len(buffered) <= 6, kinds(buffered)  # started, progress (coalesced), message, end
    assert [e.kind for e in buffered if e.kind != "progress"] == [
        "started", "message", "succeeded"]
    assert peak - baseline < 20 * 1024, f"worker RSS grew {peak - baseline} KiB"


@redis_only
def test_no_broker_key_per_task(broker, start_worker, monkeypatch, request):
    """1,000 interactive tasks later, the namespace holds only a fixed set of keys."""
    tasks = configure(broker, monkeypatch, request)
    w = start_worker(pool="threads", concurrency=4)
    r = redis_client()
    try:
        def keyset() -> set[str]:
            ns = broker.namespace
            found = {k.decode() for k in r.scan_iter(f"{ns}*", count=1000)}
            found |= {k.decode() for k in r.scan_iter(f"_kombu.binding*{ns}*", count=1000)}
            return found

        def settled_keyset() -> set[str]:
            # The lists exist only while they hold messages: right after the last result
            # an idle worker may still be popping the bells rung while all its slots were
            # busy. They must go (drained, else expired after a minute); then compare.
            def drained() -> set[str] | None:
                keys = keyset()
                shapes = {normalise(k, broker.namespace, w.name, tasks.app.client.id)
                          for k in keys}
                return None if shapes & TRANSIENT_KEYS else keys
            return wait_for(drained, 10, message="the namespace's lists to drain")

        first = [tasks.count.start(2) for _ in range(500)]
        assert [h.result(timeout=60) for h in first] == [2] * 500
        after_500 = settled_keyset()
        second = [tasks.count.start(2) for _ in range(500)]
        assert [h.result(timeout=60) for h in second] == [2] * 500
        after_1000 = settled_keyset()
        ids = {h.id for h in first + second}
        assert not [k for k in after_1000 if any(i in k for i in ids)]
        assert after_1000 == after_500, after_1000 ^ after_500
        shapes = sorted({normalise(k, broker.namespace, w.name, tasks.app.client.id)
                         for k in after_1000})
        assert set(shapes) <= ALLOWED_KEYS, shapes
        assert len(after_1000) <= len(ALLOWED_KEYS) + 1, after_1000  # + a second result hour
    finally:
        r.close()


#: the only keys the namespace may hold, however many tasks ran (Redis). Measured after
#: 1,000 tasks: <ns>.results.<hour>, <ns>.workers and _kombu.binding.<ns>.bcast; lists
#: exist only while they hold messages, and so do each worker's unacked hash and index.
ALLOWED_KEYS = {
    "<ns>.workers",                  # live workers and their last heartbeat
    "<ns>.results.<hour>",           # one hash per hour of finished tasks
    "_kombu.binding.<ns>.bcast",     # bindings of the broadcast exchange (one per worker)
    "_kombu.binding.<ns>.events",    # bindings of the monitoring exchange
    "<ns>.tasks.default",            # the task queue, while it holds messages
    "<ns>.tasks.default\x06\x16bell",  # its bell for idle workers, while it rings
    "<ns>.ctl.<worker>",             # the worker's control queue, while it holds messages
    "<ns>.inbox.<client>",           # this client's inbox, while it holds messages
    "<ns>.dead",                     # dead letters, if any
}
#: of those, the lists that must be gone once every task has finished and been read
TRANSIENT_KEYS = {
    "<ns>.tasks.default", "<ns>.tasks.default\x06\x16bell", "<ns>.ctl.<worker>",
    "<ns>.inbox.<client>",
}


def normalise(key: str, namespace: str, worker: str, client: str) -> str:
    import re

    key = key.replace(namespace, "<ns>").replace(worker, "<worker>").replace(client, "<client>")
    return re.sub(r"\.results\.\d+", ".results.<hour>", key)


# -- deliveries that must be settled exactly once ------------------------------------------------
@redis_only
def test_duplicate_publish_of_a_running_task_settles_both_deliveries(
        broker, start_worker, monkeypatch, request, tmp_path):
    tasks = configure(broker, monkeypatch, request)
    w = start_worker(concurrency=1)
    marker = tmp_path / "ran"
    task_id = "dup-" + broker.namespace
    first = tasks.app.send_task(tasks.marked_steps.name, [str(marker), 10, 0.05, "d"],
                                task_id=task_id, watch="all")
    wait_for(lambda: first.state is TaskState.RUNNING, message="running")
    second = tasks.app.send_task(tasks.marked_steps.name, [str(marker), 10, 0.05, "d"],
                                 task_id=task_id)
    assert first.result(timeout=20) == "d"
    assert second.result(timeout=10) == "d"
    assert lines(marker) == ["d"]  # one run for one task id
    assert "delivered again while it runs here" in w.log()
    r = redis_client()
    try:
        def unacked() -> int:
            return sum(r.hlen(k) for k in r.scan_iter(f"{broker.namespace}.unacked.*"))
        try:
            wait_for(lambda: unacked() == 0, 3, message="both deliveries settled")
        except AssertionError:
            raise AssertionError(f"{unacked()} delivery still unacked after the task "
                                 "ended") from None
    finally:
        r.close()
