"""The rest of Celery's canvas on real workers, on Redis and RabbitMQ: ``|``, ``.si()``,
``map``, ``starmap``, ``chunks``, a group of chains, a chord whose header holds chains."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from interactive_tasks import ChainHandle, TaskFailed, chain, chord, group
from interactive_tasks.canvas import chunks
from tests.conftest import BrokerEnv, WorkerProcess
from tests.test_signals import APP, _disconnect_all

pytestmark = pytest.mark.parametrize("broker", ["redis", "amqp"], indirect=True)


@pytest.fixture
def t(broker: BrokerEnv, start_worker: Callable[..., WorkerProcess]) -> Iterator[Any]:
    import importlib

    import tests.apps.everyday as module

    _disconnect_all()
    module = importlib.reload(module)
    _disconnect_all()
    start_worker(pool="prefork", concurrency=2, extra_args=APP)
    yield module
    module.app.close()


def test_pipe_and_immutable_signatures(t: Any) -> None:
    workflow = t.add.s(2, 3) | t.mul.s(10) | t.tag.s("total")
    assert isinstance(workflow, chain) and len(workflow.tasks) == 3
    assert workflow.delay().result(timeout=30) == "total:50"
    # chain | sig and sig | chain flatten
    longer = (t.add.s(1, 1) | t.mul.s(3)) | (t.mul.s(2) | t.add.s(1))
    assert len(longer.tasks) == 4
    assert longer.delay().result(timeout=30) == 13
    # an immutable step ignores the previous result
    assert (t.add.s(1, 2) | t.constant.si() | t.tag.s("got")).delay().result(
        timeout=30) == "got:immutable"
    assert (t.add.s(1, 2) | t.add.si(5, 5)).delay().result(timeout=30) == 10
    # group | sig is a chord
    workflow = group(t.square.s(i) for i in range(4)) | t.tsum.s()
    assert isinstance(workflow, chord)
    assert workflow.delay().result(timeout=30) == 0 + 1 + 4 + 9


def test_map_starmap_chunks(t: Any) -> None:
    assert t.square.map([1, 2, 3]).delay().result(timeout=30) == [1, 4, 9]
    assert t.add.starmap([(1, 2), (3, 4)]).delay().result(timeout=30) == [3, 7]
    pairs = list(zip(range(10), range(10), strict=True))
    parts = t.add.chunks(pairs, 3)
    assert isinstance(parts, chunks) and len(parts.group().tasks) == 4
    assert parts.delay().result(timeout=30) == [[0, 2, 4], [6, 8, 10], [12, 14, 16], [18]]
    # a map is a signature like any other: a chain step
    assert (t.square.map([2, 3]) | t.tsum.s()).delay().result(timeout=30) == 13


def test_a_group_of_chains_and_a_chord_of_chains(t: Any) -> None:
    chains = group(t.add.s(i, i) | t.mul.s(10) for i in range(3))
    handle = chains.delay()
    assert all(isinstance(h, ChainHandle) for h in handle)
    assert handle.result(timeout=30) == [0, 20, 40]

    # a mixed group: a signature, a chain, a one-step chain
    mixed = group(t.square.s(3), t.add.s(1, 2) | t.mul.s(2), chain(t.square.s(2)))
    assert mixed.delay().result(timeout=30) == [9, 6, 4]

    # a chord whose header holds chains: the body gets each chain's last result
    body = chord([t.add.s(1, 2) | t.mul.s(10), t.square.s(4),
                  t.add.s(0, 1) | t.mul.s(2) | t.mul.s(3)], t.tsum.s())
    result = body.delay()
    assert result.result(timeout=30) == 30 + 16 + 6
    assert result.header.result(timeout=5) == [30, 16, 6]

    # a chain in the header that fails: the chord's body fails instead of waiting
    failing = chord([t.boom.s("in a chain") | t.mul.s(2), t.square.s(2)], t.tsum.s())
    handle = failing.delay()
    with pytest.raises(TaskFailed, match="ChordError"):
        handle.result(timeout=30)
