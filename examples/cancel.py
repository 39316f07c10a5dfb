"""Cancel a CPU-bound task that never checks: cooperative first, then forced.

    itask worker -A examples.tasks -c 2      # terminal 1 (prefork: SIGTERM then SIGKILL)
    python -m examples.cancel                # terminal 2
"""

import time

from examples.tasks import burn
from interactive_tasks import TaskCancelled

if __name__ == "__main__":
    handle = burn.start(600)
    while handle.state.value == "pending":
        time.sleep(0.05)
    print("running in pid", handle.pid, "- cancelling with a 1 s grace period")
    started = time.monotonic()
    handle.cancel(grace=1.0)
    try:
        handle.result(timeout=30)
    except TaskCancelled:
        print(f"cancelled after {time.monotonic() - started:.2f}s; state {handle.state}")
