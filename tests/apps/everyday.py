"""An app written the way a Celery project is: signal receivers, a database connection
opened per pool process, class-based tasks with hooks, callbacks.

Every receiver and hook appends one line to ``$ITASK_TEST_RECORD/signals.jsonl`` (what
fired, in which process, with which arguments), so a test reads what happened in the
worker's processes. Configured from the environment like ``tests.apps.tasks``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from interactive_tasks import App, InteractiveTask, Task, signals

app = App("everyday", namespace=os.environ.get("ITASK_TEST_NS", "it-test"))


def note(what: str, **data: Any) -> None:
    directory = os.environ.get("ITASK_TEST_RECORD")
    if not directory:
        return
    line = json.dumps({"what": what, "pid": os.getpid(), "t": time.time(), **data},
                      default=repr)
    with open(Path(directory) / "signals.jsonl", "a") as fh:
        fh.write(line + "\n")


def notes(directory: Path) -> list[dict[str, Any]]:
    path = directory / "signals.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


# -- a database connection per pool process ---------------------------------------------------
#: opened by worker_process_init in each prefork process; sqlite refuses a connection
#: used from another thread, and a forked copy of the parent's would be shared
db: sqlite3.Connection | None = None
db_pid: int | None = None


@signals.worker_process_init.connect
def open_db(**kwargs: Any) -> None:
    global db, db_pid
    db = sqlite3.connect(":memory:")
    db.execute("create table t (pid integer)")
    db.execute("insert into t values (?)", (os.getpid(),))
    db_pid = os.getpid()
    note("worker_process_init", sender=kwargs.get("sender"))


@signals.worker_process_shutdown.connect
def close_db(pid: int, exitcode: int, **kwargs: Any) -> None:
    if db is not None:
        db.close()
    note("worker_process_shutdown", pid_arg=pid, exitcode=exitcode)


# -- the worker process -----------------------------------------------------------------------
@signals.worker_init.connect
def on_worker_init(sender: Any, **kwargs: Any) -> None:
    note("worker_init", hostname=sender.hostname)


@signals.worker_ready.connect
def on_worker_ready(sender: Any, **kwargs: Any) -> None:
    note("worker_ready", hostname=sender.hostname)


@signals.worker_shutdown.connect
def on_worker_shutdown(sender: Any, **kwargs: Any) -> None:
    note("worker_shutdown", hostname=sender.hostname)


@signals.task_revoked.connect
def on_revoked(sender: Any, request: Any, terminated: bool, signum: Any, expired: bool,
               **kwargs: Any) -> None:
    note("task_revoked", task_id=request.id, sender=getattr(sender, "name", None),
         terminated=terminated, signum=signum, expired=expired)


# -- around each run --------------------------------------------------------------------------
@signals.task_prerun.connect
def on_prerun(sender: Any, task_id: str, task: Any, args: Any, kwargs: Any,
              **rest: Any) -> None:
    note("task_prerun", task_id=task_id, sender=sender.name, same=sender is task,
         args=list(args), kwargs=kwargs, request_id=task.request.id)
    if kwargs.get("prerun_raises"):
        raise RuntimeError("a receiver that fails")
    if task.interactive:
        task.send("hello from task_prerun")  # the runtime of the task is in place


@signals.task_postrun.connect
def on_postrun(sender: Any, task_id: str, task: Any, args: Any, kwargs: Any, retval: Any,
               state: Any, **rest: Any) -> None:
    note("task_postrun", task_id=task_id, sender=sender.name, retval=repr(retval),
         state=str(state.value), args=list(args), kwargs=kwargs)


@signals.task_success.connect
def on_success(sender: Any, result: Any, **kwargs: Any) -> None:
    note("task_success", task_id=sender.request.id, sender=sender.name, result=result)


@signals.task_failure.connect
def on_failure(sender: Any, task_id: str, exception: BaseException, args: Any, kwargs: Any,
               traceback: Any, einfo: Any, **rest: Any) -> None:
    note("task_failure", task_id=task_id, sender=sender.name,
         exception=f"{type(exception).__name__}: {exception}",
         has_traceback=traceback is not None, einfo_ok="ValueError" in str(einfo))


@signals.task_retry.connect
def on_retry(sender: Any, request: Any, reason: Any, einfo: Any, **kwargs: Any) -> None:
    note("task_retry", task_id=request.id, sender=sender.name, reason=repr(reason),
         retries=request.retries)


# -- publishing (the client process) ----------------------------------------------------------
@signals.before_task_publish.connect
def before_publish(sender: str, body: Any, exchange: str, routing_key: str,
                   headers: dict[str, Any], **kwargs: Any) -> None:
    headers["trace-id"] = f"trace-{headers['id']}"  # the tracing pattern
    note("before_task_publish", task_id=headers["id"], sender=sender,
         routing_key=routing_key, body_id=body["id"])


@signals.after_task_publish.connect
def after_publish(sender: str, body: Any, exchange: str, routing_key: str,
                  **kwargs: Any) -> None:
    note("after_task_publish", task_id=body["id"], sender=sender, routing_key=routing_key)


# -- tasks ------------------------------------------------------------------------------------
@app.task(bind=True)
def double(self: Any, x: int, **options: Any) -> dict[str, Any]:
    return {"value": x * 2, "pid": os.getpid(),
            "trace": self.request.headers.get("trace-id")}


@app.task
def boom(message: str) -> None:
    raise ValueError(message)


@app.task(bind=True, max_retries=3)
def flaky(self: Any) -> int:
    if self.request.retries == 0:
        raise self.retry(exc=KeyError("first try"), countdown=0.1)
    return self.request.retries


@app.task(base=InteractiveTask)
def waits(self: Any, seconds: float = 30) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        self.checkpoint()
        time.sleep(0.02)
    return "done"


@app.task
def query_db() -> dict[str, Any]:
    """Use this process's connection (sqlite refuses one from another thread)."""
    assert db is not None, "worker_process_init did not run in this process"
    (pid,) = db.execute("select pid from t").fetchone()
    return {"pid": os.getpid(), "db_pid": db_pid, "row": pid}


# -- task class hooks -------------------------------------------------------------------------
class Hooks(Task):  # type: ignore[type-arg]
    """Celery's hooks, each noting its arguments."""

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        note("on_success", task_id=task_id, retval=retval, args=list(args), kwargs=kwargs,
             request_id=self.request.id)

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any,
                   einfo: Any) -> None:
        note("on_failure", task_id=task_id, exc=f"{type(exc).__name__}: {exc}",
             args=list(args), einfo_ok=type(exc).__name__ in str(einfo))

    def on_retry(self, exc: BaseException, task_id: str, args: Any, kwargs: Any,
                 einfo: Any) -> None:
        note("on_retry", task_id=task_id, exc=repr(exc))

    def after_return(self, status: Any, retval: Any, task_id: str, args: Any, kwargs: Any,
                     einfo: Any) -> None:
        note("after_return", task_id=task_id, status=str(status.value), retval=repr(retval),
             einfo=einfo is not None)
        if kwargs.get("hook_raises"):
            raise RuntimeError("a hook that fails")


class Hooked(Hooks):
    """A class-based task: ``run`` with the hooks of its base."""

    name = "everyday.hooked"
    app = app
    max_retries = 2

    def run(self, x: int, fail: bool = False, retry: bool = False,
            hook_raises: bool = False) -> int:
        if fail:
            raise ValueError(f"failing on {x}")
        if retry and self.request.retries == 0:
            raise self.retry(exc=KeyError("again"), countdown=0.1)
        return x + 1


hooked = app.register(Hooked)


@app.task(base=Hooks, bind=True)
def hooked_fn(self: Any, x: int) -> int:
    """A decorated function whose base class has the hooks (Celery's ``base=``)."""
    return x * 10


# -- callbacks --------------------------------------------------------------------------------
@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def tag(value: Any, label: str) -> str:
    return f"{label}:{value}"


@app.task
def constant() -> str:
    return "immutable"


# -- canvas -----------------------------------------------------------------------------------
@app.task
def mul(x: int, y: int) -> int:
    return x * y


@app.task
def tsum(values: list[int]) -> int:
    return sum(values)


@app.task
def square(x: int) -> int:
    return x * x
