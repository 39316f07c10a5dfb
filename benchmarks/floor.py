"""The machine's floor for control latency: bare relay chains with no framework code.

::

    python -m benchmarks.floor                  # chains only
    python -m benchmarks.floor --with-peers     # interleaved with itask's and Celery's figures

**One way.** A client ``LPUSH``-es ``time.time()`` on a Redis list and the last process of a chain
records receive − sent, exactly as ``control_oneway`` does, but every hop is the least code
that can make it (raw sockets, hand-written RESP, a blocking ``recv``):

* ``redis→proc`` — a process blocked in ``BRPOP`` receives it: the shape of Celery's
  workaround (a kombu queue per task consumed by the task itself), 2 wake-ups.
* ``redis→proc→thread`` — that process's reader thread hands it to another thread through
  a ``threading.Condition``, 3 wake-ups.
* ``redis→proc→proc`` — the process on Redis forwards it over a socketpair to a second process's
  blocking ``recv``: 3 wake-ups.
* ``redis→proc→proc→thread`` — the second process's reader thread hands it to another
  thread: interactive_tasks' topology (worker loop → pool
  child's reader thread → the task thread), 4 wake-ups.

**Round trip**, as ``control_roundtrip``: the client sends, the far end echoes, the
client's time from send to the echo in hand.

* ``redis⇄proc`` — the far end pops the item and pushes it on a reply list the client pops:
  Celery's workaround, 4 wake-ups.
* ``redis⇄proc⇄proc→thread`` — interactive_tasks' topology: a process with an event loop
  (``selectors``) forwards to a second process, whose reader thread hands it to another
  thread that sends it back; the first process pushes it on the client's list, which the
  client's reader thread pops and hands to the waiting thread; 8 wake-ups.

**Progress**, as ``progress_latency``: a thread of one process stamps ``time.time()`` and
sends it over a socketpair to a process with an event loop, which pushes it on the
client's list; the client's reader thread pops it and hands it to the waiting thread,
which records receive − sent (``proc→proc→redis→proc→thread``: task thread → worker →
Redis → inbox thread → the thread in ``handle.events()``, 5 wake-ups). Celery has no
push path for progress (its client polls the result backend), so it has no chain here.

The pace of the samples is the workloads' own: control messages 2 ms apart
(``CONTROL_GAP``), progress every 10 ms.

What a chain measures is what the machine charges per wake-up and per hop, before any
framework runs; the gap between a chain and the itask workload of the same shape is the
code interactive_tasks adds. ``--with-peers`` runs one repetition of ``python -m benchmarks
--only control_oneway,control_oneway_nowait,control_roundtrip,control_roundtrip_nowait``
between rounds, so every figure comes from one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

from .harness import REDIS_URL, ROOT
from .workloads.common import CONTROL_GAP

#: one way: name → (processes after Redis, whether the last one hands over to a thread)
ONE_WAY = {
    "redis→proc": (1, False),
    "redis→proc→thread": (1, True),
    "redis→proc→proc": (2, False),
    "redis→proc→proc→thread": (2, True),
}
#: round trip: name → whether the far end is interactive_tasks' shape (else Celery's)
ROUND_TRIP = {
    "redis⇄proc": False,
    "redis⇄proc⇄proc→thread": True,
}
PROGRESS_CHAIN = "proc→proc→redis→proc→thread"
PROGRESS_INTERVAL = 0.01  # progress_latency's interval
PEER_WORKLOADS = ("control_oneway,control_oneway_nowait,control_roundtrip,"
                  "control_roundtrip_nowait,progress_latency")
STOP = b"stop"
FRAME = 32  # fixed-size socketpair frames: items are short


def _resp(*args: bytes) -> bytes:
    out = b"*%d\r\n" % len(args)
    for arg in args:
        out += b"$%d\r\n%s\r\n" % (len(arg), arg)
    return out


def _redis() -> socket.socket:
    """A raw connection to the benchmarks' Redis (``BENCH_REDIS_URL``, database included)."""
    url = urlsplit(REDIS_URL)
    sock = socket.create_connection((url.hostname or "127.0.0.1", url.port or 6379))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if url.password:
        sock.sendall(_resp(b"AUTH", url.password.encode()))
        _expect_ok(sock)
    database = url.path.strip("/")
    if database:
        sock.sendall(_resp(b"SELECT", database.encode()))
        _expect_ok(sock)
    return sock


def _expect_ok(sock: socket.socket) -> None:
    reply = sock.recv(256)
    if not reply.startswith(b"+OK"):
        raise RuntimeError(f"redis refused the benchmark's connection: {reply!r}")


def _brpop(key: bytes) -> Callable[[], bytes]:
    """A function that blocks for the oldest item on ``key`` (``LPUSH`` + ``BRPOP``: first
    in, first out, as the project's queues; ``BLPOP`` would pop the newest and let a
    ``STOP`` overtake a sample still in the list). Items are small and spaced
    apart, so each reply arrives in one ``recv``; its last bulk string is the item."""
    sock = _redis()
    command = _resp(b"BRPOP", key, b"0")

    def pop() -> bytes:
        sock.sendall(command)
        return sock.recv(4096).split(b"\r\n")[-2]

    return pop


def _handed_over(source: Callable[[], bytes]) -> Callable[[], bytes]:
    """A reader thread takes each item from ``source`` and hands it over through a
    ``threading.Condition``; the function returned waits for the next one."""
    cond = threading.Condition()
    items: deque[bytes] = deque()

    def reader() -> None:
        while True:
            item = source()
            with cond:
                items.append(item)
                cond.notify()
            if item == STOP:
                return

    threading.Thread(target=reader, daemon=True).start()

    def next_item() -> bytes:
        with cond:
            while not items:
                cond.wait()
            return items.popleft()

    return next_item


def _receive(next_item: Callable[[], bytes], to_thread: bool, out: str) -> None:
    """The end of a chain: record receive − sent for each item until STOP, in this thread
    or (``to_thread``) in another one that this thread hands each item to."""
    samples: list[float] = []
    if to_thread:
        next_item = _handed_over(next_item)
    while True:
        item = next_item()
        if item == STOP:
            break
        samples.append((time.time() - float(item)) * 1000.0)
    Path(out).write_text(json.dumps(samples))


def _first(key: bytes, processes: int, to_thread: bool, out: str) -> None:
    """The process on Redis: the end of the chain, or it forwards to a second process."""
    pop = _brpop(key)
    if processes == 1:
        _receive(pop, to_thread, out)
        return
    ours, theirs = socket.socketpair()
    ctx = multiprocessing.get_context("fork")
    second = ctx.Process(target=_second, args=(theirs, to_thread, out), daemon=True)
    second.start()
    theirs.close()
    while True:
        item = pop()
        ours.sendall(item.ljust(FRAME))
        if item == STOP:
            break
    second.join(30)


def _second(sock: socket.socket, to_thread: bool, out: str) -> None:
    _receive(lambda: sock.recv(FRAME).rstrip(), to_thread, out)


def _frames(buffered: bytes) -> tuple[list[bytes], bytes]:
    """The whole fixed-size frames at the front of ``buffered`` (padding stripped), and
    what is left of it."""
    whole = len(buffered) - len(buffered) % FRAME
    return ([buffered[at:at + FRAME].rstrip() for at in range(0, whole, FRAME)],
            buffered[whole:])


@contextlib.contextmanager
def _chain_process(target: Callable[..., None], args: tuple[object, ...],
                   keys: list[bytes]) -> Iterator[multiprocessing.process.BaseProcess]:
    """A chain's first process, started; on the way out its Redis ``keys`` are deleted and
    the process is killed if it is still alive."""
    proc = multiprocessing.get_context("fork").Process(target=target, args=args)
    proc.start()
    try:
        yield proc
    finally:
        cleanup = _redis()
        cleanup.sendall(_resp(b"DEL", *keys))
        cleanup.recv(64)
        cleanup.close()
        if proc.is_alive():
            proc.kill()


def _joined(proc: multiprocessing.process.BaseProcess, name: str) -> None:
    """Wait for a chain's first process to end; RuntimeError unless it ended well."""
    proc.join(30)
    if proc.exitcode != 0:
        raise RuntimeError(f"chain {name} failed: exit {proc.exitcode}")


def _after_warm_up(name: str, got: list[float], samples: int, warm: int) -> list[float]:
    if len(got) != samples + warm:
        raise RuntimeError(f"chain {name} saw {len(got)} of {samples + warm}")
    return got[warm:]


def measure_one_way(name: str, samples: int, warm: int, gap: float) -> list[float]:
    """One run of chain ``name`` (:data:`ONE_WAY`); latencies in ms after warm-up."""
    processes, to_thread = ONE_WAY[name]
    key = f"bench-floor-{uuid.uuid4().hex[:8]}".encode()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "samples.json")
        with _chain_process(_first, (key, processes, to_thread, out), [key]) as first:
            client = _redis()
            _wait_blocked(client, key)
            for _ in range(samples + warm):
                client.sendall(_resp(b"LPUSH", key, repr(time.time()).encode()))
                client.recv(64)
                time.sleep(gap)  # the pace of the samples, as in control_oneway
            client.sendall(_resp(b"LPUSH", key, STOP))
            client.recv(64)
            client.close()
            _joined(first, name)
            got = json.loads(Path(out).read_text())
    return _after_warm_up(name, got, samples, warm)


def _echo_far_end(key_in: bytes, key_out: bytes, itask_shape: bool) -> None:
    """Pop from ``key_in``, push each item back on ``key_out``: at once, or (``itask_shape``)
    through a second process and back, from an event loop watching both sockets."""
    pop_conn, push_conn = _redis(), _redis()
    pop_command = _resp(b"BRPOP", key_in, b"0")

    def push(item: bytes) -> None:
        push_conn.sendall(_resp(b"LPUSH", key_out, item))
        push_conn.recv(64)

    if not itask_shape:
        while True:
            pop_conn.sendall(pop_command)
            item = pop_conn.recv(4096).split(b"\r\n")[-2]
            push(item)
            if item == STOP:
                return
    ours, theirs = socket.socketpair()
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_echo_child, args=(theirs,), daemon=True)
    child.start()
    theirs.close()
    loop = selectors.DefaultSelector()
    loop.register(pop_conn, selectors.EVENT_READ, "redis")
    loop.register(ours, selectors.EVENT_READ, "child")
    pop_conn.sendall(pop_command)
    buffered = b""
    while True:
        for key, _ in loop.select():
            if key.data == "redis":
                item = pop_conn.recv(4096).split(b"\r\n")[-2]
                ours.sendall(item.ljust(FRAME))
                if item != STOP:
                    pop_conn.sendall(pop_command)
                continue
            items, buffered = _frames(buffered + ours.recv(4096))
            for item in items:
                push(item)
                if item == STOP:
                    child.join(30)
                    return


def _echo_child(sock: socket.socket) -> None:
    """The second process: its reader thread hands over; the other thread echoes."""
    next_item = _handed_over(lambda: sock.recv(FRAME).rstrip())
    while True:
        item = next_item()
        sock.sendall(item.ljust(FRAME))
        if item == STOP:
            return


def measure_round_trip(name: str, samples: int, warm: int, gap: float) -> list[float]:
    """One run of round-trip chain ``name`` (:data:`ROUND_TRIP`); ms after warm-up."""
    itask_shape = ROUND_TRIP[name]
    tag = uuid.uuid4().hex[:8]
    key_in, key_out = f"bench-floor-{tag}-in".encode(), f"bench-floor-{tag}-out".encode()
    got: list[float] = []
    with _chain_process(_echo_far_end, (key_in, key_out, itask_shape),
                        [key_in, key_out]) as far:
        client = _redis()
        pop = _brpop(key_out)
        next_echo = _handed_over(pop) if itask_shape else pop
        _wait_blocked(client, key_in)
        for i in range(samples + warm):
            item = b"%d" % i
            start = time.perf_counter()
            client.sendall(_resp(b"LPUSH", key_in, item))
            client.recv(64)
            echo = next_echo()
            got.append((time.perf_counter() - start) * 1000.0)
            if echo != item:
                raise RuntimeError(f"chain {name} echoed {echo!r} for {item!r}")
            time.sleep(gap)  # the pace of the samples, as in control_roundtrip
        client.sendall(_resp(b"LPUSH", key_in, STOP))
        client.recv(64)
        client.close()
        next_echo()
        _joined(far, name)
    return _after_warm_up(name, got, samples, warm)


def measure_progress(samples: int, warm: int, interval: float) -> list[float]:
    """One run of the progress chain (:data:`PROGRESS_CHAIN`); ms after warm-up."""
    key = f"bench-floor-{uuid.uuid4().hex[:8]}".encode()
    next_item = _handed_over(_brpop(key))
    ready = _redis()
    _wait_blocked(ready, key)  # the client's reader waits before the first sample
    ready.close()
    got: list[float] = []
    with _chain_process(_progress_relay, (key, samples + warm, interval), [key]) as relay:
        while True:
            item = next_item()
            if item == STOP:
                break
            got.append((time.time() - float(item)) * 1000.0)
        _joined(relay, PROGRESS_CHAIN)
    return _after_warm_up(PROGRESS_CHAIN, got, samples, warm)


def _progress_relay(key: bytes, count: int, interval: float) -> None:
    """The worker's part: an event loop pushing what its "pool child" sends."""
    ours, theirs = socket.socketpair()
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_progress_source, args=(theirs, count, interval), daemon=True)
    child.start()
    theirs.close()
    push_conn = _redis()
    loop = selectors.DefaultSelector()
    loop.register(ours, selectors.EVENT_READ)
    buffered = b""
    while True:
        loop.select()
        items, buffered = _frames(buffered + ours.recv(4096))
        for item in items:
            push_conn.sendall(_resp(b"LPUSH", key, item))
            push_conn.recv(64)
            if item == STOP:
                child.join(30)
                return


def _progress_source(sock: socket.socket, count: int, interval: float) -> None:
    """The "task": a thread other than the one reading the socket stamps and sends."""
    _handed_over(lambda: sock.recv(FRAME).rstrip())  # a reader thread, as a pool child has
    for _ in range(count):
        sock.sendall(repr(time.time()).encode().ljust(FRAME))
        time.sleep(interval)
    sock.sendall(STOP.ljust(FRAME))


def _wait_blocked(client: socket.socket, key: bytes, timeout: float = 10.0) -> None:
    """Until a client is blocked on ``key`` (the chain is ready), polled with a deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        client.sendall(_resp(b"CLIENT", b"LIST"))
        listing = b""
        while not listing.endswith(b"\r\n") or listing.count(b"\r\n") < 2:
            listing += client.recv(65536)
        if b"cmd=brpop" in listing:
            return
        time.sleep(0.01)
    raise TimeoutError("the chain's first process never blocked on its list")


def _peers(out_dir: Path, only: str) -> dict[str, dict[str, float]]:
    """One repetition of the main benchmarks' ``only`` workloads, itask and Celery;
    ``{"<system> <workload>": metrics}``."""
    subprocess.run([sys.executable, "-m", "benchmarks", "--broker", "redis", "--repeat", "1",
                    "--only", only, "--systems", "itask,celery", "--out", str(out_dir)],
                   cwd=str(ROOT), check=True, stdout=subprocess.DEVNULL)
    newest = max(out_dir.glob("results-*.json"), key=lambda p: p.stat().st_mtime)
    data = json.loads(newest.read_text())["brokers"]["redis"]
    figures: dict[str, dict[str, float]] = {}
    for workload, entry in data.items():
        for system, result in entry["systems"].items():
            runs = [r for r in result.get("runs", []) if "metrics" in r]
            if runs:
                figures[f"{system} {workload}"] = runs[0]["metrics"]
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--gap", type=float, default=CONTROL_GAP,
                        help="seconds between control messages (the workloads' CONTROL_GAP)")
    parser.add_argument("--with-peers", action="store_true",
                        help="also run itask's and Celery's control workloads each round")
    parser.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    args = parser.parse_args(argv)

    p50s: dict[str, list[float]] = {}
    p99s: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name in ONE_WAY:
                got = measure_one_way(name, args.samples, 20, args.gap)
                p50s.setdefault(name, []).append(statistics.median(got))
                p99s.setdefault(name, []).append(_percentile(got, 0.99))
            for name in ROUND_TRIP:
                got = measure_round_trip(name, args.samples, 20, args.gap)
                p50s.setdefault(f"{name} (round trip)", []).append(statistics.median(got))
                p99s.setdefault(f"{name} (round trip)", []).append(_percentile(got, 0.99))
            got = measure_progress(args.samples, 20, PROGRESS_INTERVAL)
            p50s.setdefault(f"{PROGRESS_CHAIN} (progress)", []).append(statistics.median(got))
            p99s.setdefault(f"{PROGRESS_CHAIN} (progress)", []).append(_percentile(got, 0.99))
            if args.with_peers:
                for name, metrics in _peers(Path(tmp), PEER_WORKLOADS).items():
                    p50s.setdefault(name, []).append(metrics["p50_ms"])
                    p99s.setdefault(name, []).append(metrics["p99_ms"])
    if args.json:
        print(json.dumps({"p50_ms": p50s, "p99_ms": p99s}, indent=1))
        return 0
    print(f"latency, ms: median (min–max) of {args.rounds} round(s), "
          f"{args.samples} samples each; control {args.gap * 1000:g} ms apart, "
          f"progress every {PROGRESS_INTERVAL * 1000:g} ms")
    print(f"{'chain':<38} {'p50':>22} {'p99':>22}")
    for name in p50s:
        print(f"{name:<38} {_spread(p50s[name]):>22} {_spread(p99s[name]):>22}")
    return 0


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f})"


if __name__ == "__main__":
    sys.exit(main())
