"""The slot side of the worker ↔ slot channel: progress adapts to how far behind the
worker is reading (interactive_tasks.worker.ipc.BlockingChannel)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

from interactive_tasks.worker import ipc
from interactive_tasks.worker.ipc import BlockingChannel, FrameReader

from .conftest import wait_for

pytestmark = pytest.mark.skipif(ipc._OUTQ is None, reason="needs SIOCOUTQ (Linux)")


@pytest.fixture
def pair() -> Iterator[tuple[BlockingChannel, socket.socket]]:
    slot_end, worker_end = socket.socketpair()
    worker_end.setblocking(False)
    channel = BlockingChannel(slot_end)
    slot_end.settimeout(5)  # a frame queued behind an unread buffer fails, not hangs
    yield channel, worker_end
    slot_end.close()
    worker_end.close()


def _drain(sock: socket.socket, reader: FrameReader) -> list[Any]:
    frames: list[Any] = []
    while True:
        try:
            data = sock.recv(1 << 20)
        except BlockingIOError:
            return frames
        frames.extend(reader.feed(data))


def _progress(i: int) -> list[Any]:
    return ["ev", "t1", "progress", {"current": i}, 0.0]


def test_progress_goes_out_at_once_while_the_worker_keeps_up(
        pair: tuple[BlockingChannel, socket.socket]) -> None:
    channel, worker_end = pair
    reader = FrameReader()
    seen: list[Any] = []
    for i in range(50):
        channel.send_progress(_progress(i))
        seen.extend(_drain(worker_end, reader))
    assert [f[3]["current"] for f in seen] == list(range(50))


def test_latest_progress_wins_while_the_worker_is_behind(
        pair: tuple[BlockingChannel, socket.socket]) -> None:
    channel, worker_end = pair
    # Nobody reads: past BEHIND_BYTES unread, progress is held, each replacing the last.
    for i in range(1000):
        channel.send_progress(_progress(i))
    channel.send(["ev", "t1", "message", {"data": "after"}, 0.0])
    frames = _drain(worker_end, FrameReader())
    currents = [f[3]["current"] for f in frames if f[2] == "progress"]
    assert len(currents) < 1000  # some were replaced, none queued behind the worker
    assert currents == sorted(currents) and currents[-1] == 999  # the latest, in order
    assert frames[-1][2] == "message"  # the held progress went out before the message
    unread = ipc.BEHIND_BYTES + len(ipc.encode_frame(_progress(999)))
    assert len(frames) * len(ipc.encode_frame(_progress(999))) <= 2 * unread


def test_held_progress_goes_out_on_its_own(pair: tuple[BlockingChannel, socket.socket]) -> None:
    channel, worker_end = pair
    for i in range(1000):
        channel.send_progress(_progress(i))
    reader = FrameReader()
    frames: list[Any] = []
    # nothing else is sent: the held event goes out on its own (HOLD_S), not with a later
    # frame from the task
    wait_for(lambda: frames.extend(_drain(worker_end, reader)) or (
        frames and frames[-1][3]["current"] == 999), timeout=5,
        message="the held progress event")


def test_held_per_task_on_a_shared_channel(pair: tuple[BlockingChannel, socket.socket]) -> None:
    """The Celery bridge runs several tasks over one channel: each keeps its latest."""
    channel, worker_end = pair
    for i in range(1000):
        channel.send_progress(["ev", "t1", "progress", {"current": i}, 0.0])
        channel.send_progress(["ev", "t2", "progress", {"current": -i}, 0.0])
    assert channel.holding == 2
    channel.send(["rc", "t1", ["inbox", 1]])  # a receipt follows both held events
    frames = _drain(worker_end, FrameReader())
    assert frames[-1][0] == "rc"
    last = {f[1]: f[3]["current"] for f in frames if f[0] == "ev"}
    assert last == {"t1": 999, "t2": -999}
    for task in ("t1", "t2"):
        currents = [abs(f[3]["current"]) for f in frames if f[0] == "ev" and f[1] == task]
        assert currents == sorted(currents)


def test_a_channel_that_holds_again_and_again_keeps_one_flusher_entry(
        pair: tuple[BlockingChannel, socket.socket], monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker reads a little, the slot sends and holds again, over and over (a
    saturated prefork worker): the flush thread keeps one entry for the channel, so it
    wakes once per ``HOLD_S`` at most, not once per hold (each wake takes the
    interpreter lock from the task's thread)."""
    channel, worker_end = pair
    flusher = ipc._Flusher()
    monkeypatch.setattr(ipc, "_flusher", flusher)
    monkeypatch.setattr(ipc, "HOLD_S", 3600.0)  # nothing falls due during the test
    reader = FrameReader()
    i = 0
    for _ in range(20):
        while not channel.holding:  # send until the worker is behind
            channel.send_progress(_progress(i))
            i += 1
        _drain(worker_end, reader)  # the worker catches up:
        channel.send_progress(_progress(i))  # the held event goes out with the next one
        i += 1
        assert channel.holding == 0
    assert len(flusher._due) == 1


def test_held_progress_goes_out_on_its_own_after_holding_again(
        pair: tuple[BlockingChannel, socket.socket], monkeypatch: pytest.MonkeyPatch) -> None:
    """Held, sent with a later frame, held again: the last hold still goes out on its
    own, ``HOLD_S`` after it began (the flush thread, woken for the first hold, looks
    again)."""
    channel, worker_end = pair
    monkeypatch.setattr(ipc, "_flusher", ipc._Flusher())
    monkeypatch.setattr(ipc, "HOLD_S", 0.2)
    reader = FrameReader()
    frames: list[Any] = []
    i = 0
    for _ in range(5):
        while not channel.holding:
            channel.send_progress(_progress(i))
            i += 1
        frames.extend(_drain(worker_end, reader))
        channel.send_progress(_progress(i))  # sends what was held
        i += 1
    while not channel.holding:  # held once more, and left there
        channel.send_progress(_progress(i))
        i += 1
    last = i - 1
    wait_for(lambda: frames.extend(_drain(worker_end, reader)) or (
        frames and frames[-1][3]["current"] == last), timeout=5,
        message="the last held progress event")
    assert channel.holding == 0
