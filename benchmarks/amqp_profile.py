"""Where a RabbitMQ task round trip and a throughput run spend CPU, per process and thread.

::

    python -m benchmarks.amqp_profile --rounds 3            # itask and Dramatiq, alternated
    python -m benchmarks.amqp_profile --spy OUT_DIR          # and py-spy stacks, by category

For each round and each system (a fresh worker each time, the systems alternated within a
round) it runs ``--rt`` serial round trips of a no-op (submit, wait for the result) and
then ``--tp`` no-ops submitted at once and gathered, and reads, before and after each
loop, every thread's CPU time (``/proc/PID/task/TID/schedstat``, nanoseconds) and context
switches (``status``) of the worker's processes, of this client process, of RabbitMQ
(``beam.smp``) and of Redis (Dramatiq's result backend). It reports CPU microseconds and
wake-ups (voluntary context switches: a thread went to sleep and was woken again) per
task for each. Round-trip latency is timed per call (p50, p99).

With ``--spy`` it then runs :mod:`benchmarks.profile`'s round-trip loop under py-spy for
each system (``--rate`` samples/s, no idle samples) and sorts every sample of every
process into categories by the frames on its stack (``CATEGORIES``): the share of each
process's busy samples, which multiplied by its CPU per task from the loops above gives
microseconds per task per category. Writes ``--out`` (default
``benchmarks/results/amqp_profile.json``) with every round and median (min–max) summaries.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .floor_amqp import ROUND_TRIP, measure_round_trip
from .harness import ROOT, new_namespace, process_tree
from .systems import make_system

#: (category, predicate on the stack's frames, leaf last); the first that matches wins.
#: Syscall categories look at the leaf only (py-spy charges a C call to the Python line
#: that made it); the others at any frame, innermost rule first.
LEAF_SYSCALL = {
    "_AbstractTransport.write": "socket send (AMQP)",
    "TCPTransport._read": "socket recv (AMQP)",
    "_AbstractTransport._read": "socket recv (AMQP)",
    "_epoll.poll": "epoll wait/wake",
    # py-amqp's sock.settimeout() around a read releases the GIL (an ioctl): a thread is
    # seen on this line mostly while it waits to take the GIL back
    "_AbstractTransport.having_timeout": "socket timeout toggle (GIL wait)",
    "FrameWriter.flush": "pipe send (worker↔slot)",
    "BlockingChannel.send": "pipe send (worker↔slot)",
    "BlockingChannel.recv": "pipe recv (worker↔slot)",
    "Worker._on_slot_readable": "pipe recv (worker↔slot)",
    "Condition.wait": "thread hand-over (lock/condition)",
    "Condition.notify": "thread hand-over (lock/condition)",
    "Queue.put": "thread hand-over (lock/condition)",
    "Queue.get": "thread hand-over (lock/condition)",
    "Event.wait": "thread hand-over (lock/condition)",
    "Event.set": "thread hand-over (lock/condition)",
    # pika / redis-py (Dramatiq)
    "SelectConnection._flush_outbound": "socket send (AMQP)",
    "_AsyncPlainTransport._on_socket_writable": "socket send (AMQP)",
    "_AsyncBaseTransport._consume": "socket recv (AMQP)",
    "_AsyncPlainTransport._on_socket_readable": "socket recv (AMQP)",
    "_AsyncTransportBase._sigint_safe_send": "socket send (AMQP)",
    "_AsyncTransportBase._sigint_safe_recv": "socket recv (AMQP)",
    "AbstractConnection.send_packed_command": "socket send (Redis)",
    "_HiredisParser.read_from_socket": "socket recv (Redis)",
    "_CtypesTimeoutManager.run": "idle (sleeping thread)",
    "worker_process": "idle (sleeping thread)",
    "SocketBuffer._read_from_socket": "socket recv (Redis)",
    "Connection.send_packed_command": "socket send (Redis)",
    "SelectPoller.poll": "epoll wait/wake",
    "PollPoller.poll": "epoll wait/wake",
    "EPollPoller._poll": "epoll wait/wake",
    "_PollerBase.poll": "epoll wait/wake",
    "BaseSelector.select": "epoll wait/wake",
    "EpollSelector.select": "epoll wait/wake",
}
#: by module of the innermost frame that is not the standard library's
MODULES = (
    ("interactive_tasks/codec.py", "codec (msgpack/JSON, signing)"),
    ("interactive_tasks/", "interactive_tasks (worker/client logic)"),
    ("amqp/", "py-amqp (frames, methods)"),
    ("kombu/", "kombu (Message, Consumer, Producer, hub)"),
    ("vine/", "kombu (Message, Consumer, Producer, hub)"),
    ("pika/", "pika (Dramatiq's AMQP client)"),
    ("redis/", "redis-py (Dramatiq's results)"),
    ("dramatiq/", "dramatiq (worker/client logic)"),
    ("benchmarks/", "benchmark loop"),
)


#: (frame marker, stage): the innermost frame on the stack that matches names the stage
STAGES = (
    ("KombuOutbound.", "ack + publish result (Relay.flush → outbound)"),
    ("Relay.flush", "ack + publish result (Relay.flush → outbound)"),
    ("Outcomes.", "finish: final event, record"),
    ("Relay.emit", "finish: final event, record"),
    ("Worker._start_on", "dispatch to slot (run frame)"),
    ("Worker._on_slot_readable", "read slot's frames"),
    ("Worker._on_task_message", "accept task (verify, decode, record)"),
    ("Consumer._receive_callback", "kombu: Message, callbacks"),
    ("Channel._on_basic_deliver", "kombu: Message, callbacks"),
    ("Connection.drain_events", "py-amqp: read, parse frames"),
    ("Slot._execute", "slot: run task, send done"),
    ("Slot._read_loop", "slot: reader thread"),
    ("Task.apply_async", "client: build + publish task"),
    ("TaskHandle.result", "client: wait for result"),
    ("Client._dispatch", "client inbox: decode, route event"),
    ("KombuInbox.read", "client inbox: read, parse frames"),
    ("RabbitmqBroker.enqueue", "client: build + publish task"),
    ("Message.get_result", "client: wait for result"),
    ("ConsumerThread.", "dramatiq consumer thread: AMQP in, ack"),
    ("WorkerThread.", "dramatiq worker thread: run, store result"),
)


def stage(frames: list[str]) -> str:
    for frame in reversed(frames):
        for marker, name in STAGES:
            if marker in frame:
                return name
    return "event loop, other"


def categorize(frames: list[str]) -> str:
    if not frames:
        return "other"
    leaf = frames[-1].split(" (", 1)[0]
    if leaf in LEAF_SYSCALL:
        return LEAF_SYSCALL[leaf]
    if any(m in frames[-1] for m in ("json/", "msgpack/", "hmac.py", "hashlib")):
        return "codec (msgpack/JSON, signing)"
    for frame in reversed(frames):
        for marker, name in MODULES:
            if marker in frame:
                return name
    return "other (stdlib, interpreter)"


# -- /proc accounting --------------------------------------------------------------------
def _threads(pid: int) -> dict[int, tuple[int, int, int]]:
    """tid → (CPU ns, voluntary, involuntary context switches)."""
    out = {}
    with contextlib.suppress(OSError):
        for tid_text in os.listdir(f"/proc/{pid}/task"):
            tid = int(tid_text)
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                    ns = int(fh.read().split()[0])
                vol = invol = 0
                with open(f"/proc/{pid}/task/{tid}/status") as fh:
                    for line in fh:
                        if line.startswith("voluntary_ctxt_switches"):
                            vol = int(line.split()[1])
                        elif line.startswith("nonvoluntary_ctxt_switches"):
                            invol = int(line.split()[1])
                out[tid] = (ns, vol, invol)
            except OSError:
                continue
    return out


def _by_comm(name: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/comm") as fh:
                if fh.read().strip() == name:
                    pids.append(int(entry))
    return pids


def _client_thread_names() -> dict[int, str]:
    return {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}


def snapshot(roles: dict[str, list[int]]) -> dict[str, dict[tuple[int, int], tuple[int, ...]]]:
    return {role: {(pid, tid): v for pid in pids for tid, v in _threads(pid).items()}
            for role, pids in roles.items()}


def delta(before: dict[str, Any], after: dict[str, Any], n: int,
          thread_names: dict[int, str]) -> dict[str, Any]:
    """Per role: CPU µs / task, voluntary and involuntary switches / task, and threads."""
    out: dict[str, Any] = {}
    for role, now in after.items():
        then = before.get(role, {})
        cpu = vol = invol = 0
        threads: dict[str, float] = {}
        for key, (ns, v, i) in now.items():
            ns0, v0, i0 = then.get(key, (0, 0, 0))
            cpu += ns - ns0
            vol += v - v0
            invol += i - i0
            pid, tid = key
            if role == "client":
                label = re.sub(r"-[0-9a-f]{6}$", "", thread_names.get(tid, f"thread {tid}"))
            else:
                label = "main threads" if tid == pid else "other threads"
            threads[label] = threads.get(label, 0.0) + (ns - ns0) / 1000 / n
        out[role] = {"cpu_us": round(cpu / 1000 / n, 1), "wakeups": round(vol / n, 2),
                     "preempted": round(invol / n, 2),
                     "threads": {k: round(v, 1) for k, v in
                                 sorted(threads.items(), key=lambda kv: -kv[1]) if v >= 0.5}}
        if role == "rabbitmq":
            del out[role]["threads"]
    return out


def roles_for(system: Any, root: int) -> dict[str, list[int]]:
    tree = process_tree(root)
    roles = {"worker main": [root], "worker children": [p for p in tree if p != root],
             "client": [os.getpid()], "rabbitmq": _by_comm("beam.smp")}
    if system.name == "dramatiq":
        roles["redis"] = _by_comm("redis-server")
    return roles


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def hops(system: Any, n: int) -> dict[str, float]:
    """Median µs of each leg of a serial round trip, from timestamps on one clock: the
    client's publish (``delay()`` / ``send()``), then (itask) publish returned → the task
    ended in its pool process (the final event's ``ts``), → the client's inbox thread
    handed the event to the handle (a listener), → ``result()`` returned."""
    legs: dict[str, list[float]] = {}
    for _ in range(n):
        seen: list[float] = []
        t0 = time.time()
        handle = system.submit_noop()
        t1 = time.time()
        if system.name == "itask":
            handle.add_listener(lambda h, seen=seen: seen.append(time.time()))
        system.result(handle, 10)
        t3 = time.time()
        legs.setdefault("client: build + publish", []).append(t1 - t0)
        if system.name == "itask" and seen:
            ended = handle.snapshot().finished
            if ended and t1 <= ended <= seen[-1]:
                legs.setdefault("→ broker → worker → pool process: task ran", []).append(
                    ended - t1)
                legs.setdefault("→ worker → broker → client inbox thread: event routed",
                                []).append(seen[-1] - ended)
                legs.setdefault("→ client's waiting thread woken, result returned",
                                []).append(t3 - seen[-1])
        elif system.name == "itask":
            # the event came before the listener was added (the client thread was
            # descheduled right after its publish): no split for this one
            legs.setdefault("unsplit", []).append(t3 - t1)
        else:
            legs.setdefault("→ broker → worker → result → client has it", []).append(t3 - t1)
    out = {k: round(1e6 * statistics.median(v), 1) for k, v in legs.items() if k != "unsplit"}
    out["samples not split"] = len(legs.get("unsplit", ()))
    return out


def run_system(name: str, rt: int, tp: int, log_dir: Path) -> dict[str, Any]:
    system = make_system(name, "amqp", new_namespace("amqpprof", name), log_dir)
    result: dict[str, Any] = {}
    try:
        with system.worker() as proc:
            for _ in range(200):  # warm up: connections, caches, both slots
                system.result(system.submit_noop(), 10)
            time.sleep(0.5)
            roles = roles_for(system, proc.pid)
            result["processes"] = {k: len(v) for k, v in roles.items()}
            names = _client_thread_names()
            before = snapshot(roles)
            lat = []
            start = time.perf_counter()
            for _ in range(rt):
                t0 = time.perf_counter()
                system.result(system.submit_noop(), 10)
                lat.append(time.perf_counter() - t0)
            wall = time.perf_counter() - start
            names.update(_client_thread_names())
            result["roundtrip"] = {
                "n": rt, "p50_ms": round(1000 * statistics.median(lat), 3),
                "p99_ms": round(1000 * _pct(lat, 0.99), 3),
                "wall_us_per_task": round(1e6 * wall / rt, 1),
                "per_task": delta(before, snapshot(roles), rt, names)}
            result["hops_us"] = hops(system, rt)
            time.sleep(0.5)
            before = snapshot(roles)
            start = time.perf_counter()
            handles = [system.submit_noop() for _ in range(tp)]
            system.gather(handles, 600)
            wall = time.perf_counter() - start
            names.update(_client_thread_names())
            result["throughput"] = {
                "n": tp, "tasks_per_s": round(tp / wall, 1),
                "wall_us_per_task": round(1e6 * wall / tp, 1),
                "per_task": delta(before, snapshot(roles), tp, names)}
    finally:
        system.close()
        system.cleanup()
    return result


def spy(name: str, n: int, rate: int, out_dir: Path) -> dict[str, Any]:
    """Round trips under py-spy; per process: busy samples and their share by category."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    system = make_system(name, "amqp", new_namespace("amqpspy", name), out_dir / "logs")
    raws = {"worker": out_dir / f"{name}-roundtrip-worker.txt",
            "client": out_dir / f"{name}-roundtrip-client.txt"}
    spies: list[subprocess.Popen[bytes]] = []
    try:
        with system.worker() as proc:
            for _ in range(200):
                system.result(system.submit_noop(), 10)
            for pid, raw, extra in ((proc.pid, raws["worker"], ["--subprocesses"]),
                                    (os.getpid(), raws["client"], [])):
                spies.append(subprocess.Popen(
                    [py_spy, "record", "--pid", str(pid), "--format", "raw",
                     "--threads", "--rate", str(rate), "--output", str(raw), *extra],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(1.5)
            for _ in range(n):
                system.result(system.submit_noop(), 10)
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
    return analyze_spy(raws)


def analyze_spy(raws: dict[str, Path]) -> dict[str, Any]:
    """Per process and thread of py-spy's raw stacks (``raws``: "worker" and "client"):
    samples, their share by category and stage, and, of the samples outside system calls
    (Python running), the share of each stage | category."""
    from .profile import _parse

    root = ""
    text = raws["worker"].read_text(errors="replace")
    found = re.match(r"process (\d+):", text)
    if found:
        root = found.group(1)  # every worker stack starts at the worker's main process
    out: dict[str, Any] = {}
    for which, raw in raws.items():
        counts: dict[str, dict[str, int]] = {}
        stages: dict[str, dict[str, int]] = {}
        busy: dict[str, dict[str, int]] = {}  # stages of samples not in a syscall's line
        for spid, thread, frames, count in _parse(raw):
            if which == "client":
                role = "client"
            else:
                role = "worker main" if spid in ("client", root) else "worker children"
            thread = re.sub(r"[-_]?\d+$", "", thread)
            role = f"{role} [{thread}]"
            bucket = counts.setdefault(role, {})
            cat = categorize(frames)
            bucket[cat] = bucket.get(cat, 0) + count
            sb = stages.setdefault(role, {})
            st = stage(frames)
            sb[st] = sb.get(st, 0) + count
            if frames and frames[-1].split(" (", 1)[0] not in LEAF_SYSCALL:
                bb = busy.setdefault(role, {})
                key = f"{st} | {cat}"
                bb[key] = bb.get(key, 0) + count
        for role, bucket in counts.items():
            total = sum(bucket.values())
            out[role] = {"samples": total, "share": {
                k: round(v / total, 3) for k, v in sorted(bucket.items(), key=lambda kv: -kv[1])},
                "stages": {k: round(v / total, 3) for k, v in
                           sorted(stages[role].items(), key=lambda kv: -kv[1])}}
            python = sum(busy.get(role, {}).values())
            out[role]["python_samples"] = python
            out[role]["python_stage_category"] = {
                k: round(v / python, 3) for k, v in
                sorted(busy.get(role, {}).items(), key=lambda kv: -kv[1]) if v / python >= 0.01}
    return out


def _kernel_category(syms: list[str]) -> str:
    """A kernel stack (leaf first): its system call, and whether it is waking or sleeping."""
    call = next((s for s in syms if s.startswith(("__x64_sys_", "__do_sys_", "__se_sys_"))),
                None)
    name = "kernel: no syscall (interrupt, fault)" if call is None else \
        "kernel: " + call.split("sys_", 1)[1]
    if any(s.startswith(("try_to_wake_up", "ttwu_", "__wake_up")) for s in syms):
        return name + " → waking a thread"
    if any(s.startswith(("schedule", "__schedule", "finish_task_switch")) for s in syms):
        return name + " → sleeping/switching"
    return name


def perf_profile(name: str, workload: str, n: int, freq: int,
                 out_dir: Path) -> dict[str, Any]:
    """Round trips or a throughput run under ``perf record`` (cpu-clock, kernel stacks):
    per process, µs per task in user space (by library) and in the kernel (by system
    call, and whether the call was waking a thread or going to sleep)."""
    system = make_system(name, "amqp", new_namespace("amqpperf", name), out_dir / "logs")
    data = out_dir / f"{name}-{workload}.perf"
    try:
        with system.worker() as proc:
            for _ in range(200):
                system.result(system.submit_noop(), 10)
            roles = roles_for(system, proc.pid)
            roles.pop("redis", None)
            role_of = {pid: role for role, pids in roles.items() for pid in pids}
            rec = subprocess.Popen(
                ["perf", "record", "-F", str(freq), "-g", "-o", str(data), "-p",
                 ",".join(str(p) for p in role_of)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.5)
            start = time.perf_counter()
            if workload == "throughput":
                system.gather([system.submit_noop() for _ in range(n)], 600)
            else:
                for _ in range(n):
                    system.result(system.submit_noop(), 10)
            seconds = time.perf_counter() - start
            rec.send_signal(signal.SIGINT)
            rec.wait(60)
    finally:
        system.close()
        system.cleanup()
    text = subprocess.run(["perf", "script", "-i", str(data), "-F", "pid,tid,ip,sym,dso"],
                          capture_output=True, text=True, check=False).stdout
    counts: dict[str, dict[str, int]] = {}
    for block in text.split("\n\n"):
        lines = [ln.strip() for ln in block.strip().splitlines()]
        if not lines or "/" not in lines[0]:
            continue
        pid = int(lines[0].split("/")[0])
        frames = [ln.split(" ", 1)[1] if " " in ln else ln for ln in lines[1:]]
        syms = [f.rsplit(" (", 1)[0].split("+")[0] for f in frames]
        dsos = [f.rsplit(" (", 1)[-1].rstrip(")") for f in frames]
        if dsos and dsos[0] == "[kernel.kallsyms]":
            cat = _kernel_category(syms)
        elif dsos:
            lib = Path(dsos[0]).name
            cat = "user: " + ("Python interpreter" if lib.startswith(("python", "libpython"))
                              else lib)
        else:
            cat = "unknown"
        bucket = counts.setdefault(role_of.get(pid, str(pid)), {})
        bucket[cat] = bucket.get(cat, 0) + 1
    out: dict[str, Any] = {"n": n, "freq": freq, "wall_us_per_task": round(1e6 * seconds / n, 1)}
    for role, bucket in counts.items():
        total = sum(bucket.values())
        per = 1e6 / freq / n
        kernel = sum(v for k, v in bucket.items() if k.startswith("kernel"))
        out[role] = {"cpu_us": round(total * per, 1), "kernel_us": round(kernel * per, 1),
                     "us": {k: round(v * per, 1) for k, v in
                            sorted(bucket.items(), key=lambda kv: -kv[1]) if v * per >= 1.0}}
    return out


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Median (min, max) of every number, by the same key path."""
    def walk(items: list[Any]) -> Any:
        if not items:
            return None
        first = items[0]
        if isinstance(first, dict):
            keys = [k for k in first if all(isinstance(i, dict) and k in i for i in items)]
            return {k: walk([i[k] for i in items]) for k in keys}
        if isinstance(first, (int, float)):
            return [round(statistics.median(items), 2), min(items), max(items)]
        return first
    return walk(rounds)


def report(data: dict[str, Any]) -> str:
    """The breakdown the write-up quotes: per system and process, median CPU µs per task
    (min–max over rounds), wake-ups, the kernel's share (perf) and, for itask's worker
    and client, the user time split by stage (py-spy samples outside system calls)."""
    out = []
    summary = data["summary"]
    for name, rounds in summary.items():
        rt = rounds.get("roundtrip", {})
        line = f"\n## {name}: round trip p50 {rt['p50_ms'][0]} ms ({rt['p50_ms'][1]}–" \
               f"{rt['p50_ms'][2]})"
        if "throughput" in rounds:
            tp = rounds["throughput"]["tasks_per_s"]
            line += f", throughput {tp[0]:.0f}/s ({tp[1]:.0f}–{tp[2]:.0f})"
        out.append(line)
        hop_rounds = [r.get("hops_us") for r in data["rounds"][name] if r.get("hops_us")]
        if hop_rounds:
            out.append("  legs of a round trip, µs, median of rounds (min–max):")
            for leg in hop_rounds[0]:
                if leg == "samples not split":
                    continue
                vals = [h[leg] for h in hop_rounds if leg in h]
                out.append(f"    {statistics.median(vals):6.0f} ({min(vals):.0f}–{max(vals):.0f})"
                           f"  {leg}")
        for workload in ("roundtrip", "throughput"):
            per = rounds.get(workload, {}).get("per_task")
            if not per:
                continue
            perf = data.get("perf", {}).get(f"{name} {workload}", {})
            out.append(f"  {workload}: CPU µs/task, median (min–max); wake-ups/task; kernel %")
            for role, v in per.items():
                cpu = v["cpu_us"]
                if cpu[0] < 1:
                    continue
                p = perf.get(role)
                kshare = f"{100 * p['kernel_us'] / p['cpu_us']:.0f}%" if p and p["cpu_us"] else "?"
                threads = ", ".join(f"{k} {w[0]:.0f}" for k, w in v.get("threads", {}).items()
                                    if isinstance(w, list) and len(v["threads"]) > 1)
                out.append(f"    {role:<16} {cpu[0]:6.0f} ({cpu[1]:.0f}–{cpu[2]:.0f})"
                           f"  wake-ups {v['wakeups'][0]:.2f}  kernel {kshare}"
                           + (f"  [{threads}]" if threads else ""))
        spy_data = data.get("spy", {}).get("by_process", {}).get(name, {})
        for role, v in spy_data.items():
            if v.get("python_samples", 0) < 50 or not v.get("python_stage_category"):
                continue
            out.append(f"  user time of {role} by stage | library ({v['python_samples']} "
                       "samples outside system calls):")
            for k, share in v["python_stage_category"].items():
                if share >= 0.02:
                    out.append(f"    {100 * share:5.1f}%  {k}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.amqp_profile")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rt", type=int, default=2000, help="serial round trips per run")
    parser.add_argument("--tp", type=int, default=5000, help="tasks per throughput run")
    parser.add_argument("--systems", default="itask,dramatiq")
    parser.add_argument("--spy", type=Path, default=None, help="also py-spy, raw stacks here")
    parser.add_argument("--spy-n", type=int, default=3000)
    parser.add_argument("--rate", type=int, default=500)
    parser.add_argument("--perf", action="store_true",
                        help="also perf record the round trips (kernel time by syscall)")
    parser.add_argument("--freq", type=int, default=4000, help="perf samples/s of CPU")
    parser.add_argument("--reanalyze", type=Path, default=None,
                        help="re-read the py-spy stacks kept in this directory into --out")
    add_output_args(parser, "amqp_profile.json")
    args = parser.parse_args(argv)
    if args.reanalyze is not None:
        kept = json.loads(args.out.read_text())
        kept["spy"]["by_process"] = {
            s: analyze_spy({w: args.reanalyze / f"{s}-roundtrip-{w}.txt"
                            for w in ("worker", "client")})
            for s in kept["spy"]["by_process"]}
        kept["spy"]["reanalyzed"] = "python -m benchmarks.amqp_profile " + " ".join(
            argv or sys.argv[1:])
        args.out.write_text(json.dumps(kept, indent=1, ensure_ascii=False) + "\n")
        print(report(kept))
        return 0
    if args.report is not None:
        print(report(json.loads(args.report.read_text())))
        return 0
    systems = args.systems.split(",")
    log_dir = Path("/tmp") / "amqp_profile_logs"
    data = run_header("benchmarks.amqp_profile", argv)
    data["rounds"] = {s: [] for s in systems}
    for r in range(args.rounds):
        order = systems if r % 2 == 0 else systems[::-1]
        for name in order:
            res = run_system(name, args.rt, args.tp, log_dir)
            res["loadavg"] = os.getloadavg()[0]
            data["rounds"][name].append(res)
            rtp = res["roundtrip"]
            print(f"round {r + 1} {name}: rt p50 {rtp['p50_ms']} ms, "
                  f"tp {res['throughput']['tasks_per_s']}/s, "
                  + ", ".join(f"{k} {v['cpu_us']}µs/{v['wakeups']}w"
                              for k, v in rtp["per_task"].items()), flush=True)
        for chain in ROUND_TRIP:  # the bare floor of both shapes, back to back too
            got = measure_round_trip(chain, args.rt, 100, 0.0)
            data["rounds"].setdefault(f"floor {chain}", []).append(
                {"roundtrip": {"p50_ms": round(statistics.median(got), 3),
                               "p99_ms": round(_pct(got, 0.99), 3)}})
            print(f"round {r + 1} floor {chain}: p50 {statistics.median(got):.3f} ms",
                  flush=True)
    data["summary"] = {s: summarize([{k: v for k, v in r.items() if k != "processes"}
                                     for r in rounds])
                       for s, rounds in data["rounds"].items()}
    if args.spy is not None:
        args.spy.mkdir(parents=True, exist_ok=True)
        data["spy"] = {"rate": args.rate, "n": args.spy_n,
                       "by_process": {s: spy(s, args.spy_n, args.rate, args.spy)
                                      for s in systems}}
    if args.perf:
        perf_dir = args.spy or Path("/tmp") / "amqp_profile_perf"
        perf_dir.mkdir(parents=True, exist_ok=True)
        data["perf"] = {f"{s} {w}": perf_profile(s, w, n, args.freq, perf_dir)
                        for w, n in (("roundtrip", args.spy_n), ("throughput", args.tp))
                        for s in systems}
    write_result(args.out, data, report)
    return 0


def add_output_args(parser: argparse.ArgumentParser, result: str) -> None:
    """``--report`` (reprint an earlier result) and ``--out`` (default
    ``benchmarks/results/<result>``), as every profile takes them."""
    parser.add_argument("--report", type=Path, default=None,
                        help="only print the breakdown of an earlier run's JSON")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / result)


def run_header(module: str, argv: list[str] | None) -> dict[str, Any]:
    """The first keys of a profile's result: its command, the machine, start and load."""
    return {"command": f"python -m {module} " + " ".join(argv or sys.argv[1:]),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "loadavg_start": os.getloadavg()}


def write_result(out: Path, data: dict[str, Any],
                 report: Callable[[dict[str, Any]], str]) -> None:
    """Note the load at the end, write ``data`` to ``out`` and print its ``report``."""
    data["loadavg_end"] = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    print(report(data))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
