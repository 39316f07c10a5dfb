"""Tasks for the examples of the user guide (docs/*.md).

Start one worker for every ``*_demo`` script::

    itask worker -A examples.doc_tasks -c 2 -Q default,images,io -E

The app has its own namespace (``docs``), so its queues never mix with those of
``examples.tasks`` on the same broker. ``-Q`` lists the queues of the routing demo and
``-E`` turns on the task events of the monitoring demo.
"""

from __future__ import annotations

import time
from typing import Any

from interactive_tasks import App, InteractiveTask

app = App(
    "docs",
    namespace="docs",
    # docs/routing.md: a task name (exact) or a glob -> a queue
    task_routes={"examples.doc_tasks.image_*": "images"},
)


# -- docs/options.md ---------------------------------------------------------------------------
@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task(bind=True)
def whoami(self: Any) -> dict[str, Any]:
    """``bind=True``: the first parameter is the task, ``self.request`` the invocation."""
    r = self.request
    return {"id": r.id, "hostname": r.hostname, "retries": r.retries,
            "headers": r.headers, "eta": r.eta, "expires": r.expires}


# -- docs/routing.md ---------------------------------------------------------------------------
@app.task
def image_resize(name: str, size: int) -> str:
    """Routed to the ``images`` queue by ``task_routes``."""
    return f"{name} resized to {size}px"


@app.task(queue="io")
def fetch(url: str) -> str:
    """Always sent to the ``io`` queue (the decorator's ``queue=``)."""
    return f"fetched {url}"


# -- docs/retries.md ---------------------------------------------------------------------------
@app.task(bind=True, max_retries=3)
def flaky(self: Any, fail_times: int) -> str:
    """Fails ``fail_times`` times, retrying after 0.2 s each time, then succeeds."""
    attempt = self.request.retries + 1
    if self.request.retries < fail_times:
        raise self.retry(exc=ConnectionError(f"attempt {attempt} failed"), countdown=0.2)
    return f"succeeded on attempt {attempt}"


@app.task(bind=True, autoretry_for=(ConnectionError,), max_retries=2,
          retry_backoff=0.1, retry_jitter=False)
def always_down(self: Any) -> None:
    """Every run raises ConnectionError: retried 2 times (0.1 s, 0.2 s), then it fails."""
    raise ConnectionError(f"service down (attempt {self.request.retries + 1})")


# -- docs/rate-limits.md -----------------------------------------------------------------------
@app.task(rate_limit="5/s")
def limited() -> float:
    """At most 5 starts per second on each worker."""
    return time.time()


# -- docs/revoke.md ----------------------------------------------------------------------------
@app.task
def sleep_then(seconds: float, value: Any = None) -> Any:
    time.sleep(seconds)
    return value


# -- docs/workflows.md -------------------------------------------------------------------------
@app.task
def double(x: int) -> int:
    return 2 * x


@app.task
def total(values: list[int]) -> int:
    return sum(values)


@app.task
def fail(message: str) -> None:
    raise ValueError(message)


@app.task(base=InteractiveTask)
def count_up(self: Any, x: int, steps: int = 5) -> int:
    """An interactive step: streams progress (and could be paused or cancelled)."""
    for i in range(steps):
        self.progress(i + 1, steps, f"step {i + 1} of {steps}")
        time.sleep(0.05)
    return x + steps


# -- docs/interactive.md -----------------------------------------------------------------------
@app.task(base=InteractiveTask)
async def async_echo(self: Any, n: int) -> dict[str, Any]:
    """An ``async def`` task: awaits messages and an answer without blocking its loop."""
    import asyncio

    echoed = []
    for i in range(n):
        await self.progress(i + 1, n)
        msg = await self.receive(timeout=0)  # the next message, or None at once
        if msg is not None:
            echoed.append(msg)
            await self.send({"echo": msg})
        await asyncio.sleep(0.02)
    name = await self.ask("Your name?", timeout=60)
    return {"echoed": echoed, "name": name}
