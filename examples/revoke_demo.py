"""Revoke a task before it starts; terminate one that runs (docs/revoke.md).

    itask worker -A examples.doc_tasks -c 2 -Q default,images,io -E     # terminal 1
    python -m examples.revoke_demo                                      # terminal 2
"""

import time

from examples.doc_tasks import add, app, sleep_then
from interactive_tasks import TaskCancelled, TaskRevoked

if __name__ == "__main__":
    # not started yet (it waits for its countdown): revoked, it never runs
    later = add.apply_async((1, 2), countdown=30)
    later.revoke()
    try:
        later.result(timeout=30)
    except TaskRevoked as exc:
        print("revoked before start:", later.state, "-", exc)

    # app.revoke() takes ids (and their tokens), e.g. ids read from a log
    queued = add.apply_async((3, 4), countdown=30)
    replies = app.revoke([queued.id], tokens={queued.id: queued.token})
    # every worker replies; "revoked" lists the ids it held and stopped (an id that has
    # not reached it yet is refused when it arrives, or by a worker started later)
    print("workers told:", [r["worker"] for r in replies])
    try:
        queued.result(timeout=30)
    except TaskRevoked:
        print("app.revoke:", queued.state)

    # running: revoke alone does not stop it, terminate=True does (the task ends cancelled)
    running = sleep_then.start(60, "never")
    deadline = time.monotonic() + 30
    while running.state.value == "pending" and time.monotonic() < deadline:
        time.sleep(0.05)
    running.revoke(terminate=True)
    try:
        running.result(timeout=30)
    except TaskCancelled:
        print("terminated while running:", running.state)
