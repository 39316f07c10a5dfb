"""Retries: self.retry() and autoretry_for, with the retry events a watcher sees
(docs/retries.md).

    itask worker -A examples.doc_tasks -c 2 -Q default,images,io -E     # terminal 1
    python -m examples.retries_demo                                     # terminal 2
"""

from examples.doc_tasks import always_down, flaky
from interactive_tasks import TaskFailed

if __name__ == "__main__":
    # watch="all": this handle streams every event, retries included (delay() would
    # only deliver the final one)
    handle = flaky.apply_async((2,), watch="all")
    for event in handle.events(timeout=30):
        if event.kind == "retry":
            print(f"retry: attempt {event.fields['attempt']} in {event.fields['countdown']}s "
                  f"after {event.fields['error']['message']!r}")
        elif event.is_final:
            print(event.kind, "->", event.result)

    # autoretry_for: no code in the task; gives up after max_retries
    handle = always_down.apply_async(watch="all")
    attempts = [e.fields["attempt"] for e in handle.events(timeout=30) if e.kind == "retry"]
    try:
        handle.result(timeout=30)
    except TaskFailed as exc:
        print(f"autoretry: retried as attempts {attempts}, then failed with "
              f"{exc.remote_type}: {exc.remote_message}")
