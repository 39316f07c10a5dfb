"""Attach to a running task from a second process, given its id (and token to steer it).

    itask worker -A examples.tasks -c 2                 # terminal 1
    python -m examples.progress                         # terminal 2 (prints the task id)
    python -m examples.attach TASK_ID [TOKEN]           # terminal 3

Or from a shell: ``itask attach TASK_ID -A examples.tasks``.
"""

import sys

from examples.tasks import app
from interactive_tasks import UnknownTask

USAGE = "usage: python -m examples.attach TASK_ID [TOKEN]  (examples.progress prints an id)"

if __name__ == "__main__":
    if not 2 <= len(sys.argv) <= 3:
        sys.exit(USAGE)
    task_id = sys.argv[1]
    token = sys.argv[2] if len(sys.argv) > 2 else None
    try:
        handle = app.find(task_id, token=token)  # app.attach() would wait for a queued one
    except UnknownTask as exc:
        sys.exit(f"examples.attach: {exc}")
    snap = handle.snapshot()
    print("snapshot:", snap.state, "progress", snap.progress and snap.progress.current)
    for event in handle.events(timeout=120):  # the live tail, no gap, no duplicate
        print(event)
