"""The embedded broker's ``fsync`` transport option: what it forces to disk, and what not.

``os.fsync`` is wrapped to record the path behind each descriptor it is given: in this
process by a fixture, in a worker through ``ITASK_TEST_FSYNC_LOG`` (tests/apps/tasks.py).
"""

from __future__ import annotations

import importlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from interactive_tasks.results import FileResultStore
from interactive_tasks.transport.embedded_delay import EmbeddedDelayed
from interactive_tasks.transport.embedded_store import store_for

from .conftest import BrokerEnv, WorkerProcess

TASKS = "it.tasks.default"
INBOX = "it.inbox.c1"


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths this process fsyncs, in order."""
    seen: list[str] = []
    real = os.fsync

    def recording(fd: Any) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{int(fd)}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return seen


def under(path: str, directory: str) -> bool:
    return path.startswith(directory.rstrip("/") + "/")


@pytest.mark.parametrize("fsync", [True, False])
def test_fsync_forces_task_publishes_acks_results_and_schedules_and_nothing_else(
        fsync: bool, tmp_path: Path, fsyncs: list[str]) -> None:
    store = store_for(str(tmp_path / "broker"), fsync=fsync)
    store.ensure()  # what a connection does first
    store.declare_queue(TASKS, None)  # a task queue: no expiry
    store.declare_queue(INBOX, 60.0)  # a client's inbox: expires with its client
    qdir, inbox = store.queue_path(TASKS), store.queue_path(INBOX)
    results = FileResultStore(tmp_path / "results", "it", 3600, fsync=fsync)
    delayed = EmbeddedDelayed(store)
    fsyncs.clear()

    def step(action: Any) -> list[str]:
        fsyncs.clear()
        action()
        return list(fsyncs)

    publish = step(lambda: store.put(TASKS, b"m1"))
    again = step(lambda: store.put(TASKS, b"m2"))
    to_inbox = step(lambda: store.put(INBOX, b"event"))
    claims: list[tuple[str, bytes] | None] = []
    claim = step(lambda: claims.extend(
        store.claim(TASKS, name) for name in store.list_ready(qdir)))
    reserved = [c[0] for c in claims if c is not None]
    ack = step(lambda: store.settle(TASKS, reserved[0]))
    give_back = step(lambda: store.unreserve(TASKS, reserved[1]))
    inbox_claim = store.claim(INBOX, store.list_ready(inbox)[0])
    assert inbox_claim is not None
    inbox_ack = step(lambda: store.settle(INBOX, inbox_claim[0]))
    result = step(lambda: results.put("t1", {"state": "succeeded"}))
    schedule = step(lambda: delayed.schedule(TASKS, "t2", b"later", time.time() - 1))
    move = step(lambda: delayed.move_due())

    if not fsync:
        assert [publish, again, to_inbox, claim, ack, give_back, inbox_ack, result, schedule,
                move] == [[]] * 10
        return
    root = str(tmp_path / "broker")
    # a publish: the message file, then its name in the queue; the first one to a queue
    # in this process also the directories above it
    assert under(publish[0], qdir + "/.tmp") and publish[1:] == [qdir, f"{root}/queues", root]
    assert under(again[0], qdir + "/.tmp") and again[1:] == [qdir]
    assert to_inbox == [] and inbox_ack == []  # transient queues are never forced
    assert claim == [] and give_back == []  # either state is delivered after a crash
    assert ack == [f"{qdir}/.reserved"]
    bucket = str(tmp_path / "results" / "it" / str(int(time.time() // 3600)))
    assert result[0] == str(tmp_path / "results" / "it")  # the new hour's directory
    assert under(result[1], bucket) and result[2:] == [bucket]
    scheduled = f"{root}/scheduled"
    assert schedule[:2] == [root, scheduled]  # scheduled/ itself, once
    assert under(schedule[2], scheduled + "/.tmp") and schedule[3:] == [scheduled]
    assert under(move[0], qdir + "/.tmp") and move[1:] == [qdir, f"{scheduled}/.moving"]


def test_a_worker_with_fsync_forces_each_task_its_ack_and_its_result_to_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fsyncs: list[str]) -> None:
    """``broker_transport_options={"fsync": True}`` on a real worker and its client: each
    task's publish reaches the disk (client), and so do its ack and its result (worker);
    the events and results sent to the client's inbox do not."""
    home, records = tmp_path / "home", tmp_path / "records"
    home.mkdir()
    records.mkdir()
    broker_dir = tmp_path / "broker"
    settings = json.dumps({"broker_transport_options": {"fsync": True}})
    env = BrokerEnv("embedded", f"embedded://{broker_dir}", f"t{uuid.uuid4().hex[:10]}", home,
                    records, extra={"ITASK_TEST_SETTINGS": settings})
    env.apply(monkeypatch)
    import tests.apps.tasks as tasks_module

    tasks = importlib.reload(tasks_module)
    worker_log = tmp_path / "worker-fsyncs"
    worker = WorkerProcess(env, tmp_path, concurrency=2,
                           extra_env={"ITASK_TEST_FSYNC_LOG": str(worker_log)})
    try:
        worker.wait_ready()
        fsyncs.clear()
        handles = [tasks.add.delay(i, i) for i in range(10)]
        assert [h.result(timeout=30) for h in handles] == [2 * i for i in range(10)]
        client_inbox = tasks.app.client.inbox.name
    finally:
        worker.stop()
        tasks.app.close()
    store = store_for(str(broker_dir))
    qdir = store.queue_path(tasks.app.names.task_queue_name("default"))
    inbox = store.queue_path(client_inbox)
    published = [p for p in fsyncs if under(p, qdir + "/.tmp")]
    assert len(published) == 10 and fsyncs.count(qdir) >= 10
    assert not [p for p in fsyncs if under(p, inbox) or p == inbox]
    done = worker_log.read_text().splitlines()
    results_dir = f"{broker_dir}-results"
    assert done.count(f"{qdir}/.reserved") >= 10  # each ack
    assert len([p for p in done if under(p, results_dir) and p.endswith(".tmp")]) >= 10
    assert not [p for p in done if under(p, inbox) or p == inbox]
