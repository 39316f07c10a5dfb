"""The view model every front end shares (``interactive_tasks.view``): rate, ETA, words."""

from __future__ import annotations

import pytest

from interactive_tasks.protocol import Event, TaskSnapshot, TaskState
from interactive_tasks.view import RateMeter, cut, format_eta, format_rate, outcome_text, show

T0 = 1_700_000_000.0
TID = "3f2a9c1e5b7d4a0f"


def snap(state: TaskState, seq: int, ts: float, current: float | None, total: float = 100,
         run: int = 1) -> TaskSnapshot:
    progress = None
    if current is not None:
        progress = Event(TID, seq, "progress", T0 + ts, {"current": current, "total": total},
                         run)
    return TaskSnapshot(task_id=TID, name="job", state=state, seq=seq, run=run,
                        progress=progress)


def test_rate_over_a_window_of_running_time() -> None:
    meter = RateMeter(window=5.0)
    assert meter.observe(snap(TaskState.RUNNING, 1, 0, 0)) == (None, None)
    for i in range(1, 11):  # 2 items/s for 10 s
        rate, eta = meter.observe(snap(TaskState.RUNNING, 1 + i, i, 2 * i))
    assert rate == pytest.approx(2.0) and eta == pytest.approx(40.0)
    # faster for the last five seconds: the old samples drop out of the window
    for i in range(11, 16):
        rate, eta = meter.observe(snap(TaskState.RUNNING, 1 + i, i, 20 + 10 * (i - 10)))
    assert rate == pytest.approx(10.0) and eta == pytest.approx(3.0)


def test_repeats_do_not_count_and_a_new_run_starts_over() -> None:
    meter = RateMeter()
    meter.observe(snap(TaskState.RUNNING, 1, 0, 0))
    assert meter.observe(snap(TaskState.RUNNING, 2, 1, 10))[0] == pytest.approx(10.0)
    # the same snapshot again (a listener fired twice): no new sample
    assert meter.observe(snap(TaskState.RUNNING, 2, 1, 10))[0] == pytest.approx(10.0)
    assert meter.observe(snap(TaskState.RUNNING, 1, 10, 0, run=2)) == (None, None)
    assert meter.observe(snap(TaskState.RUNNING, 2, 12, 4, run=2))[0] == pytest.approx(2.0)


def test_a_pause_is_never_averaged_in() -> None:
    meter = RateMeter()
    meter.observe(snap(TaskState.RUNNING, 1, 0, 10))
    assert meter.observe(snap(TaskState.RUNNING, 2, 2, 30))[0] == pytest.approx(10.0)
    assert meter.observe(snap(TaskState.PAUSED, 3, 3, 30)) == (None, None)
    assert meter.observe(snap(TaskState.RUNNING, 5, 50, 31)) == (None, None)
    rate, eta = meter.observe(snap(TaskState.RUNNING, 6, 51, 41))
    assert rate == pytest.approx(10.0) and eta == pytest.approx(5.9)


def test_words() -> None:
    assert cut("abcdef", 4) == "abc…" and cut("abc", 4) == "abc"
    assert show({"a": [1]}, 50) == '{"a": [1]}' and show("x" * 10, 5) == "xxxx…"
    assert show(object(), 100).startswith('"<object object')
    assert format_rate(123.4) == "123/s" and format_rate(12.34) == "12.3/s"
    assert format_rate(0.25) == "0.25/s" and format_eta(65) == "ETA 1m05s"
    done = TaskSnapshot(task_id=TID, name="job", state=TaskState.SUCCEEDED, result=[1, 2])
    assert outcome_text(done) == "result: [1, 2]"
    stopped = snap(TaskState.CANCELLED, 4, 3, 40)
    assert outcome_text(stopped) == "cancelled at 40/100"
    assert outcome_text(snap(TaskState.RUNNING, 4, 3, 40)) == ""
