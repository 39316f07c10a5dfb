"""Interactive tasks: every behaviour, over every broker and every pool, real workers."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from interactive_tasks import (
    ControlError,
    HardPauseUnsupported,
    NotAuthorized,
    SendTimeout,
    TaskCancelled,
    TaskFinished,
    TaskState,
)
from interactive_tasks.errors import TransportError

from .conftest import POOLS, ROOT, holds_for, stream_into, wait_for
from .doc_blocks import documented


def kinds(events):
    return [e.kind for e in events]


@pytest.mark.parametrize("pool", POOLS)
def test_progress_stream_is_ordered_and_complete(tasks, start_worker, pool):
    start_worker(pool=pool)
    handle = tasks.count.start(50)
    events = list(handle.events(timeout=20))
    assert events[0].kind == "started"
    assert events[-1].kind == "succeeded" and events[-1].result == 50
    seqs = [e.seq for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    progress = [e for e in events if e.kind == "progress"]
    currents = [e.current for e in progress]
    assert currents == sorted(currents)  # coalesced maybe, never reordered
    assert currents[-1] == 50  # the last progress always arrives
    assert handle.progress.current == 50 and handle.state is TaskState.SUCCEEDED


@pytest.mark.parametrize("pool", POOLS)
def test_tasks_run_with_the_short_switch_interval(tasks, start_worker, pool):
    # A pool child's control reader waits this long for the interpreter lock behind a
    # CPU-bound task: the worker_switch_interval setting (0.5 ms), not Python's 5 ms.
    start_worker(pool=pool)
    assert tasks.app.conf.worker_switch_interval == 0.0005
    assert tasks.switch_interval.delay().result(timeout=20) == 0.0005


def test_coalesced_progress_flood_is_not_taken_for_lost_events(tasks, start_worker, caplog):
    # 20,000 progress events in a burst: the worker coalesces most of them, and each one
    # it sends says which seqs it covers, so the handle never asks for a resync snapshot.
    start_worker()
    with caplog.at_level("INFO", logger="interactive_tasks.handle"):
        handle = tasks.count.start(20_000)
        events = list(handle.events(timeout=60))
    assert events[-1].kind == "succeeded" and handle.progress.current == 20_000
    seqs = [e.seq for e in events]
    assert seqs[-1] > len(seqs), "nothing was coalesced: this test no longer tests that"
    assert not [r for r in caplog.records if r.name == "interactive_tasks.handle"]


@pytest.mark.parametrize("pool", POOLS)
def test_pause_resume_message_and_cancel(tasks, start_worker, broker, pool):
    start_worker(pool=pool)
    handle = tasks.steerable.start(100000, 0.005)
    wait_for(lambda: handle.progress and handle.progress.current >= 3, message="progress")

    handle.pause()
    wait_for(lambda: handle.state is TaskState.PAUSED, message="paused state")
    frozen = handle.progress.current
    holds_for(lambda: handle.progress.current == frozen, 0.3, message="paused progress")

    handle.resume()
    wait_for(lambda: handle.progress.current > frozen + 2, message="progress after resume")

    handle.send({"hello": 1})
    handle.send("second")
    echoes = []
    for ev in handle.events(timeout=10):
        if ev.kind == "message":
            echoes.append(ev.data)
            if len(echoes) == 2:
                break
    assert echoes == [{"echo": {"hello": 1}}, {"echo": "second"}]

    handle.cancel(grace=10)
    with pytest.raises(TaskCancelled):
        handle.result(timeout=10)
    assert handle.state is TaskState.CANCELLED
    seen = [r["what"] for r in broker.records(handle.id)]
    assert seen[0] == "start" and seen[-1] == "cancelled"
    assert [r["data"] for r in broker.records(handle.id) if r["what"] == "message"] == [
        {"hello": 1}, "second"]
    with pytest.raises(TaskFinished):
        handle.send("too late")


@pytest.mark.parametrize("pool", POOLS)
def test_send_without_waiting_keeps_order(tasks, start_worker, pool):
    # Sent before the task runs (held by the worker) and while it runs (its own queue),
    # none acknowledged: every message arrives, in the order sent.
    start_worker(pool=pool)
    handle = tasks.echo_server.start(300)
    for i in range(300):
        handle.send({"i": i}, wait=False)
    assert handle.result(timeout=30) == [{"i": i} for i in range(300)]
    echoed = [e.data for e in handle.events(timeout=10) if e.kind == "message"]
    assert echoed == [{"i": i} for i in range(300)]


def _with_send_window(tasks: Any, window: int) -> None:
    """The test app's client with another ``send_window`` (the fixture reloads the app)."""
    import dataclasses

    tasks.app.conf = dataclasses.replace(tasks.app.conf, send_window=window)


@pytest.mark.parametrize("pool", POOLS)
def test_a_sender_that_outruns_its_task_is_held_back_to_the_window(tasks, start_worker,
                                                                   pool):
    # A task that takes a message every 5 ms and a client that sends five windows' worth
    # with wait=False: send blocks whenever `window` are outstanding, so the client never
    # has more than that in flight (client, broker, worker, pool process) and cannot
    # finish before the task has read all but the last window of them.
    window, delay = 64, 0.005
    _with_send_window(tasks, window)
    start_worker(pool=pool)
    n = 5 * window
    handle = tasks.sink.start(n, delay)
    wait_for(lambda: handle.state is TaskState.RUNNING, message="the task to start")
    most, sending = stream_into(handle, n)
    out = handle.result(timeout=60)
    assert out["got"] == n and out["disorder"] is None
    assert most == window  # held at the window, never past it
    # every message but the last window (less one receipt interval) was read before the
    # last send returned, at `delay` apiece
    assert sending >= (n - window - window // 4) * delay
    wait_for(lambda: handle.outstanding < window // 4, message="the last receipts")


@pytest.mark.parametrize("pool", POOLS)
def test_a_stream_well_past_the_window_arrives_whole_and_in_order(tasks, start_worker,
                                                                    pool):
    # The default window (2048): receipts every 512 messages keep a fast reader's stream
    # flowing; a handle attached apart from the one that started the task streams too.
    start_worker(pool=pool)
    n = 6000
    started = tasks.sink.start(n)
    wait_for(lambda: started.state is TaskState.RUNNING, message="the task to start")
    handle = tasks.app.attach(started.id, started.token)
    wait_for(lambda: handle._worker is not None, message="the attached handle's worker")
    for i in range(n):
        handle.send({"i": i}, wait=False, timeout=30)
        assert handle.outstanding <= tasks.app.conf.send_window
    out = started.result(timeout=60)
    assert out == {"got": n, "disorder": None, "took": out["took"]}
    wait_for(lambda: handle.outstanding == n % 512, message="the last receipt")


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_a_burst_sent_without_waiting_then_close_leaves_no_socket_and_loses_nothing(
        tasks, start_worker):
    # On Redis the last messages' replies are still unread when the app closes: close
    # reads them, then closes every socket the app opened (none is left for the garbage
    # collector to find, and warn about, in some later test).
    import gc
    import warnings

    from .conftest import redis_sockets

    start_worker()
    before = redis_sockets()
    n = 1000
    handle = tasks.sink.start(n)
    wait_for(lambda: handle.state is TaskState.RUNNING, message="the task to start")
    for i in range(n):
        handle.send({"i": i}, wait=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        tasks.app.close()
        assert redis_sockets() <= before
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
    out = tasks.app.attach(handle.id, handle.token).result(timeout=30)
    assert out["got"] == n and out["disorder"] is None


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_a_script_that_streams_and_exits_without_closing_delivers_everything(
        tasks, start_worker, broker):
    start_worker()
    n = 1000
    handle = tasks.sink.start(n)
    wait_for(lambda: handle.state is TaskState.RUNNING, message="the task to start")
    script = (
        "import tests.apps.tasks as t\n"
        f"h = t.app.attach({handle.id!r}, {handle.token!r})\n"
        "import time\n"
        "deadline = time.monotonic() + 20\n"
        "while h._worker is None and time.monotonic() < deadline:\n"
        "    time.sleep(0.01)\n"
        f"for i in range({n}):\n"
        "    h.send({'i': i}, wait=False)\n"
    )
    out = subprocess.run([sys.executable, "-X", "dev", "-W", "error::ResourceWarning",
                          "-c", script], env=broker.env(), cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "ResourceWarning" not in out.stderr and "unclosed" not in out.stderr, out.stderr
    result = handle.result(timeout=30)
    assert result["got"] == n and result["disorder"] is None


def test_a_sender_blocked_on_a_paused_task_times_out_then_continues(tasks, start_worker):
    window = 32
    _with_send_window(tasks, window)
    start_worker()
    handle = tasks.sink.start(3 * window)
    wait_for(lambda: handle.state is TaskState.RUNNING, message="the task to start")
    handle.pause(wait=True, timeout=10)
    for i in range(window):
        handle.send({"i": i}, wait=False)
    t0 = time.monotonic()
    with pytest.raises(SendTimeout, match="send_window"):
        handle.send({"i": window}, wait=False, timeout=0.5)
    assert time.monotonic() - t0 >= 0.5
    assert handle.outstanding == window  # the refused one was not sent
    handle.resume()
    for i in range(window, 3 * window):
        handle.send({"i": i}, wait=False, timeout=30)
    assert handle.result(timeout=30)["got"] == 3 * window
    assert handle.result(timeout=30)["disorder"] is None


def test_a_sender_blocked_when_its_task_ends_gets_task_finished(tasks, start_worker):
    window = 32
    _with_send_window(tasks, window)
    start_worker()
    handle = tasks.sink.start(window // 2, 0.2)  # ends after reading half a window
    wait_for(lambda: handle.state is TaskState.RUNNING, message="the task to start")
    with pytest.raises(TaskFinished):
        for i in range(2 * window):
            handle.send({"i": i}, wait=False, timeout=30)
    assert handle.result(timeout=10)["got"] == window // 2


@pytest.mark.parametrize("pool", POOLS)
def test_ask_and_answer(tasks, start_worker, broker, pool):
    start_worker(pool=pool)
    handle = tasks.asker.start("Your name?")
    wait_for(lambda: handle.question is not None, message="the question")
    assert handle.question["prompt"] == "Your name?"
    handle.answer("Ada")
    assert handle.result(timeout=10) == "hello Ada"
    assert handle.question is None
    assert [r["data"] for r in broker.records(handle.id) if r["what"] == "answer"] == ["Ada"]
    logs = [e.text for e in handle.snapshot().events if e.kind == "log"]
    assert "hello Ada" in logs


def test_answer_without_question_is_refused(tasks, start_worker):
    start_worker()
    handle = tasks.steerable.start(100000, 0.01)
    wait_for(lambda: handle.state is TaskState.RUNNING, message="running")
    with pytest.raises(ControlError, match="no pending question"):
        handle.answer("nobody asked")
    handle.cancel(grace=0)
    with pytest.raises(TaskCancelled):
        handle.result(timeout=10)


@pytest.mark.parametrize("pool", POOLS)
def test_control_before_start(tasks, start_worker, broker, pool):
    """Cancel before start: never runs. Pause before start: starts paused. Messages in order."""
    w = start_worker(pool=pool, concurrency=1)
    blocker = tasks.sleep_then.delay(1.5, "done")
    wait_for(lambda: tasks.app.inspect("active", timeout=0.5, expect=1)[0]["data"],
             message="the blocker to run")

    never = tasks.steerable.start(5)
    paused = tasks.steerable.start(3, 0.01)
    never.cancel()
    paused.pause()
    paused.send("m1")
    paused.send("m2")
    assert blocker.result(timeout=20) == "done"
    with pytest.raises(TaskCancelled):
        never.result(timeout=10)
    assert broker.records(never.id) == []  # it never ran
    wait_for(lambda: paused.state is TaskState.PAUSED, message="started paused")
    assert paused.progress is None  # paused before its first step
    paused.resume()
    result = paused.result(timeout=20)
    assert result["received"] == ["m1", "m2"]
    assert w.proc.poll() is None


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_forced_cancel_of_task_that_never_checks(tasks, start_worker, broker, pool):
    w = start_worker(pool=pool, concurrency=1)
    handle = tasks.spin.start(120)
    wait_for(lambda: broker.records(handle.id), message="spin to start")
    started = time.monotonic()
    handle.cancel(grace=0.2)
    with pytest.raises(TaskCancelled):
        handle.result(timeout=15)
    assert time.monotonic() - started < 10
    assert handle.state is TaskState.CANCELLED
    # the pool still serves
    assert tasks.add.delay(1, 1).result(timeout=20) == 2
    if pool == "prefork":
        assert "SIGTERM" in w.log()


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_forced_cancel_ends_with_sigkill_when_sigterm_is_ignored(tasks, start_worker, broker):
    """The last stage of the cancel ladder: SIGKILL one second after the SIGTERM."""
    w = start_worker(pool="prefork", concurrency=1)
    handle = tasks.sleeper.start(120, True)
    wait_for(lambda: broker.records(handle.id), message="the sleeper to start")
    # The task can write its record before the handle has read its `started` event.
    pid = wait_for(lambda: handle.pid, message="the handle to know the task's process")
    handle.cancel(grace=0)
    with pytest.raises(TaskCancelled):
        handle.result(timeout=20)
    assert handle.snapshot().events[-1].fields.get("forced") is True
    log = w.log()
    assert f"SIGTERM to pid {pid}" in log and f"SIGKILL to pid {pid}" in log
    assert f"task {handle.id} cancelled: killed by SIGKILL" in log
    assert tasks.add.delay(1, 1).result(timeout=20) == 2  # a new pool process serves


def test_hard_pause_freezes_only_that_child(tasks, start_worker, tmp_path: Path):
    start_worker(pool="prefork", concurrency=2)
    beat = tmp_path / "beat"
    handle = tasks.spin_reporting.start(str(beat), 60)
    wait_for(lambda: beat.exists() and beat.read_text(), message="spinning")
    handle.pause(hard=True)
    wait_for(lambda: handle.state is TaskState.PAUSED, message="hard paused")
    stat = Path(f"/proc/{handle.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    assert stat in ("T", "t")
    # the sibling child keeps working while this one is frozen
    assert tasks.add.delay(2, 2).result(timeout=10) == 4
    value = beat.read_text()
    holds_for(lambda: beat.read_text() == value, 0.3, message="frozen counter")
    handle.resume()
    wait_for(lambda: beat.read_text() != value, message="running again")
    handle.cancel(grace=0)
    with pytest.raises(TaskCancelled):
        handle.result(timeout=10)


def test_no_progress_between_a_hard_pause_and_its_resume(tasks, start_worker):
    """A task emitting progress flat out is hard-paused and resumed again and again: what
    it wrote before it stopped reaches the stream before ``paused``, never after it."""
    start_worker(pool="prefork", concurrency=1)
    handle = tasks.steerable.start(10_000_000, 0)
    wait_for(lambda: handle.progress is not None, message="progress flowing")
    for _ in range(10):
        handle.pause(hard=True, wait=True, timeout=10)
        handle.resume(wait=True, timeout=10)
    handle.cancel(grace=0)
    with pytest.raises(TaskCancelled):
        handle.result(timeout=10)
    events = list(handle.events(timeout=10))
    kinds = [e.kind for e in events]
    pauses = [i for i, kind in enumerate(kinds) if kind == "paused"]
    assert len(pauses) == 10
    for i in pauses:
        assert kinds[i + 1] == "resumed", kinds[i - 2:i + 3]
        # nor later: progress the child made before it stopped, held back in the slot
        # while the worker was behind (BlockingChannel.send_progress), is dropped
        stale = [e for e in events[i:] if e.kind == "progress" and e.ts < events[i].ts]
        assert not stale, (events[i], stale[:3])


def test_progress_held_in_the_slot_at_a_hard_pause_never_follows_paused(
        tasks, start_worker, tmp_path: Path):
    """A progress event the slot held back (the worker was behind) when the hard pause
    stopped it was made before ``paused``: it is dropped, not delivered after it."""
    start_worker(pool="prefork", concurrency=1)
    beat = tmp_path / "beat"
    handle = tasks.holds_progress.start(str(beat))
    wait_for(lambda: beat.exists() and beat.read_text() == "held", message="progress held")
    handle.pause(hard=True, wait=True, timeout=10)
    handle.resume(wait=True, timeout=10)
    handle.send("go")
    assert handle.result(timeout=10) == "done"
    events = list(handle.events(timeout=10))
    kinds = [e.kind for e in events]
    paused = kinds.index("paused")
    assert kinds[paused:] == ["paused", "resumed", "message", "succeeded"], kinds
    assert [e.current for e in events if e.kind == "progress"] == [1]
    assert handle.progress.current == 1


@pytest.mark.parametrize("pool", ["threads", "solo"])
def test_hard_pause_is_a_clear_error_outside_prefork(tasks, start_worker, pool):
    start_worker(pool=pool)
    handle = tasks.steerable.start(100000, 0.01)
    wait_for(lambda: handle.state is TaskState.RUNNING, message="running")
    with pytest.raises(HardPauseUnsupported, match="prefork"):
        handle.pause(hard=True)
    handle.cancel(grace=0)
    with pytest.raises(TaskCancelled):
        handle.result(timeout=10)


def test_attach_from_second_process_snapshot_then_tail(tasks, start_worker, broker):
    start_worker()
    handle = tasks.asker.start("Who?")
    wait_for(lambda: handle.question is not None, message="question")
    # Another process attaches late, sees the pending question, and answers it.
    code = (
        "import tests.apps.tasks as t, sys\n"
        "h = t.app.attach(sys.argv[1], token=sys.argv[2])\n"
        "assert h.question and h.question['prompt'] == 'Who?', h.question\n"
        "h.answer('Grace')\n"
        "print(h.result(timeout=10))\n"
        "seqs = [e.seq for e in h.snapshot().events]\n"
        "assert seqs == sorted(set(seqs)), seqs\n"
    )
    out = subprocess.run([sys.executable, "-c", code, handle.id, handle.token],
                         env=broker.env(), cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "hello Grace"
    assert handle.result(timeout=10) == "hello Grace"


def test_a_verb_broadcast_before_any_worker_listens_reaches_the_task(tasks, start_worker):
    """A broadcast is not stored: one sent while no worker listens (none started yet, one
    starting or reconnecting) is lost, so the client sends it again until one answers."""
    handle = tasks.steerable.start(50, 0.02)
    sent: list[Any] = []
    sender = threading.Thread(target=lambda: sent.append(handle.send("x", timeout=20)))
    sender.start()
    start_worker()
    sender.join(25)
    assert sent == [None]  # acknowledged, not ControlError
    events = list(handle.events(timeout=20))
    assert [e.data for e in events if e.kind == "message"] == [{"echo": "x"}]


def test_many_watchers_each_get_the_full_stream(tasks, start_worker):
    start_worker()
    handle = tasks.steerable.start(100, 0.02)
    handle.send("x")  # before the others attach: they get it from the snapshot's history
    other = tasks.app.attach(handle.id)
    third = tasks.app.attach(handle.id)
    a = list(handle.events(timeout=20))
    b = list(other.events(timeout=20))
    c = list(third.events(timeout=20))
    for events in (a, b, c):
        assert events[-1].kind == "succeeded"
        assert [e.data for e in events if e.kind == "message"] == [{"echo": "x"}]


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_prints_and_logging_become_log_events(tasks, start_worker, pool):
    start_worker(pool=pool)
    handle = tasks.logs.start()
    events = list(handle.events(timeout=20))
    texts = [(e.level, e.text) for e in events if e.kind == "log"]
    assert ("info", "printed line") in texts
    assert ("warning", "user.code: logged warning") in texts


def test_class_form_task_streams(tasks, start_worker):
    start_worker()
    handle = tasks.deploy.start("staging")
    events = list(handle.events(timeout=20))
    assert [e.message for e in events if e.kind == "progress"][-1] == "done"
    assert events[-1].result == "deployed staging"


def test_control_needs_the_token(tasks, start_worker, broker):
    if broker.name == "embedded":
        pytest.skip("the embedded broker gives the user's own processes operator rights")
    start_worker(concurrency=2)
    a = tasks.steerable.start(100000, 0.01)
    b = tasks.steerable.start(100000, 0.01)
    wait_for(lambda: a.state is TaskState.RUNNING and b.state is TaskState.RUNNING,
             message="both running")
    anonymous = tasks.app.attach(a.id)
    with pytest.raises(NotAuthorized):
        anonymous.pause()
    wrong = tasks.app.attach(a.id, token=b.token)
    with pytest.raises(NotAuthorized):
        wrong.cancel()
    assert a.state is TaskState.RUNNING
    a.cancel(grace=0)
    b.cancel(grace=0)
    for h in (a, b):
        with pytest.raises(TaskCancelled):
            h.result(timeout=10)


#: the user another user's process runs as (``nobody``)
FOREIGN_UID = 65534


def run_as_another_user(fn: Callable[[], Any], home: Path) -> dict[str, Any]:
    """``fn()`` in a forked child running as :data:`FOREIGN_UID` with ``ITASK_HOME=home``:
    ``{"ok": value}`` or ``{"error": "Type: message"}``.

    Forked, not executed: the interpreter lives where other users cannot reach it.
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read)
        try:
            os.setgroups([])
            os.setgid(FOREIGN_UID)
            os.setuid(FOREIGN_UID)
            os.environ["ITASK_HOME"] = str(home)
            out: dict[str, Any] = {"ok": fn()}
        except BaseException as exc:
            out = {"error": f"{type(exc).__name__}: {exc}"}
        os.write(write, json.dumps(out, default=repr).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as fh:
        data = fh.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def _entries(roots: list[Path]) -> list[Path]:
    """``roots`` and everything under them (entries that vanish meanwhile are skipped)."""
    found = []
    for root in roots:
        found.append(root)
        if root.is_dir():
            for directory, dirs, files in os.walk(root):
                found += [Path(directory, name) for name in dirs + files]
    return found


def open_to_others(roots: list[Path]) -> list[str]:
    """Entries under ``roots`` whose mode grants anything to group or others."""
    opened = []
    for path in _entries(roots):
        with contextlib.suppress(FileNotFoundError):
            if path.lstat().st_mode & 0o077:
                opened.append(str(path))
    return opened


def open_up(roots: list[Path]) -> None:
    """``chmod -R a+rwX``: what an administrator sharing the directory would do."""
    for path in _entries(roots):
        with contextlib.suppress(FileNotFoundError):
            path.chmod(0o777 if path.is_dir() else 0o666)


def foreign_submit_and_pause(task_id: str, token: str) -> dict[str, Any]:
    """What another user's process gets when it submits a task and, with the task's token,
    runs ``itask pause`` (its own app: its own secret, none in memory)."""
    import tests.apps.tasks as tasks_module
    from interactive_tasks.cli.main import main

    app = importlib.reload(tasks_module).app
    try:
        app.send_task("tests.apps.tasks.add", (1, 2))
        submitted = "accepted"
    except TransportError as exc:
        submitted = str(exc)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["pause", task_id, "--token", token, "-A", "tests.apps.tasks"])
    return {"submit": submitted, "pause": [code, err.getvalue().strip().splitlines()]}


@pytest.mark.parametrize("broker", ["embedded"], indirect=True)
def test_embedded_broker_refuses_another_users_process(broker, start_worker, monkeypatch,
                                                       request):
    """On the embedded broker a token never meets another user's process: the broker's and
    result store's directories are 0700 and their files 0600, so the system refuses that
    process (one line: permission denied) before it can send anything, token or not; and
    with the directories opened to everybody, the worker refuses what it signed with its own
    user's secret."""
    if os.geteuid() != 0:
        pytest.skip("running a process as another user needs root")
    # under /tmp itself: the test's tmp_path lies in a directory only root may enter, which
    # would refuse the other user whatever the broker's own modes are
    shared = Path(tempfile.mkdtemp(prefix="itask-shared-"))
    shared.chmod(0o755)
    foreign_home = shared / "other-user-home"
    foreign_home.mkdir()
    os.chown(foreign_home, FOREIGN_UID, FOREIGN_UID)
    broker.url = f"embedded://{shared / 'broker'}"
    broker.apply(monkeypatch)
    tasks = request.getfixturevalue("tasks")
    w = start_worker(concurrency=1)
    try:
        handle = tasks.steerable.start(100000, 0.01)
        wait_for(lambda: handle.state is TaskState.RUNNING, message="running")
        store = shared / "broker-results" / broker.namespace
        assert open_to_others([shared / "broker", store.parent, broker.home / "secret"]) == []

        got = run_as_another_user(lambda: foreign_submit_and_pause(handle.id, handle.token),
                                  foreign_home)
        assert "ok" in got, got
        submitted = got["ok"]["submit"]
        assert "cannot reach the broker" in submitted and "Permission denied" in submitted
        code, err = got["ok"]["pause"]
        assert code != 0 and len(err) == 1, err
        assert str(store) in err[0] and "Permission denied" in err[0], err
        assert handle.state is TaskState.RUNNING  # nothing reached the task

        # Opened to everybody on purpose, the directory still refuses the other user: its
        # process signs with its own user's secret, checked before any token.
        open_up([shared / "broker", store.parent])
        got = run_as_another_user(lambda: foreign_submit_and_pause(handle.id, handle.token),
                                  foreign_home)
        assert got["ok"]["submit"] == "accepted", got  # the files took it ...
        wait_for(lambda: "rejected message from" in w.log(), message="the task refused")
        assert "the sender lacks the app's secret" in w.log()  # ... the worker did not
        code, err = got["ok"]["pause"]
        assert code != 0 and "no task" in err[-1], err
        wait_for(lambda: "refused control message: control message is unsigned or its "
                         "signature is wrong" in w.log(), message="the control refused")
        assert handle.state is TaskState.RUNNING
        assert "paused" not in kinds(handle.snapshot().events)
        handle.pause(wait=True, timeout=10)  # its own user's process controls it
        assert handle.cancel(grace=0) and handle.wait(10) is TaskState.CANCELLED
    finally:
        w.stop()
        tasks.app.close()  # its inbox would come back in the removed directory
        shutil.rmtree(shared, ignore_errors=True)


def test_await_handle_and_async_events(tasks, start_worker):
    import asyncio

    start_worker()

    async def main():
        handle = tasks.count.start(20)
        kinds_seen = [ev.kind async for ev in handle.aevents(timeout=20)]
        again = tasks.count.start(5)
        return kinds_seen, await again

    seen, value = asyncio.run(main())
    assert seen[0] == "started" and seen[-1] == "succeeded"
    assert value == 5


def test_time_limit_excludes_paused_time(tasks, start_worker):
    start_worker()
    ok = tasks.limited.start(0.6)
    wait_for(lambda: ok.state is TaskState.RUNNING, message="running")
    ok.pause()
    wait_for(lambda: ok.state is TaskState.PAUSED, message="paused")
    # paused for longer than the 1 s limit: it must not count
    holds_for(lambda: ok.state is TaskState.PAUSED, 1.0, message="paused")
    ok.resume()
    assert ok.result(timeout=20) == "finished"

    over = tasks.limited.start(5)
    with pytest.raises(Exception) as info:
        over.result(timeout=20)
    assert "TimeLimitExceeded" in str(info.value)


def check_async_def_task(tasks) -> None:
    """An ``async def`` task awaits progress, a message and an answer, and returns."""
    handle = tasks.async_steps.start(30)
    wait_for(lambda: handle.progress is not None, message="progress")
    handle.send("ping")
    wait_for(lambda: handle.question is not None, 20, message="the question")
    handle.answer("Ada")
    result = handle.result(timeout=20)
    assert result["answer"] == "Ada"
    assert result["got"] == ["ping"]
    assert handle.progress.current == 30


@pytest.mark.parametrize("pool", POOLS)
def test_async_def_task(tasks, start_worker, pool):
    start_worker(pool=pool)
    check_async_def_task(tasks)


def test_pause_and_resume_can_wait_for_the_task(tasks, start_worker, broker):
    """``pause(wait=True)`` returns once the task is paused, not when the worker took the
    request (the task checks only every 0.3 s here, so the plain ack comes well before)."""
    start_worker()
    handle = tasks.steerable.start(100000, 0.3)
    wait_for(lambda: handle.progress is not None, message="progress")
    handle.pause(wait=True, timeout=10)
    assert handle.state is TaskState.PAUSED  # no polling: it is paused on return
    frozen = handle.progress.current
    holds_for(lambda: handle.progress.current == frozen, 0.7, message="paused progress")
    handle.resume(wait=True, timeout=10)
    assert handle.state is TaskState.RUNNING
    wait_for(lambda: handle.progress.current > frozen, message="progress after resume")

    # a checkpoint too far away: TaskTimeout says why
    slow = tasks.steerable.start(100000, 30)
    wait_for(lambda: slow.progress is not None, message="slow task running")
    with pytest.raises(TimeoutError, match="next checkpoint") as info:
        slow.pause(wait=True, timeout=0.5)
    assert documented("TaskTimeout: task 6f1c… did not pause").match(
        f"TaskTimeout: {info.value}"), info.value
    assert slow.cancel(grace=0) is True
    # a task that ends before its next checkpoint never pauses
    last = tasks.count.start(1, 1.0)
    wait_for(lambda: last.progress is not None, message="the last step")
    with pytest.raises(TaskFinished, match=r"ended \(succeeded\) before it could pause") as end:
        last.pause(wait=True, timeout=20)
    assert documented("TaskFinished: task 6f1c… ended").match(f"TaskFinished: {end.value}")
    for h in (handle, slow):
        h.cancel(grace=0)


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_hard_pause_wait_of_a_plain_task_follows_its_events(tasks, start_worker):
    # delay() of a plain task delivers only the final event to its handle: the wait
    # follows the task through an attached handle instead
    start_worker()
    handle = tasks.sleep_then.delay(3, "woke")
    wait_for(lambda: any(t["id"] == handle.id for r in tasks.app.inspect("active")
                         for t in r["data"]), message="the task running")
    handle.pause(hard=True, wait=True, timeout=10)
    assert handle._follower().state is TaskState.PAUSED
    handle.resume(wait=True, timeout=10)
    assert handle.result(timeout=20) == "woke"


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_cancel_says_whether_it_was_accepted(tasks, start_worker):
    from interactive_tasks import TaskHandle

    start_worker()
    running = tasks.steerable.start(100000, 0.01)
    assert running.cancel(grace=0) is True
    with pytest.raises(TaskCancelled):
        running.result(timeout=20)
    assert running.cancel() is False  # ended: no exception, like Future.cancel()
    with pytest.raises(TaskFinished):
        running.pause()  # the other verbs still say it ended

    done = tasks.steerable.start(1, 0)
    assert done.result(timeout=20)["n"] == 1
    # a handle that has not heard of the end yet: the worker says so, cancel says False
    stale = TaskHandle(tasks.app, done.id, token=done.token, watch=False)
    assert stale.state is TaskState.PENDING
    assert stale.cancel() is False
    with pytest.raises(TaskFinished):
        stale.send("too late")
