"""Periodic tasks for tests/test_beat.py: a ``beat_schedule`` entry and ``@app.periodic`` ones.

Configured from the environment, so one module serves every beat the tests start:
ITASK_BROKER_URL, ITASK_TEST_NS (queue namespace), BEAT_TEST_EVERY (seconds between runs of
the ``tick`` entry), BEAT_TEST_LABEL (the argument each run gets) and ITASK_TEST_RECORD (a
directory where every run appends its time and slot to ``runs-<label>.txt``, in the worker).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from interactive_tasks import App

app = App("beat-tests", namespace=os.environ.get("ITASK_TEST_NS", "it-test"))


@app.task(bind=True)
def record_run(self: Any, label: str) -> float:
    """Appends "<run time> <slot>" to ``runs-<label>.txt``: the tests count runs with it.

    The slot is the time the beat sent this run for (its ``itask-beat-due`` header).
    """
    now = time.time()
    due = float(self.request.headers.get("itask-beat-due", 0.0))
    directory = os.environ.get("ITASK_TEST_RECORD")
    if directory:
        with open(Path(directory) / f"runs-{label}.txt", "a") as fh:
            fh.write(f"{now!r} {due!r}\n")
    return now


app.beat_schedule = {
    "tick": {
        "task": record_run.name,
        "schedule": float(os.environ.get("BEAT_TEST_EVERY", "1")),
        "args": [os.environ.get("BEAT_TEST_LABEL", "tick")],
    },
}


@app.periodic(crontab="0 3 * * mon-fri")  # never due during a test; listed by --list
@app.task
def nightly_report() -> str:
    return "report"


@app.periodic(every=3600, name="hourly-cleanup", kwargs={"older_than": 7})
def cleanup(older_than: int = 1) -> int:  # a plain function: registered as a task too
    return older_than
