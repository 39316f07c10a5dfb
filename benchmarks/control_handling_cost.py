"""What the worker's main process spends on one control message, without a broker.

::

    python -m benchmarks.control_handling_cost                 # µs per message
    python -m benchmarks.control_handling_cost --callgrind     # instructions per message

The Redis control path's worker step for the common case, ``handle.send(data)`` to a task
running on this worker: the raw frames of the control list (what the ``BLMPOP`` reply
carries) go to :meth:`ControlRouter.on_frames
<interactive_tasks.worker.control.ControlRouter.on_frames>`, which decodes each, checks
the token and the sequence number, writes the slot frame on a socketpair (``Worker.send_ctl``)
and queues the sender's acknowledgement (to a stub relay: the LPUSH is not timed here).
The other end of the socketpair is read and decoded after each message, off the clock.

Each message's wall time is timed twice: back to back, and ``CONTROL_GAP`` apart (as the
workload sends them, so the CPU idles in between and the code runs with cold caches, as
it does in the worker). With ``--callgrind``, the instructions instead (the same on a
loaded machine): this script run under ``valgrind --tool=callgrind`` for 0 messages, for
``--n`` back to back, and for ``--n`` whose slot frame the loop writes by hand instead of
calling ``on_frames`` (``--null``: the loop's own cost); per message, ``on_frames`` is the
difference of the last two over ``--n``.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from types import SimpleNamespace
from typing import Any

from interactive_tasks import App, codec
from interactive_tasks.protocol import TaskMessage, TaskState, Verb, control_wire
from interactive_tasks.transport.frames import encode_frame
from interactive_tasks.worker.control import ControlRouter
from interactive_tasks.worker.ipc import FrameReader, FrameWriter
from interactive_tasks.worker.ipc import encode_frame as ipc_frame
from interactive_tasks.worker.main import Worker
from interactive_tasks.worker.records import TaskRecord

from .workloads.common import CONTROL_GAP


class _Relay:
    """Stands in for the worker's relay: keeps the replies it is asked to publish."""

    def __init__(self) -> None:
        self.published: list[Any] = []

    def publish_inbox(self, inbox: str, payload: Any) -> None:
        self.published.append(payload)


def setup() -> tuple[ControlRouter, Any, str, str, socket.socket]:
    """A router with one running task whose slot is one end of a socketpair; returns it,
    the relay stub, the task id, its token, and the slot's end of the socketpair."""
    app = App("cost", broker="memory://", namespace=f"c{uuid.uuid4().hex[:8]}")
    token = codec.new_token()
    task_id = uuid.uuid4().hex
    message = TaskMessage(id=task_id, task="bench.ctl_sink", args=[1], kwargs={},
                          token_digest=codec.token_digest(token))
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    slot = SimpleNamespace(writer=FrameWriter(ours), sock=ours, hard_paused=False,
                           task_id=task_id)
    record = TaskRecord(message, None, True, 100, state=TaskState.RUNNING, slot=slot)
    state = SimpleNamespace(app=app, hostname="cost@host", records={task_id: record},
                            finished={}, held={}, held_subscribers={},
                            pool=SimpleNamespace(supports_hard_pause=True, name="prefork"))
    worker = SimpleNamespace(hub=None)
    worker._watch_writer = lambda slot: Worker._watch_writer(worker, slot)  # type: ignore
    relay = _Relay()
    router = ControlRouter(state, relay=relay, outcomes=None, workflows=None,  # type: ignore
                           upkeep=None,  # type: ignore
                           send_ctl=lambda *a: Worker.send_ctl(worker, *a),  # type: ignore
                           drain_slot=lambda slot: None)
    return router, relay, task_id, token, theirs


def run(n: int, gap: float, null: bool = False) -> list[float]:
    """Seconds (wall) of ``on_frames`` for each of ``n`` messages ``gap`` apart; with
    ``null``, of writing a slot frame by hand instead (the harness's own cost)."""
    router, relay, task_id, token, theirs = setup()
    slot = router.state.records[task_id].slot
    reader = FrameReader()
    took = []
    inbox = "c.inbox.0123456789abcdef"
    try:
        for i in range(n):
            wire = control_wire(Verb.MESSAGE, task_id, {"t": time.time()}, inbox,
                                f"0123456789abcdef.{i}", i + 1, token, time.time())
            frames = [encode_frame(codec.dumps(wire), None)]
            if gap:
                time.sleep(gap)
            start = time.perf_counter()
            if null:
                slot.sock.send(ipc_frame(["ctl", task_id, Verb.MESSAGE, None]))
            else:
                router.on_frames(frames)
            took.append(time.perf_counter() - start)
            got = reader.feed(theirs.recv(65536))
            assert got and got[-1][0] == "ctl", got
            relay.published.clear()
    finally:
        theirs.close()
        slot.sock.close()
    return took


def instructions(n: int, null: bool = False) -> int:
    """Instructions callgrind counts in a run of this script for ``n`` messages."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/out",
               sys.executable, "-m", "benchmarks.control_handling_cost",
               "--instructions-only", "--n", str(n), *(["--null"] if null else [])]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count in valgrind's output: {done.stderr[-500:]}")
    return int(found.group(1))


def per_message_instructions(n: int) -> dict[str, int]:
    """Instructions per message: the whole loop, the loop alone, ``on_frames``."""
    empty, full, null = instructions(0), instructions(n), instructions(n, null=True)
    return {"loop_with_on_frames": (full - empty) // n, "loop_alone": (null - empty) // n,
            "on_frames": (full - null) // n}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--gap-n", type=int, default=500,
                        help="messages CONTROL_GAP apart (default 500)")
    parser.add_argument("--rounds", type=int, default=3)
    for flag, text in (
            ("--callgrind", "instructions per message, under valgrind (--n messages)"),
            ("--instructions-only", "only run --n messages back to back (under callgrind)"),
            ("--null", "with --instructions-only: the harness alone (no on_frames)")):
        parser.add_argument(flag, action="store_true", help=text)
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.instructions_only:
        run(args.n, 0.0, args.null)
        return
    if args.callgrind:
        out: dict[str, Any] = {"n": args.n, "instructions_per_message":
                               per_message_instructions(args.n)}
    else:
        back, apart = [], []
        for _ in range(args.rounds):
            back.append(1e6 * statistics.median(run(args.n, 0.0)))
            apart.append(1e6 * statistics.median(run(args.gap_n, CONTROL_GAP)))
        out = {"back_to_back_us": [round(x, 2) for x in back],
               f"{CONTROL_GAP * 1000:g}_ms_apart_us": [round(x, 2) for x in apart]}
    print(json.dumps(out))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)

if __name__ == "__main__":
    main()
