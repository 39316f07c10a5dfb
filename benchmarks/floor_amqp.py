"""The machine's floor for control round trips on RabbitMQ: bare py-amqp chains.

::

    python -m benchmarks.floor_amqp                 # chains only
    python -m benchmarks.floor_amqp --with-peers    # interleaved with itask's and Celery's

The RabbitMQ counterpart of :mod:`benchmarks.floor`'s round trips, as
``control_roundtrip`` measures them: the client publishes an item on a queue, the far end
echoes it onto a reply queue, the client times send → echo in hand. Every hop is py-amqp
with raw bodies (``basic_publish`` / ``basic_consume``, no acks): no kombu, no framework.

* ``amqp⇄proc`` — the far end consumes and publishes the echo at once: the shape of
  Celery's workaround (a kombu queue per task consumed by the task itself), 4 wake-ups.
* ``amqp⇄proc⇄proc→thread`` — interactive_tasks' topology: a process with an event loop
  (``selectors``) forwards to a second process over a socketpair, whose reader thread hands
  it to another thread that sends it back; the first process publishes it on the client's
  queue, which the client's reader thread consumes and hands to the waiting thread;
  8 wake-ups.

The gap between a chain and the workload of the same shape is the code each system adds;
the gap between the two chains is what the topology costs before any code runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import amqp

from .floor import FRAME, STOP, _echo_child, _frames, _handed_over, _percentile, _spread
from .harness import AMQP_URL, ROOT
from .workloads.common import CONTROL_GAP

#: round trip: name → whether the far end is interactive_tasks' shape (else Celery's)
ROUND_TRIP = {
    "amqp⇄proc": False,
    "amqp⇄proc⇄proc→thread": True,
}
PEER_WORKLOADS = "control_roundtrip"


def _connection() -> amqp.Connection:
    """A py-amqp connection to the benchmarks' RabbitMQ (``BENCH_AMQP_URL``)."""
    url = urlsplit(AMQP_URL)
    vhost = unquote(url.path[1:]) if len(url.path) > 1 else "/"
    conn = amqp.Connection(f"{url.hostname or '127.0.0.1'}:{url.port or 5672}",
                           userid=unquote(url.username or "guest"),
                           password=unquote(url.password or "guest"),
                           virtual_host=vhost or "/", heartbeat=0)
    conn.connect()
    return conn


def _publish(channel: amqp.Channel, queue: str, item: bytes) -> None:
    channel.basic_publish(amqp.Message(item), exchange="", routing_key=queue)


def _consumer(queue: str) -> Callable[[], bytes]:
    """A function that waits for the next item on ``queue`` (a connection of its own)."""
    conn = _connection()
    channel = conn.channel()
    items: deque[bytes] = deque()
    channel.basic_consume(queue, callback=lambda m: items.append(bytes(m.body)), no_ack=True)

    def next_item() -> bytes:
        while not items:
            conn.drain_events()
        return items.popleft()

    return next_item


def _echo_far_end(queue_in: str, queue_out: str, itask_shape: bool,
                  ready: multiprocessing.synchronize.Event) -> None:
    """Consume ``queue_in``, publish each item on ``queue_out``: at once, or
    (``itask_shape``) through a second process and back, from an event loop."""
    conn = _connection()
    channel = conn.channel()
    items: deque[bytes] = deque()
    channel.basic_consume(queue_in, callback=lambda m: items.append(bytes(m.body)),
                          no_ack=True)
    ready.set()
    if not itask_shape:
        while True:
            conn.drain_events()
            while items:
                item = items.popleft()
                _publish(channel, queue_out, item)
                if item == STOP:
                    return
    ours, theirs = socket.socketpair()
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_echo_child, args=(theirs,), daemon=True)
    child.start()
    theirs.close()
    loop = selectors.DefaultSelector()
    loop.register(conn.sock, selectors.EVENT_READ, "amqp")
    loop.register(ours, selectors.EVENT_READ, "child")
    buffered = b""
    while True:
        for key, _ in loop.select():
            if key.data == "amqp":
                # py-amqp may hold a second message in its buffer: drain to empty
                with contextlib.suppress(socket.timeout):
                    while True:
                        conn.drain_events(timeout=0)
                while items:
                    ours.sendall(items.popleft().ljust(FRAME))
                continue
            got, buffered = _frames(buffered + ours.recv(4096))
            for item in got:
                _publish(channel, queue_out, item)
                if item == STOP:
                    child.join(30)
                    return


@contextlib.contextmanager
def _queues() -> Iterator[tuple[str, str]]:
    tag = uuid.uuid4().hex[:8]
    names = (f"bench-floor-{tag}-in", f"bench-floor-{tag}-out")
    conn = _connection()
    channel = conn.channel()
    for name in names:
        channel.queue_declare(name, durable=False, auto_delete=False)
    try:
        yield names
    finally:
        for name in names:
            channel.queue_delete(name)
        conn.close()


def measure_round_trip(name: str, samples: int, warm: int, gap: float) -> list[float]:
    """One run of round-trip chain ``name`` (:data:`ROUND_TRIP`); ms after warm-up."""
    itask_shape = ROUND_TRIP[name]
    got: list[float] = []
    with _queues() as (queue_in, queue_out):
        ctx = multiprocessing.get_context("fork")
        ready = ctx.Event()
        far = ctx.Process(target=_echo_far_end, args=(queue_in, queue_out, itask_shape,
                                                      ready))
        far.start()
        try:
            if not ready.wait(10):
                raise RuntimeError(f"chain {name} never started consuming")
            conn = _connection()
            channel = conn.channel()
            pop = _consumer(queue_out)
            next_echo = _handed_over(pop) if itask_shape else pop
            for i in range(samples + warm):
                item = b"%d" % i
                start = time.perf_counter()
                _publish(channel, queue_in, item)
                echo = next_echo()
                got.append((time.perf_counter() - start) * 1000.0)
                if echo != item:
                    raise RuntimeError(f"chain {name} echoed {echo!r} for {item!r}")
                time.sleep(gap)  # the pace of the samples, as in control_roundtrip
            _publish(channel, queue_in, STOP)
            next_echo()
            conn.close()
            far.join(30)
            if far.exitcode != 0:
                raise RuntimeError(f"chain {name} failed: exit {far.exitcode}")
        finally:
            if far.is_alive():
                far.kill()
    if len(got) != samples + warm:
        raise RuntimeError(f"chain {name} saw {len(got)} of {samples + warm}")
    return got[warm:]


def _peers(out_dir: Path) -> dict[str, dict[str, float]]:
    """One repetition of ``control_roundtrip`` on RabbitMQ, itask and Celery."""
    subprocess.run([sys.executable, "-m", "benchmarks", "--broker", "amqp", "--repeat", "1",
                    "--only", PEER_WORKLOADS, "--systems", "itask,celery",
                    "--out", str(out_dir)],
                   cwd=str(ROOT), check=True, stdout=subprocess.DEVNULL)
    newest = max(out_dir.glob("results-*.json"), key=lambda p: p.stat().st_mtime)
    data = json.loads(newest.read_text())["brokers"]["amqp"]
    figures: dict[str, dict[str, float]] = {}
    for workload, entry in data.items():
        for system, result in entry["systems"].items():
            runs = [r for r in result.get("runs", []) if "metrics" in r]
            if runs:
                figures[f"{system} {workload}"] = runs[0]["metrics"]
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floor_amqp",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--gap", type=float, default=CONTROL_GAP,
                        help="seconds between control messages (the workloads' CONTROL_GAP)")
    parser.add_argument("--with-peers", action="store_true",
                        help="also run itask's and Celery's control_roundtrip each round")
    parser.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    args = parser.parse_args(argv)

    p50s: dict[str, list[float]] = {}
    p99s: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name in ROUND_TRIP:
                got = measure_round_trip(name, args.samples, 20, args.gap)
                p50s.setdefault(name, []).append(statistics.median(got))
                p99s.setdefault(name, []).append(_percentile(got, 0.99))
            if args.with_peers:
                for name, metrics in _peers(Path(tmp)).items():
                    p50s.setdefault(name, []).append(metrics["p50_ms"])
                    p99s.setdefault(name, []).append(metrics["p99_ms"])
    if args.json:
        print(json.dumps({"p50_ms": p50s, "p99_ms": p99s}, indent=1))
        return 0
    print(f"round trip on RabbitMQ, ms: median (min–max) of {args.rounds} round(s), "
          f"{args.samples} samples each, {args.gap * 1000:g} ms apart")
    print(f"{'chain':<38} {'p50':>22} {'p99':>22}")
    for name in p50s:
        print(f"{name:<38} {_spread(p50s[name]):>22} {_spread(p99s[name]):>22}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
