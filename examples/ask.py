"""A task that asks for input; this script answers it (any client could).

    itask worker -A examples.tasks -c 2      # terminal 1
    python -m examples.ask                   # terminal 2
"""

from examples.tasks import greet

if __name__ == "__main__":
    handle = greet.start()
    for event in handle.events(timeout=60):
        if event.kind == "question":
            print("task asks:", event.prompt)
            handle.answer(input("> ") or "Ada")
        elif event.kind == "log":
            print("task says:", event.text)
    print("result:", handle.result())
