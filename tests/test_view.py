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


def test_attach_top_widget_and_web_show_the_same_rate_and_eta() -> None:
    """One event sequence into one handle; every front end's own path shows the same."""
    pytest.importorskip("anywidget")
    pytest.importorskip("starlette")
    from interactive_tasks import App, widgets
    from interactive_tasks.cli.attach import HandleSource
    from interactive_tasks.cli.render import render_task, to_ansi
    from interactive_tasks.handle import TaskHandle
    from interactive_tasks.web.state import TaskFeed

    app = App("view-unit", broker="embedded:///nonexistent-view-unit")
    handle: TaskHandle[object] = TaskHandle(app, TID, name="job", watch=False)
    terminal = HandleSource(handle)
    web = TaskFeed(handle)
    widget = widgets.TaskWidget(handle)
    widget.comm.send = lambda *a, **kw: None  # no front end here

    def feed(kind: str, dt: float, **fields: object) -> None:
        handle._on_event(Event(TID, handle.seq + 1, kind, T0 + dt, fields))
        widget._throttle.run()  # what the widget's timer does 0.1 s later

    seen: list[tuple[str, str]] = []

    def check() -> None:
        rate, eta = terminal.rate()
        view = web.since(0)[1]
        assert (widget.rate, widget.eta) == (rate, eta) == (view["rate"], view["eta"])
        assert (widget.rate_text, widget.eta_text) == (view["rate_text"], view["eta_text"])
        screen = to_ansi(render_task(handle.snapshot(), now=T0 + 100, rate=rate, eta=eta),
                         100, color=False)
        for text in (view["rate_text"], view["eta_text"]):
            assert text in screen  # the terminal writes the very same words
        seen.append((view["rate_text"], view["eta_text"]))

    try:
        feed("started", 0.0, worker="w1", pid=1)
        for i in range(1, 13):  # 4 items/s, then a pause, then 8 items/s
            feed("progress", i * 0.5, current=2 * i, total=200)
            check()
        feed("paused", 7.0)
        check()
        feed("resumed", 60.0)
        for i in range(1, 6):
            feed("progress", 60.0 + i * 0.5, current=24 + 4 * i, total=200)
            check()
        feed("cancelled", 63.0)
        assert web.since(0)[1]["outcome"] == widget.outcome == "cancelled at 44/200"
        assert "⊘ cancelled at 44/200" in to_ansi(
            render_task(handle.snapshot(), now=T0 + 100), 100, color=False)
    finally:
        widget.close()
        app.close()
    assert ("4.00/s", "ETA 47s") in seen and ("", "") in seen and ("8.00/s", "ETA 19s") in seen
