"""One adapter per system under test: how to start its worker, submit and gather a no-op.

Configuration (see README.md "How the peers are configured"):

* interactive_tasks: ``itask worker --pool prefork -c 2``; results on Redis go to the Redis
  result store, on RabbitMQ they reach the starting client through its inbox (no store).
* Celery 5: ``celery worker -P prefork -c 2`` with defaults (acks early, prefetch
  multiplier 4); result backend Redis, or ``rpc://`` on RabbitMQ. Mingle, gossip and
  heartbeats are off: they are cluster chatter with no counterpart here and only slow
  Celery down.
* Dramatiq: ``dramatiq --processes 2 --threads 1`` with its Redis or RabbitMQ broker and
  the Results middleware on Redis.
"""

from __future__ import annotations

import contextlib
import glob
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from .harness import (
    BROKER_URLS,
    REDIS_URL,
    WorkerProcess,
    base_env,
    cleanup_amqp,
    cleanup_redis,
    python,
)

SYSTEMS = ("itask", "celery", "dramatiq")


class System:
    """Base adapter. Subclasses fill in the worker command and the client calls."""

    name: ClassVar[str] = ""

    def __init__(self, broker: str, ns: str, log_dir: Path,
                 pgid_file: Path | None = None) -> None:
        self.broker = broker
        self.broker_url = BROKER_URLS[broker]
        if broker == "embedded":  # a directory of its own, like a namespace elsewhere
            self.broker_url = f"{self.broker_url}/{ns}"
        self.ns = ns
        self.hostname = f"{ns}@bench"
        self.log_dir = log_dir
        self.pgid_file = pgid_file
        self._bench: Any = None
        self.extra_queues: list[str] = []
        self._launches = 0

    # -- worker ----------
    @property
    def results_url(self) -> str:
        return REDIS_URL

    def worker_command(self) -> list[str]:
        raise NotImplementedError

    def worker_env(self) -> dict[str, str]:
        env = base_env()
        env.update({"BENCH_NS": self.ns, "BENCH_BROKER_URL": self.broker_url,
                    "BENCH_RESULTS_URL": self.results_url})
        return env

    def launch_worker(self) -> WorkerProcess:
        self._launches += 1
        log = self.log_dir / f"{self.ns}-{self._launches}.log"
        return WorkerProcess(self.worker_command(), self.worker_env(), log, self.pgid_file)

    @contextlib.contextmanager
    def worker(self, ready: bool = True, timeout: float = 60.0) -> Iterator[WorkerProcess]:
        """A running worker, stopped (whole process group) on the way out."""
        proc = self.launch_worker()
        try:
            if ready:
                self.wait_ready(proc, timeout)
            yield proc
        finally:
            proc.stop()

    def wait_ready(self, proc: WorkerProcess, timeout: float = 60.0) -> None:
        """Ready = a no-op went through the whole system (and every slot got work)."""
        deadline = time.monotonic() + timeout
        pending = [self.submit_noop() for _ in range(4)]
        for handle in pending:
            while True:
                proc.check_alive()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name} worker not ready in {timeout}s:\n"
                                       f"{proc.log_tail()}")
                try:
                    self.result(handle, 1.0)
                    break
                except self.timeout_errors():
                    continue

    # -- client ----------
    @property
    def bench(self) -> Any:
        if self._bench is None:
            self._bench = self.make_client()
        return self._bench

    def make_client(self) -> Any:
        raise NotImplementedError

    def submit_noop(self) -> Any:
        raise NotImplementedError

    def result(self, handle: Any, timeout: float) -> Any:
        raise NotImplementedError

    def gather(self, handles: list[Any], timeout: float) -> None:
        """Wait for every result (deadline shared by all)."""
        deadline = time.monotonic() + timeout
        for handle in handles:
            self.result(handle, max(1.0, deadline - time.monotonic()))

    def timeout_errors(self) -> tuple[type[BaseException], ...]:
        return (TimeoutError,)

    def close(self) -> None:
        pass

    def cleanup(self) -> None:
        """Remove this run's queues and keys from the broker (best effort)."""


class Itask(System):
    name = "itask"

    @property
    def results_url(self) -> str:
        return ""  # Redis: the broker's own store; RabbitMQ: no store (results via inbox)

    def worker_command(self) -> list[str]:
        return [python(), "-m", "interactive_tasks.cli.main", "worker",
                "-A", "benchmarks.apps.itask_worker", "--pool", "prefork", "-c", "2",
                "-n", self.hostname, "-l", "warning"]

    def make_client(self) -> Any:
        from .apps.itask_tasks import make_app

        return make_app(self.ns, self.broker_url)

    def submit_noop(self) -> Any:
        return self.bench.noop.delay()

    def result(self, handle: Any, timeout: float) -> Any:
        return handle.result(timeout)

    def timeout_errors(self) -> tuple[type[BaseException], ...]:
        from interactive_tasks import TaskTimeout

        return (TaskTimeout, TimeoutError)

    def close(self) -> None:
        if self._bench is not None:
            self._bench.app.close()

    def cleanup(self) -> None:
        if self.broker == "redis":
            cleanup_redis(self.broker_url, [f"*{self.ns}*"])
        elif self.broker == "embedded":
            # the broker's directory, and what sits beside it (results, beat: "<dir>-…")
            directory = self.broker_url.removeprefix("embedded://")
            for path in glob.glob(f"{glob.escape(directory)}*"):
                shutil.rmtree(path, ignore_errors=True)
        else:
            cleanup_amqp(self.broker_url,
                         [f"{self.ns}.tasks.default", f"{self.ns}.dead",
                          f"{self.ns}.ctl.{self.hostname}"],
                         [f"{self.ns}.bcast", f"{self.ns}.events"])


class CelerySystem(System):
    name = "celery"

    @property
    def results_url(self) -> str:
        return REDIS_URL if self.broker == "redis" else "rpc://"

    def worker_command(self) -> list[str]:
        return [python(), "-m", "celery", "-A", "benchmarks.apps.celery_worker", "worker",
                "-P", "prefork", "-c", "2", "-n", self.hostname, "-l", "warning",
                "--without-gossip", "--without-mingle", "--without-heartbeat"]

    def make_client(self) -> Any:
        from .apps.celery_tasks import make_app

        return make_app(self.ns, self.broker_url, self.results_url)

    def submit_noop(self) -> Any:
        return self.bench.noop.delay()

    def result(self, handle: Any, timeout: float) -> Any:
        return handle.get(timeout=timeout)

    def gather(self, handles: list[Any], timeout: float) -> None:
        # The backend-optimised join (Celery's docs for Redis/RPC backends).
        from celery.result import ResultSet

        ResultSet(handles, app=self.bench.app).join_native(timeout=timeout)

    def timeout_errors(self) -> tuple[type[BaseException], ...]:
        from celery.exceptions import TimeoutError as CeleryTimeout

        return (CeleryTimeout, TimeoutError)

    def control_queue(self, suffix: str) -> str:
        name = f"{self.ns}.q.{suffix}"
        self.extra_queues.append(name)
        return name

    def stats(self, timeout: float = 1.0) -> dict[str, Any] | None:
        """This worker's ``inspect stats`` reply (first reply, no waiting for others)."""
        insp = self.bench.app.control.inspect(destination=[self.hostname], timeout=timeout,
                                              limit=1)
        replies = insp.stats() or {}
        return replies.get(self.hostname)

    def close(self) -> None:
        if self._bench is not None:
            self._bench.app.close()

    def cleanup(self) -> None:
        if self.broker == "redis":
            cleanup_redis(self.broker_url, [f"*{self.ns}*"])
        else:
            queues = [self.ns, *self.extra_queues]
            cleanup_amqp(self.broker_url, queues,
                         [self.ns, f"{self.ns}.ctl.pidbox", f"reply.{self.ns}.ctl.pidbox",
                          f"{self.ns}.ev", *self.extra_queues])


class CeleryBridgeSystem(CelerySystem):
    """Celery's own worker with the Celery bridge (``interactive_tasks.celery``): the
    control tasks are ``InteractiveTask``s driven through ``task.start()`` handles, the
    same client code as itask's. Run by ``python -m benchmarks.celery_bridge``."""

    name = "celery-bridge"

    def worker_command(self) -> list[str]:
        return [python(), "-m", "celery", "-A", "benchmarks.apps.celery_bridge_worker",
                "worker", "-P", "prefork", "-c", "2", "-n", self.hostname, "-l", "warning",
                "--without-gossip", "--without-mingle", "--without-heartbeat"]

    def make_client(self) -> Any:
        from .apps.celery_bridge_tasks import make_app

        return make_app(self.ns, self.broker_url, self.results_url)

    def close(self) -> None:
        if self._bench is not None:
            from interactive_tasks.celery import bridge_app

            bridge_app(self._bench.app).close()
        super().close()

    def cleanup(self) -> None:
        super().cleanup()
        if self.broker == "amqp":
            cleanup_amqp(self.broker_url, [f"{self.ns}.ctl.{self.hostname}"],
                         [f"{self.ns}.bcast", f"{self.ns}.events"])


class DramatiqSystem(System):
    name = "dramatiq"

    def worker_command(self) -> list[str]:
        return [python(), "-m", "dramatiq", "benchmarks.apps.dramatiq_worker:broker",
                "--processes", "2", "--threads", "1"]

    def make_client(self) -> Any:
        from .apps.dramatiq_tasks import make_broker

        return make_broker(self.ns, self.broker_url, self.results_url)

    def submit_noop(self) -> Any:
        return self.bench.noop.send()

    def result(self, handle: Any, timeout: float) -> Any:
        return handle.get_result(backend=self.bench.backend, block=True,
                                 timeout=int(timeout * 1000))

    def timeout_errors(self) -> tuple[type[BaseException], ...]:
        from dramatiq.results import ResultTimeout

        return (ResultTimeout, TimeoutError)

    def close(self) -> None:
        if self._bench is not None:
            with contextlib.suppress(Exception):
                self._bench.broker.close()

    def cleanup(self) -> None:
        if self.broker == "redis":
            cleanup_redis(self.broker_url, [f"{self.ns}:*", f"*{self.ns}*"])
        else:
            cleanup_amqp(self.broker_url, [self.ns, f"{self.ns}.DQ", f"{self.ns}.XQ"])


ADAPTERS: dict[str, type[System]] = {
    "itask": Itask,
    "celery": CelerySystem,
    "dramatiq": DramatiqSystem,
    "celery-bridge": CeleryBridgeSystem,
}


def make_system(name: str, broker: str, ns: str, log_dir: Path,
                pgid_file: Path | None = None) -> System:
    return ADAPTERS[name](broker, ns, log_dir, pgid_file)
