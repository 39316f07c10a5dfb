"""The live applications, driven in-process through a pipe input with fake sources.

Each application runs in a worker thread (prompt_toolkit gives it its own event loop); the
test types into the pipe and polls the fake source or the screen with a deadline.
"""

from __future__ import annotations

import dataclasses
import io
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from typing import Any, TextIO, TypeVar, cast

import pyte
import pytest
from prompt_toolkit.application.current import get_app_or_none
from prompt_toolkit.data_structures import Size
from prompt_toolkit.input import PipeInput, create_pipe_input
from prompt_toolkit.output import DummyOutput
from prompt_toolkit.output.vt100 import Vt100_Output

from interactive_tasks.cli.tui import run_attach, run_top
from interactive_tasks.protocol import Event, TaskSnapshot, TaskState

T = TypeVar("T")
T0 = 1_700_000_000.0
DEADLINE = 5.0


def wait_for(predicate: Callable[[], object], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@contextmanager
def in_thread(fn: Callable[[], T], pipe: PipeInput) -> Iterator[Future[T]]:
    """Run an application in a thread; if the test fails first, end it with EOF."""
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(fn)
    try:
        yield future
    finally:
        if not future.done():
            pipe.close()  # the application sees the end of its input and stops
            with suppress(Exception):
                future.exception(timeout=DEADLINE)
        pool.shutdown(wait=False)


@pytest.fixture
def pipe() -> Iterator[PipeInput]:
    with create_pipe_input() as inp:
        yield inp


class FakeAttach:
    """An :class:`AttachSource` whose task the test moves by hand."""

    def __init__(self, state: TaskState = TaskState.RUNNING) -> None:
        self._lock = threading.Lock()
        self._snap = TaskSnapshot(
            "3f2a9c1e5b7d4a0f",
            "demo.count",
            state,
            worker="w1@host",
            pid=4242,
            progress=Event("3f2a9c1e5b7d4a0f", 2, "progress", T0, {"current": 40, "total": 100}),
            started=T0,
        )
        self.commands: list[str] = []
        self.callbacks: list[Callable[[], None]] = []
        self.reads = 0

    def snapshot(self) -> TaskSnapshot:
        with self._lock:
            self.reads += 1
            return self._snap

    def rate(self) -> tuple[float | None, float | None]:
        return 2.0, 30.0

    def command(self, line: str) -> str:
        self.commands.append(line)
        if line == "pause":
            self.change(state=TaskState.PAUSED)
            return "paused 3f2a9c1e"
        return f"unknown command {line!r}"

    def subscribe_changes(self, callback: Callable[[], None]) -> None:
        self.callbacks.append(callback)

    def change(self, **changes: Any) -> None:
        with self._lock:
            self._snap = dataclasses.replace(self._snap, **changes)
        for callback in self.callbacks:
            callback()


def attach(source: FakeAttach, pipe: PipeInput, out: io.StringIO, **kw: Any) -> Callable[[], int]:
    return lambda: run_attach(
        source, input=pipe, output=DummyOutput(), file=out, clock=lambda: T0 + 65, **kw
    )


def test_attach_runs_typed_commands_and_q_detaches(pipe: PipeInput) -> None:
    source, out = FakeAttach(), io.StringIO()
    with in_thread(attach(source, pipe, out), pipe) as app:
        pipe.send_text("pause\r")
        wait_for(lambda: source.commands == ["pause"], "the pause command")
        pipe.send_text("q\r")
        assert app.result(timeout=DEADLINE) == 0
    assert source.commands == ["pause"]  # `q` detaches, it is not a command
    printed = out.getvalue()
    assert "⏸ PAUSED" in printed  # the last rendering stays in the scrollback
    assert "Detached from 3f2a9c1e; the task keeps running" in printed


@pytest.mark.parametrize("key", ["\x03", "\x04"], ids=["ctrl-c", "ctrl-d"])
def test_attach_ctrl_c_and_ctrl_d_detach(pipe: PipeInput, key: str) -> None:
    source = FakeAttach()
    with in_thread(attach(source, pipe, io.StringIO()), pipe) as app:
        wait_for(lambda: source.reads, "the first rendering")
        pipe.send_text(key)
        assert app.result(timeout=DEADLINE) == 0
    assert source.commands == []


@pytest.mark.parametrize(
    ("final", "code"),
    [
        (TaskState.FAILED, 1),
        (TaskState.REVOKED, 1),
        (TaskState.SUCCEEDED, 0),
        (TaskState.CANCELLED, 0),
    ],
)
def test_attach_exits_by_itself_on_a_final_state(
    pipe: PipeInput, final: TaskState, code: int
) -> None:
    source, out = FakeAttach(), io.StringIO()
    with in_thread(attach(source, pipe, out, refresh_interval=60), pipe) as app:
        wait_for(lambda: source.reads, "the first rendering")
        assert not app.done()
        # from another thread, as a broker consumer would
        threading.Thread(
            target=source.change,
            kwargs={
                "state": final,
                "finished": T0 + 60,
                "error": {"type": "ValueError", "message": "boom", "traceback": "Traceback\n"},
            },
        ).start()
        assert app.result(timeout=DEADLINE) == code
    printed = out.getvalue()
    assert final.value.upper() in printed
    assert "Detached" not in printed
    if final is TaskState.FAILED:
        assert "✘ ValueError: boom" in printed


def test_attach_to_a_finished_task_returns_at_once(pipe: PipeInput) -> None:
    source = FakeAttach(TaskState.FAILED)
    with in_thread(attach(source, pipe, io.StringIO()), pipe) as app:
        assert app.result(timeout=DEADLINE) == 1


def test_attach_change_callbacks_are_harmless_after_exit(pipe: PipeInput) -> None:
    source = FakeAttach()
    with in_thread(attach(source, pipe, io.StringIO()), pipe) as app:
        wait_for(lambda: source.reads, "the first rendering")
        for _ in range(1000):  # a burst of changes is folded into a few redraws
            source.change(seq=1)
        pipe.send_text("q\r")
        assert app.result(timeout=DEADLINE) == 0
    source.change(seq=2)  # the sources cannot unsubscribe; this must not raise


# -- a real vt100 screen ----------------------------------------------------------------


class Screen:
    """A terminal emulator (pyte) as the output of an application.

    It answers the application's cursor position requests through the pipe input, as a
    terminal does; without answers prompt_toolkit assumes there is no room below the
    cursor for a non-full-screen application.
    """

    encoding = "utf-8"

    def __init__(self, pipe: PipeInput, rows: int = 24, columns: int = 100) -> None:
        self.pipe = pipe
        self.size = Size(rows=rows, columns=columns)
        self.screen = pyte.Screen(columns, rows)
        self.screen.set_mode(pyte.modes.LNM)  # "\n" also returns the carriage
        self.stream = pyte.Stream(self.screen)
        self.lock = threading.Lock()

    def write(self, data: str) -> None:
        with self.lock:
            for chunk in data.split("\x1b[6n"):
                self.stream.feed(chunk)
            if "\x1b[6n" in data:
                cursor = self.screen.cursor
                self.pipe.send_text(f"\x1b[{cursor.y + 1};{cursor.x + 1}R")

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True

    def output(self) -> Vt100_Output:
        return Vt100_Output(cast(TextIO, self), lambda: self.size, term="xterm-256color")

    def text(self) -> str:
        with self.lock:
            return "\n".join(line.rstrip() for line in self.screen.display)


def test_attach_screen_shows_the_task_the_status_and_the_prompt(pipe: PipeInput) -> None:
    source, screen = FakeAttach(), Screen(pipe, rows=20, columns=80)

    def run() -> int:
        return run_attach(
            source, input=pipe, output=screen.output(), file=io.StringIO(), clock=lambda: T0 + 65
        )

    with in_thread(run, pipe) as app:
        wait_for(lambda: "▶ RUNNING" in screen.text(), "the running task on screen")
        pipe.send_text("pause\r")
        wait_for(lambda: "paused 3f2a9c1e" in screen.text(), "the command's status")
        lines = screen.text().splitlines()
        assert lines[0].startswith("╭─ demo.count 3f2a9c1e ─")
        assert lines[1].startswith("│ ⏸ PAUSED  worker w1@host  pid 4242")
        assert lines[2].endswith(" 40/100  40% │")
        status = lines.index("paused 3f2a9c1e")
        assert lines[status - 1].startswith("╰─")
        assert lines[status + 1] == ">"
        pipe.send_text("q\r")
        assert app.result(timeout=DEADLINE) == 0


# -- top --------------------------------------------------------------------------------


class FakeTop:
    def __init__(self, n: int = 3) -> None:
        self.snaps = [
            TaskSnapshot(
                f"task{i:04d}-aaaa-bbbb",
                f"demo.job{i}",
                TaskState.RUNNING,
                worker="w1@host",
                pid=100 + i,
                received=T0,
            )
            for i in range(n)
        ]
        self.controls: list[tuple[str, str]] = []
        self.callbacks: list[Callable[[], None]] = []

    def workers(self) -> list[dict[str, Any]]:
        return [
            {
                "worker": "w1@host",
                "hostname": "host",
                "pid": 99,
                "pool": "prefork",
                "concurrency": 2,
                "children": [],
                "processed": 5,
                "active": 3,
                "uptime": 10.0,
                "online": True,
            }
        ]

    def tasks(self) -> list[TaskSnapshot]:
        return list(self.snaps)

    def control(self, task_id: str, verb: str) -> str:
        self.controls.append((task_id, verb))
        return f"{verb} sent to {task_id[:8]}"

    def subscribe_changes(self, callback: Callable[[], None]) -> None:
        self.callbacks.append(callback)


def top(source: FakeTop, pipe: PipeInput, **kw: Any) -> Callable[[], int]:
    kw.setdefault("output", DummyOutput())
    return lambda: run_top(source, input=pipe, clock=lambda: T0 + 5, **kw)


def test_top_j_then_p_pauses_the_second_task(pipe: PipeInput) -> None:
    source = FakeTop()
    with in_thread(top(source, pipe), pipe) as app:
        pipe.send_text("jp")
        wait_for(lambda: source.controls, "a control verb")
        pipe.send_text("q")
        assert app.result(timeout=DEADLINE) == 0
    assert source.controls == [("task0001-aaaa-bbbb", "pause")]


def test_top_keys_move_and_clamp_the_selection(pipe: PipeInput) -> None:
    source = FakeTop()
    with in_thread(top(source, pipe), pipe) as app:
        pipe.send_text("jjjjr")  # past the end: stays on the last task
        wait_for(lambda: len(source.controls) == 1, "resume")
        pipe.send_text("\x1b[A")  # up arrow
        pipe.send_text("c")
        wait_for(lambda: len(source.controls) == 2, "cancel")
        pipe.send_text("kkkkp")
        wait_for(lambda: len(source.controls) == 3, "pause")
        pipe.send_text("\x03")
        assert app.result(timeout=DEADLINE) == 0
    assert source.controls == [
        ("task0002-aaaa-bbbb", "resume"),
        ("task0001-aaaa-bbbb", "cancel"),
        ("task0000-aaaa-bbbb", "pause"),
    ]


def test_top_enter_attaches_after_leaving(pipe: PipeInput) -> None:
    source = FakeTop()
    attached: list[tuple[str, object]] = []

    def on_attach(task_id: str) -> None:
        attached.append((task_id, get_app_or_none()))

    with in_thread(top(source, pipe, on_attach=on_attach), pipe) as app:
        pipe.send_text("j\r")
        assert app.result(timeout=DEADLINE) == 0
    assert attached == [("task0001-aaaa-bbbb", None)]  # called once the dashboard is gone
    assert source.controls == []


def test_top_a_without_on_attach_stays(pipe: PipeInput) -> None:
    source, screen = FakeTop(), Screen(pipe, rows=24, columns=100)
    with in_thread(top(source, pipe, output=screen.output()), pipe) as app:
        pipe.send_text("a")
        wait_for(lambda: "attach is not available here" in screen.text(), "the status")
        assert not app.done()
        pipe.send_text("q")
        assert app.result(timeout=DEADLINE) == 0


def test_top_screen_shows_selection_and_status(pipe: PipeInput) -> None:
    source, screen = FakeTop(), Screen(pipe, rows=24, columns=100)
    with in_thread(top(source, pipe, output=screen.output()), pipe) as app:
        wait_for(lambda: "demo.job2" in screen.text(), "the task table")
        pipe.send_text("jp")
        wait_for(lambda: "pause sent to task0001" in screen.text(), "the status line")
        lines = screen.text().splitlines()
        assert lines[0] == "itask top  1 workers  3 tasks: 3 running"
        selected = [line for line in lines if line.startswith("▶")]
        assert len(selected) == 1 and "task0001" in selected[0] and "demo.job1" in selected[0]
        help_line = next(i for i, line in enumerate(lines) if line.startswith("↑/↓ select"))
        assert lines[help_line - 1] == "pause sent to task0001"
        pipe.send_text("q")
        assert app.result(timeout=DEADLINE) == 0
