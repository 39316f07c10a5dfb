"""A workflow's handles watch their tasks before the first message goes out.

The client's inbox drops an event of a task nobody in the process watches. ``chain``
and ``group`` used to publish the first step (each member) and only then create its
handle: when the worker ran that step and its final event reached the inbox before the
handle existed (a client thread descheduled for a few milliseconds on a busy machine), the
handle never saw an event and ``events()`` ended in ``TaskTimeout``
(``tests/test_doc_examples.py::test_demo[workflows_demo]``, once in a few full runs).

Here the window is held open: the patched ``send_task`` returns only once the inbox has
dispatched an event of the task it sent.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from interactive_tasks import EventKind, chain, group
from tests.conftest import WorkerProcess, wait_for


@pytest.fixture
def slow_to_return(tasks: Any, start_worker: Callable[..., WorkerProcess],
                   monkeypatch: pytest.MonkeyPatch) -> Any:
    """``tasks`` on a worker, with a client whose ``send_task`` returns only after an event
    of the sent task went through its inbox."""
    start_worker()
    client = tasks.app.client
    client.ensure_started()
    seen: set[str] = set()
    lock = threading.Lock()
    dispatch, send_task = client._dispatch, client.send_task

    def recording_dispatch(payload: dict[str, Any]) -> None:
        dispatch(payload)
        with lock:
            seen.update(w[0] for w in payload.get("e") or () if isinstance(w, list) and w)

    def late_send_task(message: Any, priority: int | None = None) -> None:
        send_task(message, priority)
        wait_for(lambda: message.id in seen, 30, message=f"an event of {message.id}")

    monkeypatch.setattr(client, "_dispatch", recording_dispatch)
    monkeypatch.setattr(client, "send_task", late_send_task)
    return tasks


def test_a_chain_step_sees_its_events_when_they_come_before_send_returns(
        slow_to_return: Any) -> None:
    t = slow_to_return
    flow = chain(t.add.s(2, 3), t.add.s(4)).delay()
    events = list(flow.events(timeout=10))
    assert [(e.task_id, e.kind) for e in events if e.is_final] == [
        (flow.steps[0].id, EventKind.SUCCEEDED), (flow.steps[1].id, EventKind.SUCCEEDED)]
    assert flow.result(timeout=10) == 9


def test_a_group_member_sees_its_events_when_they_come_before_send_returns(
        slow_to_return: Any) -> None:
    t = slow_to_return
    handle = group(t.add.s(1, 1), chain(t.add.s(2, 2), t.add.s(1))).delay()
    for member in handle:
        assert [e.kind for e in member.events(timeout=10) if e.is_final][-1] == \
            EventKind.SUCCEEDED
    assert handle.result(timeout=10) == [2, 5]
