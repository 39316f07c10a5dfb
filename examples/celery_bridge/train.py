# examples/celery_bridge/train.py
from .proj import add, train

handle = train.start(5)  # an interactive_tasks TaskHandle
sent = False
for event in handle.events():
    if event.kind == "progress":
        print("progress:", event.current, "/", event.total)
        if not sent:
            handle.send({"lr": 0.1})  # arrives at the task's self.receive()
            sent = True
    elif event.kind == "log":
        print("log:", event.text)
    elif event.kind == "question":
        print("asked:", event.prompt)
        handle.answer("yes")
print("result:", handle.result())
print("celery says:", handle.async_result.get(timeout=10))  # Celery's own AsyncResult
print("plain task:", add.delay(2, 3).get(timeout=10))
