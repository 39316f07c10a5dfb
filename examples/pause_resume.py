"""Pause a running task, watch it hold still, resume it.

    itask worker -A examples.tasks -c 2      # terminal 1
    python -m examples.pause_resume          # terminal 2
"""

import time

from examples.tasks import crunch

if __name__ == "__main__":
    handle = crunch.start(200, 0.02)
    while handle.progress is None or handle.progress.current < 20:
        time.sleep(0.05)
    handle.pause(wait=True, timeout=10)  # returns once the task stopped at a checkpoint
    print("paused at", handle.progress.current, "state", handle.state)
    time.sleep(1)
    print("still at", handle.progress.current)
    handle.resume(wait=True, timeout=10)
    handle.send("keep going")
    for event in handle.events(timeout=60):
        if event.kind in ("resumed", "message", "succeeded"):
            print(event.kind, dict(event.fields))
