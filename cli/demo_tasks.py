"""The task ``itask demo`` runs: a short interactive job on the embedded broker."""

from __future__ import annotations

import time
from typing import Any

from interactive_tasks import App, InteractiveTask

app = App("demo")


@app.task(base=InteractiveTask, name="demo.build")
def build(self: Any, steps: int = 40, delay: float = 0.15) -> dict[str, Any]:
    """Counts through ``steps``, echoing messages; asks a question at the end."""
    print(f"building {steps} steps")
    for i in range(steps):
        self.progress(i + 1, steps, f"step {i + 1} of {steps}")
        message = self.receive(timeout=0)
        if message is not None:
            print(f"got message: {message!r}")
            self.send({"echo": message})
        time.sleep(delay)
    name = self.ask("Ship it? (type: answer yes)", timeout=600)
    print(f"answer was {name!r}")
    return {"steps": steps, "shipped": str(name).lower() in ("y", "yes")}
