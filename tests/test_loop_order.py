"""Control before bulk in the worker's loop, and no cost per idle pool slot.

No broker and no timings: a loop step's order, what one read of a slot's channel hands on,
which slot a dispatch takes, and what gevent's loop watches while the worker waits, are
each observed directly (docs/architecture.md, "The path of a control message" and "The
path of an event").
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from typing import Any

import pytest
from kombu.asynchronous.hub import READ

from interactive_tasks import App
from interactive_tasks.protocol import EventKind
from interactive_tasks.worker.ipc import encode_frame
from interactive_tasks.worker.main import SLOT_READ_BYTES, Worker
from interactive_tasks.worker.order import CONTROL, SLOT, ControlFirstHub, ControlFirstPoller
from interactive_tasks.worker.pools.base import PoolSlot

from .conftest import IN_CI


class _FakePoller:
    def __init__(self, events: list[tuple[int, int]]) -> None:
        self.events = events

    def poll(self, timeout: float | None) -> list[tuple[int, int]]:
        return list(self.events)


def test_a_step_ranks_control_then_broker_then_slots_keeping_the_kernel_order_within():
    ranks = {1: SLOT, 2: SLOT, 3: 1, 4: CONTROL, 5: SLOT, 6: 1}
    poller = ControlFirstPoller(_FakePoller([(fd, READ) for fd in range(1, 7)]), ranks.get)
    assert [fd for fd, _ in poller.poll(0)] == [4, 3, 6, 1, 2, 5]


def test_a_control_frame_is_handled_before_the_progress_of_slots_ready_before_it():
    handled: list[str] = []

    def on_slot(sock: socket.socket) -> None:
        sock.recv(4096)
        handled.append("slot")

    def on_control(sock: socket.socket) -> None:
        sock.recv(4096)
        handled.append("control")

    hub = ControlFirstHub(lambda cb: cb is on_control, lambda cb: cb is on_slot)
    pairs = [socket.socketpair() for _ in range(20)]
    try:
        slots, control = pairs[:-1], pairs[-1]
        for ours, _ in slots:
            hub.add_reader(ours, on_slot, ours)
        hub.add_reader(control[0], on_control, control[0])
        # Progress is ready on every slot first (the kernel reports them first), then the
        # control frame arrives.
        for _, theirs in slots:
            theirs.send(b"progress")
        control[1].send(b"pause")
        step = hub.create_loop()
        while len(handled) < len(pairs):
            next(step)
        assert handled[0] == "control", handled
    finally:
        hub.close()
        for a, b in pairs:
            a.close()
            b.close()


@pytest.fixture
def worker() -> Any:
    app = App("order", broker="memory://", namespace=f"o{uuid.uuid4().hex[:8]}")
    app.task(name="t.noop")(lambda: None)
    return Worker(app, pool="threads", concurrency=1, hostname="order@test")


def _slot_with_record(worker: Any, task_id: str) -> tuple[PoolSlot, socket.socket, Any]:
    ours, theirs = socket.socketpair()
    slot = PoolSlot(index=0, pid=0, sock=ours)
    slot.ready, slot.task_id = True, task_id
    record: Any = type("Record", (), {"slot": slot})()
    worker.records[task_id] = record
    return slot, theirs, record


def _progress(task_id: str, n: int) -> list[Any]:
    return ["ev", task_id, EventKind.PROGRESS, {"current": n, "total": None}, 0.0]


def test_progress_a_later_frame_of_the_same_read_replaces_is_never_numbered(worker, monkeypatch):
    slot, theirs, _ = _slot_with_record(worker, "t1")
    emitted: list[tuple[str, Any]] = []
    monkeypatch.setattr(worker.relay, "emit",
                        lambda record, kind, fields, ts=None: emitted.append((kind, fields)))
    frames = [_progress("t1", n) for n in range(100)]
    frames.append(["ev", "t1", EventKind.MESSAGE, {"data": "hi"}, 0.0])
    frames += [_progress("t1", n) for n in range(100, 150)]
    theirs.sendall(b"".join(encode_frame(f) for f in frames))
    try:
        while worker._on_slot_readable(slot):
            pass
    except BlockingIOError:
        pass
    # the last progress before the message, the message, the latest progress: in order
    currents = [(kind, fields.get("current", fields.get("data"))) for kind, fields in emitted]
    assert currents == [(EventKind.PROGRESS, 99), (EventKind.MESSAGE, "hi"),
                        (EventKind.PROGRESS, 149)]
    slot.sock.close()
    theirs.close()


def test_one_read_of_a_flooding_slot_is_bounded(worker, monkeypatch):
    slot, theirs, _ = _slot_with_record(worker, "t1")
    monkeypatch.setattr(worker.relay, "emit", lambda *args, **kwargs: None)
    data = b"".join(encode_frame(_progress("t1", n)) for n in range(20_000))
    assert len(data) > 4 * SLOT_READ_BYTES
    theirs.setblocking(False)
    sent = theirs.send(data)  # as much as the socket takes
    assert sent > 2 * SLOT_READ_BYTES
    assert worker._on_slot_readable(slot)
    # the rest waits for later steps, with control handled between
    left = len(slot.sock.recv(1 << 22, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    assert left >= sent - SLOT_READ_BYTES
    slot.sock.close()
    theirs.close()


class _NoScan(list):
    """The pool's slots; looking through them all fails the test."""

    def __iter__(self) -> Any:
        raise AssertionError("the loop looked through every pool slot")


def test_a_free_slot_is_found_without_looking_through_the_pool(worker):
    slots = [PoolSlot(index=i, pid=0, sock=socket.socket()) for i in range(1000)]
    for slot in slots:
        slot.ready, slot.task_id = True, f"busy{slot.index}"
    worker.state.slots = worker.slots = _NoScan(slots)
    assert worker._free_slot() is None  # every slot busy
    # slot 500's task ends: the worker learns that from its "done" frame
    slots[500].task_id = None
    worker._on_frame(slots[500], ["done", "busy500", EventKind.SUCCEEDED, {}, 0.0])
    assert worker._free_slot() is slots[500]
    slots[500].task_id = "next"  # taken: not offered again
    assert worker._free_slot() is None
    for slot in slots:
        slot.sock.close()


def test_the_gevent_loop_waits_on_one_watcher_however_many_slots():
    try:
        import gevent
    except ImportError:
        if IN_CI:
            pytest.fail("gevent is missing (it is in the dev extra)")
        pytest.skip("gevent is not installed")
    from kombu.utils import eventio

    from interactive_tasks.worker.pools.gevent import GeventPool

    before = eventio._get_poller
    app = App("order", broker="memory://", namespace=f"o{uuid.uuid4().hex[:8]}")
    try:
        GeventPool(app, 1, "order@test")
        poller = eventio.poll()
    finally:
        eventio._get_poller = before
    pairs = [socket.socketpair() for _ in range(500)]
    watched: list[int] = []

    def ring() -> None:
        watched.append(gevent.get_hub().loop.activecnt)  # while the worker loop waits
        pairs[250][1].send(b"x")

    try:
        for ours, _ in pairs:
            poller.register(ours.fileno(), READ)
        gevent.spawn(ring)
        ready = poller.poll(30)  # yields to the greenlet, which rings one slot
        assert [fd for fd, _ in ready] == [pairs[250][0].fileno()]
        assert watched and watched[0] < 50, watched
    finally:
        poller.close()
        for a, b in pairs:
            a.close()
            b.close()


def test_a_slot_runs_tasks_below_the_priority_of_its_control_reader():
    from interactive_tasks.worker.child import Slot
    from interactive_tasks.worker.ipc import BlockingChannel, FrameReader

    app = App("order", broker="memory://", namespace=f"o{uuid.uuid4().hex[:8]}")
    ours, theirs = socket.socketpair()
    runner = Slot(app, BlockingChannel(theirs), "order@test", nice=3)
    base = os.getpriority(os.PRIO_PROCESS, 0)
    serving = threading.Thread(target=runner.serve, name="order-slot", daemon=True)
    serving.start()
    try:
        reader = FrameReader()
        frames: list[Any] = []
        while not frames:
            frames += reader.feed(ours.recv(4096))
        assert frames[0][0] == "ready"  # sent after the executor lowered its priority
        readers = [t for t in threading.enumerate() if t.name == "itask-slot-reader"]
        assert readers
        assert os.getpriority(os.PRIO_PROCESS, serving.native_id) == min(19, base + 3)
        assert all(os.getpriority(os.PRIO_PROCESS, t.native_id) == base for t in readers)
    finally:
        ours.sendall(encode_frame(["stop"]))
        serving.join(10)
        ours.close()
        theirs.close()
