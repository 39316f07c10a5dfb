"""The pure renderers, read back as plain text from a fixed-width capture console."""

from __future__ import annotations

import dataclasses
import io

import pytest
from rich.console import Console, RenderableType

from interactive_tasks.cli.render import (
    KEY_HELP,
    format_duration,
    render_task,
    render_task_table,
    render_top,
    render_workers,
    to_ansi,
)
from interactive_tasks.protocol import Event, TaskSnapshot, TaskState

T0 = 1_700_000_000.0
TID = "3f2a9c1e5b7d4a0f"
TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "jobs.py", line 12, in count\n'
    "    raise ValueError('bad input')\n"
    "ValueError: bad input\n"
)


def ev(seq: int, kind: str, dt: float, **fields: object) -> Event:
    return Event(TID, seq, kind, T0 + dt, fields)


def text(renderable: RenderableType, width: int = 80) -> str:
    console = Console(
        width=width, record=True, file=io.StringIO(), color_system=None, legacy_windows=False
    )
    console.print(renderable)
    return "\n".join(line.rstrip() for line in console.export_text().splitlines())


def inner(renderable: RenderableType, width: int = 80) -> list[str]:
    """The lines inside the attach panel, without its side borders."""
    return [line[2:-2].rstrip() for line in text(renderable, width).splitlines()[1:-1]]


RUNNING = TaskSnapshot(
    TID,
    "demo.count",
    TaskState.RUNNING,
    seq=6,
    worker="w1@host",
    pid=4242,
    progress=ev(5, "progress", 20, current=40, total=100, message="counting widgets"),
    events=(
        ev(1, "started", 0, worker="w1@host", pid=4242),
        ev(2, "log", 0.5, level="info", text="starting"),
        ev(3, "message", 2, data={"a": 1}),
        ev(4, "log", 3, level="warning", text="slow disk"),
    ),
    received=T0 - 2,
    started=T0,
)


# -- render_task ------------------------------------------------------------------------


def test_running_task_at_40_of_100_with_rate_and_eta() -> None:
    bar = "━" * 19 + "─" * 28  # 40% of a 47-cell bar
    assert text(render_task(RUNNING, now=T0 + 65, rate=2.0, eta=30.0)) == "\n".join(
        [
            "╭─ demo.count 3f2a9c1e ────────────────────────────────────────────────────────╮",
            "│ ▶ RUNNING  worker w1@host  pid 4242                                age 1m05s │",
            f"│ {bar} 40/100  40%  2.00/s  ETA 30s │",
            "│ counting widgets                                                             │",
            "│                                                                              │",
            "│   +0.5s INFO    starting                                                     │",
            "│   +2.0s message {'a': 1}                                                     │",
            "│   +3.0s WARNING slow disk                                                    │",
            "╰──────────────────────────────────────────────────────────────────────────────╯",
        ]
    )


def test_rate_and_eta_formats() -> None:
    body = inner(render_task(RUNNING, now=T0 + 65, rate=0.25, eta=3725.0))
    assert body[1].endswith("40/100  40%  0.25/s  ETA 1h02m")
    body = inner(render_task(RUNNING, now=T0 + 65, rate=123.4, eta=None))
    assert body[1].endswith("40/100  40%  123/s")
    body = inner(render_task(RUNNING, now=T0 + 65))
    assert body[1].endswith(" 40/100  40%")


def test_paused_is_obvious_and_shows_no_rate_or_eta() -> None:
    paused = dataclasses.replace(
        RUNNING, state=TaskState.PAUSED, events=(*RUNNING.events, ev(6, "paused", 30))
    )
    body = inner(render_task(paused, now=T0 + 65, rate=2.0, eta=30.0))
    assert body[0].startswith("⏸ PAUSED  worker w1@host  pid 4242")
    assert body[1].endswith(" 40/100  40%")  # no rate, no ETA while paused
    assert "ETA" not in text(render_task(paused, now=T0 + 65, rate=2.0, eta=30.0))
    assert body[2:4] == [
        "counting widgets",
        "⏸ PAUSED — the task is on hold until it is resumed",
    ]
    assert body[-1] == " +30.0s paused"


def test_pending_question_is_boxed_with_its_prompt() -> None:
    asking = dataclasses.replace(
        RUNNING,
        events=(*RUNNING.events, ev(6, "question", 25, prompt="Delete 3 files? [y/n]")),
        question={"prompt": "Delete 3 files? [y/n]", "qid": "q-17"},
    )
    body = inner(render_task(asking, now=T0 + 65))
    assert body[-5:] == [
        "  +3.0s WARNING slow disk",
        " +25.0s asked   Delete 3 files? [y/n]",
        "╭─ ? waiting for an answer ────────────────────────────────────────────────╮",
        "│ Question: Delete 3 files? [y/n]                                          │",
        "╰─────────────────────────────────────────────────────────────── qid q-17 ─╯",
    ]


def test_answered_question_is_in_the_tail_and_the_box_is_gone() -> None:
    answered = dataclasses.replace(
        RUNNING,
        events=(
            *RUNNING.events,
            ev(6, "question", 25, prompt="Go on?"),
            ev(7, "answered", 27, qid="q-17", value="yes"),
        ),
    )
    rendered = text(render_task(answered, now=T0 + 65))
    assert "Question:" not in rendered
    assert inner(render_task(answered, now=T0 + 65))[-2:] == [
        " +25.0s asked   Go on?",
        " +27.0s answer  'yes'",
    ]


def test_failed_shows_error_and_traceback() -> None:
    failed = dataclasses.replace(
        RUNNING,
        state=TaskState.FAILED,
        finished=T0 + 70,
        error={"type": "ValueError", "message": "bad input", "traceback": TRACEBACK},
    )
    body = inner(render_task(failed, now=T0 + 999, rate=2.0, eta=30.0))
    assert body[0].startswith("✘ FAILED  worker w1@host  pid 4242")
    assert body[0].endswith("took 1m10s")
    assert body[1].endswith(" 40/100  40%")
    assert body[-6:] == [
        "",
        "✘ ValueError: bad input",
        "Traceback (most recent call last):",
        '  File "jobs.py", line 12, in count',
        "    raise ValueError('bad input')",
        "ValueError: bad input",
    ]
    short = inner(render_task(failed, now=T0 + 999, show_traceback=False))
    assert short[-1] == "✘ ValueError: bad input"
    assert "Traceback" not in "\n".join(short)


def test_cancelled_says_so_and_where_it_stopped() -> None:
    cancelled = dataclasses.replace(RUNNING, state=TaskState.CANCELLED, finished=T0 + 50)
    body = inner(render_task(cancelled, now=T0 + 65))
    assert body[0].startswith("⊘ CANCELLED")
    assert body[0].endswith("took 50s")
    assert body[-1] == "⊘ cancelled at 40/100"


def test_succeeded_shows_the_result_truncated() -> None:
    done = dataclasses.replace(
        RUNNING,
        state=TaskState.SUCCEEDED,
        progress=ev(9, "progress", 40, current=100, total=100),
        result={"count": 100, "files": ["a.txt", "b.txt"]},
        finished=T0 + 42,
    )
    body = inner(render_task(done, now=T0 + 65))
    assert body[0].startswith("✔ SUCCEEDED")
    assert body[1] == "━" * 62 + " 100/100  100%"
    assert body[-1] == '✔ result: {"count": 100, "files": ["a.txt", "b.txt"]}'

    huge = dataclasses.replace(done, result="x" * 1000)
    result = "".join(inner(render_task(huge, now=T0 + 65), width=400)[-1:])
    assert result == "✔ result: " + "x" * 291 + "…"  # the outcome cut to 300 characters


def test_indeterminate_progress_moves_with_now_only() -> None:
    unknown = dataclasses.replace(RUNNING, progress=ev(5, "progress", 20, current=37, total=None))
    first = inner(render_task(unknown, now=T0 + 65.0))[1]
    assert first.endswith(" 37 done")
    bar = first[: -len(" 37 done")]
    assert bar.count("━") == 6 and set(bar) == {"━", "─"}
    assert inner(render_task(unknown, now=T0 + 65.0))[1] == first  # pure
    assert inner(render_task(unknown, now=T0 + 65.5))[1] != first  # animated by now


def test_pending_task_waits_for_a_worker() -> None:
    pending = TaskSnapshot(TID, "demo.count", TaskState.PENDING, received=T0)
    assert inner(render_task(pending, now=T0 + 5)) == [
        "○ PENDING                                                          queued 5s",
        "waiting for a worker…",
    ]


def test_tail_keeps_the_last_lines_only() -> None:
    logs = tuple(ev(i, "log", i, level="info", text=f"line {i}") for i in range(1, 21))
    many = dataclasses.replace(RUNNING, events=logs)
    body = inner(render_task(many, now=T0 + 65, tail=3))
    assert body[-3:] == [
        " +18.0s INFO    line 18",
        " +19.0s INFO    line 19",
        " +20.0s INFO    line 20",
    ]
    assert "line 17" not in "\n".join(body)
    assert not any("INFO" in line for line in inner(render_task(many, now=T0 + 65, tail=0)))


def test_task_text_is_never_markup_or_terminal_control() -> None:
    sneaky = dataclasses.replace(
        RUNNING,
        name="[bold red]evil[/]",
        events=(ev(2, "log", 1, level="info", text="\x1b[2Jcleared? [link=x]no[/link]"),),
    )
    rendered = text(render_task(sneaky, now=T0 + 65))
    assert "[bold red]evil[/]" in rendered
    assert "\\x1b[2Jcleared? [link=x]no[/link]" in rendered
    assert "\x1b" not in to_ansi(render_task(sneaky, now=T0 + 65), 80, color=False)


# -- tables -----------------------------------------------------------------------------


SNAPSHOTS = [
    RUNNING,
    dataclasses.replace(
        RUNNING,
        task_id="bbbbbbbb1111",
        name="demo.other",
        state=TaskState.PAUSED,
        worker="w2@host",
        pid=77,
        progress=ev(9, "progress", 1, current=3, total=4),
    ),
    TaskSnapshot("cccccccc2222", "demo.wait", TaskState.PENDING, received=T0 + 60),
]


def test_task_table_rows_and_selection() -> None:
    assert text(render_task_table(SNAPSHOTS, now=T0 + 65, selected="bbbbbbbb1111")) == "\n".join(
        [
            "   ID        TASK               WORKER    PID  STATE      PROGRESS           AGE",
            "─" * 80,
            "   3f2a9c1e  demo.count         w1@host  4242  ▶ RUNNING  ━━━━──────  40%  1m07s",
            "▶  bbbbbbbb  demo.other         w2@host    77  ⏸ PAUSED   ━━━━━━━━──  75%  1m07s",
            "   cccccccc  demo.wait                         ○ PENDING                      5s",
        ]
    )


def test_task_table_window_keeps_the_selected_row() -> None:
    many = [TaskSnapshot(f"{i:08d}", f"job{i}", TaskState.RUNNING, received=T0) for i in range(30)]
    rendered = text(render_task_table(many, now=T0, selected="00000020", max_rows=5))
    rows = rendered.splitlines()[2:]
    assert [row[:11] for row in rows[:5]] == [
        "   00000018",
        "   00000019",
        "▶  00000020",
        "   00000021",
        "   00000022",
    ]
    assert rows[5].strip() == "tasks 19-23 of 30"


def test_empty_task_table() -> None:
    assert text(render_task_table([], now=T0)).splitlines()[-1].strip() == "no tasks"


WORKERS = [
    {
        "worker": "w1@host",
        "hostname": "host",
        "pid": 100,
        "pool": "prefork",
        "concurrency": 2,
        "children": [
            {"pid": 101, "state": "busy", "task_id": TID, "task": "demo.count"},
            {"pid": 102, "state": "idle", "task_id": None, "task": None},
        ],
        "processed": 12,
        "active": 1,
        "uptime": 3723.0,
        "online": True,
    },
    {
        "worker": "w2@gone",
        "hostname": "gone",
        "pid": 200,
        "pool": "threads",
        "concurrency": 4,
        "children": [],
        "processed": 3,
        "active": 0,
        "uptime": 50.0,
        "online": False,
    },
]


def test_workers_panel_with_an_offline_worker() -> None:
    assert text(render_workers(WORKERS, now=T0)) == "\n".join(
        [
            "WORKER     PID  STATE    DETAILS",
            "─" * 80,
            "w1@host    100  online   prefork, 2 procs  busy 1  active 1  done 12  up 1h02m",
            "├ process  101  busy     demo.count 3f2a9c1e",
            "└ process  102  idle",
            "w2@gone    200  offline  threads, 4 procs  busy 0  active 0  done 3  up 50s",
        ]
    )


GEVENT = [
    {
        "worker": "g@host",
        "hostname": "host",
        "pid": 300,
        "pool": "gevent",
        "concurrency": 1000,
        "children": [
            {"pid": 300, "state": "busy" if n < 980 else "idle",
             "task_id": f"{n:08x}aaaa" if n < 980 else None,
             "task": "demo.count" if n < 980 else None}
            for n in range(1000)
        ],
        "processed": 5,
        "active": 980,
        "uptime": 10.0,
        "online": True,
    }
]


def test_greenlets_are_summarised_in_one_row() -> None:
    assert text(render_workers(GEVENT, now=T0)) == "\n".join(
        [
            "WORKER            PID  STATE   DETAILS",
            "─" * 80,
            "g@host            300  online  gevent, 1000 greenlets  busy 980  active 980  "
            "do…",
            "└ 1000 greenlets               980 busy  20 idle  (s: one row each)",
        ]
    )


def test_expanded_slots_scroll_in_their_own_window() -> None:
    rows = text(render_workers(GEVENT, now=T0, expand_slots=True, max_rows=4, offset=10))
    lines = rows.splitlines()
    assert [line.split()[0] for line in lines[2:6]] == ["├"] * 4
    assert "00000009" in lines[2]  # rows 11-14: the worker row, then greenlets 0, 1 …
    assert lines[-1].strip() == "worker rows 11-14 of 1001"
    # an offset past the end shows the last rows
    last = text(render_workers(GEVENT, now=T0, expand_slots=True, max_rows=4, offset=5000))
    assert last.splitlines()[-1].strip() == "worker rows 998-1001 of 1001"
    assert "└ greenlet" in last


def test_offline_worker_is_dimmed_in_colour() -> None:
    ansi = to_ansi(render_workers(WORKERS, now=T0), 80)
    offline_line = next(line for line in ansi.splitlines() if "w2@gone" in line)
    assert "\x1b[2m" in offline_line  # dim
    assert "\x1b[1;2;31m" in offline_line or "31m" in offline_line  # red "offline"


def test_top_combines_summary_workers_tasks_status_and_keys() -> None:
    rendered = text(
        render_top(
            WORKERS,
            SNAPSHOTS,
            now=T0 + 65,
            selected="bbbbbbbb1111",
            status_line="paused bbbbbbbb",
        )
    ).splitlines()
    assert rendered[0] == (
        "itask top  2 workers (1 offline)  3 tasks: 1 running, 1 paused, 1 pending"
    )
    assert any(line.startswith("w2@gone    200  offline") for line in rendered)
    assert any(line.startswith("▶  bbbbbbbb  demo.other") for line in rendered)
    assert rendered[-2:] == ["paused bbbbbbbb", KEY_HELP]
    assert KEY_HELP == (
        "↑/↓ select  Tab pane  s slots  p pause  r resume  c cancel  a attach  q quit"
    )


# -- formatting, to_ansi --------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(-3, "0s"), (0, "0s"), (59.9, "59s"), (65, "1m05s"), (3725, "1h02m"), (90061, "1d01h")],
)
def test_format_duration(seconds: float, expected: str) -> None:
    assert format_duration(seconds) == expected


def test_to_ansi_colour_and_plain() -> None:
    coloured = to_ansi(render_task(RUNNING, now=T0 + 65), 60)
    plain = to_ansi(render_task(RUNNING, now=T0 + 65), 60, color=False)
    assert "\x1b[" in coloured
    assert "\x1b" not in plain
    assert plain.endswith("╯\n")
    assert {len(line) for line in plain.splitlines()} == {60}
