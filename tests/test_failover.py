"""Broker failover and restarts under load, on Redis servers these tests start themselves.

* A primary, a replica and a sentinel (``tests/redis_servers.py``); a real ``itask worker``
  and this process as its client on the ``sentinel://`` URL; the primary SIGKILLed while
  tasks are queued, running and being published.
* One Redis with ``appendonly yes``, SIGKILLed and started again on the same directory
  and port, under the same load.

What each promises is in docs/reliability.md ("Broker failover and restarts").
"""

from __future__ import annotations

import importlib
import json
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from interactive_tasks.errors import TaskTimeout, TransportError

from .conftest import BrokerEnv, WorkerProcess, wait_for
from .doc_blocks import doc_block
from .redis_servers import RedisProcess, SentinelSetup, free_port, wait_gone

#: tasks submitted per test, and how many of them run or wait at once
TOTAL = 120
BACKLOG = 16
#: the broker breaks once this many tasks were published
BREAK_AT = 40


@dataclass
class Run:
    env: BrokerEnv
    tasks: Any
    worker: WorkerProcess
    marker: Path
    #: keys whose first publish raised TransportError (published again, same task id)
    retried: set[str] = field(default_factory=set)
    handles: dict[str, Any] = field(default_factory=dict)


@pytest.fixture
def started(request: pytest.FixtureRequest) -> Iterator[list[Any]]:
    """Servers and workers a test starts; killed afterwards (logs printed on failure)."""
    things: list[Any] = []
    yield things
    failed = getattr(getattr(request.node, "rep_call", None), "failed", False)
    for thing in reversed(things):
        if failed and isinstance(thing, WorkerProcess):
            print(f"--- worker {thing.name} ---\n{thing.log()[-5000:]}")
        if failed and isinstance(thing, SentinelSetup):
            print(thing.logs())
        if failed and isinstance(thing, RedisProcess):
            print(f"--- redis {thing.port} ---\n{thing.log_tail()}")
        if isinstance(thing, RedisProcess):
            thing.kill()
        else:
            thing.stop()


def start_run(url: str, transport_options: dict[str, Any], tmp_path: Path,
              monkeypatch: pytest.MonkeyPatch, started: list[Any]) -> Run:
    """The tests' app on ``url`` in this process, and one prefork worker (-c 2) on it."""
    home, records = tmp_path / "home", tmp_path / "records"
    home.mkdir()
    records.mkdir()
    settings = json.dumps({"broker_transport_options": transport_options})
    env = BrokerEnv("redis", url, f"t{uuid.uuid4().hex[:10]}", home, records,
                    extra={"ITASK_TEST_SETTINGS": settings})
    env.apply(monkeypatch)
    import tests.apps.tasks as tasks_module

    tasks = importlib.reload(tasks_module)
    worker = WorkerProcess(env, tmp_path, concurrency=2)
    started.append(worker)
    worker.wait_ready()
    return Run(env, tasks, worker, tmp_path / "done")


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def submit_under_load(run: Run, break_broker: Callable[[], None]) -> threading.Thread:
    """Publish TOTAL tasks keeping BACKLOG of them unfinished; when BREAK_AT are out,
    break the broker from another thread while publishing goes on. A publish that
    raises TransportError is repeated with the same task id until it goes through."""
    breaker = threading.Thread(target=break_broker, name="break-broker")
    for i in range(TOTAL):
        key = f"k{i:03d}"
        if i == BREAK_AT:
            breaker.start()
        wait_for(lambda n=i: len(lines(run.marker)) >= n - BACKLOG, 60,
                 message=f"fewer than {BACKLOG} tasks unfinished before publishing {key}")

        def publish(key: str = key) -> bool:
            try:
                run.handles[key] = run.tasks.marked_steps.apply_async(
                    args=(str(run.marker), 3, 0.02, key), task_id=key)
                return True
            except TransportError:
                run.retried.add(key)
                return False

        wait_for(publish, 30, interval=0.05, message=f"{key} to be published")
    return breaker


def result_or_report(run: Run, key: str, handle: Any) -> Any:
    """The task's result; if none comes, a failure that says how far the task got."""
    try:
        return handle.result(timeout=60)
    except TaskTimeout as exc:
        started_ = [line for line in lines(Path(f"{run.marker}.started")) if
                    line.split()[0] == key]
        raise AssertionError(f"{key}: {exc}; started {len(started_)} time(s), finished "
                             f"{lines(run.marker).count(key)} time(s)") from exc


def check_every_task_ran_once(run: Run) -> None:
    """Every starter gets its result; every task published in one go (apply_async
    returned) was started once and finished once; one published again after a
    TransportError (it may have been queued by the first try) ran at most twice."""
    results = {key: result_or_report(run, key, handle) for key, handle in run.handles.items()}
    assert results == {key: key for key in run.handles}
    finished = Counter(lines(run.marker))
    started_ = Counter(line.split()[0] for line in lines(Path(f"{run.marker}.started")))
    once = sorted(k for k in run.handles if k not in run.retried)
    assert len(once) >= TOTAL - 10, f"too few tasks published in one go: {len(once)}"
    assert {k: finished[k] for k in once} == dict.fromkeys(once, 1)
    assert {k: started_[k] for k in once} == dict.fromkeys(once, 1)
    assert all(1 <= finished[k] <= 2 for k in run.retried), {k: finished[k] for k in run.retried}
    assert set(finished) == set(run.handles)


def check_nothing_left_behind(run: Run, redis_client: Any) -> None:
    """No message still queued or recorded unacknowledged (it would run again later:
    a worker's unacked keys are ``<ns>.unacked.<incarnation>``, gone once empty)."""
    ns = run.env.namespace
    assert list(redis_client.scan_iter(f"{ns}.unacked*")) == []
    assert redis_client.llen(f"{ns}.tasks.default") == 0


# -- sentinel failover ------------------------------------------------------------------------
@pytest.mark.parametrize("failover", ["crash", "handover"])
def test_sentinel_failover_under_load_loses_no_task_and_runs_none_twice(
        failover: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        started: list[Any]) -> None:
    """The primary fails over while tasks are queued, running and being published; the
    worker and the client follow the sentinel to the promoted replica by themselves, and
    with ``wait_replicas=1`` nothing the old primary acknowledged is missing there.

    ``crash``: the primary is SIGKILLed — the real failure: connections reset, no primary
    for a few seconds until the sentinel has seen it down and promoted the replica (its
    supervisor then starts it again as a replica). ``handover``: ``SENTINEL FAILOVER``, as
    an operator does for maintenance — nothing breaks, and that is the trap: the old
    primary keeps the connections and takes writes until it is demoted (~10 s), then
    drops them."""
    setup = SentinelSetup(tmp_path / "redis")
    started.append(setup)
    setup.start()
    # a short WAIT timeout: after a handover the new primary has no replica until the
    # sentinel demotes the old one (~10 s), and each write waits this long meanwhile
    wait = {"wait_replicas": 1, "wait_replicas_timeout": 0.25}
    run = start_run(setup.url, {**setup.transport_options, **wait}, tmp_path, monkeypatch,
                    started)
    try:
        fail_over = setup.crash_primary if failover == "crash" else setup.hand_over
        breaker = submit_under_load(run, fail_over)
        breaker.join(30)
        assert setup.primary_port() == setup.replica.port  # it did fail over
        check_every_task_ran_once(run)
        log = run.worker.log()
        assert "broker connection lost" in log and log.count(" ready") >= 2
        assert run.worker.proc.poll() is None
        check_nothing_left_behind(run, setup.replica.client())
        assert setup.primary_port() == setup.replica.port  # one failover, not two
    finally:
        run.tasks.app.close()


# -- a Redis restart with AOF ------------------------------------------------------------------
def documented_redis_conf() -> list[str]:
    """The production ``redis.conf`` lines of docs/deploy.md as command-line arguments."""
    block = doc_block("docs/deploy.md", "# redis.conf")
    return [word for words in block.commands() if words
            for word in (f"--{words[0]}", *words[1:])]


def test_redis_restart_with_aof_under_load_loses_no_task_and_runs_none_twice(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, started: list[Any]) -> None:
    """Redis with the production setting of docs/deploy.md (``appendonly yes``,
    ``appendfsync everysec``) is SIGKILLed and started again on its directory and port
    while tasks are queued, running and being published: what it acknowledged was
    written to its AOF, so every queued task, every unacked record and every result is
    back."""
    conf = documented_redis_conf()
    assert conf == ["--appendonly", "yes", "--appendfsync", "everysec"]
    server = RedisProcess(tmp_path / "redis", free_port(), conf)
    started.append(server)
    server.start()
    run = start_run(server.url, {}, tmp_path, monkeypatch, started)

    def restart() -> None:
        server.kill()
        wait_gone(server.port)
        server.start()

    try:
        breaker = submit_under_load(run, restart)
        breaker.join(30)
        check_every_task_ran_once(run)
        server_log = server.log_tail(50_000)
        assert server_log.count("Ready to accept connections") == 2  # it did restart
        assert "DB loaded from incr file" in server_log  # … from its AOF
        log = run.worker.log()
        assert "broker connection lost" in log and log.count(" ready") >= 2
        assert run.worker.proc.poll() is None
        check_nothing_left_behind(run, server.client())
    finally:
        run.tasks.app.close()
