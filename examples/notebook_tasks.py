"""Tasks for the notebook example (``examples/notebook.ipynb``).

The notebook starts its own worker for them::

    itask worker -A notebook_tasks -c 2        # from examples/, as the notebook does

They use their own namespace so this worker never takes other apps' tasks from the shared
embedded broker.
"""

from __future__ import annotations

import time
from typing import Any

from interactive_tasks import App, InteractiveTask

app = App("notebook", namespace="notebook-demo")


@app.task(base=InteractiveTask)
def train(self: Any, epochs: int = 5, steps: int = 40, delay: float = 0.05) -> dict[str, Any]:
    """A pretend training loop: progress per step, a log line per epoch, takes messages.

    Send ``{"lr": 0.01}`` to change the learning rate while it runs.
    """
    lr = 0.1
    loss = 1.0
    total = epochs * steps
    for epoch in range(epochs):
        for step in range(steps):
            done = epoch * steps + step + 1
            self.progress(done, total, f"epoch {epoch + 1}/{epochs}")  # a checkpoint
            while (msg := self.receive(timeout=0)) is not None:
                if isinstance(msg, dict) and "lr" in msg:
                    lr = float(msg["lr"])
                self.send({"ack": msg, "lr": lr})
            loss *= 1 - lr / 20
            time.sleep(delay)
        print(f"epoch {epoch + 1}: loss {loss:.4f} (lr {lr})")  # reaches watchers as a log line
    return {"loss": round(loss, 4), "lr": lr}


@app.task(base=InteractiveTask)
def greet(self: Any) -> str:
    """Asks a question; any watcher (the widget's answer box, ``handle.answer()``) answers."""
    name = self.ask("Your name?", timeout=300)
    print("hello", name)
    return f"hello {name}"
