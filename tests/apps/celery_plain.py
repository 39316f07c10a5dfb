"""A Celery project that does not call ``enable()``, for tests/test_celery_bridge.py:
importing the bridge must change nothing for it."""

from __future__ import annotations

import os

from celery import Celery

import interactive_tasks.celery  # noqa: F401 - imported, never enabled

app = Celery("celery_plain", broker=os.environ.get("CELERY_BRIDGE_BROKER",
                                                   "redis://127.0.0.1:6379/0"),
             backend=os.environ.get("CELERY_BRIDGE_BACKEND", "redis://127.0.0.1:6379/0"))
app.conf.task_default_queue = os.environ.get("CELERY_BRIDGE_QUEUE", "celery")
app.conf.broker_connection_retry_on_startup = True


@app.task
def add(a, b):
    return a + b


@app.task(bind=True, max_retries=2, default_retry_delay=0.1)
def flaky(self):
    if self.request.retries < 2:
        raise self.retry()
    return self.request.retries


@app.task
def environment():
    return os.environ.get("ITASK_CELERY_RELAY")
