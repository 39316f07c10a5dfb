"""Where a Redis control message's one-way latency goes, hop by hop, against the floors.

::

    python -m benchmarks.redis_control_profile --rounds 3           # send() as the workload
    python -m benchmarks.redis_control_profile --rounds 3 --nowait  # send(wait=False)
    python -m benchmarks.redis_control_profile --report FILE        # reprint a result

``control_oneway`` (benchmarks/workloads/control.py) times ``handle.send({"t": time.time()})``
to the task's ``self.receive()`` returning it: client → Redis → the worker's loop → the
slot's socketpair → the pool process's reader thread → the task thread, four wake-ups
against the two of Celery's workaround (client → Redis → the pool process consuming its
own kombu queue).

Each round, in an order alternated between rounds:

* **probed** — an itask worker whose app is :mod:`benchmarks.apps.itask_control_probe`:
  timestamps (``time.time()``, one clock for every process) at each step of the path, in
  the worker's main process, the pool process's reader thread and the task thread, and
  in this client around its ``LPUSH`` (``TaskPublisher.push``). ``--n`` messages
  ``CONTROL_GAP`` apart, as the workload sends them; per leg the median over messages.
  Around the stream, every thread's CPU time and wake-ups (voluntary context switches)
  per message of the worker's processes, the client and Redis (the
  ``benchmarks.amqp_profile`` accounting).
* **itask** and **celery** — the ``control_oneway`` workload itself (no probes), for the
  figure the probed legs must add up to and for Celery's workaround beside it
  (``control_oneway_nowait`` with ``--nowait``; Celery's side is the same code).
* **decoding** — one step of the worker's path (decoding a control body) timed back to
  back and ``CONTROL_GAP`` apart: what the pace alone does to the cost of the same code.
* **floors** — ``benchmarks.floor``'s bare chains of the same topologies:
  ``redis→proc`` (Celery's workaround's shape), ``redis→proc→thread``,
  ``redis→proc→proc``, ``redis→proc→proc→thread`` (ours). Their differences price one
  socketpair hop and one thread hand-off on this machine.

Writes ``--out`` (default ``benchmarks/results/redis_control_profile.json``): every round
and medians (min–max) over rounds; prints the breakdown (``--report`` reprints it).
"""

from __future__ import annotations

import argparse
import bisect
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from .amqp_profile import (
    _by_comm,
    _client_thread_names,
    add_output_args,
    delta,
    run_header,
    snapshot,
    summarize,
    write_result,
)
from .floor import ONE_WAY, measure_one_way
from .harness import new_namespace, process_tree
from .systems import Itask, make_system
from .workloads.common import CONTROL_GAP, wait_itask_started
from .workloads.control import control_oneway

PROBE_APP = "benchmarks.apps.itask_control_probe"
#: (leg, stamp it starts at, stamp it ends at), in path order; "sent" is the message's
#: own ``time.time()``, "push"/"pushed" this client's ``TaskPublisher.push`` entry and
#: return, "received" the task's ``time.time()`` after ``receive()`` returned
LEGS = (
    ("client: send() → LPUSH packed (handle, codec, signing)", "sent", "push"),
    ("→ Redis → worker loop's poll returned", "push", "loop woke"),
    ("worker: loop step → control reader called", "loop woke", "control read"),
    ("worker: read BLMPOP reply (hiredis)", "control read", "frames parsed"),
    ("worker: cut the body out of the frame (control_frame)", "frames parsed",
     "frame checked"),
    ("worker: decode (codec.loads, control_fields), build the HeldControl", "frame checked",
     "decoded"),
    ("worker: look the task up", "decoded", "held"),
    ("worker: check the token, note the sequence number", "held", "authorized"),
    ("worker: apply the verb → send_ctl", "authorized", "send_ctl"),
    ("worker: encode frame", "send_ctl", "sending"),
    ("→ send() on socketpair → pool process's reader thread", "sending", "child recv"),
    ("reader thread: decode frame", "child recv", "child frame"),
    ("reader thread: route, lock, queue, notify", "child frame", "notified"),
    ("→ task thread woken, receive() returned", "notified", "received"),
)
#: off the path: what runs beside it
SIDE_LEGS = (
    ("client: LPUSH round trip (push → its reply read)", "push", "pushed"),
    ("worker: send() on the socketpair until send_ctl returned", "sending", "written"),
    ("worker: after send_ctl until on_frames returned (the ack)", "written",
     "control done"),
)


class ProbedItask(Itask):
    """The itask system with :data:`PROBE_APP` as the worker's app."""

    def worker_command(self) -> list[str]:
        return [PROBE_APP if arg == "benchmarks.apps.itask_worker" else arg
                for arg in super().worker_command()]


def _client_pushes() -> tuple[list[float], list[float]]:
    """Wrap this process's ``TaskPublisher.push``: its entry and return times for each
    push to a control list (two lists that grow as the client sends)."""
    from interactive_tasks.transport.redis_fast import TaskPublisher

    entered: list[float] = []
    returned: list[float] = []
    push = getattr(TaskPublisher.push, "__wrapped__", TaskPublisher.push)

    @functools.wraps(push)
    def timed(self: Any, queue: str, *args: Any, **kwargs: Any) -> None:
        control = ".ctl." in queue
        if control:
            entered.append(time.time())
        push(self, queue, *args, **kwargs)
        if control:
            returned.append(time.time())

    TaskPublisher.push = timed  # type: ignore[method-assign]
    return entered, returned


#: probes stamped together (one per control reply, per send_ctl, per decoded frame): the
#: first of each group finds a message's stamp, the others share its index
GROUPS = (("push", "pushed"), ("control read", "loop woke", "frames parsed", "control done"),
          ("frame checked",), ("decoded",), ("held",), ("authorized",),
          ("send_ctl", "sending", "written"), ("child recv",), ("child frame", "notified"))


def align(stamps: dict[str, list[float]]) -> list[dict[str, float]]:
    """Each message's stamps, by time: from its ``sent`` on, the first stamp of each group
    in path order no earlier than the one before it and no later than ``received``. Rows
    also hold other control traffic (the run frame names "ctl"; the handle's own verbs,
    such as its watch renewals), and one ``recv`` may bring two frames; a message whose
    path cannot be found whole is left out."""
    out = []
    for sent, received in zip(stamps["sent"], stamps["received"], strict=True):
        message = {"sent": sent, "received": received}
        after = sent
        for group in GROUPS:
            at = bisect.bisect_left(stamps[group[0]], after)
            if at >= min(len(stamps[name]) for name in group) or \
                    stamps[group[0]][at] > received:
                break
            message.update({name: stamps[name][at] for name in group})
            after = stamps[group[0]][at]
        else:
            out.append(message)
    return out


def probed_run(n: int, warm: int, wait: bool, log_dir: Path) -> dict[str, Any]:
    """One probed stream of ``warm + n`` messages; per leg the median µs (after warm-up),
    and CPU and wake-ups per message of each process."""
    from interactive_tasks import InteractiveTask

    system = ProbedItask("redis", new_namespace("ctlprof", "itask"), log_dir)
    total = n + warm
    entered, returned = _client_pushes()
    try:
        with system.worker() as proc:
            probe = system.bench.app.task(base=InteractiveTask, name="bench.ctl_probe")(
                lambda self, n: None)  # the client's stub: the worker runs the real one
            handle = probe.start(total)
            wait_itask_started(handle)
            tree = process_tree(proc.pid)
            roles = {"worker main": [proc.pid],
                     "worker children": [p for p in tree if p != proc.pid],
                     "client": [os.getpid()], "redis": _by_comm("redis-server")}
            names = _client_thread_names()
            entered.clear()
            returned.clear()
            before = snapshot(roles)
            for _ in range(total):
                handle.send({"t": time.time()}, wait=wait)
                time.sleep(CONTROL_GAP)
            got = handle.result(60)
            cpu = delta(before, snapshot(roles), total, names)
    finally:
        system.close()
        system.cleanup()
    stamps = dict(got["probes"], sent=got["sent"], received=got["received"],
                  push=entered, pushed=returned)
    counts = {k: len(v) for k, v in stamps.items()}
    out: dict[str, Any] = {"n": n, "wait": wait, "stamps_per_probe": counts,
                           "per_message": cpu}
    first = stamps["sent"][warm]  # after the warm-up
    messages = [m for m in align(stamps) if m["sent"] >= first]
    out["messages_aligned"] = len(messages)
    if len(messages) < n // 2:
        out["error"] = "too few messages aligned: no legs"
        return out
    legs: dict[str, float] = {}
    for leg, start, end in (*LEGS, *SIDE_LEGS):
        legs[leg] = round(1e6 * statistics.median(m[end] - m[start] for m in messages), 1)
    one_way = [m["received"] - m["sent"] for m in messages]
    out["legs_us"] = legs
    out["one_way_p50_us"] = round(1e6 * statistics.median(one_way), 1)
    out["sum_of_leg_medians_us"] = round(sum(legs[leg] for leg, _, _ in LEGS), 1)
    return out


def workload_p50(name: str, wait: bool, log_dir: Path) -> float:
    """``control_oneway``'s p50 (ms) for system ``name`` on Redis, one run (``wait``
    False: ``control_oneway_nowait``, which for Celery is the same code)."""
    system = make_system(name, "redis", new_namespace("ctlprof", name), log_dir)
    try:
        return float(control_oneway(system, quick=False, wait=wait)["p50_ms"])
    finally:
        system.close()
        system.cleanup()


def floors(samples: int) -> dict[str, float]:
    """p50 ms of each one-way chain of :data:`benchmarks.floor.ONE_WAY`, and the price of
    one socketpair hop and one thread hand-off derived from them."""
    out = {name: round(statistics.median(measure_one_way(name, samples, 20, CONTROL_GAP)), 4)
           for name in ONE_WAY}
    base = out["redis→proc"]
    out["socketpair hop (redis→proc→proc − redis→proc)"] = round(
        out["redis→proc→proc"] - base, 4)
    out["thread hand-off (redis→proc→thread − redis→proc)"] = round(
        out["redis→proc→thread"] - base, 4)
    return out


def pace_cost(samples: int = 200) -> dict[str, float]:
    """µs (median) of one step of the worker's path, decoding a control message's body
    (``codec.loads`` and ``control_fields``), run back to back and run
    ``CONTROL_GAP`` apart as the workload's messages come: what the same code costs on
    a CPU that idled in between."""
    from interactive_tasks import codec
    from interactive_tasks.protocol import ControlMessage, Verb, control_fields

    body = codec.dumps(ControlMessage(
        verb=Verb.MESSAGE, task_id="0" * 32, data={"t": time.time()}, sender="ns.inbox.x",
        rid="0" * 12, cseq=1, token="0" * 43).to_wire())
    out = {}
    for name, gap in (("back to back", 0.0), (f"{CONTROL_GAP * 1000:g} ms apart", CONTROL_GAP)):
        took = []
        for _ in range(samples):
            if gap:
                time.sleep(gap)
            start = time.perf_counter()
            control_fields(codec.loads(body))
            took.append(time.perf_counter() - start)
        out[name] = round(1e6 * statistics.median(took), 1)
    return out


def report(data: dict[str, Any]) -> str:
    """The breakdown the write-up quotes: medians (min–max) over rounds."""
    rounds = data["rounds"]
    out = []

    def spread(values: list[float], fmt: str = "{:.0f}") -> str:
        if not values:
            return "?"
        return (fmt.format(statistics.median(values)) + " (" + fmt.format(min(values))
                + "–" + fmt.format(max(values)) + ")")

    probed = [r["probed"] for r in rounds if "legs_us" in r.get("probed", {})]
    out.append(f"control_oneway p50, ms, median (min–max) of {len(rounds)} rounds:")
    out.append(f"  itask   {spread([r['itask_p50_ms'] for r in rounds], '{:.3f}')}")
    out.append(f"  celery  {spread([r['celery_p50_ms'] for r in rounds], '{:.3f}')}")
    out.append(f"  probed  {spread([p['one_way_p50_us'] / 1000 for p in probed], '{:.3f}')}"
               f" (sum of leg medians "
               f"{spread([p['sum_of_leg_medians_us'] / 1000 for p in probed], '{:.3f}')})")
    out.append("legs of the probed path, µs, median over messages, then over rounds:")
    for leg, _, _ in (*LEGS, *SIDE_LEGS):
        # (a file written before a leg was renamed has "?" for it)
        got = [p["legs_us"][leg] for p in probed if leg in p["legs_us"]]
        out.append(f"  {spread(got):>16}  {leg}")
    out.append("floors (benchmarks.floor chains), p50 µs:")
    for chain in rounds[0]["floors"]:
        out.append(f"  {spread([1000 * r['floors'][chain] for r in rounds]):>16}  {chain}")
    out.append("one step, decoding a control body, in this process, µs:")
    for pace in rounds[0].get("decode_us", {}):
        out.append(f"  {spread([r['decode_us'][pace] for r in rounds], '{:.1f}'):>16}  {pace}")
    out.append("CPU µs / wake-ups per message (probed stream):")
    for role in probed[0]["per_message"] if probed else ():
        cpu = [p["per_message"][role]["cpu_us"] for p in probed]
        wakes = [p["per_message"][role]["wakeups"] for p in probed]
        out.append(f"  {role:<16} {spread(cpu):>16} µs  {spread(wakes, '{:.2f}')} wake-ups")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.redis_control_profile")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=300, help="probed messages per round")
    parser.add_argument("--floor-samples", type=int, default=300)
    parser.add_argument("--nowait", action="store_true",
                        help="send(wait=False): no acknowledgement from the worker")
    add_output_args(parser, "redis_control_profile.json")
    args = parser.parse_args(argv)
    if args.report is not None:
        print(report(json.loads(args.report.read_text())))
        return 0
    log_dir = Path("/tmp") / "redis_control_profile_logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    data = run_header("benchmarks.redis_control_profile", argv)
    data["rounds"] = []
    steps = ("probed", "itask", "celery", "floors")
    for r in range(args.rounds):
        got: dict[str, Any] = {}
        for step in steps if r % 2 == 0 else steps[::-1]:
            if step == "probed":
                got["probed"] = probed_run(args.n, 20, not args.nowait, log_dir)
            elif step == "floors":
                got["floors"] = floors(args.floor_samples)
                got["decode_us"] = pace_cost()
            else:
                got[f"{step}_p50_ms"] = round(workload_p50(step, not args.nowait, log_dir), 4)
        got["loadavg"] = os.getloadavg()[0]
        data["rounds"].append(got)
        print(f"round {r + 1}: itask {got['itask_p50_ms']} ms, celery "
              f"{got['celery_p50_ms']} ms, probed "
              f"{got['probed'].get('one_way_p50_us')} µs, floors {got['floors']}", flush=True)
    data["summary"] = summarize(data["rounds"])
    write_result(args.out, data, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
