"""Celery-style configuration: a Celery project's ``celeryconfig.py`` loads unchanged
through ``app.config_from_object``, Django settings through ``namespace="CELERY"``, and
``app.autodiscover_tasks`` finds the tasks a real worker then runs."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from interactive_tasks import App, ConfigurationError
from interactive_tasks.schedules import crontab
from tests.conftest import REDIS_URL, ROOT, BrokerEnv, WorkerProcess

#: a celeryconfig.py as Celery's "First steps" and "Configuration" pages write one
CELERYCONFIG = '''\
from datetime import timedelta
from os import environ

default_queue_name = environ.get("PROJ_QUEUE", "celery")  # the file's own variable

broker_url = "{broker_url}"
result_backend = "rpc://"

task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
timezone = "Europe/Oslo"
enable_utc = True

task_default_queue = default_queue_name
task_routes = {{
    "proj.orders.tasks.ship": "low-priority",
    "proj.billing.*": {{"queue": "billing"}},
}}
task_annotations = {{"proj.orders.tasks.ship": {{"rate_limit": "10/m"}}}}
task_default_rate_limit = "100/s"
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
broker_transport_options = {{"visibility_timeout": 3600}}
result_expires = timedelta(hours=6)
task_track_started = True
imports = ("proj.extra",)
beat_schedule = {{
    "every-five-minutes": {{
        "task": "proj.orders.tasks.ship",
        "schedule": timedelta(minutes=5),
        "args": (1,),
    }},
}}
'''

FILES = {
    "proj/__init__.py": "",
    "proj/celery.py": '''\
        import os

        from interactive_tasks import App

        app = App("proj", namespace=os.environ.get("ITASK_TEST_NS", "proj"))
        app.config_from_object("proj.celeryconfig")
        app.autodiscover_tasks(["proj.orders", "proj.billing", "proj.notasks"])
        ''',
    "proj/orders/__init__.py": "",
    "proj/orders/tasks.py": '''\
        from proj.celery import app

        @app.task
        def ship(order):
            return f"shipped {order}"
        ''',
    "proj/billing/__init__.py": "",
    "proj/billing/tasks.py": '''\
        from proj.celery import app

        @app.task
        def charge(amount):
            return amount * 100
        ''',
    "proj/notasks/__init__.py": "",
    "proj/extra.py": '''\
        from proj.celery import app

        @app.task
        def ping():
            return "pong"
        ''',
}


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A Celery-shaped project on sys.path; its modules forgotten afterwards."""
    root = tmp_path / "project"
    for name, text in FILES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    (root / "proj" / "celeryconfig.py").write_text(CELERYCONFIG.format(broker_url=REDIS_URL))
    monkeypatch.syspath_prepend(str(root))
    yield root
    for name in [m for m in sys.modules if m == "proj" or m.startswith("proj.")]:
        app = getattr(sys.modules[name], "app", None)
        if isinstance(app, App):
            app.close()
        del sys.modules[name]


def test_a_celeryconfig_loads_unchanged(project: Path) -> None:
    from proj.celery import app

    conf = app.conf
    assert app.broker_url == REDIS_URL
    assert app.result_backend is None  # rpc://: results come back to the caller
    assert conf.task_default_queue == "celery"
    assert conf.acks_late is True and conf.reject_on_worker_lost is True
    assert conf.prefetch_multiplier == 1
    assert conf.broker_transport_options == {"visibility_timeout": 3600}
    assert conf.result_expires == 6 * 3600
    assert conf.allow_pickle is False
    assert app.route("proj.orders.tasks.ship") == "low-priority"
    assert app.route("proj.billing.tasks.charge") == "billing"
    assert app.route("proj.other") == "celery"
    assert app.beat_schedule["every-five-minutes"]["schedule"] == 300.0
    # autodiscover_tasks and imports: deferred until the tasks are needed
    assert "proj.orders.tasks" not in sys.modules
    app.finalize()
    assert {"proj.orders.tasks.ship", "proj.billing.tasks.charge", "proj.extra.ping"} <= \
        set(app.tasks)
    assert "proj.notasks.tasks" not in sys.modules  # a package without tasks: skipped
    # task_annotations reach the tasks
    assert app.tasks["proj.orders.tasks.ship"].rate_limit == "10/m"
    assert app.tasks["proj.billing.tasks.charge"].rate_limit == "100/s"  # the default


def test_django_settings_with_a_namespace() -> None:
    settings = SimpleNamespace(
        DEBUG=True, INSTALLED_APPS=["django.contrib.admin"], SECRET_KEY="x",
        CELERY_BROKER_URL=REDIS_URL, CELERY_RESULT_BACKEND="redis://127.0.0.1:6379/1",
        CELERY_TASK_ACKS_LATE=False, CELERY_WORKER_PREFETCH_MULTIPLIER=2,
        CELERY_TASK_ROUTES={"shop.*": {"queue": "shop"}},
        CELERY_TIMEZONE="UTC",
        CELERY_BEAT_SCHEDULE={"nightly": {"task": "shop.tasks.report",
                                          "schedule": crontab(hour=3, minute=0)}},
    )
    app = App("django-proj")
    app.config_from_object(settings, namespace="CELERY")
    assert app.broker_url == REDIS_URL
    assert app.result_backend == "redis://127.0.0.1:6379/1"
    assert app.conf.acks_late is False and app.conf.prefetch_multiplier == 2
    assert app.route("shop.tasks.report") == "shop"
    schedule = app.beat_schedule["nightly"]["schedule"]
    assert isinstance(schedule, crontab) and schedule.tz is not None  # Celery's timezone
    # the same from a mapping, and from "module:attribute"
    other = App("mapping")
    other.config_from_object({"task_default_queue": "q1", "task_acks_late": False})
    assert other.conf.task_default_queue == "q1" and other.conf.acks_late is False


def test_pickle_is_refused_unless_allowed() -> None:
    with pytest.raises(ConfigurationError, match="task_serializer='pickle'"):
        App("p").config_from_object({"task_serializer": "pickle"})
    app = App("p")
    app.config_from_object({"task_serializer": "pickle",
                            "accept_content": ["pickle", "json"]})
    assert app.conf.allow_pickle is True


def test_settings_that_cannot_apply_are_named_with_what_to_do() -> None:
    with pytest.raises(ConfigurationError) as info:
        App("x").config_from_object({
            "task_compression": "gzip", "worker_concurrency": 8, "no_such_setting": 1,
            "result_backend": "db+sqlite:///results.db"})
    message = str(info.value)
    assert "unsupported result_backend" in message
    with pytest.raises(ConfigurationError) as info:
        App("x").config_from_object({"task_compression": "gzip", "worker_concurrency": 8,
                                     "no_such_setting": 1})
    message = str(info.value)
    assert "task_compression: messages are not compressed" in message
    assert "worker_concurrency: pass -c" in message
    assert "no_such_setting" not in message  # not shaped like a setting: a variable
    with pytest.raises(ConfigurationError, match="task_no_such_thing: unknown setting"):
        App("x").config_from_object({"task_no_such_thing": 1})
    with pytest.raises(ConfigurationError, match="no_such_setting: unknown setting"):
        App("x").config_from_object({"CELERY_NO_SUCH_SETTING": 1}, namespace="CELERY")
    with pytest.raises(ConfigurationError, match="router functions"):
        App("x").config_from_object({"task_routes": [lambda *a: None]})
    with pytest.raises(ConfigurationError, match="names no queue"):
        App("x").config_from_object({"task_routes": {"a": {"exchange": "x"}}})
    with pytest.raises(ConfigurationError, match="cannot import"):
        App("x").config_from_object("no_such_module_here.celeryconfig")


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_a_worker_runs_the_discovered_and_routed_tasks(
        project: Path, broker: BrokerEnv, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ITASK_BROKER_URL")  # the config names the broker
    worker = WorkerProcess(broker, tmp_path, extra_args=[
        "-A", "proj", "-Q", "celery,low-priority,billing"],
        extra_env={"PYTHONPATH": f"{project}:{ROOT}"})
    try:
        worker.wait_ready()
        from proj.billing.tasks import charge
        from proj.celery import app
        from proj.orders.tasks import ship

        assert ship.delay(7).result(timeout=20) == "shipped 7"  # on low-priority
        assert charge.delay(3).result(timeout=20) == 300  # on billing
        assert app.send_task("proj.extra.ping").result(timeout=20) == "pong"  # imports
    finally:
        worker.stop()
