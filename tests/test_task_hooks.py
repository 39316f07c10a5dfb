"""Task class hooks (``on_success``, ``on_failure``, ``on_retry``, ``after_return``) and
callbacks (``apply_async(link=, link_error=)``, ``.si()``) on real workers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from interactive_tasks import TaskFailed, TaskRevoked
from tests.conftest import BrokerEnv, WorkerProcess, wait_for
from tests.test_signals import APP, _disconnect_all, _of


@pytest.fixture
def everyday(broker: BrokerEnv) -> Iterator[Any]:
    import importlib

    import tests.apps.everyday as module

    _disconnect_all()
    module = importlib.reload(module)
    _disconnect_all()  # this process only publishes; the worker has the receivers
    yield module
    module.app.close()


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_hooks_of_a_class_based_task(broker: BrokerEnv, everyday: Any, pool: str,
                                     start_worker: Callable[..., WorkerProcess]) -> None:
    worker = start_worker(pool=pool, concurrency=2, extra_args=APP)
    ok = everyday.hooked.delay(1)
    assert ok.result(timeout=20) == 2
    failed = everyday.hooked.delay(2, fail=True)
    with pytest.raises(TaskFailed):
        failed.result(timeout=20)
    retried = everyday.hooked.delay(3, retry=True)
    assert retried.result(timeout=20) == 4
    raising = everyday.hooked.delay(4, hook_raises=True)
    assert raising.result(timeout=20) == 5  # a hook that raises changes nothing
    fn = everyday.hooked_fn.delay(5)
    assert fn.result(timeout=20) == 50

    notes = wait_for(lambda: (n := everyday.notes(broker.record_dir)) and
                     _of(n, "after_return", fn.id) and n, 10, message="hook notes")
    [success] = _of(notes, "on_success", ok.id)
    assert success["retval"] == 2 and success["args"] == [1] and success["kwargs"] == {}
    assert success["request_id"] == ok.id  # self.request is the run's
    [after] = _of(notes, "after_return", ok.id)
    assert after["status"] == "succeeded" and after["retval"] == "2" and not after["einfo"]
    assert not _of(notes, "on_failure", ok.id)

    [failure] = _of(notes, "on_failure", failed.id)
    assert failure["exc"] == "ValueError: failing on 2" and failure["einfo_ok"]
    [after] = _of(notes, "after_return", failed.id)
    assert after["status"] == "failed" and after["einfo"]
    assert not _of(notes, "on_success", failed.id)

    [retry] = _of(notes, "on_retry", retried.id)
    assert "again" in retry["exc"]
    assert [a["status"] for a in _of(notes, "after_return", retried.id)] == \
        ["retry", "succeeded"]
    assert len(_of(notes, "on_success", retried.id)) == 1

    assert "after_return raised" in worker.log() and "a hook that fails" in worker.log()
    [success] = _of(notes, "on_success", fn.id)
    assert success["retval"] == 50


@pytest.mark.parametrize("broker", ["redis", "amqp"], indirect=True)
def test_link_and_link_error(broker: BrokerEnv, everyday: Any,
                             start_worker: Callable[..., WorkerProcess]) -> None:
    start_worker(pool="prefork", concurrency=2, extra_args=APP)
    # link: the result is the callback's first argument; several callbacks; .si() none
    handle = everyday.add.apply_async(
        (2, 3), link=[everyday.tag.s("sum"), everyday.constant.si()],
        link_error=everyday.tag.s("error"))
    assert handle.result(timeout=20) == 5
    linked, immutable, errback = handle.children
    assert linked.result(timeout=20) == "sum:5"
    assert immutable.result(timeout=20) == "immutable"
    # the errback that does not apply ends revoked: its handle finishes too
    with pytest.raises(TaskRevoked):
        errback.result(timeout=20)

    # link_error: the failed task's id is the errback's first argument
    failed = everyday.boom.apply_async(("no",), link=everyday.tag.s("ok"),
                                       link_error=[everyday.tag.s("failed")])
    with pytest.raises(TaskFailed):
        failed.result(timeout=20)
    not_run, errback = failed.children
    assert errback.result(timeout=20) == f"failed:{failed.id}"
    with pytest.raises(TaskRevoked):
        not_run.result(timeout=20)

    # a signature's link works the same (Celery: sig.apply_async(link=...))
    sig_handle = everyday.add.s(10).apply_async((1,), link=everyday.tag.s("sig"))
    assert sig_handle.children[0].result(timeout=20) == "sig:11"


@pytest.mark.parametrize("broker", ["embedded"], indirect=True)
def test_link_takes_signatures_only(everyday: Any) -> None:
    with pytest.raises(TypeError, match="link takes task signatures"):
        everyday.add.apply_async((1, 2), link=everyday.tag)
