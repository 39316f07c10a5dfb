"""Interactive tasks used by the other examples.

Start a worker for them with::

    itask worker -A examples.tasks -c 2
"""

from __future__ import annotations

import time
from typing import Any

from interactive_tasks import App, Cancelled, InteractiveTask

app = App("examples")


@app.task(base=InteractiveTask)
def crunch(self: Any, n: int = 200, delay: float = 0.02) -> int:
    """Steps through ``n`` items; every progress() is a checkpoint for pause and cancel."""
    total = 0
    for i in range(n):
        self.progress(i + 1, n, f"item {i + 1}")
        msg = self.receive(timeout=0)
        if msg is not None:
            self.send({"echo": msg})
        total += i
        time.sleep(delay)
    return total


@app.task(base=InteractiveTask)
def greet(self: Any) -> str:
    """Asks a question and waits for any client to answer it."""
    name = self.ask("Your name?", timeout=300)
    print("hello", name)  # prints reach watchers as log events
    return f"hello {name}"


@app.task(base=InteractiveTask)
def burn(self: Any, seconds: float = 600) -> str:
    """CPU-bound and never checks: only a forced cancel (or hard pause) stops it."""
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pass
    except Cancelled:  # raised asynchronously in the threads pool
        raise
    return "done"
