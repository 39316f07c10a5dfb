"""Tasks the integration tests run on real workers.

The app is configured from the environment so one module serves every broker:
ITASK_BROKER_URL, ITASK_RESULT_BACKEND, ITASK_TEST_NS (queue namespace, one per test
worker) and ITASK_TEST_RECORD (a directory where tasks write what they saw, so a test can
check the task's own view of the control it received).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from interactive_tasks import App, Cancelled, InteractiveTask

app = App(
    "tests",
    namespace=os.environ.get("ITASK_TEST_NS", "it-test"),
    broker_transport_options={"visibility_timeout": float(
        os.environ.get("ITASK_TEST_VISIBILITY", "3600"))},
    max_message_size=int(os.environ.get("ITASK_TEST_MAX_SIZE", str(1024 * 1024))),
)


def record(task_id: str, what: str, data: Any = None) -> None:
    """Append one line to this task's record file (the task's own view)."""
    directory = os.environ.get("ITASK_TEST_RECORD")
    if not directory:
        return
    with open(Path(directory) / f"{task_id}.jsonl", "a") as fh:
        fh.write(json.dumps({"what": what, "data": data, "pid": os.getpid(),
                             "t": time.time()}) + "\n")


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task(bind=True)
def add_recorded(self: Any, x: int, y: int) -> int:
    """``add`` that records each start (its time and delivery) in the task's record file."""
    record(self.request.id, "start", self.request.delivery)
    return x + y


@app.task
def noop() -> None:
    return None


@app.task
def switch_interval() -> float:
    """Python's thread switch interval in the process that runs tasks."""
    import sys

    return sys.getswitchinterval()


@app.task
def fail(message: str) -> None:
    raise ValueError(message)


@app.task
def sleep_then(seconds: float, value: Any = None) -> Any:
    time.sleep(seconds)
    return value


@app.task
def crash_hard() -> None:
    os._exit(9)


@app.task(bind=True)
def whoami(self: Any) -> dict[str, Any]:
    return {"id": self.request.id, "hostname": self.request.hostname,
            "delivery": self.request.delivery, "pid": os.getpid()}


@app.task
def slow_marked(path: str, seconds: float, key: str) -> str:
    """Sleeps, then appends ``key`` to ``path``: counts how many times a task ran to the end."""
    Path(path + ".started").open("a").write(f"{key} {os.getpid()}\n")
    time.sleep(seconds)
    with open(path, "a") as fh:
        fh.write(key + "\n")
    return key


@app.task(base=InteractiveTask)
def count(self: Any, n: int, delay: float = 0.0) -> int:
    for i in range(n):
        self.progress(i + 1, n, f"step {i + 1}")
        if delay:
            time.sleep(delay)
    return n


@app.task(base=InteractiveTask)
def steerable(self: Any, n: int, delay: float = 0.02) -> dict[str, Any]:
    """Counts to n, echoing every message and recording what it saw at each step."""
    tid = self.request.id
    record(tid, "start")
    received = []
    try:
        for i in range(n):
            self.progress(i + 1, n)
            while (msg := self.receive(timeout=0)) is not None:
                record(tid, "message", msg)
                received.append(msg)
                self.send({"echo": msg})
            time.sleep(delay)
    except Cancelled:
        record(tid, "cancelled", i)
        raise
    record(tid, "done", n)
    return {"n": n, "received": received}


@app.task(base=InteractiveTask)
def asker(self: Any, prompt: str = "Your name?", timeout: float = 60) -> str:
    answer = self.ask(prompt, timeout=timeout)
    record(self.request.id, "answer", answer)
    print("hello", answer)
    return f"hello {answer}"


@app.task(base=InteractiveTask)
def echo_server(self: Any, count: int) -> list[Any]:
    """Echoes ``count`` messages back as they arrive (control round trip)."""
    got = []
    while len(got) < count:
        msg = self.receive(timeout=30)
        if msg is None:
            break
        got.append(msg)
        self.send(msg)
    return got


@app.task(base=InteractiveTask)
def sink(self: Any, count: int, delay: float = 0.0) -> dict[str, Any]:
    """Takes ``count`` messages ``{"i": i}``, ``delay`` seconds apart at least; reports how
    many came, the first out of order (None: none), and how long the reading took."""
    got = 0
    disorder = None
    started = None
    while got < count:
        msg = self.receive(timeout=30)
        if msg is None:
            break
        if started is None:
            started = time.monotonic()
        if disorder is None and msg.get("i") != got:
            disorder = msg
        got += 1
        if delay:
            time.sleep(delay)
    return {"got": got, "disorder": disorder,
            "took": time.monotonic() - started if started is not None else 0.0}


@app.task(base=InteractiveTask)
def spin(self: Any, seconds: float = 60) -> str:
    """CPU-bound and never checks: only forced cancel or hard pause can stop it."""
    record(self.request.id, "start")
    end = time.monotonic() + seconds
    x = 0
    while time.monotonic() < end:
        x += 1
    return "spun"


@app.task(base=InteractiveTask)
def spin_reporting(self: Any, path: str, seconds: float = 60) -> str:
    """CPU-bound; writes a heartbeat counter to ``path`` without checkpoints."""
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        i += 1
        if i % 20000 == 0:
            with open(path, "w") as fh:
                fh.write(str(i))
    return "done"


@app.task(base=InteractiveTask)
def chatty(self: Any, n: int) -> int:
    """Emits n progress events as fast as it can, then a message."""
    for i in range(n):
        self.progress(i + 1, n)
    self.send("end")
    return n


@app.task(base=InteractiveTask)
def narrate(self: Any, n: int, delay: float = 0.05) -> int:
    """Logs a line and reports progress n times, ``delay`` apart: a stream to follow."""
    for i in range(n):
        self.log(f"step {i + 1}")
        self.progress(i + 1, n)
        time.sleep(delay)
    return n


@app.task(base=InteractiveTask)
def logs(self: Any) -> str:
    import logging

    print("printed line")
    logging.getLogger("user.code").warning("logged warning")
    return "ok"


@app.task(base=InteractiveTask, time_limit=1.0)
def limited(self: Any, seconds: float) -> str:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        self.checkpoint()
        time.sleep(0.01)  # the task's work: a checkpoint every 10 ms until the limit
    return "finished"


class Deploy(InteractiveTask):
    name = "tests.deploy"

    def run(self, target: str) -> str:
        self.progress(1, 2, f"deploying {target}")
        self.progress(2, 2, "done")
        return f"deployed {target}"


deploy = app.register(Deploy)


# -- fault-injection, fuzz and soak tests (tests/test_reliability.py, test_fuzz.py) ------------
# ITASK_TEST_SETTINGS: a JSON object of extra App settings for one test (e.g. max_deliveries,
# subscription_ttl, worker_heartbeat); broker_transport_options are merged, not replaced.
_test_settings = json.loads(os.environ.get("ITASK_TEST_SETTINGS") or "{}")
if _test_settings:
    _transport = {**app.conf.broker_transport_options,
                  **_test_settings.pop("broker_transport_options", {})}
    app.configure(broker_transport_options=_transport, **_test_settings)

# ITASK_TEST_FSYNC_LOG: a file the worker appends the path of everything it fsyncs to, one
# line each (tests/test_embedded_fsync.py: which files and directories reach the disk).
if os.environ.get("ITASK_TEST_FSYNC_LOG"):
    _fsync_log, _real_fsync = os.environ["ITASK_TEST_FSYNC_LOG"], os.fsync

    def _logged_fsync(fd: Any) -> None:
        with open(_fsync_log, "a") as fh:
            fh.write(os.readlink(f"/proc/self/fd/{int(fd)}") + "\n")
        _real_fsync(fd)

    os.fsync = _logged_fsync


@app.task(base=InteractiveTask)
def marked_steps(self: Any, path: str, n: int, delay: float, key: str) -> str:
    """``n`` progress steps ``delay`` apart; appends ``key`` to ``path`` when it completes.

    ``path.started`` gets one line per run (key, pid, delivery): how often it was started.
    """
    with open(path + ".started", "a") as fh:
        fh.write(f"{key} {os.getpid()} {self.request.delivery}\n")
    for i in range(n):
        self.progress(i + 1, n)
        time.sleep(delay)
    with open(path, "a") as fh:
        fh.write(key + "\n")
    return key


@app.task(bind=True)
def crash_counted(self: Any) -> None:
    """Records each delivery, then kills its pool process (like crash_hard)."""
    record(self.request.id, "start", self.request.delivery)
    os._exit(9)


@app.task(base=InteractiveTask)
def chatty_for(self: Any, seconds: float) -> int:
    """Emits progress as fast as it can for ``seconds``; returns how many it emitted."""
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        i += 1
        self.progress(i)
    self.send({"emitted": i})
    return i


@app.task(base=InteractiveTask)
def holds_progress(self: Any, path: str) -> str:
    """Reports progress 1, then 2 held back in the slot as if the worker were behind
    (``BlockingChannel.send_progress``) and kept there (no ``HOLD_S`` flush); writes
    ``path`` and waits for a message, then sends one, which lets the held progress out."""
    from interactive_tasks.context import current_runtime
    from interactive_tasks.worker import ipc

    self.progress(1, 2)
    channel = current_runtime().channel  # type: ignore[attr-defined]
    ipc.HOLD_S = 3600.0
    channel._behind = lambda: True
    self.progress(2, 2)
    del channel._behind
    assert channel.holding == 1
    with open(path, "w") as fh:
        fh.write("held")
    while self.receive(timeout=0.05) is None:
        pass
    self.send("bye")
    return "done"


@app.task(base=InteractiveTask, soft_time_limit=0.8)
def soft_limited(self: Any, seconds: float) -> dict[str, Any]:
    """Checkpoints every 5 ms for ``seconds``; reports when the soft limit interrupted it."""
    start = time.monotonic()
    try:
        while time.monotonic() - start < seconds:
            self.checkpoint()
            time.sleep(0.005)
    except Exception as exc:
        if type(exc).__name__ != "SoftTimeLimitExceeded":
            raise
        return {"soft_limit": True, "after": time.monotonic() - start}
    return {"soft_limit": False, "after": time.monotonic() - start}


@app.task(base=InteractiveTask, time_limit=1.0)
def hard_limited_spin(self: Any, seconds: float) -> str:
    """CPU-bound, never checks: only the hard time limit can stop it."""
    record(self.request.id, "start")
    end = time.monotonic() + seconds
    x = 0
    while time.monotonic() < end:
        x += 1
    return "spun"


@app.task(bind=True)
def fuzz_target(self: Any, tag: str) -> str:
    """The task a fuzzed message names; records every run so a test can count them."""
    record(self.request.id, "run", tag)
    return tag


@app.task(bind=True, max_retries=3)
def flaky(self: Any, path: str, fail_times: int) -> int:
    """Fails ``fail_times`` times (counted in ``path``), retrying quickly, then succeeds."""
    p = Path(path)
    count = int(p.read_text()) if p.exists() else 0
    p.write_text(str(count + 1))
    if count < fail_times:
        raise self.retry(exc=RuntimeError(f"attempt {count + 1} failed"), countdown=0.1)
    return count + 1


@app.task(autoretry_for=(ConnectionError,), max_retries=2, retry_backoff=0.05,
          retry_jitter=False)
def auto_flaky(path: str) -> int:
    """Always raises ConnectionError: retried twice automatically, then fails."""
    p = Path(path)
    count = int(p.read_text()) if p.exists() else 0
    p.write_text(str(count + 1))
    raise ConnectionError(f"attempt {count + 1}")


@app.task(rate_limit="5/s")
def limited_rate() -> float:
    return time.time()


@app.task
def double(x: int) -> int:
    return 2 * x


@app.task
def total(values: list[int]) -> int:
    return sum(values)


@app.task(base=InteractiveTask)
def stepper(self: Any, x: int, steps: int = 5, delay: float = 0.05) -> int:
    """An interactive chain step: streams progress, can be paused and cancelled."""
    for i in range(steps):
        self.progress(i + 1, steps)
        time.sleep(delay)
    record(self.request.id, "done", x)
    return x + 1


@app.task(base=InteractiveTask)
async def async_steps(self: Any, n: int) -> dict[str, Any]:
    """An ``async def`` task: awaits progress, messages and an answer."""
    import asyncio

    got = []
    for i in range(n):
        await self.progress(i + 1, n)
        msg = await self.receive(timeout=0)
        if msg is not None:
            got.append(msg)
            await self.send({"echo": msg})
        await asyncio.sleep(0.01)
    answer = await self.ask("async name?", timeout=30)
    return {"got": got, "answer": answer}


@app.task(base=InteractiveTask)
def rendezvous(self: Any, key: str, n: int, timeout: float = 60) -> int:
    """Waits until ``n`` copies of itself run at once (a Redis counter): proof of concurrency."""
    import redis

    r = redis.Redis.from_url(os.environ.get("ITASK_TEST_REDIS", "redis://127.0.0.1:6379/0"))
    r.incr(key)
    r.expire(key, 300)
    end = time.monotonic() + timeout
    last = -1
    while True:
        seen = int(r.get(key) or 0)
        if seen != last:  # progress only when it changes: a thousand of these run at once
            self.progress(seen, n)
            last = seen
        if seen >= n:
            return seen
        if time.monotonic() > end:
            raise TimeoutError(f"only {seen} of {n} ran at once")
        time.sleep(0.25)  # the poll period (deadline above): a thousand copies poll Redis


@app.task(bind=True, acks_late=False)
def early_ack(self: Any, seconds: float) -> str:
    """Acked when it starts; records each start (with its delivery). Runs ``seconds`` on its
    first delivery and returns at once on later ones (tests kill its first run)."""
    record(self.request.id, "start", self.request.delivery)
    if self.request.delivery == 1:
        time.sleep(seconds)
    return "done"


@app.task(base=InteractiveTask)
def sleeper(self: Any, seconds: float, ignore_sigterm: bool = False) -> str:
    """Sleeps without a checkpoint: only a forced cancel ends it early. With
    ``ignore_sigterm`` (prefork) its pool process survives SIGTERM, so only the SIGKILL
    stage of the cancel ladder can stop it."""
    if ignore_sigterm:
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    record(self.request.id, "start")
    time.sleep(seconds)
    return "slept"


@app.task
def mark(key: str) -> str:
    """Appends ``key`` to this process's file in the record dir (counts executions)."""
    directory = os.environ.get("ITASK_TEST_RECORD")
    if directory:
        with open(Path(directory) / f"runs-{os.getpid()}.txt", "a") as fh:
            fh.write(key + "\n")
    return key


@app.task(base=InteractiveTask)
def tiny(self: Any, i: int) -> int:
    self.progress(1, 1)
    return i


@app.task(soft_time_limit=0.3)
def soft_limited_plain(seconds: float) -> str:
    """A plain task (no checkpoints): the soft limit still interrupts it in prefork."""
    from interactive_tasks import SoftTimeLimitExceeded

    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        return "cleaned up"
    return "finished"


@app.task(bind=True, max_retries=5)
def retry_forever(self: Any) -> None:
    time.sleep(0.3)  # each attempt runs a while: a cancel can land inside one
    raise self.retry(countdown=0.2)


@app.task(bind=True)
def show_request(self: Any) -> dict[str, Any]:
    return {"headers": {k: v for k, v in self.request.headers.items()
                        if not k.startswith("itask-")},
            "eta": self.request.eta, "started": time.time()}


@app.task
def outlive_soft(seconds: float) -> str:
    """No limits of its own: catches the soft limit, then runs into the hard one."""
    from interactive_tasks import SoftTimeLimitExceeded

    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        record(str(os.getpid()), "soft")
        time.sleep(seconds)
    return "finished"


@app.task(bind=True, time_limit=30, soft_time_limit=20)
def own_limits(self: Any, seconds: float) -> str:
    """Limits of its own, longer than the worker's defaults in the tests."""
    time.sleep(seconds)
    return "finished"


#: memory a task kept in its pool process (so the process's RSS stays grown)
_kept: list[bytes] = []


@app.task
def grow(megabytes: int) -> dict[str, int]:
    """Keep ``megabytes`` MB in this pool process; returns its pid."""
    _kept.append(b"x" * (megabytes * 1024 * 1024))
    return {"pid": os.getpid(), "kept": sum(len(b) for b in _kept) // (1024 * 1024)}


@app.task(base=InteractiveTask)
def gather_and_wait(self: Any, key: str, n: int, timeout: float = 90) -> dict[str, Any]:
    """Reports how many copies of itself run at once (a Redis counter) until a message
    comes, then returns it: many of these run at once and each is steered separately."""
    import redis

    r = redis.Redis.from_url(os.environ.get("ITASK_TEST_REDIS", "redis://127.0.0.1:6379/0"))
    r.incr(key)
    r.expire(key, 300)
    end = time.monotonic() + timeout
    last = -1
    while time.monotonic() < end:
        seen = int(r.get(key) or 0)
        if seen != last:  # progress only when it changes: a thousand of these run at once
            self.progress(seen, n)
            last = seen
        message = self.receive(timeout=0.25)  # a checkpoint: pause and cancel apply here
        if message is not None:
            return {"seen": seen, "message": message}
    raise TimeoutError(f"no message within {timeout}s")


@app.task
def loaded_modules(names: list[str]) -> list[str]:
    """Which of ``names`` the pool process running this has imported."""
    import sys

    return [name for name in names if name in sys.modules]


@app.task(base=InteractiveTask)
def loaded_modules_interactive(self: Any, names: list[str]) -> list[str]:
    """Which of ``names`` the pool process running this has imported, after the task's
    own calls (progress, checkpoint, receive, log) ran once each."""
    import sys

    self.progress(1, 1)
    self.checkpoint()
    self.receive(timeout=0.01)
    self.log("checked")
    return [name for name in names if name in sys.modules]


@app.task
def frozen_objects() -> int:
    """How many objects the pool process running this holds out of the garbage
    collector's passes (``gc.freeze``)."""
    import gc

    return gc.get_freeze_count()


@app.task(bind=True)
def retry_once_after_go(self: Any, path: str) -> int:
    """Counts its runs in ``path``; the first waits (up to 30 s) for ``path + ".go"`` to
    exist, then retries; later runs return their number."""
    p = Path(path)
    count = int(p.read_text()) if p.exists() else 0
    p.write_text(str(count + 1))
    if count == 0:
        go = Path(path + ".go")
        deadline = time.monotonic() + 30
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        raise self.retry(countdown=0)
    return count + 1
