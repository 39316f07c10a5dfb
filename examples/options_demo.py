"""apply_async options and self.request (docs/options.md).

    itask worker -A examples.doc_tasks -c 2 -Q default,images,io -E     # terminal 1
    python -m examples.options_demo                                     # terminal 2
"""

import time
from datetime import datetime, timedelta, timezone

from examples.doc_tasks import add, whoami
from interactive_tasks import TaskRevoked

if __name__ == "__main__":
    # countdown: start no sooner than 1 s from now
    sent = time.time()
    handle = add.apply_async((2, 3), countdown=1)
    print(f"countdown: {handle.result(timeout=30)} after {time.time() - sent:.1f}s")

    # eta: a datetime (or epoch seconds)
    at = datetime.now(timezone.utc) + timedelta(seconds=0.5)
    print("eta:", add.apply_async((4, 5), eta=at).result(timeout=30))

    # expires: a task that has not started by then ends revoked
    expired = add.apply_async((1, 1), expires=datetime.now(timezone.utc) - timedelta(seconds=1))
    try:
        expired.result(timeout=30)
    except TaskRevoked as exc:
        print("expires:", expired.state, "-", exc)

    # task_id and headers, seen by a bound task in self.request
    handle = whoami.apply_async(task_id="order-42", headers={"tenant": "acme"})
    request = handle.result(timeout=30)
    print("task_id:", request["id"], "headers:", request["headers"],
          "ran on:", request["hostname"])
