"""The ``itask`` command: one readable line per error, exit codes, --json, --help."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import uuid
from typing import Any

import pytest

from interactive_tasks import TaskState

from .conftest import IN_CI, ROOT, BrokerEnv, wait_for
from .doc_blocks import documented

pytestmark = pytest.mark.parametrize("broker", ["redis"], indirect=True)


def itask(broker: BrokerEnv, *args: str, app: bool = True) -> subprocess.CompletedProcess[str]:
    extra = ["-A", "tests.apps.tasks"] if app else []
    return subprocess.run([sys.executable, "-m", "interactive_tasks.cli.main", *args, *extra],
                          env=broker.env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


def one_line(out: subprocess.CompletedProcess[str]) -> str:
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "Traceback" not in out.stderr
    return lines[0]


def test_errors_are_one_line_with_exit_codes(tasks, start_worker, broker):
    out = itask(broker, "ping", "-b", "redis://127.0.0.1:1/0")
    assert out.returncode == 3
    assert "redis://127.0.0.1:1/0" in one_line(out)

    out = itask(broker, "ping", "-A", "no_such_module_here", app=False)
    assert out.returncode == 2
    assert "cannot import app module 'no_such_module_here'" in one_line(out)

    start_worker()
    out = itask(broker, "attach", str(uuid.uuid4()))
    assert out.returncode == 2
    assert "is known" in one_line(out)

    handle = tasks.add.delay(1, 2)
    assert handle.result(timeout=20) == 3
    out = itask(broker, "pause", handle.id, "--token", handle.token)
    assert out.returncode == 1
    assert "already ended" in one_line(out)

    running = tasks.steerable.start(100000, 0.01)
    out = itask(broker, "pause", running.id)
    assert out.returncode == 1
    assert "no token" in one_line(out)
    out = itask(broker, "pause", running.id, "--token", running.token)
    assert out.returncode == 0, out.stderr
    assert "delivered" in out.stdout
    out = itask(broker, "cancel", running.id, "--token", running.token, "--grace", "0")
    assert out.returncode == 0, out.stderr


def test_send_resume_and_answer_reach_the_task(tasks, start_worker, broker):
    start_worker()
    running = tasks.steerable.start(100000, 0.01)
    token = ["--token", running.token]
    wait_for(lambda: running.state is TaskState.RUNNING, message="running")
    assert itask(broker, "pause", running.id, *token).returncode == 0
    wait_for(lambda: running.state is TaskState.PAUSED, message="paused")
    out = itask(broker, "resume", running.id, *token)
    assert out.returncode == 0, out.stderr
    assert "resume: delivered" in out.stdout
    wait_for(lambda: running.state is TaskState.RUNNING, message="resumed")
    for message in ('{"speed": 2}', "plain words"):  # JSON is parsed, anything else is text
        out = itask(broker, "send", running.id, message, *token)
        assert out.returncode == 0, out.stderr

    def messages() -> list[Any]:
        return [r["data"] for r in broker.records(running.id) if r["what"] == "message"]

    wait_for(lambda: len(messages()) >= 2, message="both messages")
    assert messages() == [{"speed": 2}, "plain words"]
    running.cancel(grace=0)

    asking = tasks.asker.start("Your name?")
    wait_for(lambda: asking.question is not None, message="the question")
    out = itask(broker, "answer", asking.id, "Ada Lovelace", "--token", asking.token)
    assert out.returncode == 0, out.stderr
    assert asking.result(timeout=20) == "hello Ada Lovelace"
    assert [r["data"] for r in broker.records(asking.id)] == ["Ada Lovelace"]


def test_json_outputs_and_revoke(tasks, start_worker, broker):
    w = start_worker()
    handle = tasks.add.delay(2, 3)
    assert handle.result(timeout=20) == 5
    out = itask(broker, "result", handle.id, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["result"] == 5
    out = itask(broker, "ping", "--json", "--timeout", "3")
    assert [r["worker"] for r in json.loads(out.stdout)] == [w.name]
    out = itask(broker, "inspect", "stats", "--json", "--timeout", "3")
    assert json.loads(out.stdout)[w.name]["pool"] == "prefork"
    out = itask(broker, "ls", "--json", "--timeout", "3")
    assert handle.id in [t["id"] for t in json.loads(out.stdout)]
    out = itask(broker, "ls", "--timeout", "3")
    assert "\x1b[" not in out.stdout  # no colours when not a terminal
    assert handle.id[:8] in out.stdout

    w.stop()
    later = tasks.add.delay(1, 1)
    out = itask(broker, "revoke", later.id, "--token", later.token)
    assert out.returncode == 0, out.stderr
    start_worker()
    with pytest.raises(Exception, match="revoked"):
        later.result(timeout=20)


def test_every_command_has_help_with_an_example(broker):
    for command in ("worker", "ping", "inspect", "ls", "attach", "top", "send", "pause",
                    "resume", "cancel", "answer", "result", "revoke", "events", "demo",
                    "multi", "beat", "control", "status", "call", "purge"):
        out = itask(broker, command, "--help", app=False)
        assert out.returncode == 0, (command, out.stderr)
        assert "example" in out.stdout.lower(), command


def test_every_typo_ends_in_one_line_that_says_what_to_do(broker, tmp_path):
    """A newcomer's typos: bad URL, wrong -A, a broken app module, bad numbers. One line on
    stderr, the exit code of the docstring, no traceback; ``--debug`` shows it."""
    import time

    started = time.monotonic()
    out = itask(broker, "ping", "-b", "foo://bar", app=False)
    assert out.returncode == 2
    line = one_line(out)
    assert "unknown broker URL scheme 'foo'" in line and "redis://" in line
    assert time.monotonic() - started < 10  # refused at once, not after a connect timeout

    out = itask(broker, "ping", "-b", "localhost:6379", app=False)
    assert out.returncode == 2
    assert "'localhost:6379' is not a URL" in one_line(out)

    env = broker.env()
    env["ITASK_BROKER_URL"] = "redis:/127.0.0.1"  # one slash short
    out = subprocess.run([sys.executable, "-m", "interactive_tasks.cli.main", "ping"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert one_line(out).startswith("itask: ITASK_BROKER_URL: broker URL 'redis:/127.0.0.1'")

    out = itask(broker, "ping", "-A", "tests/apps/tasks.py", app=False)
    assert out.returncode == 2
    assert "not a file path: try -A tests.apps.tasks" in one_line(out)

    out = itask(broker, "ping", "-A", "tests.apps.tasks:ap", app=False)
    assert out.returncode == 2
    assert "has no attribute 'ap'); its App is -A tests.apps.tasks:app" in one_line(out)

    (tmp_path / "proj.py").write_text("from interactive_tasks import App\n"
                                      "app = App('broken')\nundefined_name\n")
    out = subprocess.run([sys.executable, "-m", "interactive_tasks.cli.main", "worker",
                          "-A", "proj"], env=broker.env(), cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    line = one_line(out)
    assert f"app module 'proj' raised NameError while importing at {tmp_path}/proj.py:3" in line
    assert documented("itask: app module 'proj' raised NameError").match(line), line

    out = itask(broker, "worker", "-c", "0", app=False)
    assert out.returncode == 2 and "must be at least 1, not 0" in out.stderr

    out = itask(broker, "ping", "-b", "amqp://guest:wrong@127.0.0.1:5672//", app=False)
    assert out.returncode == 3
    assert "ACCESS_REFUSED" in one_line(out) and "guest:**@" in out.stderr

    for args in (["--debug", "ping", "-b", "foo://bar"], ["ping", "-b", "foo://bar", "--debug"]):
        out = itask(broker, *args, app=False)
        assert out.returncode == 2
        assert "Traceback" in out.stderr and "ConfigurationError" in out.stderr
        assert out.stderr.strip().splitlines()[-1].startswith("itask: unknown broker URL")


def test_steering_typos_and_cancel_of_an_ended_task(tasks, start_worker, broker):
    start_worker()
    running = tasks.steerable.start(100000, 0.01)
    wait_for(lambda: running.progress is not None, message="the task running")
    out = itask(broker, "pause", running.id, "--token", "not-the-token")
    assert out.returncode == 1
    line = one_line(out)
    assert "wrong or missing token" in line and "handle.token" in line
    assert documented("itask: not authorised to pause task").match(line), line

    out = itask(broker, "pause", running.id, "--token", running.token, "--wait")
    assert out.returncode == 0, out.stderr
    assert "it is paused now" in out.stdout
    assert running.state is TaskState.PAUSED
    out = itask(broker, "resume", running.id, "--token", running.token, "--wait")
    assert out.returncode == 0, out.stderr
    assert "it is running now" in out.stdout

    out = itask(broker, "cancel", running.id, "--token", running.token, "--grace", "0")
    assert out.returncode == 0, out.stderr
    assert running.wait(20) is TaskState.CANCELLED
    out = itask(broker, "cancel", running.id, "--token", running.token)
    assert out.returncode == 1
    line = one_line(out)
    assert "had already ended (cancelled); nothing to cancel" in line
    assert documented("itask: task 6f1c… had already ended").match(line), line


def test_ping_and_status_reach_only_the_destination(start_worker, broker):
    """``-d`` (Celery's ``inspect ping -d w1@host``): only the workers named reply."""
    first, second = start_worker(concurrency=1), start_worker(concurrency=1)
    out = itask(broker, "ping", "-d", first.name, "--timeout", "5")
    assert out.returncode == 0, out.stderr
    assert f"{first.name}: pong" in out.stdout and second.name not in out.stdout
    out = itask(broker, "status", "-d", second.name, "--json", "--timeout", "5")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"workers": [second.name], "online": 1}
    out = itask(broker, "ping", "-d", f"{first.name},nobody@nowhere", "--timeout", "1")
    assert out.returncode == 1
    assert f"{first.name}: pong" in out.stdout
    assert "nobody@nowhere did not reply within 1.0s" in one_line(out)
    out = itask(broker, "status", "-d", f"{second.name},nobody@nowhere", "--timeout", "1")
    assert out.returncode == 1
    assert f"-> {second.name}: OK" in out.stdout
    assert "nobody@nowhere did not reply within 1.0s" in out.stderr, out.stderr


def test_unknown_arguments_show_the_command_usage(broker):
    out = itask(broker, "ping", "--no-such-option", app=False)
    assert out.returncode == 2
    assert out.stderr.startswith("usage: itask ping "), out.stderr
    assert "itask ping: error: unrecognized arguments: --no-such-option" in out.stderr
    out = itask(broker, "answer", "ID", "yes", "extra", app=False)
    assert out.returncode == 2
    assert "itask answer: error: unrecognized arguments: extra" in out.stderr


def test_call_refuses_a_priority_outside_0_to_9(broker):
    out = itask(broker, "call", "tasks.add", "--priority", "42", app=False)
    assert out.returncode == 2
    assert "itask call: error: argument --priority: invalid choice: 42" in out.stderr


def test_worker_log_level_is_checked(broker):
    from interactive_tasks.cli.main import build_parser

    out = itask(broker, "worker", "-l", "verbose", app=False)
    assert out.returncode == 2
    assert "itask worker: error: argument -l/--loglevel: unknown log level 'verbose'" \
        in out.stderr
    for given, level in (("debug", "DEBUG"), ("Warning", "WARNING"), ("warn", "WARNING"),
                          ("FATAL", "FATAL")):
        args = build_parser("worker").parse_args(["worker", "-l", given])
        assert args.loglevel == level
    assert build_parser("worker").parse_args(["worker"]).loglevel == "INFO"
    out = itask(broker, "beat", "-l", "loud", app=False)
    assert out.returncode == 2 and "unknown log level 'loud'" in out.stderr


def test_prefork_only_options_warn_on_other_pools(start_worker, broker):
    w = start_worker(pool="threads", concurrency=1,
                     extra_args=["--max-tasks-per-child", "5", "--max-memory-per-child", "9"])
    log = w.log()
    assert ("--max-tasks-per-child applies to the prefork pool only (the threads pool's "
            "tasks share the worker's process); ignored") in log
    assert "--max-memory-per-child applies to the prefork pool only" in log
    w = start_worker(pool="prefork", concurrency=1, extra_args=["--max-tasks-per-child", "5"])
    assert "applies to the prefork pool only" not in w.log()


def test_eventlet_deprecation_is_one_log_line(start_worker, broker):
    # find_spec, not import: importing eventlet warns that it is deprecated (an error here)
    if importlib.util.find_spec("eventlet") is None:
        if IN_CI:
            pytest.fail("eventlet is missing (it is in the dev extra)")
        pytest.skip("eventlet is not installed")
    w = start_worker(pool="eventlet", concurrency=2)
    log = w.log()
    assert "Eventlet is deprecated" not in log  # eventlet's own warning, many lines
    lines = [line for line in log.splitlines() if "deprecated" in line.lower()]
    assert len(lines) == 1, lines
    assert "eventlet is deprecated upstream (bug fixes only); the gevent pool (-P gevent) " \
           "is recommended" in lines[0]


def test_a_secret_on_the_client_only_says_what_it_means(start_worker, broker):
    w = start_worker(concurrency=1)  # no secret
    env = broker.env()
    env["ITASK_SECRET"] = "only-the-client-has-it"
    out = subprocess.run([sys.executable, "-m", "interactive_tasks.cli.main", "ping", "-d",
                          w.name, "--timeout", "2", "-A", "tests.apps.tasks"], env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert ("dropped a reply that was unsigned: the workers have no secret or a different "
            "one (ITASK_SECRET)") in out.stderr.splitlines()[0], out.stderr
    assert "malformed" not in out.stderr
