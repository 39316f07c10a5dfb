"""A Celery project using the bridge, for tests/test_celery_bridge.py.

Configured from the environment so each test has its own queue and namespace:
``CELERY_BRIDGE_BROKER``, ``CELERY_BRIDGE_BACKEND``, ``CELERY_BRIDGE_QUEUE`` and
``ITASK_TEST_NS``.
"""

from __future__ import annotations

import logging
import os
import time

from celery import Celery

from interactive_tasks.celery import InteractiveTask, enable

app = Celery("celery_proj", broker=os.environ.get("CELERY_BRIDGE_BROKER",
                                                  "redis://127.0.0.1:6379/0"),
             backend=os.environ.get("CELERY_BRIDGE_BACKEND", "redis://127.0.0.1:6379/0"))
app.conf.task_default_queue = os.environ.get("CELERY_BRIDGE_QUEUE", "celery")
app.conf.result_expires = 600
app.conf.broker_connection_retry_on_startup = True
enable(app, namespace=os.environ.get("ITASK_TEST_NS", "it"))

logger = logging.getLogger("celery_proj")


@app.task(base=InteractiveTask, bind=True)
def train(self, epochs, expect=0):
    """Progress per epoch, ``expect`` messages in (each echoed back as a message event),
    a print and a log record."""
    got = []
    for e in range(epochs):
        self.progress(e + 1, epochs, f"epoch {e}")
        while (msg := self.receive(timeout=0)) is not None:
            got.append(msg)
            self.send({"echo": msg})
    while len(got) < expect:
        msg = self.receive(timeout=30)
        if msg is None:
            break
        got.append(msg)
        self.send({"echo": msg})
    print("trained", epochs)
    logger.warning("a log record from the task")
    return {"epochs": epochs, "got": got}


@app.task(base=InteractiveTask, bind=True)
def sink(self, count, delay=0.0):
    """Takes ``count`` messages ``{"i": i}``, ``delay`` seconds apart at least; returns
    how many came and the first out of order (None: none)."""
    got, disorder = 0, None
    while got < count:
        msg = self.receive(timeout=30)
        if msg is None:
            break
        if disorder is None and msg.get("i") != got:
            disorder = msg
        got += 1
        time.sleep(delay)
    return {"got": got, "disorder": disorder}


@app.task(base=InteractiveTask, bind=True)
def looper(self, steps, delay=0.05):
    """A loop with a checkpoint (progress) per step: pause and cancel act here."""
    for i in range(steps):
        self.progress(i + 1, steps)
        time.sleep(delay)
    return steps


@app.task(base=InteractiveTask, bind=True)
def holds_progress(self, path):
    """Progress 1, then 2 held back in the pool process as if the relay were behind
    (``BlockingChannel.send_progress``) and kept there (no ``HOLD_S`` flush); writes
    ``path`` and waits for a message, then sends one, which lets the held progress out."""
    from interactive_tasks.celery.process import process_channel
    from interactive_tasks.worker import ipc

    self.progress(1, 2)
    channel = process_channel().channel
    ipc.HOLD_S = 3600.0
    channel._behind = lambda: True
    self.progress(2, 2)
    del channel._behind
    assert channel.holding == 1
    with open(path, "w") as fh:
        fh.write("held")
    while self.receive(timeout=0.05) is None:
        pass
    self.send("bye")
    return "done"


@app.task(base=InteractiveTask, bind=True)
def spin(self, seconds):
    """CPU-bound without checkpoints after the first: only a forced cancel ends it."""
    self.progress(0, None, "spinning")
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return n


@app.task(base=InteractiveTask, bind=True)
def asker(self, prompt="learning rate?"):
    return {"lr": self.ask(prompt, timeout=60)}


@app.task(base=InteractiveTask, bind=True)
def double(self, x):
    self.progress(1, 1, "doubling")
    return x * 2


@app.task
def add(a, b):
    return a + b


@app.task(base=InteractiveTask, bind=True, max_retries=1, default_retry_delay=0.1)
def flaky(self):
    """Retries once through Celery's ``self.retry()``, then returns the retry count."""
    self.progress(1, 1, f"attempt {self.request.retries}")
    if self.request.retries == 0:
        raise self.retry()
    return self.request.retries


@app.task(base=InteractiveTask, bind=True, acks_late=True)
def late_looper(self, steps, delay=0.05):
    """``looper`` acknowledged after it ran: a lost worker's run is delivered again."""
    for i in range(steps):
        self.progress(i + 1, steps)
        time.sleep(delay)
    return steps


@app.task(base=InteractiveTask, bind=True)
def chatty(self, n):
    """Progress as fast as it can, then a message: watchers get the last progress and
    every other event (earlier progress may be coalesced)."""
    for i in range(n):
        self.progress(i + 1, n)
    self.send("done")
    return n
