"""An ``async def`` interactive task: await receive() and ask() (docs/interactive.md).

    itask worker -A examples.doc_tasks -c 2 -Q default,images,io -E     # terminal 1
    python -m examples.async_demo                                       # terminal 2
"""

from examples.doc_tasks import async_echo

if __name__ == "__main__":
    handle = async_echo.start(50)
    sent = False
    for event in handle.events(timeout=60):
        if event.kind == "progress" and not sent:
            handle.send("ping")
            sent = True
        elif event.kind == "message":
            print("task sent:", event.data)
        elif event.kind == "question":
            print("task asks:", event.prompt)
            handle.answer("Ada")
    print("result:", handle.result())
