"""Found by ``app.autodiscover_tasks()`` because ``progressapp`` is in INSTALLED_APPS."""

import time

from interactive_tasks import InteractiveTask, shared_task


@shared_task(base=InteractiveTask)
def crunch(self, steps: int, delay: float = 0.05) -> int:
    """Count to ``steps``, reporting progress at each step."""
    for step in range(1, steps + 1):
        time.sleep(delay)
        self.progress(step, steps, f"step {step} of {steps}")
    return steps
