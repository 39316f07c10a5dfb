"""The gevent slots' condition variable (interactive_tasks.worker.pools.gevent_condition)
and a task runtime waiting on it: wake-ups, timeouts, and what ``receive`` keeps of the
``threading.Condition`` behaviour (order of messages, pause/resume, cancel, receipts).

Green threads of this process's gevent hub, no monkey patching, no timing assertions:
what must happen before something else is polled for with a deadline.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

gevent = pytest.importorskip("gevent")

from interactive_tasks.context import Request  # noqa: E402
from interactive_tasks.errors import Cancelled  # noqa: E402
from interactive_tasks.protocol import EventKind  # noqa: E402
from interactive_tasks.worker.child import SlotRuntime  # noqa: E402
from interactive_tasks.worker.pools.gevent import GeventPool  # noqa: E402
from interactive_tasks.worker.pools.gevent_condition import GeventCondition  # noqa: E402


class _Channel:
    """A slot channel that keeps what the runtime sends."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, obj: Any) -> None:
        self.sent.append(obj)

    def send_progress(self, obj: Any) -> None:
        self.sent.append(obj)

    def recv(self) -> Any:
        raise AssertionError("not used")


def _until(predicate: Any, what: str, deadline_s: float = 10.0) -> None:
    """Let other green threads run until ``predicate()`` holds."""
    deadline = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        gevent.sleep(0.001)


def _runtime(channel: _Channel, paused: bool = False) -> SlotRuntime:
    return SlotRuntime(channel, Request(id="t1", task="x"), paused=paused,
                       soft_time_limit=None, condition=GeventCondition)


def test_timed_wait_without_notify_returns_false() -> None:
    cond = GeventCondition()
    with cond:
        assert cond.wait(0.01) is False
    assert cond._waiters == []


def test_notify_all_wakes_every_waiter_with_true() -> None:
    cond = GeventCondition()
    results: list[bool] = []

    def waiter() -> None:
        with cond:
            results.append(cond.wait(30))

    greenlets = [gevent.spawn(waiter) for _ in range(3)]
    _until(lambda: len(cond._waiters) == 3, "three waiters")
    cond.notify_all()
    gevent.joinall(greenlets, timeout=10)
    assert results == [True, True, True]
    assert cond._waiters == []


def test_a_killed_waiter_leaves_no_waiter_or_timer_behind() -> None:
    cond = GeventCondition()
    greenlet = gevent.spawn(cond.wait, 30)
    _until(lambda: len(cond._waiters) == 1, "the waiter")
    greenlet.kill(Cancelled, block=True, timeout=10)
    assert isinstance(greenlet.exception, Cancelled)
    assert cond._waiters == []
    cond.notify_all()  # nobody to wake: nothing happens
    gevent.sleep(0)


def test_wait_for_returns_the_predicate_once_true() -> None:
    cond = GeventCondition()
    state = {"ready": False}

    def setter() -> None:
        state["ready"] = True
        cond.notify_all()

    gevent.spawn_later(0.001, setter)
    assert cond.wait_for(lambda: state["ready"], timeout=30) is True
    assert cond.wait_for(lambda: False, timeout=0.001) is False


def test_gevent_pool_gives_runtimes_the_gevent_condition() -> None:
    assert isinstance(GeventPool.make_condition(GeventPool.__new__(GeventPool)),
                      GeventCondition)


def test_receive_times_out_with_none_then_takes_messages_in_order() -> None:
    channel = _Channel()
    runtime = _runtime(channel)
    assert runtime.receive(0.001) is None
    assert runtime.receive(0) is None
    got: list[Any] = []

    def task() -> None:
        for _ in range(3):
            got.append(runtime.receive(30))

    greenlet = gevent.spawn(task)
    _until(lambda: len(runtime._cond._waiters) == 1, "the task to wait")
    runtime.control("message", "a")
    runtime.control("message", "b", "r-b")
    _until(lambda: len(got) == 2, "two messages")
    runtime.control("message", {"c": 3})
    greenlet.join(timeout=10)
    assert got == ["a", "b", {"c": 3}]
    assert ["rc", "t1", "r-b"] in channel.sent


def test_receive_blocks_while_paused_and_resumes() -> None:
    channel = _Channel()
    runtime = _runtime(channel, paused=True)
    got: list[Any] = []
    greenlet = gevent.spawn(lambda: got.append(runtime.receive(30)))
    _until(lambda: any(f[2] == EventKind.PAUSED for f in channel.sent), "paused event")
    runtime.control("message", "m")
    gevent.sleep(0)
    assert got == []  # paused: the message waits
    runtime.control("resume", None)
    greenlet.join(timeout=10)
    assert got == ["m"]
    assert [f[2] for f in channel.sent] == [EventKind.PAUSED, EventKind.RESUMED]


def test_cancel_wakes_a_waiting_receive() -> None:
    runtime = _runtime(_Channel())
    greenlet = gevent.spawn(runtime.receive, None)
    _until(lambda: len(runtime._cond._waiters) == 1, "the task to wait")
    runtime.control("cancel", None)
    greenlet.join(timeout=10)
    assert isinstance(greenlet.exception, Cancelled)
