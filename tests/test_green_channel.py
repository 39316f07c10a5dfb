"""The green pools' slot channel (interactive_tasks.worker.pools.green_channel): one
in-process inbox for every green slot, woken through one descriptor.

No green threads and no timings: what the inbox hands the worker loop, in which order,
and when its descriptor is readable, are observed directly; then a worker's loop callback
acting on it.
"""

from __future__ import annotations

import select
import uuid
from typing import Any

import pytest

from interactive_tasks import App
from interactive_tasks.protocol import EventKind
from interactive_tasks.worker.ipc import ChannelClosed
from interactive_tasks.worker.main import INBOX_BATCH, Worker
from interactive_tasks.worker.order import SLOT, ControlFirstHub
from interactive_tasks.worker.pools.base import PoolSlot
from interactive_tasks.worker.pools.green_channel import (
    CLOSED,
    GreenChannel,
    SlotInbox,
    decode,
)


def _progress(task_id: str, n: int) -> list[Any]:
    return ["ev", task_id, EventKind.PROGRESS, {"current": n, "total": None}, 0.0]


def _message(task_id: str, data: Any) -> list[Any]:
    return ["ev", task_id, EventKind.MESSAGE, {"data": data}, 0.0]


def _readable(inbox: SlotInbox) -> bool:
    return bool(select.select([inbox.fileno()], [], [], 0)[0])


def _drain_all(inbox: SlotInbox, limit: int = 1000) -> list[tuple[Any, Any]]:
    frames: list[tuple[Any, Any]] = []
    while True:
        taken = inbox.drain(limit)
        if not taken:
            return frames
        frames += [(slot, CLOSED if body == CLOSED else decode(body)) for slot, body in taken]


@pytest.fixture
def inbox() -> Any:
    box = SlotInbox()
    yield box
    box.close()


def _channels(inbox: SlotInbox, count: int) -> list[GreenChannel]:
    channels = [GreenChannel(inbox) for _ in range(count)]
    for i, channel in enumerate(channels):
        channel.slot = f"slot{i}"
    return channels


def test_frames_other_than_progress_are_handed_over_before_progress(inbox):
    a, b = _channels(inbox, 2)
    a.send_progress(_progress("ta", 1))
    b.send(_message("tb", "reply"))
    b.send(["done", "tb", EventKind.SUCCEEDED, {"result": 1}, 0.0])
    frames = _drain_all(inbox)
    assert [(slot, frame[0], frame[2]) for slot, frame in frames] == [
        ("slot1", "ev", EventKind.MESSAGE), ("slot1", "done", EventKind.SUCCEEDED),
        ("slot0", "ev", EventKind.PROGRESS)]


def test_unread_progress_is_replaced_by_the_latest_of_the_same_task(inbox):
    a, b = _channels(inbox, 2)
    for n in range(100):
        a.send_progress(_progress("ta", n))
        b.send_progress(_progress("tb", n))
    frames = _drain_all(inbox)
    assert [(slot, frame[3]["current"]) for slot, frame in frames] == [
        ("slot0", 99), ("slot1", 99)]


def test_a_slot_s_frames_keep_their_order_less_superseded_progress(inbox):
    (a,) = _channels(inbox, 1)
    for n in range(10):
        a.send_progress(_progress("t1", n))
    a.send(_message("t1", "hi"))  # takes the waiting progress ahead of it
    for n in range(10, 20):
        a.send_progress(_progress("t1", n))
    a.send(["done", "t1", EventKind.SUCCEEDED, {}, 0.0])
    a.send_progress(_progress("t2", 0))  # the slot's next task
    frames = [frame for _, frame in _drain_all(inbox)]
    seen = [(f[1], f[0], f[3].get("current", f[3].get("data"))) if f[0] == "ev"
            else (f[1], f[0]) for f in frames]
    assert seen == [("t1", "ev", 9), ("t1", "ev", "hi"), ("t1", "ev", 19), ("t1", "done"),
                    ("t2", "ev", 0)]


def test_progress_of_another_task_on_the_same_slot_does_not_replace_the_waiting_one(inbox):
    (a,) = _channels(inbox, 1)
    a.send_progress(_progress("t1", 1))
    a.send_progress(_progress("t2", 2))
    a.send_progress(_progress("t2", 3))
    frames = [frame for _, frame in _drain_all(inbox)]
    assert [(f[1], f[3]["current"]) for f in frames] == [("t1", 1), ("t2", 3)]


def test_a_batch_is_bounded_and_the_descriptor_stays_readable_until_all_is_taken(inbox):
    channels = _channels(inbox, 50)
    assert not _readable(inbox)
    for n in range(20):
        for channel in channels:
            channel.send_progress(_progress(str(channel.slot), n))
    for channel in channels:
        channel.send(["done", str(channel.slot), EventKind.SUCCEEDED, {}, 0.0])
    assert _readable(inbox)
    assert len(inbox.drain(30)) == 30
    assert _readable(inbox)  # the rest waits for the loop's next turns
    rest = _drain_all(inbox, limit=7)
    assert not _readable(inbox)
    # every slot's last progress and its done, none lost, progress before done
    assert len(rest) == 100 - 30
    inbox.put("again", b"")
    assert _readable(inbox)


def test_no_done_frame_is_lost_under_a_flood_of_progress(inbox):
    channels = _channels(inbox, 200)
    done: list[str] = []
    handed: list[Any] = []
    for n in range(30):
        for i, channel in enumerate(channels):
            channel.send_progress(_progress(f"t{i}", n))
            if n == 10 * (i % 3):
                channel.send(["done", f"t{i}", EventKind.SUCCEEDED, {}, 0.0])
                done.append(f"t{i}")
        if n % 4 == 0:  # the loop takes a batch now and then
            handed += [decode(body) for _, body in inbox.drain(INBOX_BATCH)]
    handed += [frame for _, frame in _drain_all(inbox)]
    assert len(done) == 200
    assert sorted(f[1] for f in handed if f[0] == "done") == sorted(done)
    assert not _readable(inbox)


def test_every_done_frame_reaches_the_loop_in_order_with_the_slot_s_progress(inbox):
    channels = _channels(inbox, 100)
    handed: list[tuple[Any, Any]] = []
    for n in range(20):
        for i, channel in enumerate(channels):
            channel.send_progress(_progress(f"t{i}", n))
            if n == 5 + i % 10:
                channel.send(["done", f"t{i}", EventKind.SUCCEEDED, {}, 0.0])
        handed += [(s, decode(b)) for s, b in inbox.drain(37)]
    handed += _drain_all(inbox)
    for i, channel in enumerate(channels):
        mine = [f for s, f in handed if s == channel.slot]
        kinds = [f[0] for f in mine]
        assert kinds.count("done") == 1
        before = mine[:kinds.index("done")]
        currents = [f[3]["current"] for f in before]
        # progress before the done: increasing, the last one sent before the done present
        assert currents == sorted(currents) and currents[-1] == 5 + i % 10
        after = [f[3]["current"] for f in mine[kinds.index("done") + 1:]]
        assert after == sorted(after) and (not after or after[-1] == 19)


def test_closed_reaches_the_loop_after_everything_the_slot_sent(inbox):
    (a,) = _channels(inbox, 1)
    a.send_progress(_progress("t1", 1))
    a.closed()
    assert _drain_all(inbox) == [("slot0", _progress("t1", 1)), ("slot0", CLOSED)]


def test_what_cannot_be_encoded_fails_in_the_slot_and_queues_nothing(inbox):
    (a,) = _channels(inbox, 1)
    with pytest.raises(TypeError):
        a.send(["done", "t1", EventKind.SUCCEEDED, {"result": object()}, 0.0])
    assert not _readable(inbox) and len(inbox) == 0


def test_the_worker_s_frames_reach_the_slot_in_order_until_it_closes(inbox):
    (a,) = _channels(inbox, 1)
    assert a.write(["run", {"id": "t1"}]) and a.pending == 0 and a.flush()
    a.write(["ctl", "t1", "pause", None])
    assert a.recv() == ["run", {"id": "t1"}]
    assert a.recv() == ["ctl", "t1", "pause", None]
    a.close()
    for _ in range(2):
        with pytest.raises(ChannelClosed):
            a.recv()


@pytest.fixture
def worker() -> Any:
    app = App("green", broker="memory://", namespace=f"g{uuid.uuid4().hex[:8]}")
    return Worker(app, pool="threads", concurrency=1, hostname="green@test")


def test_the_loop_acts_on_the_inbox_in_bounded_batches_and_ranks_it_with_slots(
        worker, inbox, monkeypatch):
    monkeypatch.setattr(worker.pool, "inbox", inbox)
    emitted: list[tuple[str, Any]] = []
    monkeypatch.setattr(worker.relay, "emit",
                        lambda record, kind, fields, ts=None: emitted.append((kind, fields)))
    slots = []
    for i in range(INBOX_BATCH + 10):
        channel = GreenChannel(inbox)
        slot = PoolSlot(index=i, pid=0, sock=None, writer=channel)
        channel.slot = slot
        slot.ready, slot.task_id = True, f"t{i}"
        worker.records[f"t{i}"] = type("Record", (), {"slot": slot})()
        channel.send_progress(_progress(f"t{i}", 1))
        slots.append(slot)
    slots[-1].writer.send(_message(f"t{len(slots) - 1}", "reply"))  # type: ignore[attr-defined]
    assert worker._on_inbox_readable()
    assert len(emitted) == INBOX_BATCH
    assert emitted[0] == (EventKind.PROGRESS, {"current": 1, "total": None})
    assert emitted[1] == (EventKind.MESSAGE, {"data": "reply"})  # ahead of other slots'
    worker.drain_slot(slots[0])
    assert len(emitted) == INBOX_BATCH + 11
    hub = ControlFirstHub(lambda cb: False, worker._is_slot_reader)
    try:
        hub.add_reader(inbox.fileno(), worker._on_inbox_readable)
        assert hub.rank(inbox.fileno()) == SLOT
    finally:
        hub.close()


def test_a_closed_green_slot_is_replaced_without_a_socket(worker, inbox, monkeypatch):
    monkeypatch.setattr(worker.pool, "inbox", inbox)
    spawned: list[int] = []

    def spawn(index: int) -> PoolSlot:
        spawned.append(index)
        return PoolSlot(index=index, pid=0, sock=None, writer=GreenChannel(inbox))

    monkeypatch.setattr(worker.pool, "spawn", spawn)
    channel = GreenChannel(inbox)
    slot = PoolSlot(index=3, pid=0, sock=None, writer=channel)
    channel.slot = slot
    slot.ready = True
    worker.slots[:] = [slot]
    channel.closed()
    worker._on_inbox_readable()
    assert slot.closed and spawned == [3] and worker.slots[0] is not slot


def test_a_green_slot_ending_without_a_stop_frame_ends_its_reader_too(monkeypatch):
    # A slot whose serve() ends another way than by the worker's "stop" (a forced stop
    # between jobs, an error) must also end the reader green thread that waits for the
    # worker's next frame: its recv raises ChannelClosed instead of waiting for ever.
    from interactive_tasks.worker.pools import green

    class _EndsAtOnce:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def serve(self) -> None:
            raise RuntimeError("slot ended")

    class _Pool(green.GreenPool):
        def start_green(self, serve: Any) -> Any:
            with pytest.raises(RuntimeError):
                serve()
            return None

        def force_stop(self, slot: PoolSlot) -> str:
            return "not used"

    monkeypatch.setattr(green, "Slot", _EndsAtOnce)
    app = App("green", broker="memory://", namespace=f"g{uuid.uuid4().hex[:8]}")
    pool = _Pool(app, 1, "green@test")
    try:
        slot = pool.spawn(0)
        assert [body for _, body in pool.inbox.drain(10)] == [CLOSED]
        with pytest.raises(ChannelClosed):
            slot.writer.recv()
    finally:
        pool.inbox.close()


def test_a_closed_inbox_ignores_slots_that_still_send(inbox):
    (a,) = _channels(inbox, 1)
    inbox.close()
    inbox.close()  # twice: nothing happens
    a.send(_message("t1", 1))  # a slot still ending after the worker stopped
    a.closed()
    assert inbox.fileno() == -1
