"""Celery's remote control against real workers: rate_limit, time_limit, add_consumer,
cancel_consumer, shutdown, and inspect reserved / revoked / query_task, from Python
(``app.control``) and from ``itask control`` / ``itask inspect``."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from interactive_tasks import TaskState
from interactive_tasks.errors import NotAuthorized

from .conftest import ROOT, BrokerEnv, holds_for, wait_for

SECRET = "operator-secret-for-control"


@pytest.fixture
def operator(broker: BrokerEnv, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Workers, this process and the itask runs share an operator secret."""
    broker.extra["ITASK_SECRET"] = SECRET
    monkeypatch.setenv("ITASK_SECRET", SECRET)
    yield


def itask(broker: BrokerEnv, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "interactive_tasks.cli.main", *args,
                           "-A", "tests.apps.tasks"],
                          env=broker.env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


def one_line(out: subprocess.CompletedProcess[str]) -> str:
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    return lines[0]


def queue_names(tasks: Any, worker: str) -> list[str]:
    stats = tasks.app.control.inspect(destination=worker, timeout=5).stats()
    return list(stats[worker]["queues"])


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_rate_limit_set_and_lifted_from_python(operator, tasks, start_worker, broker):
    w = start_worker(concurrency=2)
    replies = tasks.app.control.rate_limit(tasks.noop.name, "1/m", destination=[w.name],
                                           timeout=5)
    assert replies == [{w.name: {"ok": f"rate limit of {tasks.noop.name} set to 1/m"}}]
    first, second = tasks.noop.delay(), tasks.noop.delay()
    first.result(timeout=10)
    # one start a minute: the second waits although a slot is free
    holds_for(lambda: second.state is TaskState.PENDING, 1.0, message="second held back")
    replies = tasks.app.control.rate_limit(tasks.noop.name, None, timeout=5,
                                           destination=w.name)
    assert replies == [{w.name: {"ok": f"rate limit of {tasks.noop.name} set to none"}}]
    assert second.result(timeout=5) is None


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_time_limit_from_the_cli_applies_to_the_next_runs(operator, tasks, start_worker,
                                                          broker):
    w = start_worker(concurrency=1)
    out = itask(broker, "control", "time_limit", tasks.sleep_then.name, "none", "0.5",
                "-d", w.name, "--json", "--timeout", "5")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {w.name: {
        "ok": f"time limits of {tasks.sleep_then.name} set to soft=None hard=0.5"}}
    handle = tasks.sleep_then.delay(30)
    handle.wait(timeout=15)
    assert handle.state is TaskState.FAILED
    assert handle.snapshot().error["type"] == "TimeLimitExceeded"
    assert "hard time limit of 0.5s exceeded" in w.log()


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_time_limit_reaches_a_task_already_reserved(operator, tasks, start_worker, broker):
    w = start_worker(concurrency=1)
    busy = tasks.sleep_then.delay(1.5, "first")
    inspect = tasks.app.control.inspect(destination=[w.name], timeout=5)
    wait_for(lambda: inspect.active().get(w.name), 10, message="the first to start")
    reserved = tasks.sleep_then.delay(30)
    wait_for(lambda: inspect.reserved().get(w.name), 10, message="the second reserved")
    tasks.app.control.time_limit(tasks.sleep_then.name, hard=0.5, destination=[w.name],
                                 timeout=5)
    assert reserved.wait(timeout=15) is TaskState.FAILED
    assert reserved.snapshot().error["type"] == "TimeLimitExceeded"
    assert busy.result(timeout=5) == "first"  # a run already started keeps its limits


@pytest.mark.parametrize("broker", ["redis", "amqp"], indirect=True)
def test_add_and_cancel_consumer(operator, tasks, start_worker, broker):
    w = start_worker(concurrency=1, extra_args=["-Q", "default"])
    waiting = tasks.add.apply_async((1, 2), queue="extra")
    holds_for(lambda: waiting.state is TaskState.PENDING, 1.0, message="no consumer")
    out = itask(broker, "control", "add_consumer", "extra", "-d", w.name, "--timeout", "5")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"-> {w.name}: OK now consuming from extra"
    assert waiting.result(timeout=10) == 3
    assert queue_names(tasks, w.name) == ["default", "extra"]

    replies = tasks.app.control.cancel_consumer("extra", destination=[w.name], timeout=5)
    assert replies == [{w.name: {"ok": "no longer consuming from extra"}}]
    assert queue_names(tasks, w.name) == ["default"]
    later = tasks.add.apply_async((2, 2), queue="extra")
    holds_for(lambda: later.state is TaskState.PENDING, 1.5, message="consumer cancelled")
    assert tasks.add.delay(3, 3).result(timeout=10) == 6  # the other queue still served
    # its last queue is not dropped, and an unknown one is an error: one line each
    replies = tasks.app.control.cancel_consumer("default", destination=[w.name], timeout=5)
    assert replies == [{w.name: {"error": f"default is the last queue of {w.name}; use "
                                          "shutdown", "type": "ControlError"}}]
    out = itask(broker, "control", "cancel_consumer", "nope", "-d", w.name, "--timeout", "5")
    assert out.returncode == 1
    assert out.stdout.strip() == (f"-> {w.name}: ERROR ControlError: {w.name} does not "
                                  "consume from nope")


@pytest.mark.parametrize("broker", ["amqp"], indirect=True)
def test_add_consumer_the_broker_refuses_is_an_error_and_tasks_keep_coming(
        operator, tasks, start_worker, broker):
    other = tasks.app.names.task_queue_name("other")
    with tasks.app.connection() as conn:
        # without the x-max-priority of task queues: the worker's declaration is refused
        conn.channel().queue_declare(other, durable=True, auto_delete=False)
    try:
        w = start_worker(concurrency=1, extra_args=["-Q", "default"])
        assert tasks.add.delay(1, 1).result(timeout=10) == 2
        [reply] = tasks.app.control.add_consumer("other", destination=[w.name], timeout=5)
        error = reply[w.name]
        assert error["type"] == "QueueRefused", error
        assert error["error"].startswith(f"the broker refused to declare queue {other}: "
                                         "PRECONDITION_FAILED"), error
        assert queue_names(tasks, w.name) == ["default"]
        # the task channel was not the one the refusal closed: tasks still come
        assert tasks.add.delay(2, 2).result(timeout=10) == 4
    finally:
        with tasks.app.connection() as conn:
            conn.channel().queue_delete(other)


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_shutdown_stops_only_the_destination(operator, tasks, start_worker, broker):
    stays, goes = start_worker(concurrency=1), start_worker(concurrency=1)
    out = itask(broker, "control", "shutdown", "-d", goes.name, "--timeout", "5")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"-> {goes.name}: OK warm shutdown started"
    wait_for(lambda: goes.proc.poll() is not None, 15, message="the worker to exit")
    assert goes.proc.returncode == 0
    assert "remote control shutdown: warm shutdown" in goes.log()
    assert stays.proc.poll() is None
    assert tasks.add.delay(1, 1).result(timeout=10) == 2
    # a destination nobody answers for: exit 1, one line
    out = itask(broker, "control", "shutdown", "-d", "nobody@nowhere", "--timeout", "0.5")
    assert out.returncode == 1
    assert "nobody@nowhere replied" in one_line(out)
    assert stays.proc.poll() is None


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_worker_wide_control_needs_the_operator_secret(tasks, start_worker, broker):
    w = start_worker(concurrency=1)
    with pytest.raises(NotAuthorized, match="needs the operator secret"):
        tasks.app.control.rate_limit(tasks.noop.name, "1/m")
    out = itask(broker, "control", "shutdown", "-d", w.name)
    assert out.returncode == 1
    assert "shutdown changes whole workers: it needs the operator secret" in one_line(out)
    # sent anyway (an older client, or a forged one): the worker refuses and says why
    replies = tasks.app.control.broadcast("shutdown", destination=[w.name], timeout=5)
    assert [r["error"]["type"] for r in replies] == ["NotAuthorized"]
    assert "refused shutdown" in w.log()
    assert w.proc.poll() is None
    assert tasks.add.delay(2, 3).result(timeout=10) == 5


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_inspect_reserved_revoked_and_query_task(operator, tasks, start_worker, broker):
    w = start_worker(concurrency=1)
    busy = tasks.sleep_then.delay(30)
    inspect = tasks.app.control.inspect(destination=[w.name], timeout=5)
    wait_for(lambda: inspect.active().get(w.name), 10, message="busy to start")
    queued = tasks.add.delay(1, 1)
    reserved = wait_for(lambda: inspect.reserved().get(w.name), 10,
                        message="the second task reserved")
    assert [(t["id"], t["state"]) for t in reserved] == [(queued.id, "pending")]

    out = itask(broker, "inspect", "query_task", busy.id, "no-such-id", "-d", w.name,
                "--json", "--timeout", "5")
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)[w.name]
    assert list(found) == [busy.id] and found[busy.id]["state"] == "running"

    tasks.app.revoke([queued.id])
    assert queued.wait(timeout=10) is TaskState.REVOKED
    out = itask(broker, "inspect", "revoked", "-d", w.name, "--json", "--timeout", "5")
    assert out.returncode == 0, out.stderr
    assert queued.id in json.loads(out.stdout)[w.name]
    out = itask(broker, "inspect", "reserved", "-d", w.name, "--timeout", "5")
    assert out.stdout.splitlines() == [f"-> {w.name}", "   (none)"]
    busy.cancel(grace=0)


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_bad_verbs_and_arguments_are_one_line(operator, broker):
    cases = [
        (("control", "frobnicate"), "unknown control command 'frobnicate'; use rate_limit"),
        (("control", "rate_limit", "tests.apps.tasks.noop"),
         "control rate_limit takes 2 argument(s), not 1: itask control rate_limit TASK RATE"),
        (("control", "rate_limit", "tests.apps.tasks.noop", "fast"),
         "control rate_limit: bad rate_limit 'fast'"),
        (("control", "time_limit", "tests.apps.tasks.noop", "-3"),
         "the soft limit must be a positive number"),
        (("inspect", "query_task"), "inspect query_task needs task ids"),
        (("inspect", "active", "some-id"), "inspect active takes no task ids"),
    ]
    for args, expected in cases:
        out = itask(broker, *args)
        assert out.returncode == 2, (args, out.stderr)
        assert expected in one_line(out), (args, out.stderr)
