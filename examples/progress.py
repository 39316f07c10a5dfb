"""Stream a task's progress, logs and messages as they happen.

    itask worker -A examples.tasks -c 2      # terminal 1
    python -m examples.progress              # terminal 2
"""

from examples.tasks import crunch

if __name__ == "__main__":
    handle = crunch.start(100, 0.02)
    print("task", handle.id)
    for event in handle.events(timeout=60):
        if event.kind == "progress":
            print(f"\r{event.current}/{event.total} {event.message}", end="", flush=True)
        else:
            print(f"\n{event.kind} {dict(event.fields)}")
    print("result:", handle.result())
