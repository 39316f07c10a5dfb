"""Interactive tasks inside an existing Celery deployment (docs/celery-bridge.md).

::

    from celery import Celery
    from interactive_tasks.celery import InteractiveTask, enable

    app = Celery("proj", broker="redis://127.0.0.1:6379/0", backend="redis://127.0.0.1:6379/0")
    enable(app)

    @app.task(base=InteractiveTask, bind=True)
    def train(self, epochs):
        for e in range(epochs):
            self.progress(e + 1, epochs)
        return epochs

    handle = train.start(10)   # an interactive_tasks TaskHandle

The bridge is its own layer: it uses the library (handles, the wire protocol, the
transport) and, inside a Celery worker only, the worker's slot runtime and channel
framing. The library and the itask worker never import it.
"""

from __future__ import annotations

from .enabling import bridge_app, enable
from .task import InteractiveTask

__all__ = ["InteractiveTask", "bridge_app", "enable"]
