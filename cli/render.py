"""Pure terminal rendering: task snapshots and worker reports in, rich renderables out.

Nothing here does I/O or reads a clock; callers pass ``now`` (seconds since the epoch,
the same clock as :attr:`Event.ts`). The live applications in :mod:`.tui` only feed these
functions and show the result (rendered to ANSI by :func:`to_ansi`), so every view can be
tested with a fixed-width capture ``Console``.

Every string that comes from a task, a worker or a user is wrapped in :class:`rich.text.Text`
(never parsed as console markup) and has its control characters made visible, so a task
cannot restyle or scramble the terminal.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.measure import Measurement
from rich.panel import Panel
from rich.style import Style
from rich.table import Table
from rich.text import Text

from interactive_tasks.protocol import Event, EventKind, TaskSnapshot, TaskState
from interactive_tasks.view import cut as _cut
from interactive_tasks.view import format_duration, format_eta, format_rate, outcome_text

__all__ = [
    "KEY_HELP",
    "TAIL_KINDS",
    "format_duration",
    "render_task",
    "render_task_table",
    "render_top",
    "render_workers",
    "short_id",
    "to_ansi",
    "worker_rows",
]

#: (symbol, word, badge style, colour) for each state; bars and borders use the colour.
_STATE_LOOK: dict[TaskState, tuple[str, str, str, str]] = {
    TaskState.PENDING: ("○", "PENDING", "bold", "white"),
    TaskState.RUNNING: ("▶", "RUNNING", "bold green", "green"),
    TaskState.PAUSED: ("⏸", "PAUSED", "bold black on yellow", "yellow"),
    TaskState.RETRY: ("↻", "RETRY", "bold yellow", "yellow"),
    TaskState.SUCCEEDED: ("✔", "SUCCEEDED", "bold green", "green"),
    TaskState.FAILED: ("✘", "FAILED", "bold red", "red"),
    TaskState.CANCELLED: ("⊘", "CANCELLED", "bold magenta", "magenta"),
    TaskState.REVOKED: ("⊘", "REVOKED", "bold red", "red"),
}

_LEVEL_STYLE = {
    "DEBUG": "dim",
    "INFO": "cyan",
    "WARNING": "yellow",
    "WARN": "yellow",
    "ERROR": "bold red",
    "CRITICAL": "bold white on red",
}

_CHILD_STYLE = {"idle": "dim", "busy": "green", "paused": "bold yellow", "stopped": "red"}

#: Event kinds shown in the tail of the attach view.
TAIL_KINDS = frozenset(
    {
        EventKind.LOG,
        EventKind.MESSAGE,
        EventKind.QUESTION,
        EventKind.ANSWERED,
        EventKind.PAUSED,
        EventKind.RESUMED,
        EventKind.RETRY,
        EventKind.WORKER_LOST,
    }
)

#: The key help line of ``itask top``.
KEY_HELP = "↑/↓ select  Tab pane  s slots  p pause  r resume  c cancel  a attach  q quit"

_DATA_CHARS = 200

# C0 controls (but tab and newline), DEL and C1 controls, shown as \xNN instead of being
# sent to the terminal.
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0))}


# -- small formatters -------------------------------------------------------------------


def short_id(task_id: str) -> str:
    """The first eight characters of a task id, as shown in tables."""
    return task_id[:8]


def _offset(seconds: float) -> str:
    if seconds < 60:
        return f"+{max(0.0, seconds):.1f}s"
    return "+" + format_duration(seconds)


def _num(x: float) -> str:
    if isinstance(x, int) or float(x).is_integer():
        return str(int(x))
    return f"{x:.1f}"


def _clean(s: object) -> str:
    return str(s).translate(_CONTROL)


def _safe_repr(value: Any, limit: int) -> str:
    try:
        text = repr(value)
    except Exception as exc:  # a broken __repr__ must not break the view
        text = f"<unrepresentable {type(value).__name__}: {exc}>"
    return _cut(_clean(text), limit)


def _badge(state: TaskState) -> Text:
    symbol, word, style, _ = _STATE_LOOK[state]
    return Text(f"{symbol} {word}", style=style)


def _fraction(progress: Event | None) -> float | None:
    if progress is None:
        return None
    current, total = progress.current, progress.total
    if current is None or not total or total <= 0:
        return None
    return min(1.0, max(0.0, current / total))


class _Bar:
    """A progress bar that reads without colour too: ``━`` done, ``─`` to do.

    ``fraction=None`` draws an indeterminate bar: a short block whose position is a pure
    function of ``now`` (so the live view animates and tests stay exact).
    """

    def __init__(
        self,
        fraction: float | None,
        *,
        now: float = 0.0,
        width: int | None = None,
        style: str = "green",
    ) -> None:
        self.fraction = fraction
        self.now = now
        self.width = width
        self.style = style

    def text(self, width: int) -> Text:
        width = max(1, width)
        if self.fraction is None:
            block = max(1, min(6, width // 4))
            span = width - block
            step = int(self.now * 8) % (2 * span) if span else 0
            start = step if step <= span else 2 * span - step
            return Text.assemble(
                ("─" * start, "dim"),
                ("━" * block, self.style),
                ("─" * (width - start - block), "dim"),
            )
        done = round(width * self.fraction)
        return Text.assemble(("━" * done, self.style), ("─" * (width - done), "dim"))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.text(min(self.width or options.max_width, options.max_width))

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        if self.width is not None:
            return Measurement(self.width, self.width)
        return Measurement(10, options.max_width)


# -- one task ---------------------------------------------------------------------------


def _age_text(snapshot: TaskSnapshot, now: float) -> Text:
    if snapshot.state.is_final:
        begin = snapshot.started if snapshot.started is not None else snapshot.received
        if begin is not None and snapshot.finished is not None:
            return Text(f"took {format_duration(snapshot.finished - begin)}", style="dim")
        return Text("")
    if snapshot.started is not None:
        return Text(f"age {format_duration(now - snapshot.started)}", style="dim")
    if snapshot.received is not None:
        return Text(f"queued {format_duration(now - snapshot.received)}", style="dim")
    return Text("")


def _progress_row(
    snapshot: TaskSnapshot, now: float, rate: float | None, eta: float | None
) -> RenderableType | None:
    progress = snapshot.progress
    state = snapshot.state
    if progress is None or progress.current is None:
        if state is TaskState.PENDING:
            return Text("waiting for a worker…", style="dim")
        if state in (TaskState.RUNNING, TaskState.RETRY):
            return Text("no progress reported yet", style="dim")
        return None
    colour = _STATE_LOOK[state][3]
    live = state in (TaskState.RUNNING, TaskState.RETRY)
    fraction = _fraction(progress)
    numbers: list[str] = []
    if fraction is None:
        numbers.append(f"{_num(progress.current)} done")
        # an indeterminate bar only moves while the task runs
        bar = _Bar(None, now=now if live else 0.0, style=colour)
    else:
        assert progress.total is not None
        numbers += [
            f"{_num(progress.current)}/{_num(progress.total)}",
            f"{math.floor(fraction * 100)}%",
        ]
        bar = _Bar(fraction, style=colour)
    if live and rate is not None:
        numbers.append(format_rate(rate))
    if live and eta is not None:
        numbers.append(format_eta(eta))
    grid = Table.grid(padding=(0, 1), expand=True)
    grid.add_column(ratio=1)
    grid.add_column(no_wrap=True, justify="right")
    grid.add_row(bar, Text("  ".join(numbers)))
    return grid


def _event_line(ev: Event, base: float | None) -> Text:
    line = Text(no_wrap=True, overflow="ellipsis")
    if base is not None:
        line.append(f"{_offset(ev.ts - base):>7} ", style="dim")
    kind = ev.kind
    if kind == EventKind.LOG:
        level = _clean(ev.level or "log").upper()
        line.append(f"{level:<7} ", style=_LEVEL_STYLE.get(level, ""))
        text = _clean(ev.text or "")
        first, _, rest = text.partition("\n")
        line.append(first)
        if rest:
            line.append(f" (+{rest.count(chr(10)) + 1} lines)", style="dim")
    elif kind == EventKind.MESSAGE:
        line.append("message ", style="blue")
        line.append(_safe_repr(ev.data, _DATA_CHARS))
    elif kind == EventKind.QUESTION:
        line.append("asked   ", style="bold yellow")
        line.append(_clean(ev.prompt or ""))
    elif kind == EventKind.ANSWERED:
        line.append("answer  ", style="yellow")
        line.append(_safe_repr(ev.fields.get("value"), _DATA_CHARS))  # as the task emits it
    else:
        line.append(kind.replace("-", " "), style="dim italic")
    return line


def _tail(snapshot: TaskSnapshot, tail: int) -> list[Text]:
    if tail <= 0:
        return []
    events = [e for e in snapshot.events if e.kind in TAIL_KINDS][-tail:]
    base = snapshot.started if snapshot.started is not None else snapshot.received
    if base is None and snapshot.events:
        base = snapshot.events[0].ts
    return [_event_line(e, base) for e in events]


_OUTCOME_LOOK = {
    TaskState.SUCCEEDED: ("✔ ", "bold green"),
    TaskState.FAILED: ("✘ ", "bold red"),
    TaskState.CANCELLED: ("⊘ ", "bold magenta"),
    TaskState.REVOKED: ("⊘ ", "bold red"),
    TaskState.RETRY: ("↻ ", "yellow"),
}


def _outcome(snapshot: TaskSnapshot, show_traceback: bool) -> list[RenderableType]:
    # the words are the shared view model's, so every front end says the same
    text = outcome_text(snapshot)
    if not text:
        return []
    symbol, style = _OUTCOME_LOOK.get(snapshot.state, ("", ""))
    out: list[RenderableType] = [Text(symbol + _clean(text), style=style)]
    traceback = (snapshot.error or {}).get("traceback")
    if snapshot.state is TaskState.FAILED and show_traceback and traceback:
        out.append(Text(_clean(traceback).rstrip("\n"), style="dim"))
    return out


def render_task(
    snapshot: TaskSnapshot,
    *,
    now: float,
    rate: float | None = None,
    eta: float | None = None,
    tail: int = 8,
    show_traceback: bool = True,
) -> RenderableType:
    """The ``itask attach`` view of one task.

    A panel titled with the task name and short id holding: the state (``⏸ PAUSED`` on
    yellow when paused), worker, pid and age; the progress bar with ``current/total``,
    percent, ``rate`` and ``eta`` (both only while running, both computed by the caller,
    e.g. with :class:`~interactive_tasks.view.RateMeter`); the progress message; the last
    ``tail`` log, message, question/answer and pause/resume events; the pending question;
    and for a finished task the result, the error with its traceback (unless
    ``show_traceback`` is false) or the cancellation.
    """
    state = snapshot.state
    colour = _STATE_LOOK[state][3]

    header = Table.grid(padding=(0, 2), expand=True)
    header.add_column(no_wrap=True)
    header.add_column(ratio=1, no_wrap=True, overflow="ellipsis")
    header.add_column(justify="right", no_wrap=True)
    where = Text()
    if snapshot.worker:
        where.append("worker ", style="dim").append(_clean(snapshot.worker))
    if snapshot.pid is not None:
        where.append("  pid ", style="dim").append(str(snapshot.pid))
    if snapshot.run > 1:
        where.append("  run ", style="dim").append(str(snapshot.run))
    header.add_row(_badge(state), where, _age_text(snapshot, now))

    parts: list[RenderableType] = [header]
    bar = _progress_row(snapshot, now, rate, eta)
    if bar is not None:
        parts.append(bar)
    if snapshot.progress is not None and snapshot.progress.message:
        parts.append(Text(_clean(snapshot.progress.message), style="italic"))
    if state is TaskState.PAUSED:
        parts.append(
            Text("⏸ PAUSED — the task is on hold until it is resumed", style="bold yellow")
        )
    lines = _tail(snapshot, tail)
    if lines:
        parts.append(Text(""))
        parts.extend(lines)
    question = snapshot.question
    if question and not state.is_final:
        prompt = _clean(question.get("prompt") or "")
        qid = question.get("qid")
        parts.append(
            Panel(
                Text.assemble(("Question: ", "bold"), (prompt, "bold yellow")),
                title=Text("? waiting for an answer", style="bold yellow"),
                title_align="left",
                subtitle=Text(f"qid {_clean(qid)}", style="dim") if qid else None,
                subtitle_align="right",
                border_style="bold yellow",
            )
        )
    outcome = _outcome(snapshot, show_traceback)
    if outcome:
        parts.append(Text(""))
        parts.extend(outcome)

    title = Text.assemble(
        (_clean(snapshot.name) or "?", "bold"), " ", (short_id(snapshot.task_id), "dim")
    )
    return Panel(
        Group(*parts),
        title=title,
        title_align="left",
        border_style=colour,
        box=box.ROUNDED,
    )


# -- tables -----------------------------------------------------------------------------


def _progress_cell(snapshot: TaskSnapshot) -> Text:
    progress = snapshot.progress
    if progress is None or progress.current is None:
        return Text("")
    fraction = _fraction(progress)
    colour = _STATE_LOOK[snapshot.state][3]
    if fraction is None:
        return Text(f"{_num(progress.current)} done")
    pct = f"{math.floor(fraction * 100)}%"
    return Text.assemble(_Bar(fraction, style=colour).text(10), f" {pct:>4}")


def _window(n: int, selected: int | None, rows: int) -> tuple[int, int]:
    """The slice ``[start, stop)`` of ``rows`` items out of ``n`` that shows ``selected``."""
    if rows >= n:
        return 0, n
    centre = selected if selected is not None else 0
    start = min(max(0, centre - rows // 2), n - rows)
    return start, start + rows


def render_task_table(
    snapshots: Sequence[TaskSnapshot],
    *,
    now: float,
    selected: str | None = None,
    max_rows: int | None = None,
) -> RenderableType:
    """The ``itask ls`` / ``itask top`` table, one row per snapshot, in the order given.

    The row whose task id is ``selected`` is marked with ``▶`` and shown in reverse video.
    ``max_rows`` limits the rows to a window that keeps the selected one in view, with a
    caption saying which rows are shown.
    """
    table = Table(
        box=box.SIMPLE_HEAD, expand=True, pad_edge=False, show_edge=False, collapse_padding=True
    )
    table.add_column("", width=1, no_wrap=True)
    table.add_column("ID", no_wrap=True)
    table.add_column("TASK", ratio=2, no_wrap=True, overflow="ellipsis")
    table.add_column("WORKER", ratio=1, no_wrap=True, overflow="ellipsis")
    table.add_column("PID", justify="right", no_wrap=True)
    table.add_column("STATE", no_wrap=True)
    table.add_column("PROGRESS", no_wrap=True)
    table.add_column("AGE", justify="right", no_wrap=True)

    index = next((i for i, s in enumerate(snapshots) if s.task_id == selected), None)
    start, stop = _window(len(snapshots), index, max_rows if max_rows is not None else 1 << 30)
    for i in range(start, stop):
        snap = snapshots[i]
        begin = snap.received if snap.received is not None else snap.started
        is_selected = i == index
        table.add_row(
            Text("▶" if is_selected else ""),
            Text(short_id(snap.task_id), style="dim" if not is_selected else ""),
            Text(_clean(snap.name)),
            Text(_clean(snap.worker or "")),
            Text("" if snap.pid is None else str(snap.pid)),
            _badge(snap.state),
            _progress_cell(snap),
            Text(format_duration(now - begin) if begin is not None else ""),
            style=Style(reverse=True) if is_selected else None,
        )
    if not snapshots:
        table.caption = "no tasks"
    elif stop - start < len(snapshots):
        table.caption = f"tasks {start + 1}-{stop} of {len(snapshots)}"
    return table


#: What a slot is called when it is not a process of its own, by pool.
_SLOT_NOUN = {"gevent": "greenlets", "eventlet": "greenlets", "threads": "threads"}


def _slots_are_processes(worker: Mapping[str, Any], children: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the slots of ``worker`` are processes of their own (prefork), rather than
    greenlets or threads of the worker's process (each reporting the worker's pid)."""
    if not children:
        return True
    pid = worker.get("pid")
    return any(c.get("pid") not in (None, pid) for c in children)


def worker_rows(workers: Iterable[Mapping[str, Any]], *,
                expand_slots: bool = False) -> list[tuple[Any, ...]]:
    """The rows of :func:`render_workers`: ``(name, pid, state, details, row style)``.

    Slots that are processes get a row each. Slots that are not (greenlets, threads) are
    summarised in one row (busy, idle and paused counts) unless ``expand_slots``.
    """
    rows: list[tuple[Any, ...]] = []
    for w in workers:
        online = bool(w.get("online", True))
        name = _clean(w.get("worker") or w.get("hostname") or "?")
        children = list(w.get("children") or ())
        busy = sum(1 for c in children if c.get("state") == "busy")
        processes = _slots_are_processes(w, children)
        noun = "procs" if processes else _SLOT_NOUN.get(str(w.get("pool")), "slots")
        details = (
            f"{_clean(w.get('pool', '?'))}, {w.get('concurrency', len(children))} {noun}"
            f"  busy {busy}  active {w.get('active', 0)}  done {w.get('processed', 0)}"
            f"  up {format_duration(float(w.get('uptime') or 0))}"
        )
        row_style = None if online else "dim"
        rows.append((
            Text(name, style="bold" if online else ""),
            Text(str(w.get("pid", ""))),
            Text("online", style="green") if online else Text("offline", style="bold red"),
            Text(details),
            row_style,
        ))
        if not processes and not expand_slots:
            counts: dict[str, int] = {}
            for c in children:
                state = _clean(c.get("state") or "?")
                counts[state] = counts.get(state, 0) + 1
            summary = Text()
            for state, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
                summary.append(f"{n} {state}", style=_CHILD_STYLE.get(state, "") if online else "")
                summary.append("  ")
            summary.append("(s: one row each)", style="dim")
            rows.append((
                Text(f"└ {len(children)} {noun}", style="dim"),
                Text(""),
                Text(""),
                summary,
                row_style,
            ))
            continue
        for n, child in enumerate(children):
            cstate = _clean(child.get("state") or "?")
            task = Text()
            if child.get("task"):
                task.append(_clean(child["task"]))
            if child.get("task_id"):
                task.append(f" {short_id(_clean(child['task_id']))}", style="dim")
            kind = "process" if processes else noun.rstrip("s")
            rows.append((
                Text(("└ " if n == len(children) - 1 else "├ ") + kind, style="dim"),
                Text(str(child.get("pid", ""))),
                Text(cstate, style=_CHILD_STYLE.get(cstate, "") if online else ""),
                task,
                row_style,
            ))
    return rows


def render_workers(
    workers: Iterable[Mapping[str, Any]],
    *,
    now: float,
    expand_slots: bool = False,
    max_rows: int | None = None,
    offset: int = 0,
) -> RenderableType:
    """Workers and their pool slots: one row per worker, then one indented row per child
    process; greenlets and threads (slots that share the worker's pid) are summarised in
    one row of busy/idle counts unless ``expand_slots``.

    A worker row's DETAILS are its pool, busy slots, active and processed counts and
    uptime; a child row's DETAILS are the task it runs. ``max_rows`` shows at most that
    many rows from ``offset`` on (clamped), with a caption saying which.

    Offline workers (``online`` false) are dimmed with a red ``offline`` status. ``now`` is
    accepted for symmetry with the other views; uptimes come from the reports themselves.
    """
    del now  # the reports carry their own uptime
    table = Table(
        box=box.SIMPLE_HEAD, expand=True, pad_edge=False, show_edge=False, collapse_padding=True
    )
    table.add_column("WORKER", no_wrap=True, overflow="ellipsis", max_width=40)
    table.add_column("PID", justify="right", no_wrap=True)
    table.add_column("STATE", no_wrap=True)
    table.add_column("DETAILS", ratio=1, no_wrap=True, overflow="ellipsis")
    rows = worker_rows(workers, expand_slots=expand_slots)
    start, stop = 0, len(rows)
    if max_rows is not None and max_rows < len(rows):
        start = min(max(0, offset), len(rows) - max(1, max_rows))
        stop = start + max(1, max_rows)
    for *cells, style in rows[start:stop]:
        table.add_row(*cells, style=style)
    if not rows:
        table.caption = "no workers"
    elif stop - start < len(rows):
        table.caption = f"worker rows {start + 1}-{stop} of {len(rows)}"
    return table


def _summary(workers: Sequence[Mapping[str, Any]], snapshots: Sequence[TaskSnapshot]) -> Text:
    offline = sum(1 for w in workers if not w.get("online", True))
    text = Text.assemble(("itask top", "bold"), f"  {len(workers)} workers")
    if offline:
        text.append(f" ({offline} offline)", style="red")
    text.append(f"  {len(snapshots)} tasks")
    counts: dict[TaskState, int] = {}
    for s in snapshots:
        counts[s.state] = counts.get(s.state, 0) + 1
    if counts:
        text.append(": ")
        text.append(
            ", ".join(f"{n} {state.value}" for state, n in counts.items()),
        )
    return text


def render_top(
    workers: Sequence[Mapping[str, Any]],
    snapshots: Sequence[TaskSnapshot],
    *,
    now: float,
    selected: str | None = None,
    status_line: str = "",
    max_task_rows: int | None = None,
    max_worker_rows: int | None = None,
    worker_offset: int = 0,
    expand_slots: bool = False,
) -> RenderableType:
    """The ``itask top`` dashboard: a summary, the workers, the tasks, status and key help.

    The workers pane and the task table scroll on their own: ``max_worker_rows`` and
    ``worker_offset`` window the first, ``max_task_rows`` the second (around ``selected``).
    """
    parts: list[RenderableType] = [
        _summary(workers, snapshots),
        Text(""),
        render_workers(workers, now=now, expand_slots=expand_slots,
                       max_rows=max_worker_rows, offset=worker_offset),
        Text(""),
        render_task_table(snapshots, now=now, selected=selected, max_rows=max_task_rows),
        Text(""),
    ]
    if status_line:
        parts.append(Text(_clean(status_line), style="bold"))
    parts.append(Text(KEY_HELP, style="dim"))
    return Group(*parts)


# -- output -----------------------------------------------------------------------------


def to_ansi(renderable: RenderableType, width: int, *, color: bool = True) -> str:
    """Render to a string ``width`` cells wide: ANSI styled, or plain text when not ``color``.

    The result ends with a newline, as ``Console.print`` writes it.
    """
    buffer = io.StringIO()
    console = Console(
        file=buffer,
        force_terminal=color,
        color_system="truecolor" if color else None,
        width=max(1, width),
        no_color=not color,
        legacy_windows=False,
        highlight=False,
        emoji=False,
    )
    console.print(renderable)
    return buffer.getvalue()
