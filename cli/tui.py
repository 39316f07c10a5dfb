"""Live terminal applications: ``itask attach`` and ``itask top``.

Each is one prompt_toolkit :class:`~prompt_toolkit.application.Application` that owns the
terminal and shows the pure renderings of :mod:`.render` (rich → ANSI → prompt_toolkit).
They read from small provider interfaces, :class:`AttachSource` and :class:`TopSource`, so
they run against a fake in tests and against a broker in the CLI.

Threading: sources call the ``subscribe_changes`` callback from any thread; the callback
only schedules ``app.invalidate()`` on the application's loop (at most one pending call,
and the application redraws at most 20 times a second). Commands and control verbs, which
may wait on the network, run one at a time in a worker thread so the screen keeps updating.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TextIO

from prompt_toolkit.application import Application
from prompt_toolkit.filters import Condition
from prompt_toolkit.formatted_text import ANSI, FormattedText
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.input import Input
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.layout import ConditionalContainer, HSplit, Layout, Window
from prompt_toolkit.layout.controls import FormattedTextControl
from prompt_toolkit.output import ColorDepth, Output
from prompt_toolkit.widgets import TextArea

from interactive_tasks.cli.render import (
    TAIL_KINDS,
    render_task,
    render_top,
    short_id,
    to_ansi,
    worker_rows,
)
from interactive_tasks.protocol import TaskSnapshot, TaskState

__all__ = ["AttachSource", "TopSource", "run_attach", "run_top"]

#: Redraws per second at most, however often sources report changes.
_MIN_REDRAW_INTERVAL = 0.05


class AttachSource(Protocol):
    """What ``itask attach`` needs to know about, and do to, one task."""

    def snapshot(self) -> TaskSnapshot:
        """The current state; cheap and thread-safe."""
        ...

    def rate(self) -> tuple[float | None, float | None]:
        """``(items per second, seconds left)``, either ``None`` when unknown."""
        ...

    def command(self, line: str) -> str:
        """Execute a typed line and return a status text; never raises."""
        ...

    def subscribe_changes(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from any thread) whenever the snapshot changes."""
        ...


class TopSource(Protocol):
    """What ``itask top`` needs: workers, tasks and the task control verbs."""

    def workers(self) -> list[dict[str, Any]]: ...

    def tasks(self) -> list[TaskSnapshot]: ...

    def control(self, task_id: str, verb: str) -> str:
        """Send ``verb`` (``pause``, ``resume`` or ``cancel``); return a status text."""
        ...

    def subscribe_changes(self, callback: Callable[[], None]) -> None: ...


class _Redraw:
    """Turns change notifications from any thread into ``app.invalidate()`` on its loop.

    Notifications before the application runs or after it ended are dropped (the sources
    have no unsubscribe, so this stays harmless forever); while one is pending, further
    ones are folded into it.
    """

    def __init__(self, app: Application[Any]) -> None:
        self._app = app
        self._lock = threading.Lock()
        self._pending = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self) -> None:
        self._loop = asyncio.get_running_loop()

    def close(self) -> None:
        self._loop = None

    def notify(self) -> None:
        loop = self._loop
        if loop is None:
            return
        with self._lock:
            if self._pending:
                return
            self._pending = True
        try:
            loop.call_soon_threadsafe(self._fire)
        except RuntimeError:  # the loop closed under us: the application is over
            with self._lock:
                self._pending = False

    def _fire(self) -> None:
        with self._lock:
            self._pending = False
        if self._loop is not None:
            self._app.invalidate()


def _exit_code(state: TaskState) -> int:
    return 1 if state in (TaskState.FAILED, TaskState.REVOKED) else 0


def _fit(draw: Callable[[int | None], str], rows: int, most: int, extra: int = 0) -> str:
    """``draw(None)``, or when that is taller than ``rows`` lines, ``draw(limit)`` with the
    limit on the ``most`` variable lines that fits (``extra``: lines a limit itself adds)."""
    text = draw(None)
    excess = text.count("\n") - rows
    if excess > 0 and most > 0:
        text = draw(max(0, most - excess - extra))
    return text


def _in_thread(
    app: Application[Any],
    executor: ThreadPoolExecutor,
    fn: Callable[[], str],
    done: Callable[[str], None],
) -> None:
    """Run ``fn`` in ``executor`` and hand its text (or its error) to ``done`` on the loop."""

    async def runner() -> None:
        loop = asyncio.get_running_loop()
        try:
            text = await loop.run_in_executor(executor, fn)
        except Exception as exc:  # a source that raises anyway: show it, keep running
            text = f"error: {type(exc).__name__}: {exc}"
        done(text)
        app.invalidate()

    app.create_background_task(runner())


# -- attach -----------------------------------------------------------------------------


_DETACHED = -1


def run_attach(
    source: AttachSource,
    *,
    color: bool = True,
    refresh_interval: float = 0.25,
    input: Input | None = None,
    output: Output | None = None,
    file: TextIO | None = None,
    clock: Callable[[], float] = time.time,
    left_note: str | None = None,
) -> int:
    """Show one task live with a command line below it, until it ends or the user leaves.

    Enter runs the line with ``source.command`` and shows the status it returns; ``q`` alone
    on the line, Ctrl-C or Ctrl-D detach (the task keeps running) and return 0; the line
    then printed says so, or is ``left_note`` when the caller ends the task itself. When the
    task reaches a final state its last rendering is drawn, the application exits and the
    function returns 0 (succeeded, cancelled) or 1 (failed, revoked). Either way the last
    rendering is then printed to ``file`` (stdout) so it stays in the scrollback.

    ``input``/``output`` default to the terminal; tests pass a pipe input and a dummy or
    vt100 output. ``clock`` supplies ``now`` for the rendering.
    """
    status: list[str] = []
    last: list[TaskSnapshot] = []
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="itask-attach")

    def width() -> int:
        return app.output.get_size().columns

    def render(snap: TaskSnapshot, tail: int | None) -> str:
        rate, eta = source.rate()
        view = render_task(snap, now=clock(), rate=rate, eta=eta, tail=8 if tail is None else tail)
        return to_ansi(view, width(), color=color)

    def task_text() -> ANSI:
        snap = source.snapshot()
        last[:] = [snap]
        rows = app.output.get_size().rows - 1 - (status[0].count("\n") + 1 if status else 0)
        tail = min(8, sum(1 for e in snap.events if e.kind in TAIL_KINDS))
        return ANSI(_fit(lambda limit: render(snap, limit), rows, tail).rstrip("\n"))

    def status_text() -> FormattedText:
        return FormattedText([("bold", status[0])]) if status else FormattedText([])

    def set_status(text: str) -> None:
        status[:] = [text]

    def accept(buffer: Any) -> bool:
        line = buffer.text.strip()
        if not line:
            return False
        if line == "q":
            app.exit(result=_DETACHED)
            return False
        set_status(f"… {line}")
        _in_thread(app, executor, lambda: source.command(line), set_status)
        return False

    entry = TextArea(
        prompt="> ",
        multiline=False,
        history=InMemoryHistory(),
        accept_handler=accept,
        wrap_lines=False,
    )
    kb = KeyBindings()

    @kb.add("c-c")
    @kb.add("c-d")
    @kb.add("<sigint>")  # a SIGINT from outside, e.g. kill -INT
    def _leave(event: KeyPressEvent) -> None:
        event.app.exit(result=_DETACHED)

    app: Application[int] = Application(
        layout=Layout(
            HSplit(
                [
                    Window(
                        FormattedTextControl(task_text, show_cursor=False),
                        wrap_lines=False,
                        dont_extend_height=True,
                    ),
                    ConditionalContainer(
                        Window(
                            FormattedTextControl(status_text, show_cursor=False),
                            dont_extend_height=True,
                            wrap_lines=True,
                        ),
                        filter=Condition(lambda: bool(status)),
                    ),
                    entry,
                ]
            ),
            focused_element=entry,
        ),
        key_bindings=kb,
        # Not full screen: the view grows under the shell prompt like any command, and the
        # final rendering printed afterwards lands in the normal scrollback.
        full_screen=False,
        erase_when_done=True,
        refresh_interval=refresh_interval,
        min_redraw_interval=_MIN_REDRAW_INTERVAL,
        color_depth=None if color else ColorDepth.MONOCHROME,
        input=input,
        output=output,
    )

    def after_render(_: object) -> None:
        # Leave only once the final state has been drawn.
        if last and last[0].state.is_final and not app.is_done:
            app.exit(result=_exit_code(last[0].state))

    app.after_render += after_render
    redraw = _Redraw(app)
    source.subscribe_changes(redraw.notify)
    try:
        code = app.run(pre_run=redraw.bind)
    finally:
        redraw.close()
        executor.shutdown(wait=False, cancel_futures=True)

    snap = source.snapshot()
    out = file if file is not None else sys.stdout
    out.write(render(snap, None))
    if code == _DETACHED:
        code = 0
        if not snap.state.is_final:
            out.write(
                f"{left_note}\n" if left_note is not None else
                f"Detached from {short_id(snap.task_id)}; the task keeps running "
                f"(itask attach {snap.task_id}).\n"
            )
    out.flush()
    return code


# -- top --------------------------------------------------------------------------------


_VERB_KEYS = {"p": "pause", "r": "resume", "c": "cancel"}


def run_top(
    source: TopSource,
    *,
    color: bool = True,
    refresh_interval: float = 0.5,
    on_attach: Callable[[str], None] | None = None,
    input: Input | None = None,
    output: Output | None = None,
    clock: Callable[[], float] = time.time,
) -> int:
    """The full-screen ``itask top`` dashboard. Returns 0.

    ↑/↓ (or k/j) select a task, PgUp/PgDn a page further; Tab moves these keys to the
    workers pane and back, which then scroll it (it takes at most a third of the screen,
    the task table the rest); s shows greenlets and threads one row each or summarised; p,
    r, c pause, resume or cancel the selected task and show the returned status; a or
    Enter leave the dashboard and then call ``on_attach(task_id)``; q or Ctrl-C quit.
    """
    selected: list[str] = []  # the selected task id, if any
    shown: list[TaskSnapshot] = []  # the tasks as last drawn, which the keys refer to
    status: list[str] = [""]
    # the workers pane: whether the arrows scroll it, its first row, greenlets expanded
    view = {"workers_focused": False, "offset": 0, "expand": False}
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="itask-top")

    def tasks() -> list[TaskSnapshot]:
        if not shown:
            shown[:] = source.tasks()
        return shown

    def index() -> int | None:
        ids = [t.task_id for t in tasks()]
        if not ids:
            return None
        if selected and selected[0] in ids:
            return ids.index(selected[0])
        return 0

    def select(i: int | None) -> None:
        selected[:] = [] if i is None else [tasks()[i].task_id]

    def worker_pane_rows() -> int:
        return max(3, app.output.get_size().rows // 3)

    def clamp_offset(total: int) -> None:
        view["offset"] = max(0, min(int(view["offset"]), total - worker_pane_rows()))

    def screen() -> ANSI:
        shown[:] = source.tasks()
        select(index())
        workers = source.workers()
        size = app.output.get_size()
        clamp_offset(len(worker_rows(workers, expand_slots=bool(view["expand"]))))

        def draw(rows: int | None) -> str:
            return to_ansi(
                render_top(
                    workers,
                    shown,
                    now=clock(),
                    selected=selected[0] if selected else None,
                    status_line=status[0],
                    max_task_rows=rows,
                    max_worker_rows=worker_pane_rows(),
                    worker_offset=int(view["offset"]),
                    expand_slots=bool(view["expand"]),
                ),
                size.columns,
                color=color,
            )

        # a limited table has one more line, saying which rows it shows
        return ANSI(_fit(draw, size.rows, len(shown), extra=1).rstrip("\n"))

    kb = KeyBindings()

    def move(step: int) -> None:
        if view["workers_focused"]:
            # clamped against the rows when the screen is next drawn
            view["offset"] = max(0, int(view["offset"]) + step)
            return
        i = index()
        if i is not None:
            select(min(max(0, i + step), len(tasks()) - 1))

    def page() -> int:
        return worker_pane_rows() if view["workers_focused"] else max(
            1, app.output.get_size().rows - worker_pane_rows() - 12)

    @kb.add("up")
    @kb.add("k")
    def _up(event: KeyPressEvent) -> None:
        move(-1)

    @kb.add("down")
    @kb.add("j")
    def _down(event: KeyPressEvent) -> None:
        move(1)

    @kb.add("pageup")
    def _page_up(event: KeyPressEvent) -> None:
        move(-page())

    @kb.add("pagedown")
    def _page_down(event: KeyPressEvent) -> None:
        move(page())

    @kb.add("tab")
    def _focus(event: KeyPressEvent) -> None:
        view["workers_focused"] = not view["workers_focused"]
        status[0] = ("↑/↓ scroll the workers" if view["workers_focused"]
                     else "↑/↓ select a task")

    @kb.add("s")
    def _slots(event: KeyPressEvent) -> None:
        view["expand"] = not view["expand"]

    def verb_handler(verb: str) -> Callable[[KeyPressEvent], None]:
        def handler(event: KeyPressEvent) -> None:
            i = index()
            if i is None:
                status[0] = "no task selected"
                return
            task_id = tasks()[i].task_id
            status[0] = f"{verb} {short_id(task_id)}…"

            def done(text: str) -> None:
                status[0] = text

            _in_thread(event.app, executor, lambda: source.control(task_id, verb), done)

        return handler

    for key, verb in _VERB_KEYS.items():
        kb.add(key)(verb_handler(verb))

    @kb.add("a")
    @kb.add("enter")
    def _attach(event: KeyPressEvent) -> None:
        i = index()
        if on_attach is None:
            status[0] = "attach is not available here"
        elif i is not None:
            event.app.exit(result=tasks()[i].task_id)

    @kb.add("q")
    @kb.add("c-c")
    @kb.add("<sigint>")
    def _quit(event: KeyPressEvent) -> None:
        event.app.exit(result=None)

    app: Application[str | None] = Application(
        layout=Layout(Window(FormattedTextControl(screen, show_cursor=False), wrap_lines=False)),
        key_bindings=kb,
        full_screen=True,
        refresh_interval=refresh_interval,
        min_redraw_interval=_MIN_REDRAW_INTERVAL,
        color_depth=None if color else ColorDepth.MONOCHROME,
        input=input,
        output=output,
    )
    redraw = _Redraw(app)
    source.subscribe_changes(redraw.notify)
    try:
        attach_to = app.run(pre_run=redraw.bind)
    finally:
        redraw.close()
        executor.shutdown(wait=False, cancel_futures=True)
    if attach_to is not None and on_attach is not None:
        on_attach(attach_to)
    return 0
