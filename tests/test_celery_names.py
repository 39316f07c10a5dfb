"""Celery names that map one to one: ``@shared_task``, ``res.parent``, ``res.forget()``."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from interactive_tasks import App, InteractiveTask, chain, shared, shared_task
from interactive_tasks.errors import NotAuthorized
from interactive_tasks.worker.testing import start_worker

from .conftest import wait_for


def memory_app(name: str) -> App:
    return App(name, broker="memory://", namespace=f"m{uuid.uuid4().hex[:8]}")


@pytest.fixture
def forget_shared() -> Iterator[None]:
    """Shared tasks defined by a test bind to every app made later: drop them after it."""
    before = list(shared._shared)
    yield
    shared._shared[:] = before


def test_shared_task_binds_to_every_app_and_runs_on_the_current_one(forget_shared):
    before = memory_app("before")

    @shared_task(name="shared.mul")
    def mul(x: int, y: int) -> int:
        return x * y

    @shared_task(base=InteractiveTask, name="shared.steps")
    def steps(self, n: int) -> int:
        for i in range(n):
            self.progress(i + 1, n)
        return n

    assert isinstance(mul, shared.SharedTask)
    assert {"shared.mul", "shared.steps"} <= set(before.tasks)  # an app made before
    current = memory_app("current")
    assert {"shared.mul", "shared.steps"} <= set(current.tasks)  # and one made after
    assert mul.name == "shared.mul" and mul.app is current  # the last app made is current
    assert mul(6, 7) == 42  # called directly: the function runs here
    with start_worker(current, concurrency=2):
        assert mul.delay(6, 7).result(timeout=10) == 42
        handle = steps.start(3)
        assert handle.result(timeout=10) == 3
        assert handle.progress is not None and handle.progress.current == 3
        assert (mul.s(2, 3) | mul.s(4)).apply_async().result(timeout=10) == 24
    before.close()
    current.close()


def test_shared_task_with_an_unknown_option_is_refused_at_once(forget_shared):
    with pytest.raises(TypeError, match=r"unknown task option.*no_such_option"):
        @shared_task(no_such_option=True)
        def broken() -> None:
            return None
    memory_app("after").close()  # nothing was kept that would fail a later app


def test_chain_steps_lead_back_through_parent():
    app = memory_app("parents")

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    with start_worker(app):
        handle = chain(add.s(1, 2), add.s(3), add.s(4)).apply_async()
        assert handle.result(timeout=10) == 10
    first, second, third = handle.steps
    assert handle.parent is second and third.parent is second
    assert second.parent is first and first.parent is None
    assert second.result(timeout=1) == 6 and handle.parent.parent.result(timeout=1) == 3
    assert add.delay(1, 1).parent is None
    app.close()


@pytest.mark.parametrize("broker", ["redis", "embedded"], indirect=True)
def test_forget_drops_the_stored_result(tasks, start_worker, broker):
    start_worker(concurrency=1)
    handle = tasks.add.delay(2, 2)
    assert handle.result(timeout=10) == 4
    wait_for(lambda: tasks.app.results.get(handle.id), 5, message="the result stored")
    kept = tasks.add.delay(3, 3)
    assert kept.result(timeout=10) == 6
    handle.forget()
    assert tasks.app.results.get(handle.id) is None
    assert handle.result(timeout=0) == 4  # this handle keeps what it knew
    assert tasks.app.results.get(kept.id) is not None  # only that one
    if broker.name == "redis":  # the embedded broker's user holds the operator secret
        with pytest.raises(NotAuthorized, match="no token to forget"):
            tasks.app.attach(kept.id).forget()


def test_ignore_result_is_accepted_and_the_result_kept():
    app = memory_app("ignore")

    @app.task(ignore_result=True)
    def quiet() -> str:
        return "kept"

    with start_worker(app):
        handle = quiet.apply_async(ignore_result=True)
        assert handle.result(timeout=10) == "kept"
    assert app.results.get(handle.id)["result"] == "kept"
    app.close()
