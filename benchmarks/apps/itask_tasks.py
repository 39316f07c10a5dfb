"""interactive_tasks side of the benchmarks: one app per namespace."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

from interactive_tasks import App, InteractiveTask


def make_app(ns: str, broker_url: str, result_backend: str | None = None) -> SimpleNamespace:
    """The app and its tasks for namespace ``ns`` (task names do not depend on ``ns``)."""
    app = App(f"bench-{ns}", broker=broker_url, result_backend=result_backend, namespace=ns)

    @app.task(name="bench.noop")
    def noop() -> None:
        return None

    @app.task(base=InteractiveTask, name="bench.ctl_sink")
    def ctl_sink(self: Any, n: int) -> list[float]:
        """Receives ``n`` messages ``{"t": sent}``; returns receive − sent in ms for each."""
        out: list[float] = []
        for _ in range(n):
            msg = self.receive(timeout=30)
            now = time.time()
            if msg is None:
                break
            out.append((now - msg["t"]) * 1000.0)
        return out

    @app.task(base=InteractiveTask, name="bench.stream_sink")
    def stream_sink(self: Any, n: int, delay: float = 0.0) -> dict[str, Any]:
        """Receives ``n`` messages ``{"i": i}``, ``delay`` seconds apart at least; reports
        how many came, whether in order, and the wall time of the first and last."""
        first = last = 0.0
        got = 0
        in_order = True
        for i in range(n):
            msg = self.receive(timeout=30)
            if msg is None:
                break
            last = time.time()
            if i == 0:
                first = last
            in_order = in_order and msg.get("i") == i
            got += 1
            if delay:
                time.sleep(delay)
        return {"received": got, "in_order": in_order, "first": first, "last": last}

    @app.task(base=InteractiveTask, name="bench.echo")
    def echo(self: Any, n: int) -> int:
        """Sends every message it receives straight back (``n`` of them)."""
        for i in range(n):
            msg = self.receive(timeout=30)
            if msg is None:
                return i
            self.send(msg)
        return n

    @app.task(base=InteractiveTask, name="bench.chatty")
    def chatty(self: Any, n: int) -> dict[str, float]:
        """Emits ``n`` progress events as fast as it can, then one message."""
        start = time.perf_counter()
        for i in range(n):
            self.progress(i + 1, n)
        elapsed = time.perf_counter() - start
        self.send("end")
        return {"emit_s": elapsed, "n": n}

    @app.task(base=InteractiveTask, name="bench.ticker")
    def ticker(self: Any, n: int, interval: float) -> int:
        """Progress every ``interval`` s with the wall-clock send time in the message field."""
        for i in range(n):
            self.progress(i + 1, n, f"{time.time():.6f}")
            time.sleep(interval)
        return n

    @app.task(base=InteractiveTask, name="bench.hum")
    def hum(self: Any, until: float, interval: float) -> int:
        """Progress every ``interval`` s until wall-clock time ``until``, sending every
        message it receives straight back; ``"stop"`` ends it. Returns the ticks."""
        ticks = 0
        while time.time() < until:
            msg = self.receive(timeout=interval)
            if msg == "stop":
                break
            if msg is not None:
                self.send(msg)
            ticks += 1
            self.progress(ticks)
        return ticks

    @app.task(base=InteractiveTask, name="bench.ticking")
    def ticking(self: Any, rate: float, seconds: float) -> int:
        """Progress ``rate`` times a second for ``seconds`` (or until ``"stop"``), echoing
        every message it receives; returns the number of progress events."""
        n = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.progress(n)
            n += 1
            msg = self.receive(timeout=1.0 / rate)
            if msg == "stop":
                break
            if msg is not None:
                self.send(msg)
        return n

    @app.task(base=InteractiveTask, name="bench.burn")
    def burn(self: Any, seconds: float) -> int:
        """CPU-bound: progress as fast as it can for ``seconds`` (or until ``"stop"``)."""
        n = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.progress(n)
            n += 1
            if n % 256 == 0 and self.receive(timeout=0) == "stop":
                break
        return n

    @app.task(base=InteractiveTask, name="bench.busy")
    def busy(self: Any, work_s: float) -> int:
        """CPU-bound work in slices of ``work_s`` seconds, a checkpoint after each, until
        the message ``"stop"``; returns the number of slices."""
        slices = 0
        while True:
            end = time.perf_counter() + work_s
            while time.perf_counter() < end:
                pass
            if self.receive(timeout=0) == "stop":  # receive is a checkpoint too
                return slices
            slices += 1

    @app.task(base=InteractiveTask, name="bench.spin")
    def spin(self: Any, seconds: float) -> str:
        """CPU-bound and never reaches a checkpoint: only a forced cancel stops it."""
        end = time.monotonic() + seconds
        x = 0
        while time.monotonic() < end:
            x += 1
        return "spun"

    return SimpleNamespace(app=app, noop=noop, ctl_sink=ctl_sink, echo=echo,
                           stream_sink=stream_sink, chatty=chatty,
                           ticker=ticker, hum=hum, busy=busy, spin=spin,
                           ticking=ticking, burn=burn)
