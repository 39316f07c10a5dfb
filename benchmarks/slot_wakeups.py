"""Wake-ups of a pool process's helper threads, and what they cost other processes.

Two measurements behind ``benchmarks/HISTORY.md``, "A stall of control round trips on a
saturated prefork worker":

* ``channel``: a slot channel (``worker.ipc.BlockingChannel``) whose task thread sends
  progress as fast as it can while a reader process (the worker) reads 16 KiB every 2 ms,
  as a saturated prefork worker does. Reported: the context switches a second of the
  progress flush thread (``itask-progress-flush``), of the task thread and of a control
  reader thread waiting for frames from the worker (``recv``, as a slot's does), from
  ``/proc/self/task/TID/status``, and whether the last progress event arrived; with
  ``--side NAME=DIR``, for each checkout's code (``PYTHONPATH``), alternated.
* ``probe``: a process in its own session wakes every 2 ms and records how late it woke,
  beside 8 CPU-bound Python processes (nice 5, one session): plain, each with a second
  thread that wakes every 2 ms (and so takes the interpreter lock from the spinning
  thread), each with one that wakes every 50 ms, and 8 sleeping processes instead of the
  threads. No project code: this is the machine's scheduler.

    python -m benchmarks.slot_wakeups --side base=/tmp/base --side new=. --rounds 3 \\
        --out benchmarks/results/x.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

READ_BYTES = 1 << 14
READ_EVERY = 0.002


def _switches(tid: int) -> int:
    total = 0
    for line in Path(f"/proc/self/task/{tid}/status").read_text().splitlines():
        if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
            total += int(line.split()[1])
    return total


def channel_side(root: Path, seconds: float) -> dict[str, Any]:
    """One run of :func:`channel` with the code of checkout ``root``."""
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--channel-once",
                          str(seconds)], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                         capture_output=True, text=True, check=True, timeout=120)
    return dict(json.loads(out.stdout))


def _reader(sock: socket.socket, stop: Any, last: Any) -> None:
    from worker.ipc import FrameReader

    reader = FrameReader()
    sock.setblocking(False)
    while not stop.is_set():
        time.sleep(READ_EVERY)
        try:
            frames = reader.feed(sock.recv(READ_BYTES))
        except BlockingIOError:
            continue
        if frames:
            last.value = frames[-1][3]["current"]
    deadline = time.monotonic() + 2.0  # what is still held goes out within HOLD_S
    while time.monotonic() < deadline:
        try:
            frames = reader.feed(sock.recv(1 << 20))
        except BlockingIOError:
            time.sleep(0.01)
            continue
        if frames:
            last.value = frames[-1][3]["current"]


def channel(seconds: float) -> dict[str, Any]:
    """One run of the ``channel`` measurement."""
    from worker import ipc

    slot_end, worker_end = socket.socketpair()
    ctx = multiprocessing.get_context("fork")
    stop, last = ctx.Event(), ctx.Value("q", -1)
    proc = ctx.Process(target=_reader, args=(worker_end, stop, last))
    proc.start()
    chan = ipc.BlockingChannel(slot_end)
    reader_tid: list[int] = []

    def read_loop() -> None:  # a slot's control reader: nothing comes, it only waits
        reader_tid.append(threading.get_native_id())
        try:
            while True:
                chan.recv()
        except ipc.ChannelClosed:
            pass

    threading.Thread(target=read_loop, daemon=True).start()
    sent = 0
    end = time.monotonic() + 0.5  # the flush thread starts at the first hold
    while time.monotonic() < end:
        chan.send_progress(["ev", "t", "progress", {"current": sent}, 0.0])
        sent += 1
    flush = [t for t in threading.enumerate() if t.name == "itask-progress-flush"]
    flush_tid = flush[0].native_id if flush else None
    main_tid = threading.get_native_id()
    before = (_switches(flush_tid) if flush_tid else 0, _switches(main_tid),
              _switches(reader_tid[0]))
    start = time.monotonic()
    end = start + seconds
    while time.monotonic() < end:
        chan.send_progress(["ev", "t", "progress", {"current": sent}, 0.0])
        sent += 1
    elapsed = time.monotonic() - start
    after = (_switches(flush_tid) if flush_tid else 0, _switches(main_tid),
             _switches(reader_tid[0]))
    stop.set()
    proc.join(10)
    slot_end.close()
    return {"flush_thread_switches_per_s": (after[0] - before[0]) / elapsed,
            "task_thread_switches_per_s": (after[1] - before[1]) / elapsed,
            "reader_thread_switches_per_s": (after[2] - before[2]) / elapsed,
            "progress_per_s": sent / (elapsed + 0.5),
            "last_progress_arrived": last.value == sent - 1}


_SPIN = """
import os, sys, threading, time
sys.setswitchinterval(0.0005)
helper = float(sys.argv[2])
def wake():
    while True:
        time.sleep(helper)
if helper > 0:
    threading.Thread(target=wake, daemon=True).start()
os.setpriority(os.PRIO_PROCESS, 0, 5)  # this thread only
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    pass
"""

_SLEEP = """
import sys, time
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    time.sleep(0.002)
"""

_PROBE = """
import json, os, sys, time
late = []
end = time.monotonic() + float(sys.argv[1])
with open(f"/proc/{os.getpid()}/schedstat") as f:
    run0, delay0 = (int(x) for x in f.read().split()[:2])
while time.monotonic() < end:
    t = time.monotonic()
    time.sleep(0.002)
    late.append((time.monotonic() - t - 0.002) * 1000)
with open(f"/proc/{os.getpid()}/schedstat") as f:
    run1, delay1 = (int(x) for x in f.read().split()[:2])
late.sort()
n = len(late)
print(json.dumps({"wakeups": n, "late_p50_ms": late[n // 2], "late_p99_ms": late[int(n * 0.99)],
                  "late_max_ms": late[-1], "over_100ms": sum(1 for x in late if x > 100),
                  "runqueue_wait_ms": (delay1 - delay0) / 1e6,
                  "run_ms": (run1 - run0) / 1e6}))
"""

#: name: (helper thread period in s, 0: none; separate sleeping processes)
LOADS = {"none": None, "spinners": (0.0, False), "spinners+thread-2ms": (0.002, False),
         "spinners+thread-50ms": (0.05, False), "spinners+sleepers-2ms": (0.0, True)}


def probe(load: str, seconds: float) -> dict[str, Any]:
    """One run of the ``probe`` measurement beside ``load`` (a key of LOADS)."""
    spec = LOADS[load]
    procs: list[subprocess.Popen[bytes]] = []
    if spec is not None:
        helper, sleepers = spec
        script = "\n".join(
            [f"{sys.executable} -c '{_SPIN}' {seconds + 3} {helper} &"] * 8
            + ([f"{sys.executable} -c '{_SLEEP}' {seconds + 3} &"] * 8 if sleepers else [])
            + ["wait"])
        procs.append(subprocess.Popen(["bash", "-c", script], start_new_session=True))
        time.sleep(1.5)
    out = subprocess.run([sys.executable, "-c", _PROBE, str(seconds)], capture_output=True,
                         text=True, check=True, start_new_session=True)
    for proc in procs:
        proc.wait(30)
    return dict(json.loads(out.stdout), load=load)


def _summary(runs: list[dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    return {k: {"median": statistics.median(r[k] for r in runs),
                "min": min(r[k] for r in runs), "max": max(r[k] for r in runs)}
            for k in keys}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.slot_wakeups")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--only", choices=("channel", "probe"))
    parser.add_argument("--side", action="append", metavar="NAME=DIR",
                        help="channel: a checkout whose code to measure (default: this one)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--channel-once", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.channel_once:
        print(json.dumps(channel(args.channel_once)))
        return 0
    sides = [(name, Path(path).resolve()) for name, path in (
        side.split("=", 1) for side in args.side or [f"this={Path(__file__).parents[1]}"])]
    doc: dict[str, Any] = {"script": "python -m benchmarks.slot_wakeups " + " ".join(
        argv if argv is not None else sys.argv[1:]), "cpus": os.cpu_count(),
        "load_before": os.getloadavg()[0]}
    if args.only in (None, "channel"):
        by_side: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in sides}
        for rnd in range(args.rounds):
            for name, root in sides if rnd % 2 == 0 else list(reversed(sides)):
                run = channel_side(root, args.seconds)
                print("channel", name, json.dumps(run), flush=True)
                by_side[name].append(run)
        keys = ["flush_thread_switches_per_s", "task_thread_switches_per_s",
                "reader_thread_switches_per_s", "progress_per_s"]
        doc["channel"] = {name: {"root": str(root), "runs": by_side[name],
                                 "summary": _summary(by_side[name], keys)}
                          for name, root in sides}
    if args.only in (None, "probe"):
        probes: dict[str, list[dict[str, Any]]] = {load: [] for load in LOADS}
        for _ in range(args.rounds):  # the loads alternate within each round
            for load in LOADS:
                run = probe(load, args.seconds)
                print("probe", json.dumps(run), flush=True)
                probes[load].append(run)
        doc["probe"] = {load: {"runs": runs, "summary": _summary(
            runs, ["late_p99_ms", "late_max_ms", "runqueue_wait_ms", "over_100ms"])}
            for load, runs in probes.items()}
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
