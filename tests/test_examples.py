"""The README's examples run exactly as shown, on the embedded broker with no server."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, wait_for


@pytest.fixture
def example_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ITASK_")}
    env["ITASK_HOME"] = str(tmp_path / "home")
    env["PYTHONPATH"] = str(ROOT)
    return env


def worker(module: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "interactive_tasks.cli.main", "worker", "-A", module,
             "--pool", "prefork", "--concurrency", "2"],
            env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(lambda: "ready" in log.read_text() or proc.poll() is not None, 20,
             message="example worker")
    assert proc.poll() is None, log.read_text()
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def run(args: list[str], env: dict[str, str], stdin: str = "") -> str:
    out = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, input=stdin,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_hello_as_in_the_readme(example_env, tmp_path):
    proc = worker("examples.hello", example_env, tmp_path / "w.log")
    try:
        assert run(["examples/hello.py"], example_env).strip() == "5"
        assert "embedded broker files:" in (tmp_path / "w.log").read_text()
    finally:
        stop(proc)


def test_interactive_examples(example_env, tmp_path):
    proc = worker("examples.tasks", example_env, tmp_path / "w.log")
    try:
        assert "result: 4950" in run(["-m", "examples.progress"], example_env)
        out = run(["-m", "examples.pause_resume"], example_env)
        assert re.search(r"^paused at \d+ state paused$", out, re.M), out
        assert "resumed" in out and "'echo': 'keep going'" in out
        assert "result: hello Ada" in run(["-m", "examples.ask"], example_env, "Ada\n")
        assert "state cancelled" in run(["-m", "examples.cancel"], example_env)
    finally:
        stop(proc)


def test_itask_demo_without_a_terminal(example_env):
    out = subprocess.run([sys.executable, "-m", "interactive_tasks.cli.main", "demo"],
                         env=example_env, cwd=ROOT, capture_output=True, text=True,
                         timeout=120, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "succeeded -> {'steps': 10, 'shipped': True}" in out.stdout
    assert "message {'echo': 'hello from the demo'}" in out.stdout
    assert "itask attach" in out.stdout
    assert "itask worker -A examples.tasks -c 2" in out.stdout  # where the examples' tasks are
    assert "Traceback" not in out.stdout + out.stderr


def test_attach_example(example_env, tmp_path):
    out = subprocess.run([sys.executable, "-m", "examples.attach"], env=example_env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1  # sys.exit(message)
    assert out.stderr.strip() == ("usage: python -m examples.attach TASK_ID [TOKEN]  "
                                  "(examples.progress prints an id)")
    proc = worker("examples.tasks", example_env, tmp_path / "w.log")
    try:
        out = subprocess.run([sys.executable, "-m", "examples.attach", "no-such-id"],
                             env=example_env, cwd=ROOT, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 1 and "Traceback" not in out.stderr
        assert out.stderr.startswith("examples.attach: no task no-such-id is known")
        # a running task, attached from this second process: snapshot, then the live tail
        code = ("from examples.tasks import crunch; h = crunch.start(100, 0.02); "
                "print(h.id, h.token, flush=True); h.result(timeout=60)")
        starter = subprocess.Popen([sys.executable, "-c", code], env=example_env, cwd=ROOT,
                                   stdout=subprocess.PIPE, text=True)
        with starter:
            task_id, token = starter.stdout.readline().split()
            out_text = run(["-m", "examples.attach", task_id, token], example_env)
            assert out_text.startswith("snapshot: ")
            assert "succeeded" in out_text.splitlines()[-1]
            assert starter.wait(60) == 0
    finally:
        stop(proc)
