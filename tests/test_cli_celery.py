"""``itask status``, ``itask call`` and ``itask purge``, as ``celery status / call / purge``,
against real workers and brokers."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys

import pytest

from interactive_tasks.errors import TaskTimeout

from .conftest import ROOT, BrokerEnv


def itask(broker: BrokerEnv, *args: str,
          stdin: int | None = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "interactive_tasks.cli.main", *args,
                           "-A", "tests.apps.tasks"],
                          env=broker.env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=60, stdin=stdin)


def one_line(out: subprocess.CompletedProcess[str]) -> str:
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    return lines[0]


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_status_lists_the_workers_online(tasks, start_worker, broker):
    out = itask(broker, "status", "--timeout", "0.5")
    assert out.returncode == 1 and "no worker replied within 0.5s" in one_line(out)
    first, second = start_worker(concurrency=1), start_worker(concurrency=1)
    names = sorted([first.name, second.name])
    out = itask(broker, "status", "--timeout", "2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"-> {names[0]}: OK", f"-> {names[1]}: OK", "",
                                       "2 nodes online."]
    out = itask(broker, "status", "--json", "--timeout", "2")
    assert json.loads(out.stdout) == {"workers": names, "online": 2}


@pytest.mark.parametrize("broker", ["redis", "amqp"], indirect=True)
def test_call_prints_the_id_of_a_task_a_worker_runs(tasks, start_worker, broker):
    start_worker(concurrency=1)
    out = itask(broker, "call", tasks.add.name, "--args", "[2, 3]")
    assert out.returncode == 0, out.stderr
    task_id = out.stdout.strip()
    assert tasks.app.attach(task_id).result(timeout=10) == 5
    token = out.stderr.split("token: ")[1].split()[0]

    out = itask(broker, "call", tasks.sleep_then.name, "--kwargs",
                '{"seconds": 0, "value": "late"}', "--countdown", "1", "--json")
    assert out.returncode == 0, out.stderr
    sent = json.loads(out.stdout)
    assert set(sent) == {"id", "token"} and sent["token"] != token
    handle = tasks.app.attach(sent["id"])
    assert handle.result(timeout=15) == "late"

    out = itask(broker, "call", tasks.add.name, "--args", "[1, 1]", "--queue", "elsewhere")
    waiting = tasks.app.attach(out.stdout.strip())
    with pytest.raises(TaskTimeout):  # nobody consumes 'elsewhere'
        waiting.wait(timeout=1.0)


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_call_errors_are_one_line(broker):
    cases = [
        (("call", "tests.apps.tasks.add", "--args", "[2,"), "call: --args is not JSON"),
        (("call", "tests.apps.tasks.add", "--args", '{"x": 1}'),
         "call: --args must be a JSON list"),
        (("call", "tests.apps.tasks.add", "--kwargs", "[1]"),
         "call: --kwargs must be a JSON object"),
        (("call", "tests.apps.tasks.ad"), "did you mean 'tests.apps.tasks.add'?"),
        (("call", "tests.apps.tasks.add", "--eta", "2030-01-01T00:00"),
         "call: --eta needs a time zone"),
    ]
    for args, expected in cases:
        out = itask(broker, *args)
        assert out.returncode == 2, (args, out.stderr)
        assert expected in one_line(out), (args, out.stderr)


@pytest.mark.parametrize("broker", ["redis", "amqp", "embedded"], indirect=True)
def test_purge_refuses_without_a_terminal_and_empties_with_force(tasks, broker):
    for n in range(3):
        tasks.add.delay(n, n)
    tasks.add.apply_async((9, 9), queue="io")
    out = itask(broker, "purge")  # stdin is not a terminal: refuse, never hang
    assert out.returncode == 2
    assert "stdin is not a terminal to ask: pass -f" in one_line(out)

    out = itask(broker, "purge", "-Q", "default,io", "-f", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"purged": 4, "queues": {"default": 3, "io": 1}}
    out = itask(broker, "purge", "-Q", "default,io", "-f")
    assert out.stdout.strip() == "purged 0 messages from 2 queues (default: 0, io: 0)"


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_purge_asks_on_a_terminal(tasks, broker):
    tasks.add.delay(1, 1)
    for answer, code, purged in ((b"n\n", 1, "nothing purged"),
                                 (b"y\n", 0, "purged 1 message from 1 queue")):
        leader, follower = pty.openpty()
        try:
            os.write(leader, answer)
            out = itask(broker, "purge", "-Q", "default", stdin=follower)
        finally:
            os.close(leader)
            os.close(follower)
        assert out.returncode == code, out.stderr
        assert "Delete every task waiting in default" in out.stdout
        assert purged in out.stdout


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_default_purge_covers_routed_queues(tasks, broker):
    from interactive_tasks.cli.control_cmd import purge_queues

    assert "numbers" not in purge_queues(tasks.app, None)
    tasks.app.configure(task_routes={"tests.apps.tasks.double": "numbers"})
    assert {"default", "numbers"} <= set(purge_queues(tasks.app, None))
