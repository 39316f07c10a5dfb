"""The Celery bridge against real ``celery worker`` subprocesses (docs/celery-bridge.md).

Each test runs the stock ``celery -A tests.apps.celery_proj worker`` on Redis or
RabbitMQ with its own queue and interactive_tasks namespace, and drives its tasks through
``task.start()`` handles; Celery's result backend (Redis) must agree with the handles.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from interactive_tasks.errors import HardPauseUnsupported, TaskCancelled
from interactive_tasks.protocol import EventKind, TaskState
from tests.conftest import (
    AMQP_URL,
    REDIS_URL,
    ROOT,
    holds_for,
    require_broker,
    stream_into,
    wait_for,
)

pytest.importorskip("celery")
pytestmark = pytest.mark.timeout(120)


class CeleryEnv:
    """Environment shared by the test process and its Celery workers."""

    def __init__(self, broker: str) -> None:
        self.broker = broker
        self.url = REDIS_URL if broker == "redis" else AMQP_URL
        self.namespace = f"cb{uuid.uuid4().hex[:8]}"
        self.queue = f"{self.namespace}.celery"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ITASK_")}
        env.update({
            "CELERY_BRIDGE_BROKER": self.url,
            "CELERY_BRIDGE_BACKEND": REDIS_URL,
            "CELERY_BRIDGE_QUEUE": self.queue,
            "ITASK_TEST_NS": self.namespace,
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
        })
        return env


class CeleryWorker:
    """A real ``celery worker`` subprocess, its log in a file."""

    def __init__(self, env: CeleryEnv, log_dir: Path, pool: str, concurrency: int,
                 module: str = "tests.apps.celery_proj",
                 extra_env: dict[str, str] | None = None) -> None:
        self.name = f"w{uuid.uuid4().hex[:6]}@test"
        self.log_path = log_dir / f"{self.name}.log"
        self._log = open(self.log_path, "ab")
        args = [sys.executable, "-m", "celery", "-A", module, "worker",
                "-P", pool, "-c", str(concurrency), "-n", self.name, "-l", "info",
                "--without-mingle", "--without-gossip", "--without-heartbeat"]
        self.proc = subprocess.Popen(args, env={**env.env(), **(extra_env or {})},
                                     cwd=str(ROOT), stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30.0) -> CeleryWorker:
        wait_for(lambda: " ready." in self.log() or self.proc.poll() is not None, timeout,
                 message=f"celery worker {self.name} to start")
        if self.proc.poll() is not None:
            raise AssertionError(f"celery worker exited early:\n{self.log()[-3000:]}")
        return self

    def children(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True,
                             text=True).stdout
        return sorted(int(p) for p in out.split())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)
        self._log.close()


@pytest.fixture(params=["redis", "amqp"])
def celery_env(request: pytest.FixtureRequest,
               monkeypatch: pytest.MonkeyPatch) -> Iterator[CeleryEnv]:
    require_broker(request.param)
    require_broker("redis")  # Celery's result backend in these tests
    env = CeleryEnv(request.param)
    for key, value in env.env().items():
        monkeypatch.setenv(key, value)
    for key in [k for k in os.environ if k.startswith("ITASK_") and k != "ITASK_TEST_NS"]:
        monkeypatch.delenv(key)
    yield env
    if env.broker == "amqp":
        import amqp

        host = env.url.split("@", 1)[1].split("/", 1)[0]
        conn = amqp.Connection(host, userid="guest", password="guest", heartbeat=0)
        conn.connect()
        try:
            conn.channel().queue_delete(env.queue)
        finally:
            conn.close()


@pytest.fixture
def proj(celery_env: CeleryEnv) -> Iterator[Any]:
    """The Celery project module as a client sees it, configured for this test."""
    import tests.apps.celery_proj as module

    module = importlib.reload(module)
    yield module
    from interactive_tasks.celery import bridge_app

    bridge_app(module.app).close()


@pytest.fixture
def start_celery(celery_env: CeleryEnv, tmp_path: Path,
                 request: pytest.FixtureRequest) -> Iterator[Callable[..., CeleryWorker]]:
    workers: list[CeleryWorker] = []

    def start(pool: str = "prefork", concurrency: int = 2,
              module: str = "tests.apps.celery_proj",
              extra_env: dict[str, str] | None = None) -> CeleryWorker:
        worker = CeleryWorker(celery_env, tmp_path, pool, concurrency, module, extra_env)
        workers.append(worker)
        return worker.wait_ready()

    yield start
    for worker in workers:
        worker.stop()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for worker in workers:
            sys.stderr.write(f"\n--- log of {worker.name} ---\n{worker.log()[-4000:]}\n")


def proc_state(pid: int) -> str:
    """The kernel's one-letter state of ``pid`` (``T``: stopped)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("State:"):
                return line.split()[1]
    raise AssertionError(f"no state for {pid}")


@pytest.mark.parametrize("pool", ["prefork", "threads", "solo", "gevent", "eventlet"])
def test_progress_stream_messages_and_result(proj: Any, start_celery: Any,
                                             pool: str) -> None:
    worker = start_celery(pool=pool)
    handle = proj.train.start(40, expect=2)
    wait_for(lambda: handle.state is not TaskState.PENDING, 20, message="task to start")
    handle.send("first")
    handle.send({"second": 2})
    events = list(handle.events(timeout=30))
    kinds = [e.kind for e in events]
    assert kinds[0] == EventKind.STARTED and kinds[-1] == EventKind.SUCCEEDED
    seqs = [e.seq for e in events]
    assert seqs == sorted(set(seqs))
    # Progress is latest-wins, never reordered: in the pool process while the relay has
    # not read what it sent (docs/architecture.md, "Pools"), and in a handle whose reader
    # has not taken it yet. Every other event is numbered and none is missing.
    progress = [e.current for e in events if e.kind == EventKind.PROGRESS]
    assert progress == sorted(set(progress)) and progress[-1] == 40
    others = [e for e in events if e.kind != EventKind.PROGRESS]
    assert len(others) + len(progress) <= events[-1].seq <= len(others) + 40
    echoes = [e.data for e in events if e.kind == EventKind.MESSAGE]
    assert echoes == [{"echo": "first"}, {"echo": {"second": 2}}]
    logs = [e.text for e in events if e.kind == EventKind.LOG]
    assert "trained 40" in logs
    assert any("a log record from the task" in text for text in logs)
    expected = {"epochs": 40, "got": ["first", {"second": 2}]}
    assert handle.result(timeout=10) == expected
    # Celery's side is Celery's: the result backend and AsyncResult
    assert handle.async_result.get(timeout=10) == expected
    assert handle.async_result.state == "SUCCESS"
    started = events[0]
    assert started.worker == worker.name
    # The pool channels are readers on Celery's event loop where the worker runs one
    # that tasks leave free (prefork, threads); solo runs its task on that loop and
    # gevent has none, so there the relay reads them on a thread.
    on_loop = "pool channels on the worker's event loop" in worker.log()
    assert on_loop == (pool in ("prefork", "threads"))
    if pool == "prefork":
        assert started.pid in worker.children()
    else:
        assert started.pid == worker.proc.pid
    # plain Celery tasks are untouched
    assert proj.add.delay(2, 3).get(timeout=10) == 5


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_a_stream_into_a_slow_task_is_held_back_to_the_send_window(proj: Any, start_celery: Any,
                                                                   pool: str) -> None:
    # The relay hands the task's receipts back as the itask worker does: the sender
    # stops at the window and goes on at the task's pace.
    import dataclasses

    from interactive_tasks.celery import bridge_app

    itask_app = bridge_app(proj.app)
    window, delay = 32, 0.005
    itask_app.conf = dataclasses.replace(itask_app.conf, send_window=window)
    start_celery(pool=pool)
    n = 5 * window
    handle = proj.sink.start(n, delay)
    wait_for(lambda: handle.state is TaskState.RUNNING, 20, message="task to start")
    most, sending = stream_into(handle, n)
    assert handle.result(timeout=30) == {"got": n, "disorder": None}
    assert most == window
    assert sending >= (n - window - window // 4) * delay


def test_the_relay_on_a_hub_reads_its_channels_again_after_a_reset() -> None:
    """Celery resets its hub when it loses the broker connection, which drops every
    reader; the relay's upkeep timer puts the pool channels back on it."""
    import socket
    import tempfile

    from kombu.asynchronous import Hub

    from interactive_tasks import App
    from interactive_tasks.celery.relay import Relay
    from interactive_tasks.worker.ipc import encode_frame

    require_broker("redis")
    hub = Hub()
    directory = tempfile.mkdtemp(prefix="itask-hub-")
    relay = Relay(App("hubtest", broker=REDIS_URL, namespace=f"t{uuid.uuid4().hex[:8]}"),
                  "hub@test", os.path.join(directory, "relay.sock"),
                  supports_hard_pause=True)
    relay.start(hub)
    loop = hub.create_loop()
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        hub.reset()  # what asynloop does when the broker connection is lost
        assert relay.listener.fileno() not in hub.readers
        relay._hub_tick()  # the timer survives the reset
        assert relay.listener.fileno() in hub.readers
        client.connect(relay.socket_path)
        client.sendall(encode_frame(["ready", 4242]))
        wait_for(lambda: next(loop) is None and relay.conns and relay.conns[0].pid == 4242,
                 5, message="the relay read the channel on the hub")
    finally:
        client.close()
        relay.stop()
        hub.close()


@pytest.mark.parametrize("read_only_attach", [False, True])
def test_a_renewal_extends_a_watch_and_starts_one_only_where_watching_is_open(
        read_only_attach: bool) -> None:
    """``subscribe`` with a ``renew`` list (what a client sends every 10 s) keeps its
    watches alive; for a task it does not watch it starts one only when watching needs no
    token (``read_only_attach``), as on the itask worker."""
    import tempfile

    from interactive_tasks import App
    from interactive_tasks.celery.relay import Relay, _Task
    from interactive_tasks.protocol import ControlMessage, Verb
    from interactive_tasks.worker.records import Subscriber

    require_broker("redis")
    directory = tempfile.mkdtemp(prefix="itask-renew-")
    relay = Relay(App("renewtest", broker=REDIS_URL, namespace=f"t{uuid.uuid4().hex[:8]}",
                      read_only_attach=read_only_attach),
                  "renew@test", os.path.join(directory, "relay.sock"),
                  supports_hard_pause=True)
    try:
        task = _Task(id="t1", name="looper", conn=None, pid=None, token_digest="digest")
        task.subscribers["watcher"] = Subscriber("watcher", time.monotonic() + 1, True)
        relay.tasks[task.id] = task
        renew = ControlMessage(verb=Verb.SUBSCRIBE, data={"renew": ["t1"]},
                               sender="watcher")
        relay.handle_read(renew, None, signed=False)
        assert task.subscribers["watcher"].expires > time.monotonic() + 10
        stranger = dataclasses.replace(renew, sender="stranger")
        relay.handle_read(stranger, None, signed=False)
        assert ("stranger" in task.subscribers) is read_only_attach
    finally:
        relay.stop()


def test_the_snapshot_keeps_messages_and_logs_however_much_progress_came() -> None:
    """The relay's history holds what is not progress (the latest progress is kept on its
    own), so an attach after 500 progress events still sees the task's message and log
    line; a question pending when the task ends is gone from its final snapshot."""
    import tempfile

    from interactive_tasks import App
    from interactive_tasks.celery.relay import Relay, _Task

    require_broker("redis")
    directory = tempfile.mkdtemp(prefix="itask-history-")
    relay = Relay(App("historytest", broker=REDIS_URL, namespace=f"t{uuid.uuid4().hex[:8]}"),
                  "history@test", os.path.join(directory, "relay.sock"),
                  supports_hard_pause=True)
    try:
        task = _Task(id="t1", name="looper", conn=None, pid=None, token_digest=None)
        relay.tasks[task.id] = task
        relay.emit(task, EventKind.MESSAGE, {"data": "hello"})
        relay.emit(task, EventKind.LOG, {"level": "info", "text": "a line"})
        for i in range(500):
            relay.emit(task, EventKind.PROGRESS, {"current": i + 1, "total": 500})
        relay.emit(task, EventKind.QUESTION, {"qid": "q1", "prompt": "go on?"})
        snapshot = task.snapshot(relay.hostname)
        kinds = [e.kind for e in snapshot.events]
        assert kinds == [EventKind.MESSAGE, EventKind.LOG, EventKind.QUESTION]
        assert snapshot.progress is not None and snapshot.progress.fields["current"] == 500
        assert snapshot.question is not None
        relay.emit(task, EventKind.SUCCEEDED, {"result": 1})
        assert relay.finished["t1"].snapshot(relay.hostname).question is None
    finally:
        relay.stop()


@pytest.mark.parametrize("pool", ["prefork", "threads", "gevent", "eventlet"])
def test_soft_pause_resume_then_cancel(proj: Any, start_celery: Any, pool: str) -> None:
    start_celery(pool=pool)
    handle = proj.looper.start(100000, 0.02)
    wait_for(lambda: handle.progress is not None, 20, message="first progress")
    handle.pause(wait=True, timeout=10)
    assert handle.state is TaskState.PAUSED
    at = handle.progress.current
    holds_for(lambda: handle.progress.current == at, 0.6, message="no progress while paused")
    handle.resume(wait=True, timeout=10)
    wait_for(lambda: handle.progress.current > at + 3, 10, message="progress after resume")
    assert handle.cancel(grace=10) is True
    with pytest.raises(TaskCancelled):
        handle.result(timeout=15)
    kinds = [e.kind for e in handle.events_nowait()]
    assert kinds.count(EventKind.PAUSED) == 1 and kinds.count(EventKind.RESUMED) == 1
    # Celery records the cancel as a revoke
    wait_for(lambda: handle.async_result.state == "REVOKED", 10, message="REVOKED in Celery")


def test_hard_pause_stops_the_pool_process(proj: Any, start_celery: Any) -> None:
    worker = start_celery(pool="prefork")
    handle = proj.looper.start(100000, 0.02)
    wait_for(lambda: handle.progress is not None, 20, message="first progress")
    pid = handle.pid
    assert pid in worker.children()
    handle.pause(hard=True, wait=True, timeout=10)
    assert proc_state(pid) == "T"
    at = handle.progress.current
    holds_for(lambda: handle.progress.current == at, 0.6, message="frozen")
    handle.resume(wait=True, timeout=10)
    assert proc_state(pid) != "T"
    wait_for(lambda: handle.progress.current > at, 10, message="progress after resume")
    handle.cancel(grace=10)
    with pytest.raises(TaskCancelled):
        handle.result(timeout=15)
    # what the child wrote before it stopped came before "paused", nothing after it
    events = list(handle.events(timeout=10))
    kinds = [e.kind for e in events]
    paused = kinds.index("paused")
    assert kinds[paused + 1] == "resumed", kinds[paused - 2:paused + 3]
    # nor later: progress made before the stop, held back in the pool process while the
    # relay was behind (BlockingChannel.send_progress), is dropped
    assert not [e for e in events[paused:] if e.kind == "progress"
                and e.ts < events[paused].ts]


def test_progress_held_in_the_pool_process_at_a_hard_pause_never_follows_paused(
        proj: Any, start_celery: Any, tmp_path: Path) -> None:
    """A progress event the pool process held back (the relay was behind) when the hard
    pause stopped it was made before ``paused``: it is dropped, not delivered after it."""
    start_celery(pool="prefork")
    beat = tmp_path / "beat"
    handle = proj.holds_progress.start(str(beat))
    wait_for(lambda: beat.exists() and beat.read_text() == "held", 20,
             message="progress held")
    handle.pause(hard=True, wait=True, timeout=10)
    handle.resume(wait=True, timeout=10)
    handle.send("go")
    assert handle.result(timeout=15) == "done"
    events = list(handle.events(timeout=10))
    kinds = [e.kind for e in events]
    paused = kinds.index("paused")
    assert kinds[paused:] == ["paused", "resumed", "message", "succeeded"], kinds
    assert [e.current for e in events if e.kind == "progress"] == [1]


def test_hard_pause_needs_prefork(proj: Any, start_celery: Any) -> None:
    start_celery(pool="threads")
    handle = proj.looper.start(100000, 0.02)
    wait_for(lambda: handle.progress is not None, 20, message="first progress")
    with pytest.raises(HardPauseUnsupported):
        handle.pause(hard=True)
    handle.cancel(grace=10)
    with pytest.raises(TaskCancelled):
        handle.result(timeout=15)


def test_forced_cancel_ends_the_child_and_celery_replaces_it(proj: Any,
                                                            start_celery: Any) -> None:
    worker = start_celery(pool="prefork", concurrency=1)
    handle = proj.spin.start(300)
    wait_for(lambda: handle.progress is not None, 20, message="the task to spin")
    pid = handle.pid
    assert worker.children() == [pid]
    handle.cancel(grace=0.5)
    assert handle.wait(timeout=15) is TaskState.CANCELLED
    assert handle.events_nowait()[-1].fields.get("forced") is True
    wait_for(lambda: pid not in worker.children(), 10, message="the child to end")
    # Celery replaces the child and the worker keeps serving
    wait_for(lambda: len(worker.children()) == 1, 20, message="a new pool process")
    assert proj.add.delay(1, 1).get(timeout=20) == 2
    again = proj.double.start(21)
    assert again.result(timeout=20) == 42
    assert again.pid != pid
    # Celery's own record of the killed run: its pool lost the process
    wait_for(lambda: handle.async_result.state == "FAILURE", 20, message="FAILURE in Celery")
    assert "WorkerLostError" in repr(handle.async_result.result)


def test_question_answered_from_a_process_that_attached(proj: Any, start_celery: Any,
                                                         celery_env: CeleryEnv) -> None:
    start_celery(pool="prefork")
    handle = proj.asker.start("learning rate?")
    wait_for(lambda: handle.question is not None, 20, message="the question")
    script = textwrap.dedent(f"""
        import sys, time
        import tests.apps.celery_proj as proj
        from interactive_tasks.celery import bridge_app
        h = bridge_app(proj.app).attach({handle.id!r}, token={handle.token!r})
        deadline = time.monotonic() + 20
        while h.question is None and time.monotonic() < deadline:
            time.sleep(0.05)
        print("ASKED", h.question["prompt"], flush=True)
        h.answer(0.125)
        bridge_app(proj.app).close()
    """)
    out = subprocess.run([sys.executable, "-c", script], env=celery_env.env(), cwd=str(ROOT),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ASKED learning rate?" in out.stdout
    assert handle.result(timeout=15) == {"lr": 0.125}
    assert handle.async_result.get(timeout=10) == {"lr": 0.125}


def test_attach_gets_a_snapshot_then_the_live_tail(proj: Any, start_celery: Any,
                                                  celery_env: CeleryEnv) -> None:
    start_celery(pool="prefork")
    handle = proj.looper.start(100000, 0.01)
    wait_for(lambda: handle.progress is not None and handle.progress.current >= 5, 20,
             message="some progress")
    script = textwrap.dedent(f"""
        import time
        import tests.apps.celery_proj as proj
        from interactive_tasks.celery import bridge_app
        h = bridge_app(proj.app).attach({handle.id!r})
        print("SNAPSHOT", h.state.value, h.worker, h.progress.current, flush=True)
        first = h.progress.current
        deadline = time.monotonic() + 20
        while h.progress.current < first + 20 and time.monotonic() < deadline:
            time.sleep(0.02)
        print("TAIL", h.progress.current - first, flush=True)
        bridge_app(proj.app).close()
    """)
    out = subprocess.run([sys.executable, "-c", script], env=celery_env.env(), cwd=str(ROOT),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    snapshot = next(line for line in out.stdout.splitlines() if line.startswith("SNAPSHOT"))
    _, state, worker, current = snapshot.split()
    assert state == "running" and worker == handle.worker and float(current) >= 5
    tail = next(line for line in out.stdout.splitlines() if line.startswith("TAIL"))
    assert float(tail.split()[1]) >= 20
    handle.cancel(grace=10)
    assert handle.wait(timeout=15) is TaskState.CANCELLED


def test_chain_with_an_interactive_task(proj: Any, start_celery: Any) -> None:
    from celery import chain

    start_celery(pool="prefork")
    result = chain(proj.add.s(1, 2), proj.double.s(), proj.add.s(10)).apply_async()
    assert result.get(timeout=30) == 16
    # the interactive step ran through the relay: its final state is in the result store
    from interactive_tasks.celery import bridge_app

    step = result.parent
    record = wait_for(lambda: bridge_app(proj.app).results.get(step.id), 10,
                      message="the interactive step's record")
    assert record["state"] == "succeeded" and record["result"] == 6


def test_worker_sigkill_is_reported_as_worker_lost(proj: Any, start_celery: Any) -> None:
    worker = start_celery(pool="prefork")
    handle = proj.looper.start(100000, 0.02)
    wait_for(lambda: handle.progress is not None, 20, message="first progress")
    os.killpg(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait(10)
    wait_for(lambda: handle.worker_lost, 20, message="the handle to see the worker lost")
    assert not handle.state.is_final


def test_an_app_without_enable_is_unchanged(celery_env: CeleryEnv,
                                             start_celery: Any) -> None:
    from celery import chain

    import tests.apps.celery_plain as plain
    from interactive_tasks.celery.bootstep import RelayStep

    plain = importlib.reload(plain)
    assert RelayStep not in plain.app.steps["worker"]
    worker = start_celery(pool="prefork", module="tests.apps.celery_plain")
    assert plain.add.delay(2, 2).get(timeout=20) == 4
    assert chain(plain.add.s(1, 1), plain.add.s(5)).apply_async().get(timeout=20) == 7
    assert plain.flaky.delay().get(timeout=20) == 2
    assert plain.environment.delay().get(timeout=20) is None
    assert "interactive_tasks relay" not in worker.log()


def test_interactive_task_called_directly_or_eagerly(proj: Any) -> None:
    assert proj.train(3) == {"epochs": 3, "got": []}
    assert proj.looper.apply(args=(3, 0)).get() == 3
    from interactive_tasks.errors import QuestionTimeout

    with pytest.raises(QuestionTimeout):
        proj.asker()


def test_start_needs_enable() -> None:
    from celery import Celery

    from interactive_tasks.celery import InteractiveTask
    from interactive_tasks.errors import ConfigurationError

    app = Celery("not_bridged", broker="redis://127.0.0.1:6379/0")

    @app.task(base=InteractiveTask, bind=True)
    def job(self: Any) -> int:
        return 1

    with pytest.raises(ConfigurationError, match="enable"):
        job.start()


#: a module that makes a Celery app on the broker URL in argv[1] and enables the bridge,
#: then sends a plain Celery task and reads it back over Celery's own kombu connection;
#: prints the module of the kombu transport that carried it
PLAIN_CELERY_ON = """
import json, sys
from celery import Celery
from interactive_tasks.celery import enable
app = Celery("plain", broker=sys.argv[1], set_as_current=False)
app.conf.task_default_queue = "plainq"
enable(app)
app.send_task("proj.nothing", args=(1,))
with app.connection_for_read() as conn:
    message = conn.SimpleQueue("plainq").get(timeout=10)
    message.ack()
    print(json.dumps([type(conn.transport).__module__, message.headers["task"]]))
"""


@pytest.mark.parametrize("scheme", ["embedded", "memory"])
def test_a_celery_app_on_this_packages_schemes_connects_once_the_bridge_is_imported(
        scheme: str, tmp_path: Path) -> None:
    """The package enters embedded:// and memory:// in kombu's table only on its own way
    to a connection; Celery's connections are kombu's own, so importing the bridge enters
    them (a fresh interpreter: this one has done it already)."""
    url = f"embedded://{tmp_path / 'broker'}" if scheme == "embedded" else "memory://"
    out = subprocess.run([sys.executable, "-c", PLAIN_CELERY_ON, url], cwd=ROOT,
                         env={**os.environ, "ITASK_HOME": str(tmp_path / "home")},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    transport, task = json.loads(out.stdout.strip().splitlines()[-1])
    assert (transport, task) == (f"interactive_tasks.transport.{scheme}", "proj.nothing")


def itask(env: CeleryEnv, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "interactive_tasks.cli.main", *args,
                           "-A", "tests.apps.celery_proj"], env=env.env(), cwd=str(ROOT),
                          capture_output=True, text=True, timeout=60)


def test_itask_commands_and_top_on_a_celery_app(proj: Any, start_celery: Any,
                                                celery_env: CeleryEnv) -> None:
    import json

    from interactive_tasks.app import load_app
    from interactive_tasks.celery import bridge_app
    from interactive_tasks.cli.attach import ClusterSource

    assert load_app("tests.apps.celery_proj") is bridge_app(proj.app)
    worker = start_celery(pool="prefork")
    handle = proj.looper.start(100000, 0.02)
    wait_for(lambda: handle.progress is not None, 20, message="first progress")
    listed = json.loads(itask(celery_env, "ls", "--json").stdout)
    assert [(t["id"], t["worker"]) for t in listed] == [(handle.id, worker.name)]
    out = itask(celery_env, "pause", handle.id, "--token", handle.token, "--wait")
    assert out.returncode == 0, out.stderr
    assert handle.state is TaskState.PAUSED
    source = ClusterSource(bridge_app(proj.app), interval=0.2)
    try:
        row = wait_for(lambda: [w for w in source.workers()
                                if w["worker"] == worker.name and w["online"]], 15,
                       message="the Celery worker in top")[0]
        assert {c["pid"] for c in row["children"]} == set(worker.children())
        assert [c["state"] for c in row["children"] if c["task_id"] == handle.id] == \
            ["paused"]
        wait_for(lambda: [t.task_id for t in source.tasks()] == [handle.id], 10,
                 message="the task in top")
    finally:
        source.close()
    out = itask(celery_env, "cancel", handle.id, "--token", handle.token)
    assert out.returncode == 0, out.stderr
    assert handle.wait(timeout=15) is TaskState.CANCELLED
    result = json.loads(itask(celery_env, "result", handle.id, "--json").stdout)
    assert result["state"] == "cancelled" and result["worker"] == worker.name


@pytest.mark.parametrize("celery_env", ["redis"], indirect=True)
def test_the_documented_example_project(celery_env: CeleryEnv, tmp_path: Path) -> None:
    """docs/celery-bridge.md: its project is examples/celery_bridge/proj.py, and its two
    commands print its output (a real Celery worker; Redis database 9 for the example's
    default queue and namespace)."""
    from tests.doc_blocks import doc_block

    doc = "docs/celery-bridge.md"
    project = doc_block(doc, "# examples/celery_bridge/proj.py")
    assert project.text.strip() == \
        (ROOT / "examples/celery_bridge/proj.py").read_text().strip()
    commands = doc_block(doc, "celery -A examples.celery_bridge.proj worker -l info   "
                              "# terminal 1").commands()
    assert commands == [["celery", "-A", "examples.celery_bridge.proj", "worker", "-l", "info"],
                        ["python", "-m", "examples.celery_bridge.train"]]
    expected = doc_block(doc, "progress: 1 / 5").lines
    import redis

    url = REDIS_URL.rsplit("/", 1)[0] + "/9"
    redis.Redis.from_url(url).flushdb()
    env = {k: v for k, v in celery_env.env().items() if not k.startswith("CELERY_")}
    env["CELERY_BROKER_URL"] = url
    env.pop("ITASK_TEST_NS", None)
    log_path = tmp_path / "example-worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen([sys.executable, "-m", *commands[0]], env=env, cwd=ROOT,
                                  stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        wait_for(lambda: " ready." in log_path.read_text() or worker.poll() is not None, 30,
                 message="the example's worker")
        out = subprocess.run([sys.executable, *commands[1][1:]], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr[-2000:]
        lines = out.stdout.splitlines()
        # Progress lines a slow reader did not take are coalesced (latest wins): every
        # other line is printed exactly as documented, in order.
        assert [x for x in lines if not x.startswith("progress")] == \
            [x for x in expected if not x.startswith("progress")]
        progress = [x for x in lines if x.startswith("progress")]
        assert progress[-1] == "progress: 5 / 5" and set(progress) <= set(expected)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(5)
        redis.Redis.from_url(url).flushdb()


def test_celery_retry_starts_a_new_run(proj: Any, start_celery: Any) -> None:
    start_celery(pool="prefork")
    handle = proj.flaky.start()
    assert handle.result(timeout=30) == 1
    assert handle.async_result.get(timeout=10) == 1
    events = handle.events_nowait()
    assert EventKind.RETRY in [e.kind for e in events if e.run == 1]
    final = events[-1]
    assert final.kind == EventKind.SUCCEEDED and final.run == 2
    assert [e.message for e in events if e.kind == EventKind.PROGRESS][-1] == "attempt 1"


def test_celery_revoke_of_a_queued_interactive_task(proj: Any, start_celery: Any) -> None:
    from interactive_tasks.errors import TaskRevoked

    start_celery(pool="prefork", concurrency=1)
    blocker = proj.looper.start(100000, 0.02)
    wait_for(lambda: blocker.progress is not None, 20, message="the only child busy")
    queued = proj.looper.start(10, 0.01)
    queued.async_result.revoke()  # Celery's revoke, through Celery's remote control
    blocker.cancel(grace=10)
    assert blocker.wait(timeout=15) is TaskState.CANCELLED
    with pytest.raises(TaskRevoked):
        queued.result(timeout=20)
    assert queued.async_result.state == "REVOKED"
    assert [e.kind for e in queued.events_nowait()] == [EventKind.REVOKED]


@pytest.mark.parametrize("celery_env", ["amqp"], indirect=True)
def test_acks_late_task_of_a_killed_worker_runs_again_and_the_handle_follows(
        proj: Any, start_celery: Any) -> None:
    """RabbitMQ gives a dead consumer's unacknowledged message to another at once (on
    Redis Celery waits for its visibility_timeout, an hour by default)."""
    first = start_celery(pool="prefork", concurrency=1)
    handle = proj.late_looper.start(100, 0.05)
    wait_for(lambda: handle.progress is not None and handle.progress.current >= 3, 20,
             message="progress on the first worker")
    assert handle.worker == first.name
    second = start_celery(pool="prefork", concurrency=1)
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.proc.wait(10)
    assert handle.result(timeout=60) == 100
    assert handle.worker == second.name
    events = handle.events_nowait()
    assert events[-1].run == 2 and events[-1].kind == EventKind.SUCCEEDED
    assert handle.async_result.get(timeout=10) == 100


@pytest.mark.parametrize("celery_env", ["redis"], indirect=True)
def test_itask_web_on_a_celery_app(proj: Any, start_celery: Any, celery_env: CeleryEnv,
                                   tmp_path: Path) -> None:
    """``itask web -A proj`` with a Celery project: the task table, the metrics and a
    pause from the dashboard reach the Celery worker's task."""
    import json
    import socket
    import urllib.request

    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    worker = start_celery(pool="prefork")
    handle = proj.looper.start(100000, 0.02)
    wait_for(lambda: handle.progress is not None, 20, message="first progress")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = tmp_path / "web.log"
    with open(log_path, "wb") as log:
        web = subprocess.Popen([sys.executable, "-m", "interactive_tasks.cli.main", "web",
                                "-A", "tests.apps.celery_proj", "--port", str(port)],
                               env=celery_env.env(), cwd=str(ROOT), stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def get(path: str) -> Any:
        with urllib.request.urlopen(url + path, timeout=10) as resp:
            body = resp.read().decode()
            return json.loads(body) if path.startswith("/api") else body

    def listening() -> bool:
        assert web.poll() is None, log_path.read_text()[-3000:]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    try:
        wait_for(listening, 20, message="itask web to listen")
        rows = wait_for(lambda: [r for r in get("/api/tasks")["tasks"]
                                 if r.get("id") == handle.id], 15,
                        message="the Celery worker's task in the dashboard")
        assert rows[0]["worker"] == worker.name
        wait_for(lambda: 'itask_workers{status="online"} 1' in get("/metrics"), 15,
                 message="the Celery worker online in /metrics")
        token = get("/api/config")["csrf"]
        request = urllib.request.Request(
            f"{url}/api/task/{handle.id}/control", method="POST",
            data=json.dumps({"action": "pause"}).encode(),
            headers={"Content-Type": "application/json", "X-CSRF-Token": token,
                     "Cookie": f"itask_csrf={token}", "X-Itask-Key": handle.token})
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert json.loads(resp.read()) == {"ok": True}
        wait_for(lambda: handle.state is TaskState.PAUSED, 10, message="paused from the web")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(web.pid, signal.SIGTERM)
        web.wait(10)
    handle.cancel(grace=10)
    assert handle.wait(timeout=15) is TaskState.CANCELLED


@pytest.mark.parametrize("celery_env", ["redis"], indirect=True)
def test_the_operator_secret_signs_everything_and_controls_any_task(
        celery_env: CeleryEnv, start_celery: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ITASK_SECRET on both sides every message is signed and the secret's holder
    controls any task without its token; a client with another secret is not heard."""
    import tests.apps.celery_proj as module
    from interactive_tasks.celery import bridge_app
    from interactive_tasks.errors import ControlError

    monkeypatch.setenv("ITASK_SECRET", "operator-secret")
    proj = importlib.reload(module)
    start_celery(pool="prefork", extra_env={"ITASK_SECRET": "operator-secret"})
    handle = proj.looper.start(100000, 0.02)
    wait_for(lambda: handle.progress is not None, 20, message="first progress")
    operator = bridge_app(proj.app).attach(handle.id)  # no token: the secret
    assert operator.token is None and operator.state is TaskState.RUNNING
    operator.pause(wait=True, timeout=10)
    wait_for(lambda: handle.state is TaskState.PAUSED, 10, message="the starter sees it")
    operator.resume(wait=True, timeout=10)
    worker_name, token = handle.worker, handle.token
    monkeypatch.setenv("ITASK_SECRET", "someone-else")
    from interactive_tasks.app import App
    from interactive_tasks.handle import TaskHandle

    stranger_app = App("stranger", broker=REDIS_URL, namespace=celery_env.namespace)
    try:
        stranger = TaskHandle(stranger_app, handle.id, token=token)
        stranger._worker = worker_name  # as a located handle would know it
        with pytest.raises(ControlError):
            stranger.pause(timeout=2)  # its signature is wrong: the relay drops it
    finally:
        stranger_app.close()
    assert handle.state is TaskState.RUNNING
    assert operator.cancel(grace=10)
    assert handle.wait(timeout=15) is TaskState.CANCELLED
    bridge_app(proj.app).close()


def test_a_wrong_token_is_refused(proj: Any, start_celery: Any) -> None:
    from interactive_tasks.celery import bridge_app
    from interactive_tasks.errors import NotAuthorized

    start_celery(pool="prefork")
    handle = proj.looper.start(100000, 0.02)
    wait_for(lambda: handle.progress is not None, 20, message="first progress")
    wrong = bridge_app(proj.app).attach(handle.id, token="0" * 36)
    with pytest.raises(NotAuthorized):
        wrong.pause(timeout=5)
    holds_for(lambda: handle.state is TaskState.RUNNING, 0.5, message="still running")
    assert handle.cancel(grace=10)
    assert handle.wait(timeout=15) is TaskState.CANCELLED


@pytest.mark.parametrize("celery_env", ["redis"], indirect=True)
def test_bad_input_is_refused_and_the_relay_keeps_serving(
        proj: Any, start_celery: Any, celery_env: CeleryEnv) -> None:
    """Garbage on the worker's control list and on the relay's socket: one log line each,
    and the relay goes on steering tasks."""
    import re
    import socket
    import struct

    import redis

    worker = start_celery(pool="prefork")
    handle = proj.looper.start(100000, 0.02)
    wait_for(lambda: handle.progress is not None, 20, message="first progress")
    r = redis.Redis.from_url(REDIS_URL)
    r.lpush(f"{celery_env.namespace}.ctl.{worker.name}", b"garbage", b"0\xc1\xc1")
    path = re.search(r"interactive_tasks relay for \S+ on (\S+)", worker.log()).group(1)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        from interactive_tasks.codec import dumps

        begin = dumps(["begin"])  # a frame missing its fields
        sock.sendall(struct.pack(">I", len(begin)) + begin)
        wait_for(lambda: "ignored a bad frame" in worker.log(), 10,
                 message="the bad frame ignored")
        sock.sendall(struct.pack(">I", 3) + b"\xc1\xc1\xc1")  # not msgpack
        wait_for(lambda: "dropped a pool channel" in worker.log(), 10,
                 message="the malformed channel dropped")
    wait_for(lambda: "refused control message" in worker.log(), 10,
             message="the garbage control refused")
    handle.pause(wait=True, timeout=10)
    handle.resume(wait=True, timeout=10)
    assert proj.double.start(4).result(timeout=20) == 8
    handle.cancel(grace=10)
    assert handle.wait(timeout=15) is TaskState.CANCELLED
    assert "Traceback" not in worker.log()


@pytest.mark.parametrize("celery_env", ["redis"], indirect=True)
def test_the_jupyter_widget_follows_and_steers_a_celery_task(proj: Any,
                                                             start_celery: Any) -> None:
    """The widget of a ``start()`` handle (its model, driven as the comm drives it)."""
    pytest.importorskip("anywidget")
    pytest.importorskip("ipywidgets")
    from interactive_tasks import widgets

    start_celery(pool="prefork")
    handle = proj.looper.start(100000, 0.02)
    w = widgets.TaskWidget(handle)
    try:
        wait_for(lambda: w.state == "running" and (w.current or 0) >= 3, 20,
                 message="the widget showing progress")
        w._on_custom(w, {"action": "pause"}, [])  # as the comm delivers a click
        wait_for(lambda: w.state == "paused", 10, message="paused in the widget")
        assert handle.state is TaskState.PAUSED
        w._on_custom(w, {"action": "cancel"}, [])
        wait_for(lambda: w.state == "cancelled", 15, message="cancelled in the widget")
        assert not w.error
    finally:
        w.close()
    assert handle.async_result.state == "REVOKED"


@pytest.mark.parametrize("celery_env", ["redis"], indirect=True)
def test_a_flood_of_progress_is_coalesced_never_lost(proj: Any, start_celery: Any) -> None:
    start_celery(pool="prefork")
    handle = proj.chatty.start(20000)
    assert handle.result(timeout=60) == 20000
    events = handle.events_nowait()
    final = events[-1]
    # started, up to 20,000 progress (latest-wins in the pool process while the relay has
    # not read what it sent: docs/architecture.md, "Pools"), the message, the end:
    # numbered without a gap, and the handle needed no snapshot to fill one
    assert final.kind == EventKind.SUCCEEDED and final.seq <= 20003
    assert handle.progress.current == 20000 and handle.progress.seq == final.seq - 2
    assert [e.kind for e in events if e.kind != EventKind.PROGRESS] == \
        [EventKind.STARTED, EventKind.MESSAGE, EventKind.SUCCEEDED]
    assert handle._resync_deadline is None
