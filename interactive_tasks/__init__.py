"""interactive_tasks: a distributed task queue whose tasks you can talk to while they run.

::

    from interactive_tasks import App, InteractiveTask

    app = App("demo")                      # embedded broker: no server needed

    @app.task(base=InteractiveTask)
    def count(self, n):
        for i in range(n):
            self.progress(i + 1, n)        # a checkpoint: pause and cancel take effect here
        return n

    handle = count.start(100)              # returns at once
    for event in handle.events():          # ordered, lossless stream
        print(event)
"""

from ._eventlet import maybe_patch as _maybe_patch_eventlet
from ._gevent import maybe_patch as _maybe_patch_gevent

_maybe_patch_gevent()  # must run before kombu and redis import socket/select
_maybe_patch_eventlet()  # the same for --pool eventlet

from . import signals  # noqa: E402
from .app import App, Settings, load_app  # noqa: E402
from .canvas import ChainHandle, GroupHandle, chain, chord, group  # noqa: E402
from .errors import (  # noqa: E402
    Cancelled,
    ConfigurationError,
    ControlError,
    HardPauseUnsupported,
    InteractiveTasksError,
    MaxRetriesExceeded,
    NotAuthorized,
    PayloadTooLarge,
    ProtocolError,
    QuestionTimeout,
    Retry,
    SendTimeout,
    SoftTimeLimitExceeded,
    TaskCancelled,
    TaskError,
    TaskFailed,
    TaskFinished,
    TaskRevoked,
    TaskTimeout,
    TransportError,
    UnknownTask,
    WorkerLost,
)
from .handle import TaskHandle  # noqa: E402
from .protocol import Event, EventKind, TaskSnapshot, TaskState  # noqa: E402
from .shared import shared_task  # noqa: E402
from .task import InteractiveTask, Signature, Task  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "App",
    "Cancelled",
    "ChainHandle",
    "ConfigurationError",
    "ControlError",
    "Event",
    "EventKind",
    "GroupHandle",
    "HardPauseUnsupported",
    "InteractiveTask",
    "InteractiveTasksError",
    "MaxRetriesExceeded",
    "NotAuthorized",
    "PayloadTooLarge",
    "ProtocolError",
    "QuestionTimeout",
    "Retry",
    "SendTimeout",
    "Settings",
    "Signature",
    "SoftTimeLimitExceeded",
    "Task",
    "TaskCancelled",
    "TaskError",
    "TaskFailed",
    "TaskFinished",
    "TaskHandle",
    "TaskRevoked",
    "TaskSnapshot",
    "TaskState",
    "TaskTimeout",
    "TransportError",
    "UnknownTask",
    "WorkerLost",
    "__version__",
    "chain",
    "chord",
    "group",
    "load_app",
    "shared_task",
    "signals",
]
