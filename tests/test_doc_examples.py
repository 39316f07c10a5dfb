"""The user guide's example scripts (docs/*.md) run as documented, against a real worker.

One ``itask worker -A examples.doc_tasks -c 2 -Q default,images,io -E`` on the embedded
broker (ITASK_HOME in a temporary directory) serves every script, as in the docs.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import ROOT, wait_for

WORKER_ARGS = ["-A", "examples.doc_tasks", "-c", "2", "-Q", "default,images,io", "-E"]


@pytest.fixture(scope="module")
def doc_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("doc-examples")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ITASK_")}
    env["ITASK_HOME"] = str(home / "home")
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@pytest.fixture(scope="module")
def doc_worker(doc_env: dict[str, str],
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    log = tmp_path_factory.mktemp("doc-worker") / "worker.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "interactive_tasks.cli.main", "worker", *WORKER_ARGS],
            env=doc_env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        wait_for(lambda: "ready" in log.read_text() or proc.poll() is not None, 20,
                 message="the docs' example worker")
        assert proc.poll() is None, log.read_text()
        yield log
    finally:
        _stop(proc)


def run_demo(name: str, env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-m", f"examples.{name}"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_options_demo(doc_worker, doc_env):
    out = run_demo("options_demo", doc_env)
    took = float(re.search(r"countdown: 5 after ([\d.]+)s", out).group(1))
    assert took >= 1.0
    assert "eta: 9" in out
    assert "expires: revoked - " in out and "expired before it started" in out
    assert "task_id: order-42 headers: {'tenant': 'acme'}" in out


def test_routing_demo(doc_worker, doc_env):
    out = run_demo("routing_demo", doc_env)
    assert "image_resize -> images : cat.png resized to 128px" in out
    assert "fetch -> io : fetched https://example.org" in out
    assert "add -> io : 4" in out
    assert "add -> default : 6" in out


def test_retries_demo(doc_worker, doc_env):
    out = run_demo("retries_demo", doc_env)
    assert "retry: attempt 2 in 0.2s after 'attempt 1 failed'" in out
    assert "retry: attempt 3 in 0.2s after 'attempt 2 failed'" in out
    assert "succeeded -> succeeded on attempt 3" in out
    assert ("autoretry: retried as attempts [2, 3], then failed with ConnectionError: "
            "service down (attempt 3)") in out


def test_rate_limit_demo(doc_worker, doc_env):
    out = run_demo("rate_limit_demo", doc_env)
    smallest = float(re.search(r"smallest gap: ([\d.]+)", out).group(1))
    assert smallest >= 0.18, out  # 5/s: one start every 0.2 s, even with 2 free slots


def test_revoke_demo(doc_worker, doc_env):
    out = run_demo("revoke_demo", doc_env)
    assert "revoked before start: revoked - " in out
    assert "workers told: ['" in out
    assert "app.revoke: revoked" in out
    assert "terminated while running: cancelled" in out


def test_workflows_demo(doc_worker, doc_env):
    out = run_demo("workflows_demo", doc_env)
    assert "  progress: step 4 of 4" in out
    assert "chain: 14" in out
    assert "group: [0, 2, 4, 6, 8]" in out
    assert "chord: 12" in out
    assert "chain failed: ValueError bad input" in out
    assert "next step: revoked - " in out and "chain stopped" in out


def test_monitoring_demo(doc_worker, doc_env):
    out = run_demo("monitoring_demo", doc_env)
    for line in ("add  task-received ", "add  task-started ", "add  task-succeeded ",
                 "fail task-failed "):
        assert line in out, out
    assert "heartbeat from " in out and "pool=prefork" in out
    assert "no task events" not in out


def test_async_demo(doc_worker, doc_env):
    out = run_demo("async_demo", doc_env)
    assert "task sent: {'echo': 'ping'}" in out
    assert "task asks: Your name?" in out
    assert "result: {'echoed': ['ping'], 'name': 'Ada'}" in out


def test_itask_events_prints_json_lines(doc_worker, doc_env, tmp_path):
    """``itask events -A examples.doc_tasks`` as in docs/monitoring.md."""
    import json

    out_path = tmp_path / "events.jsonl"
    with open(out_path, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "interactive_tasks.cli.main", "events",
             "-A", "examples.doc_tasks"],
            env=doc_env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        def events() -> list[dict]:
            return [json.loads(line) for line in out_path.read_text().splitlines()
                    if line.startswith("{")]

        # a heartbeat (every 2 s) proves it listens before the task is sent
        wait_for(lambda: any(e["type"] == "worker-heartbeat" for e in events()), 15,
                 message="a heartbeat on itask events")
        code = "from examples.doc_tasks import add; print(add.delay(20, 22).id)"
        task_id = subprocess.run([sys.executable, "-c", code], env=doc_env, cwd=ROOT,
                                 capture_output=True, text=True, timeout=60,
                                 check=True).stdout.strip()
        wait_for(lambda: any(e.get("id") == task_id and e["type"] == "task-succeeded"
                             for e in events()), 15, message="task-succeeded")
        mine = [e["type"] for e in events() if e.get("id") == task_id]
        assert mine == ["task-received", "task-started", "task-succeeded"]
    finally:
        _stop(proc)
