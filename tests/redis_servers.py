"""Redis servers a test starts for itself: a primary, replicas, a sentinel, on free ports.

Never the shared server on 6379: failover and restart tests kill and restart what they
started here. Every process runs in its own session (its own process group), so
:meth:`RedisProcess.kill` and the fixtures' cleanup reach it with one ``killpg``, also
when the test failed. ``redis-server`` comes from the system (``.ci/run`` installs it;
``--sentinel`` is the same binary).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI, wait_for

MASTER_NAME = "itprimary"


def require_redis_server() -> str:
    """The ``redis-server`` binary; skip (locally) or fail (CI) without it."""
    path = shutil.which("redis-server")
    if path is None:
        message = "redis-server is not installed"
        if IN_CI:
            pytest.fail(message + " (CI=true: .ci/run installs it)")
        pytest.skip(message)
    return path


_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port nothing listened on a moment ago (the kernel's pick), never the same
    twice in this process. Another process may still take it first: ``start`` then
    picks another."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


class RedisProcess:
    """One ``redis-server`` (or sentinel) with its own directory, port and log.

    ``args``: configuration lines as ``redis-server`` takes them on its command line
    (``["--appendonly", "yes"]``); a sentinel gets a config file (it rewrites it).
    """

    def __init__(self, directory: Path, port: int, args: list[str] | None = None,
                 sentinel_config: str | None = None) -> None:
        self.directory = directory
        self.port = port
        self.args = list(args or [])
        self.sentinel_config = sentinel_config
        self.proc: subprocess.Popen[bytes] | None = None
        self._started_before = False
        directory.mkdir(parents=True, exist_ok=True)
        self.log_path = directory / "server.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisProcess:
        """Start and wait until it answers. The first start moves to another port when
        someone else took this one; a restart keeps its port (the test's point)."""
        for _ in range(5):
            self._launch()
            if wait_for(self._started, timeout, interval=0.02,
                        message=f"redis-server on port {self.port} to answer") == "up":
                self._started_before = True
                return self
            if self._started_before:
                raise AssertionError(f"port {self.port} was taken: {self.log_tail()}")
            self.port = free_port()
        raise AssertionError(f"no free port for redis-server: {self.log_tail()}")

    def _launch(self) -> None:
        binary = require_redis_server()
        common = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
                  "--logfile", str(self.log_path), "--daemonize", "no"]
        if self.sentinel_config is not None:
            config = self.directory / "sentinel.conf"
            if not config.exists():  # a restarted sentinel keeps what it learnt
                config.write_text(self.sentinel_config)
            argv = [binary, str(config), "--sentinel", *common]
        else:
            # No RDB snapshots (AOF only where a test asks for it); a replica syncs at once
            # instead of waiting 5 s for more replicas to share a diskless transfer.
            argv = [binary, "--save", "", "--repl-diskless-sync-delay", "0", *common,
                    *self.args]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def _started(self) -> str | None:
        """"up" once this process answers on its port, "taken" if the port was not free."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            if "Address already in use" in self.log_tail():
                return "taken"
            raise AssertionError(f"redis-server on port {self.port} exited: {self.log_tail()}")
        try:  # the process on the port must be ours, not whoever had the port
            return "up" if self.client().info("server")["process_id"] == self.proc.pid else None
        except Exception:
            return None

    def client(self, **kwargs: Any) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1,
                           socket_timeout=5, **kwargs)

    def kill(self) -> None:
        """SIGKILL the server's process group and reap it (no shutdown, no save)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no log)"


def replica_online(primary: RedisProcess, replica: RedisProcess) -> bool:
    """Does ``primary`` stream its writes to ``replica`` (its only one)? A write and a
    ``WAIT`` tell: after a diskless sync the replica reports its link up at once, and the
    primary lists it "online", but streams only after its first ``REPLCONF ACK`` (up to a
    second later); a write in between reaches it late, or never if the primary dies
    first (seen here: a failover 0.4 s after the sync lost one)."""
    client = primary.client()
    client.set("redis_servers.synced", replica.port)
    return bool(client.execute_command("WAIT", 1, 100) >= 1)


class SentinelSetup:
    """A primary, one replica and one sentinel watching them (quorum 1)."""

    def __init__(self, root: Path, down_after_ms: int = 2000) -> None:
        # down-after-milliseconds must stay well above the sentinel's fixed 1 s reconnect
        # period (Redis 7.0 sentinel.c). On the switch to the promoted replica the
        # sentinel starts that replica's down clock but keeps the old primary's link,
        # which reconnects no sooner than 1 s after its last attempt; a SIGKILLed primary
        # is retried every second, often in the timer tick of the switch. The sentinel
        # then connects, sends its first PING and checks the clock in one tick, before
        # any PONG can come back. With 1000 ms it declared the just-promoted replica down
        # 1.01 s after the switch and failed over back to the restarted old primary: 3 in
        # 25 crashes with only redis-server and the sentinel running (beside two busy
        # loops), none in 25 with 2000 ms, the value Redis's own sentinel tests use.
        self.down_after_ms = down_after_ms
        self.primary = RedisProcess(root / "a", free_port())
        self.replica = RedisProcess(root / "b", free_port())
        # The sentinel fsyncs its config file at every step of a failover; one fsync
        # stalled behind other I/O on this shared machine for 3.5 s, the sentinel took
        # that for a clock jump and stopped acting for 30 s (TILT mode). On tmpfs an
        # fsync costs nothing.
        self._sentinel_dir = Path(tempfile.mkdtemp(
            prefix="itask-sentinel-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
        self.sentinel = RedisProcess(self._sentinel_dir, free_port())
        self.transport_options = {"master_name": MASTER_NAME}

    @property
    def url(self) -> str:
        return f"sentinel://127.0.0.1:{self.sentinel.port}"

    @property
    def processes(self) -> list[RedisProcess]:
        return [self.primary, self.replica, self.sentinel]

    def start(self) -> SentinelSetup:
        """Start all three; return once the replica is in sync and the sentinel knows it
        (the sentinel starts last: it finds replicas in the primary's INFO, which it
        asks for at once and then only every 10 s)."""
        self.primary.start()
        self.replica.args = ["--replicaof", "127.0.0.1", str(self.primary.port)]
        self.replica.start()
        wait_for(lambda: replica_online(self.primary, self.replica), 20, interval=0.05,
                 message="the replica to sync")
        self.sentinel.sentinel_config = (
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.primary.port} 1\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after_ms}\n"
            f"sentinel failover-timeout {MASTER_NAME} 4000\n"
            f"sentinel parallel-syncs {MASTER_NAME} 1\n")
        self.sentinel.start()
        wait_for(self._sentinel_sees_replica, 20, interval=0.05,
                 message="the sentinel to see the replica")
        return self

    def _sentinel_sees_replica(self) -> bool:
        replicas = self.sentinel.client().sentinel_slaves(MASTER_NAME)
        return any(r["port"] == self.replica.port and not r["is_sdown"] for r in replicas)

    def primary_port(self) -> int:
        """The port of the primary the sentinel names now to clients (``SENTINEL
        MASTERS``, which redis-py asks; ``GET-MASTER-ADDR-BY-NAME`` turns a little
        earlier, mid-failover)."""
        return int(self.sentinel.client().sentinel_master(MASTER_NAME)["port"])

    def crash_primary(self) -> None:
        """SIGKILL the primary; once the sentinel has promoted the replica, start the old
        primary again as the new one's replica (what its supervisor, following the
        sentinel, does), so writes that wait for a replica find one again."""
        self.primary.kill()
        wait_for(lambda: self.primary_port() == self.replica.port, 30, interval=0.05,
                 message="the sentinel to promote the replica")
        self.primary.args = ["--replicaof", "127.0.0.1", str(self.replica.port)]
        self.primary.start()
        wait_for(lambda: replica_online(self.replica, self.primary), 20, interval=0.05,
                 message="the old primary to sync as a replica")

    def hand_over(self) -> None:
        """``SENTINEL FAILOVER``: the replica is promoted while the primary stays up; the
        sentinel demotes the old primary only once it notices it still acts as one (~10 s
        here), and meanwhile it accepts writes on the connections it has."""
        import redis

        def failover_started() -> bool:
            try:
                return bool(self.sentinel.client().execute_command(
                    "SENTINEL", "FAILOVER", MASTER_NAME))
            except redis.ResponseError as exc:  # NOGOODSLAVE until it has fresh replica info
                if "NOGOODSLAVE" not in str(exc):
                    raise
                return False

        wait_for(failover_started, 20, interval=0.1, message="the sentinel to fail over")
        wait_for(lambda: self.primary_port() == self.replica.port, 30, interval=0.05,
                 message="the sentinel to promote the replica")

    def stop(self) -> None:
        for process in self.processes:
            process.kill()
        shutil.rmtree(self._sentinel_dir, ignore_errors=True)

    def logs(self) -> str:
        return "\n".join(f"--- {p.directory.name} (port {p.port}) ---\n{p.log_tail()}"
                         for p in self.processes)


def wait_gone(port: int, timeout: float = 5.0) -> None:
    """Wait until nothing accepts connections on ``port`` (a killed server's socket)."""
    def refused() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return False
        except OSError:
            return True

    wait_for(refused, timeout, message=f"port {port} to close")

