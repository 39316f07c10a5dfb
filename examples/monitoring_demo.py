"""The monitoring stream: worker heartbeats and (with -E) task events (docs/monitoring.md).

    itask worker -A examples.doc_tasks -c 2 -Q default,images,io -E     # terminal 1
    python -m examples.monitoring_demo                                  # terminal 2

The same stream from a shell: ``itask events -A examples.doc_tasks``.
"""

import time

from examples.doc_tasks import add, app, fail
from interactive_tasks.monitor import EventReceiver

if __name__ == "__main__":
    seen_heartbeat = False
    with EventReceiver(app) as receiver:  # returns once it listens: no event missed
        ok = add.delay(2, 2)
        bad = fail.delay("boom")
        names = {ok.id: "add", bad.id: "fail"}
        pending = {(ok.id, "task-succeeded"), (bad.id, "task-failed")}
        deadline = time.monotonic() + 15  # a heartbeat comes every 2 s
        while (pending or not seen_heartbeat) and time.monotonic() < deadline:
            for event in receiver.events(timeout=0.5):
                kind = event["type"]
                if kind.startswith("task-") and event["id"] in names:
                    print(f"{names[event['id']]:4} {kind:14} on {event['worker']} "
                          f"state={event['state']}")
                    pending.discard((event["id"], kind))
                elif kind == "worker-heartbeat" and not seen_heartbeat:
                    stats = event["stats"]
                    print(f"heartbeat from {event['worker']}: pool={stats['pool']} "
                          f"processed={stats['processed']}")
                    seen_heartbeat = True
                if not pending and seen_heartbeat:
                    break
    if pending:
        print("no task events: start the worker with -E")
