"""Which task a prefetch-1 consumer gets next from a RabbitMQ priority queue when it acks.

::

    python -m benchmarks.amqp_priority_race [--trials 200] [--out FILE]

What ``tests/test_options.py::test_priority_orders_waiting_tasks[amqp]`` relies on, with
bare py-amqp: a consumer with prefetch 1 holds a blocker; four messages with priorities
6, 9, 0, 3 are published without publisher confirms (as an itask client publishes); then
the blocker is acked and the next delivery is counted. Two modes:

* ``ack at once`` — the ack follows the publishes immediately;
* ``ack at depth 4`` — the ack waits until a passive ``queue_declare`` on a third
  connection reports all four messages queued.

A publish without confirms returns before the queue holds the message, and the queue's
process handles an ack ahead of the deliveries still in its mailbox
(``rabbit_amqqueue_process:prioritise_cast``), so an early ack can free the one reservation
while only the first message is queued. Also counted: the depth reported right after the
four publishes returned.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import amqp

PRIORITIES = (6, 9, 0, 3)


def _connect() -> amqp.Connection:
    conn = amqp.Connection("127.0.0.1", userid="guest", password="guest", heartbeat=0)
    conn.connect()
    return conn


def run(trials: int) -> dict[str, Any]:
    name = f"bench-priority-race-{uuid.uuid4().hex[:8]}"
    pub, con, look = _connect(), _connect(), _connect()
    pch, cch, lch = pub.channel(), con.channel(), look.channel()
    lch.queue_declare(name, durable=False, auto_delete=False,
                      arguments={"x-max-priority": 10})
    got: list[Any] = []
    cch.basic_qos(0, 1, False)
    tag = cch.basic_consume(name, callback=got.append)

    def next_delivery() -> Any:
        while not got:
            con.drain_events(timeout=10)
        return got.pop(0)

    out: dict[str, Any] = {"trials": trials}
    try:
        for mode in ("ack at once", "ack at depth 4"):
            firsts: dict[str, int] = {}
            depths: dict[int, int] = {}
            for _ in range(trials):
                pch.basic_publish(amqp.Message(b"blocker", priority=0), routing_key=name)
                blocker = next_delivery()
                for priority in PRIORITIES:
                    pch.basic_publish(amqp.Message(f"p{priority}".encode(), priority=priority),
                                      routing_key=name)
                if mode == "ack at depth 4":
                    depth = lch.queue_declare(name, passive=True).message_count
                    depths[depth] = depths.get(depth, 0) + 1
                    while lch.queue_declare(name, passive=True).message_count != 4:
                        pass
                cch.basic_ack(blocker.delivery_tag)
                first = next_delivery()
                firsts[first.body.decode()] = firsts.get(first.body.decode(), 0) + 1
                cch.basic_ack(first.delivery_tag)
                for _ in PRIORITIES[1:]:
                    cch.basic_ack(next_delivery().delivery_tag)
            out[mode] = {"first_delivered": dict(sorted(firsts.items()))}
            if depths:
                out["depth_right_after_publishing_4"] = {
                    str(k): v for k, v in sorted(depths.items())}
    finally:
        cch.basic_cancel(tag)
        lch.queue_delete(name)
        for conn in (pub, con, look):
            conn.close()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--note", default="", help="conditions of the run, kept in the record")
    args = parser.parse_args(argv)
    load = Path("/proc/loadavg").read_text().split()[0]
    result = run(args.trials)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    record = {"command": " ".join(["python -m benchmarks.amqp_priority_race", *sys.argv[1:]]),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": commit,
              "note": args.note, "loadavg_1min_at_start": float(load), **result}
    text = json.dumps(record, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
