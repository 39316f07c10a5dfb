"""The ``itask`` command: one readable line per error, exit codes, --json, --help."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

from .conftest import ROOT, BrokerEnv

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
                    "multi", "beat"):
        out = itask(broker, command, "--help", app=False)
        assert out.returncode == 0, (command, out.stderr)
        assert "example" in out.stdout.lower(), command
