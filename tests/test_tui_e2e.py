"""``itask attach`` and ``itask top`` in a real terminal (tmux) against a real worker.

Each scenario types into the UI like a person would and checks both the screen and the
task's own record of what it received. tmux runs on a private socket, never touching any
other tmux server.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from interactive_tasks import TaskState

from .conftest import IN_CI, ROOT, BrokerEnv, wait_for

pytestmark = pytest.mark.parametrize("broker", ["redis"], indirect=True)


class Tmux:
    def __init__(self, env: dict[str, str], width: int = 110, height: int = 34) -> None:
        self.socket = f"it-test-{uuid.uuid4().hex[:8]}"
        self.env = env
        self.width, self.height = width, height

    def _tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", *args],
                              capture_output=True, text=True, timeout=10).stdout

    def start(self, command: list[str]) -> None:
        env_prefix = ["env", *(f"{k}={v}" for k, v in self.env.items()
                               if k.startswith(("ITASK_", "PYTHONPATH"))),
                      "TERM=xterm-256color"]
        line = " ".join(_quote(a) for a in [*env_prefix, *command])
        self._tmux("new-session", "-d", "-s", "t", "-x", str(self.width), "-y",
                   str(self.height), f"cd {_quote(str(ROOT))} && {line}; sleep 600")

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "t")

    def type(self, text: str) -> None:
        self._tmux("send-keys", "-t", "t", "-l", text)
        self._tmux("send-keys", "-t", "t", "Enter")

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "t", *keys)

    def wait_screen(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        def found() -> re.Match[str] | None:
            return re.search(pattern, self.screen())

        try:
            return wait_for(found, timeout, interval=0.1, message=f"screen to show {pattern!r}")
        except AssertionError:
            raise AssertionError(f"{pattern!r} not on screen:\n{self.screen()}") from None

    def pane_pid(self) -> int:
        """The pid of the shell running the started command."""
        return int(self._tmux("display-message", "-p", "-t", "t", "#{pane_pid}"))

    def kill(self) -> None:
        self._tmux("kill-server")


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


@pytest.fixture
def tmux(broker: BrokerEnv) -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        if IN_CI:
            pytest.fail("tmux is missing (.ci/run installs it)")
        pytest.skip("tmux is not installed")
    t = Tmux(broker.env())
    yield t
    t.kill()


def itask(*args: str) -> list[str]:
    return [sys.executable, "-m", "interactive_tasks.cli.main", *args, "-A", "tests.apps.tasks"]


def wait_state(handle, state: TaskState, tmux: Tmux, timeout: float = 15.0) -> None:
    """Wait for the task's state; on timeout show the screen (what the user saw)."""
    try:
        wait_for(lambda: handle.state is state, timeout, message=f"state {state.value}")
    except AssertionError:
        raise AssertionError(f"task not {state.value}; screen:\n{tmux.screen()}") from None


def progress_on(screen: str) -> int:
    found = re.findall(r"(\d+)/(\d+)\s+\d+%", screen)
    return int(found[-1][0]) if found else -1


def test_attach_pause_resume_message_cancel(tasks, start_worker, tmux, broker):
    start_worker()
    handle = tasks.steerable.start(100000, 0.02)
    wait_for(lambda: handle.state is TaskState.RUNNING, message="running")
    tmux.start(itask("attach", handle.id, "--token", handle.token))
    tmux.wait_screen(r"RUNNING")
    first = progress_on(tmux.wait_screen(r"\d+/100000").string)
    wait_for(lambda: progress_on(tmux.screen()) > first, message="visible progress")

    tmux.type("pause")
    tmux.wait_screen(r"PAUSED")
    frozen = progress_on(tmux.screen())
    wait_for(lambda: handle.state is TaskState.PAUSED, message="paused")
    assert progress_on(tmux.screen()) == frozen

    tmux.type("resume")
    tmux.wait_screen(r"RUNNING")
    wait_for(lambda: progress_on(tmux.screen()) > frozen, message="progress after resume")

    tmux.type("hello there")
    tmux.wait_screen(r"'echo': 'hello there'")
    tmux.type("cancel")
    tmux.wait_screen(r"CANCELLED")
    assert handle.wait(15) is TaskState.CANCELLED
    seen = broker.records(handle.id)
    assert [r["data"] for r in seen if r["what"] == "message"] == ["hello there"]
    assert seen[-1]["what"] == "cancelled"


def test_attach_answers_a_question(tasks, start_worker, tmux, broker):
    start_worker()
    handle = tasks.asker.start("Your name?")
    wait_for(lambda: handle.question is not None, message="question")
    tmux.start(itask("attach", handle.id, "--token", handle.token))
    tmux.wait_screen(r"Your name\?")
    tmux.type("answer Ada")
    tmux.wait_screen(r"SUCCEEDED")
    tmux.wait_screen(r"hello Ada")
    tmux.wait_screen(r"answer +'Ada'")  # the log line shows the answer the task got
    assert handle.result(10) == "hello Ada"
    assert [r["data"] for r in broker.records(handle.id) if r["what"] == "answer"] == ["Ada"]


@pytest.mark.parametrize("leave", ["q", "SIGTERM"])
def test_leaving_itask_demo_stops_its_worker_and_says_so(tmux, leave, tmp_path):
    """``itask demo`` owns its worker: leaving the attach view (q, or SIGTERM as Ctrl-C)
    says the task ends, cancels it, stops the worker and deletes the worker's log."""
    from .test_examples import alive, children

    tmux.start(["env", f"TMPDIR={tmp_path}", sys.executable, "-m",
                "interactive_tasks.cli.main", "demo"])
    tmux.wait_screen(r"RUNNING")
    [demo] = wait_for(lambda: children(tmux.pane_pid()), message="the demo process")
    [worker] = children(demo)
    log = tmp_path / f"itask-demo-{demo}.log"
    assert log.exists()
    try:
        if leave == "q":
            tmux.type("q")
        else:
            os.kill(demo, signal.SIGTERM)
        tmux.wait_screen(r"stopping the demo worker, and the task ends with it")
        assert "the task keeps running" not in tmux.screen()
        wait_for(lambda: not alive(demo) and not alive(worker), 30,
                 message="the demo and its worker to end")
        assert not log.exists(), tmux.screen() + log.read_text()
        task_id = re.search(r"Started task ([0-9a-f-]+)", tmux.screen())
        assert task_id is not None
        out = subprocess.run([sys.executable, "-m", "interactive_tasks.cli.main", "result",
                              task_id.group(1)], env=tmux.env, cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
        assert "cancelled" in out.stdout, out.stdout + out.stderr
    finally:
        if alive(worker):  # its own session: all of it
            os.killpg(worker, signal.SIGKILL)


def test_top_pauses_resumes_and_cancels_the_selected_task(tasks, start_worker, tmux, broker):
    broker.extra["ITASK_SECRET"] = "operator-secret"  # top steers any task as an operator
    os.environ["ITASK_SECRET"] = "operator-secret"
    try:
        tasks.app.configure(secret="operator-secret")
        w = start_worker(extra_args=["-E"])
        handle = tasks.steerable.start(100000, 0.02)
        wait_for(lambda: handle.state is TaskState.RUNNING, message="running")
        tmux.env = broker.env()
        tmux.start(itask("top"))
        tmux.wait_screen(re.escape(w.name))
        # the task's row in the table (its id also shows in the worker panel earlier)
        tmux.wait_screen(handle.id[:8] + r"\s+tests\.apps\.tasks\.steerable")
        tmux.keys("p")
        wait_state(handle, TaskState.PAUSED, tmux)
        tmux.wait_screen(r"paused")
        tmux.keys("r")
        wait_state(handle, TaskState.RUNNING, tmux)
        tmux.keys("c")
        assert handle.wait(15) is TaskState.CANCELLED
        assert broker.records(handle.id)[-1]["what"] == "cancelled"
        tmux.keys("q")
    finally:
        os.environ.pop("ITASK_SECRET", None)


def test_render_screenshots_for_docs(tasks, start_worker, tmux, tmp_path: Path):
    """Keeps docs/attach.png and docs/top.png reproducible: the text they are made from."""
    start_worker()
    handle = tasks.steerable.start(100000, 0.02)
    wait_for(lambda: handle.progress is not None and handle.progress.current > 30,
             message="progress")
    tmux.start(itask("attach", handle.id, "--token", handle.token))
    screen = tmux.wait_screen(r"\d+/100000").string
    out = ROOT / "test-artifacts"
    out.mkdir(exist_ok=True)
    (out / "attach.txt").write_text(screen)
    handle.cancel(grace=0)
    assert handle.wait(15) is TaskState.CANCELLED


def _selected_id(screen: str) -> str:
    found = re.search(r"▶\s+([0-9a-f]{8})\s", screen)
    assert found, f"no selected row:\n{screen}"
    return found.group(1)


def test_top_with_1000_greenlets_fits_one_screen_and_keeps_up(tasks, start_worker, broker):
    """``itask top`` against a gevent worker running 1,000 interactive tasks (each with 4
    progress events a second): the greenlets are one summary row, so the worker and the
    task table fit on one 45-line screen; the panes scroll on their own; a key steers the
    selected task and attaches to it."""
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    broker.extra["ITASK_SECRET"] = "operator-secret"  # top steers any task as an operator
    os.environ["ITASK_SECRET"] = "operator-secret"
    tmux = Tmux(broker.env(), width=120, height=45)
    w = None
    try:
        tasks.app.configure(secret="operator-secret")
        w = start_worker(pool="gevent", concurrency=1000, extra_args=["-E"])
        handles = [tasks.steerable.start(600, 0.25) for _ in range(1000)]
        by_prefix = {h.id[:8]: h for h in handles}
        tmux.start(itask("top"))
        tmux.wait_screen(re.escape(w.name) + r".*gevent, 1000 greenlets", timeout=60)
        tmux.wait_screen(r"└ 1000 greenlets\s+1000 busy", timeout=90)
        screen = tmux.wait_screen(r"tasks 1-\d+ of 1000", timeout=30).string
        lines = screen.rstrip("\n").splitlines()
        assert len(lines) <= 45
        assert any(re.match(r"\s*ID\s+TASK", line) for line in lines), screen
        shown = re.findall(r"([0-9a-f]{8})\s+tests\.apps\.tasks\.steerable", screen)
        assert len(shown) >= 15, screen  # the task table has most of the screen
        assert "Tab pane" in lines[-1]

        # keeps up: the selected task's progress moves on screen (1 % per 1.5 s)
        first = _selected_id(screen)

        def percent() -> int:
            found = re.search(r"▶\s+" + first + r".*?(\d+)%", tmux.screen())
            return int(found.group(1)) if found else -1

        wait_for(lambda: percent() >= 0, 20, message="the selected row")
        before = percent()
        wait_for(lambda: percent() >= before + 2, 30,
                 message="the selected row's progress to move on screen")

        # the task pane: the selection moves, and c cancels the selected task
        tmux.keys("Down", "Down")
        tmux.wait_screen(r"▶\s+(?!" + first + r")[0-9a-f]{8}")
        target = by_prefix[_selected_id(tmux.screen())]
        tmux.keys("c")
        assert target.wait(30) is TaskState.CANCELLED
        assert broker.records(target.id)[-1]["what"] == "cancelled"

        # the worker pane: expanded, it scrolls on its own, the task selection stays
        selected = _selected_id(tmux.screen())
        tmux.keys("s")
        tmux.wait_screen(r"worker rows 1-\d+ of 1001")
        tmux.keys("Tab", "Down", "Down", "Down")
        tmux.wait_screen(r"worker rows 4-\d+ of 1001")
        assert _selected_id(tmux.screen()) == selected
        tmux.keys("Tab", "s")
        tmux.wait_screen(r"└ 1000 greenlets")

        # a attaches to the selected task
        tmux.keys("a")
        tmux.wait_screen(r"\d+/600")
        tmux.wait_screen(re.escape(by_prefix[selected].id[:8]))
    finally:
        tmux.kill()
        os.environ.pop("ITASK_SECRET", None)
        if w is not None:  # 999 tasks of 150 s each: a warm shutdown would wait them out
            w.signal(signal.SIGKILL)
