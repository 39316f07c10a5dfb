"""examples/django_project: a Django project whose tasks ``app.autodiscover_tasks()`` finds
in INSTALLED_APPS, with its settings under ``CELERY_`` read by
``config_from_object("django.conf:settings", namespace="CELERY")``. A real worker started
the Celery way (``itask worker -A proj`` in the project's directory) runs the task that a
view starts, and the project's own Django tests (``manage.py test``) read its progress
through the view with Django's test client."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import REDIS_URL, ROOT, require_broker, wait_for
from .doc_blocks import doc_block

pytest.importorskip("django")

PROJECT = ROOT / "examples" / "django_project"


@pytest.fixture
def project_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    require_broker("redis")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ITASK_", "DJANGO_"))}
    env.update({"ITASK_HOME": str(tmp_path), "CELERY_BROKER_URL": REDIS_URL,
                "CELERY_NAMESPACE": f"dj{uuid.uuid4().hex[:8]}",
                "PYTHONPATH": os.pathsep.join([str(ROOT), str(PROJECT)]),
                "PYTHONUNBUFFERED": "1"})
    yield env


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=PROJECT, env=env, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


@contextlib.contextmanager
def worker(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "interactive_tasks.cli.main", "worker", "-A", "proj",
             "-c", "2", "-n", "django@test", "-l", "info"],
            cwd=PROJECT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: "ready" in log.read_text() or proc.poll() is not None, 30,
                 message="the worker to start")
        assert proc.poll() is None, log.read_text()
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def test_a_worker_runs_the_discovered_task_and_the_view_shows_its_progress(project_env,
                                                                             tmp_path):
    block = doc_block("docs/celery.md", "itask worker -A proj -c 2                      # "
                                        "terminal 1")
    assert block.commands() == [["itask", "worker", "-A", "proj", "-c", "2"],
                                ["python", "manage.py", "test", "progressapp"]]
    log = tmp_path / "worker.log"
    with worker(project_env, log):
        out = run(project_env, "-m", "interactive_tasks.cli.main", "inspect", "registered",
                  "-A", "proj", "--json", "--timeout", "3")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"django@test": ["progressapp.tasks.crunch"]}

        out = run(project_env, "manage.py", "test", "progressapp", "-v", "2")
        assert out.returncode == 0, out.stdout + out.stderr + log.read_text()[-3000:]
        assert "Ran 2 tests" in out.stderr and "\nOK" in out.stderr
        for name in ("test_the_task_is_discovered_from_installed_apps",
                     "test_the_view_starts_the_task_and_shows_its_progress"):
            assert f"{name} " in out.stderr and "... ok" in out.stderr


def test_settings_come_from_the_celery_namespace(project_env):
    code = ("from proj.celery import app; "
            "print(app.broker_url, app.conf.namespace, app.route('progressapp.tasks.x'))")
    out = run(project_env, "-c", code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [REDIS_URL, project_env["CELERY_NAMESPACE"], "default"]
