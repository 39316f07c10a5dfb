"""Profile interactive_tasks' hot paths with py-spy: ``python -m benchmarks.profile``.

Starts an ``itask worker`` (prefork, -c 2), attaches ``py-spy record`` to the worker and
its pool children (``--subprocesses``) and to this client process, runs the throughput or
the round-trip loop, then prints, for each process, how busy it was and the functions
with the largest share of its samples (self = leaf frame, total = anywhere on the stack).

    python -m benchmarks.profile throughput --n 10000
    python -m benchmarks.profile roundtrip --n 2000
    python -m benchmarks.profile control --n 2000 --broker embedded

Needs ``pip install py-spy`` and permission to ptrace (root, or
``kernel.yama.ptrace_scope=0``). Raw stacks are kept in ``--out`` for flame graphs
(``inferno-flamegraph`` or speedscope).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .harness import ROOT, new_namespace
from .systems import make_system

_LINE = re.compile(r":\d+\)$")
#: frames every sample of a process passes through (program entry, event loop, threads)
_ENTRY = ("main (", "<module> (", "cmd_worker (", "Worker.run (", "Worker._serve_connected (",
          "_run_module_as_main (", "_run_code (", "Hub.create_loop (", "Thread.", "_bootstrap",
          "BaseProcess.", "Popen.", "Process._Popen", "ForkProcess._Popen",
          "PreforkPool.spawn (", "_child_main (", "Slot.serve (")


def _frame(frame: str) -> str:
    return _LINE.sub(")", frame)


def _parse(path: Path) -> list[tuple[str, str, list[str], int]]:
    """(pid or "client", thread name, frames, count) for each raw py-spy line."""
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = stack.split(";")
        pid = "client"
        while frames and frames[0].startswith("process "):  # children nest under parents
            pid = frames[0].split(":", 1)[0].split()[1]
            frames = frames[1:]
        if not frames or not frames[0].startswith(("thread ", "<", "_", "Thread")):
            continue  # a torn sample (--nonblocking reads memory while it changes)
        thread = "main"
        if frames and frames[0].startswith("thread "):
            thread = frames[0].split(":", 1)[-1].strip()
            thread = re.sub(r"-[0-9a-f]{6}$", "", thread) or "main"
            frames = frames[1:]
        rows.append((pid, thread, [_frame(f) for f in frames], int(count_text)))
    return rows


def analyze(path: Path, rate: int, seconds: float, top: int = 15) -> str:
    """Per process and thread: busy share, top self and total functions."""
    rows = _parse(path)
    children = {pid for pid, _, names, _ in rows
                if any("_child_main" in n or "Slot._read_loop" in n for n in names)}
    groups: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    selfs: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    totals: collections.Counter[str] = collections.Counter()
    for pid, thread, names, count in rows:
        role = "client" if pid == "client" else (
            f"pool child {pid}" if pid in children else f"worker {pid}")
        key = f"{role} [{thread}]"
        totals[key] += count
        if names:
            selfs[key][names[-1]] += count
        for name in set(names):
            groups[key][name] += count
    out = []
    for key, total in totals.most_common():
        busy = 100.0 * total / max(1.0, rate * seconds)
        out.append(f"\n== {key}: {total} samples (≈{busy:.0f}% of one core over "
                   f"{seconds:.1f}s)")
        out.append("  self (leaf frame):")
        for name, count in selfs[key].most_common(top):
            out.append(f"    {100.0 * count / total:5.1f}%  {name}")
        out.append("  total, interactive_tasks functions (entry chain above 90% left out):")
        shown = 0
        for name, count in groups[key].most_common():
            share = 100.0 * count / total
            if "interactive_tasks/" not in name or share >= 90.0 or name.startswith(_ENTRY):
                continue
            out.append(f"    {share:5.1f}%  {name}")
            shown += 1
            if shown >= top:
                break
        out.append("  total, third-party functions:")
        shown = 0
        for name, count in groups[key].most_common():
            share = 100.0 * count / total
            if "interactive_tasks/" in name or share >= 90.0 or "(" not in name \
                    or name.startswith(_ENTRY):
                continue
            out.append(f"    {share:5.1f}%  {name}")
            shown += 1
            if shown >= top:
                break
    return "\n".join(out)


def _control_round_trips(system: Any, n: int) -> None:
    """``handle.send()`` → the echo task's ``self.send()`` → ``handle.events()``, n times."""
    handle = system.bench.echo.start(n)
    events = handle.events(timeout=10)
    for i in range(n):
        handle.send({"i": i})
        for event in events:
            if event.kind == "message" and event.data == {"i": i}:
                break
        time.sleep(0.002)
    handle.result(30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile")
    parser.add_argument("workload", choices=["throughput", "roundtrip", "control"])
    parser.add_argument("--n", type=int, default=None, help="tasks (default 10000 / 2000)")
    parser.add_argument("--broker", choices=["redis", "amqp", "embedded"], default="redis")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "profile")
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        parser.error("py-spy is not installed: pip install py-spy")
    n = args.n or (10000 if args.workload == "throughput" else 2000)
    args.out.mkdir(parents=True, exist_ok=True)
    worker_raw = args.out / f"{args.workload}-worker.txt"
    client_raw = args.out / f"{args.workload}-client.txt"
    system = make_system("itask", args.broker, new_namespace("profile", "itask"),
                         args.out / "logs")
    spies: list[subprocess.Popen[bytes]] = []
    try:
        with system.worker() as proc:
            for pid, raw, extra in ((proc.pid, worker_raw, ["--subprocesses", "--threads"]),
                                    (os.getpid(), client_raw, ["--threads"])):
                spies.append(subprocess.Popen(
                    [spy, "record", "--pid", str(pid), "--format", "raw", "--nonblocking",
                     "--rate", str(args.rate), "--output", str(raw), *extra],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(1.0)  # py-spy attaches
            start = time.perf_counter()
            if args.workload == "throughput":
                handles = [system.submit_noop() for _ in range(n)]
                system.gather(handles, 600)
            elif args.workload == "control":
                _control_round_trips(system, n)
            else:
                for _ in range(n):
                    system.result(system.submit_noop(), 10)
            seconds = time.perf_counter() - start
            for s in spies:
                s.send_signal(signal.SIGINT)
            for s in spies:
                s.wait(30)
    finally:
        for s in spies:
            if s.poll() is None:
                s.kill()
        system.close()
        system.cleanup()
    if args.workload == "control":
        print(f"{n} control round trips in {seconds:.2f}s = {1000 * seconds / n:.2f} ms "
              "each, 2 ms apart (under py-spy)")
    elif args.workload == "throughput":
        print(f"{n} tasks in {seconds:.2f}s = {n / seconds:.0f} tasks/s (under py-spy)")
    else:
        print(f"{n} round trips in {seconds:.2f}s = {1000 * seconds / n:.2f} ms each "
              "(under py-spy)")
    for title, raw in (("worker + pool children", worker_raw), ("client", client_raw)):
        print(f"\n##### {title} ({raw})")
        print(analyze(raw, args.rate, seconds + 1.0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
