# examples/celery_bridge/proj.py
import os

from celery import Celery

from interactive_tasks.celery import InteractiveTask, enable

broker = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
app = Celery("proj", broker=broker, backend=os.environ.get("CELERY_RESULT_BACKEND", broker))
enable(app)  # adds the relay to `celery -A examples.celery_bridge.proj worker`


@app.task(base=InteractiveTask, bind=True)
def train(self, epochs):
    lr = 0.01
    for epoch in range(epochs):
        self.progress(epoch + 1, epochs, f"epoch {epoch}")  # a checkpoint
        message = self.receive(timeout=0.2)
        if message is not None:
            lr = message["lr"]
            print(f"learning rate now {lr}")
    keep = self.ask("keep the model?", choices=["yes", "no"], timeout=300)
    return {"epochs": epochs, "lr": lr, "kept": keep == "yes"}


@app.task
def add(a, b):  # a plain Celery task: untouched
    return a + b
