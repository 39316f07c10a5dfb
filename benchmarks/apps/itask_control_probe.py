"""``itask worker -A benchmarks.apps.itask_control_probe``: the benchmarks' itask app
(:mod:`.itask_worker`) with timestamps along the control path, for
``python -m benchmarks.redis_control_profile``.

Importing it in the worker (before the prefork pool forks) wraps the methods a control
message passes through and makes them write ``time.time()`` into a table in anonymous
shared memory that the pool processes inherit; the task ``bench.ctl_probe`` receives
``n`` messages and returns that table. Each probe runs in one thread of one process only,
so each has its own row and counter; the k-th stamp of every row belongs to the k-th
message (the client sends them one at a time, ``CONTROL_GAP`` apart). A stamp costs one
``time.time()`` and a ``struct.pack_into`` (about half a microsecond).
"""

from __future__ import annotations

import functools
import mmap
import os
import struct
import time
from collections.abc import Callable
from typing import Any

from benchmarks.apps.itask_worker import app, bench
from interactive_tasks import InteractiveTask

#: the probes, in the order a control message passes them (name → where it stamps)
PROBES = {
    "loop woke": "the worker loop's poll returned, in the step that read the control list",
    "control read": "HubCommand._on_readable entered (the control list's BLMPOP reply)",
    "frames parsed": "ControlRouter.on_frames entered (reply parsed by hiredis)",
    "frame checked": "ControlRouter._on_control entered (control_frame: the body cut out)",
    "decoded": "ControlRouter.task_control entered (codec.loads, control_fields, the "
               "HeldControl built)",
    "held": "ControlRouter.apply_task_control entered (the task's record looked up)",
    "authorized": "ControlRouter._apply entered (token checked, sequence number noted)",
    "send_ctl": "Worker.send_ctl entered (verb applied: the slot frame next)",
    "sending": "FrameWriter.flush entered from send_ctl (frame encoded, send() next)",
    "written": "Worker.send_ctl returned (frame sent on the slot's socketpair)",
    "control done": "ControlRouter.on_frames returned (the sender's reply queued)",
    "child recv": "the slot's reader thread: recv() returned bytes (FrameReader.feed)",
    "child frame": "the reader thread: BlockingChannel.recv returned the decoded frame",
    "notified": "SlotRuntime.control returned (message queued, task thread notified)",
}
MAX_STAMPS = 4096
_ROWS = list(PROBES)
#: row i: a counter (8 bytes) then MAX_STAMPS doubles
_ROW = 8 + 8 * MAX_STAMPS
_table = mmap.mmap(-1, _ROW * len(_ROWS))
_last_poll = [0.0]
#: set while Worker.send_ctl runs: its FrameWriter.flush is the control frame's send
_in_send_ctl = [False]


def stamp(row: int, when: float | None = None) -> None:
    """Record ``when`` (now by default) as the next stamp of probe ``row``."""
    base = row * _ROW
    (count,) = struct.unpack_from("q", _table, base)
    if count < MAX_STAMPS:
        struct.pack_into("d", _table, base + 8 + 8 * count,
                         time.time() if when is None else when)
        struct.pack_into("q", _table, base, count + 1)


def _stamp_row(row: int, *_: Any) -> None:
    stamp(row)


def table() -> dict[str, list[float]]:
    """Every probe's stamps so far."""
    out = {}
    for row, name in enumerate(_ROWS):
        base = row * _ROW
        (count,) = struct.unpack_from("q", _table, base)
        out[name] = list(struct.unpack_from(f"{count}d", _table, base + 8))
    return out


def _wrap(cls: Any, name: str, before: Callable[..., None] | None = None,
          after: Callable[..., None] | None = None) -> None:
    """Replace ``cls.name`` by a wrapper calling ``before(self, *args)`` and
    ``after(self, result, *args)`` around it."""
    original = getattr(cls, name)

    @functools.wraps(original)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if before is not None:
            before(self, *args)
        result = original(self, *args, **kwargs)
        if after is not None:
            after(self, result, *args)
        return result

    setattr(cls, name, wrapper)


def install() -> None:
    """Wrap the control path's methods (worker main and pool process)."""
    from interactive_tasks.transport.redis_fast import HubCommand, ListReader
    from interactive_tasks.worker import child, ipc, main, order
    from interactive_tasks.worker.control import ControlRouter

    row = {name: i for i, name in enumerate(_ROWS)}
    main_pid = os.getpid()  # the worker's main process: this runs before the pool forks
    poll = order.ControlFirstPoller.poll

    def timed_poll(self: Any, timeout: float | None) -> Any:
        events = poll(self, timeout)
        _last_poll[0] = time.time()
        return events

    order.ControlFirstPoller.poll = timed_poll  # type: ignore[method-assign]

    def control_read(command: Any) -> None:
        if isinstance(getattr(command._on_reply, "__self__", None), ListReader):
            stamp(row["loop woke"], _last_poll[0])
            stamp(row["control read"])

    def got_frame(channel: Any, frame: Any) -> None:
        if frame[0] == "ctl":
            stamp(row["child frame"])

    _wrap(HubCommand, "_on_readable", before=control_read)
    _wrap(ControlRouter, "on_frames", before=lambda *_: stamp(row["frames parsed"]),
          after=lambda *_: stamp(row["control done"]))

    def send_ctl(*_: Any) -> None:
        stamp(row["send_ctl"])
        _in_send_ctl[0] = True

    def sending(*_: Any) -> None:
        if _in_send_ctl[0]:
            _in_send_ctl[0] = False
            stamp(row["sending"])

    def fed(reader: Any, data: bytes) -> None:
        if os.getpid() != main_pid and b"ctl" in data:  # a control frame, in a slot
            stamp(row["child recv"])

    _wrap(main.Worker, "send_ctl", before=send_ctl, after=lambda *_: stamp(row["written"]))
    _wrap(ipc.FrameWriter, "flush", before=sending)
    for method, probe in (("_on_control", "frame checked"), ("task_control", "decoded"),
                          ("apply_task_control", "held"), ("_apply", "authorized")):
        _wrap(ControlRouter, method, before=functools.partial(_stamp_row, row[probe]))
    _wrap(ipc.FrameReader, "feed", before=fed)
    _wrap(ipc.BlockingChannel, "recv", after=got_frame)
    _wrap(child.SlotRuntime, "control", after=lambda *_: stamp(row["notified"]))


@app.task(base=InteractiveTask, name="bench.ctl_probe")
def ctl_probe(self: Any, n: int) -> dict[str, Any]:
    """Receives ``n`` messages ``{"t": sent}``; returns each one's sent time, the time
    ``receive()`` returned it, and every probe's stamps (the last ``n`` of each row are
    these messages': the run frame of this task also names "ctl")."""
    sent, got = [], []
    for _ in range(n):
        msg = self.receive(timeout=30)
        now = time.time()
        if msg is None:
            break
        sent.append(msg["t"])
        got.append(now)
    return {"sent": sent, "received": got, "probes": table()}


install()
__all__ = ["app", "bench", "ctl_probe"]
