"""The execution pool contract.

A pool owns *slots*. Every slot, whatever the pool, runs :class:`..child.Slot` and talks
to the worker in the frames of :mod:`..ipc`: over its own socketpair in a billiard child
process (prefork) or a thread of the worker (threads, solo); through the pool's one
in-process inbox in a green thread of the worker (gevent, eventlet:
:mod:`.green_channel`). The worker loop handles every frame the same way; pools differ
only in how a slot is started, forced to stop, frozen and replaced, and in that channel.
"""

from __future__ import annotations

import abc
import ctypes
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from interactive_tasks.app import App

from ..ipc import FrameReader, FrameWriter
from .green_channel import SlotInbox


def use_switch_interval(app: App) -> None:
    """Apply ``worker_switch_interval`` to this process, where tasks run (see Settings)."""
    interval = app.conf.worker_switch_interval
    if interval is not None:
        sys.setswitchinterval(interval)


class SlotWriter(Protocol):
    """How the worker writes frames to a slot: :class:`..ipc.FrameWriter` on a socket,
    :class:`.green_channel.GreenChannel` to a green slot."""

    @property
    def pending(self) -> int: ...

    def write(self, obj: Any) -> bool: ...

    def flush(self) -> bool: ...


@dataclass(eq=False)
class PoolSlot:
    """The worker's side of one slot: its socket, or (a green slot) None and the
    ``writer`` its frames to the slot go through."""

    index: int
    pid: int
    sock: socket.socket | None
    handle: Any = None  # the billiard Process, the Thread or the green thread
    reader: FrameReader = field(default_factory=FrameReader)
    writer: SlotWriter = None  # type: ignore[assignment]  # a socket's: __post_init__
    ready: bool = False
    task_id: str | None = None
    tasks_run: int = 0
    retiring: bool = False
    hard_paused: bool = False
    hard_paused_at: float = 0.0
    #: wall time a hard pause was announced at: progress the slot made before it (held
    #: back in the slot, ``BlockingChannel.send_progress``) and read only after is stale
    stale_progress_before: float = 0.0
    closed: bool = False
    spawned: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.sock is not None:
            self.sock.setblocking(False)
            if self.writer is None:
                self.writer = FrameWriter(self.sock)

    @property
    def busy(self) -> bool:
        return self.task_id is not None


class Pool(abc.ABC):
    """Starts, stops and forces slots. Implementations: prefork, threads, solo."""

    name: str = "base"
    #: whether SIGSTOP/SIGCONT of one slot is possible without freezing others
    supports_hard_pause = False
    #: whether slots are separate processes (a dead slot can be replaced)
    separate_processes = False
    #: where slots without a socket (``PoolSlot.sock`` None) leave their frames
    inbox: SlotInbox | None = None

    def __init__(self, app: App, concurrency: int, hostname: str,
                 max_tasks_per_child: int | None = None) -> None:
        self.app = app
        self.concurrency = concurrency
        self.hostname = hostname
        self.max_tasks_per_child = max_tasks_per_child

    @abc.abstractmethod
    def spawn(self, index: int) -> PoolSlot:
        """Start slot ``index`` and return the worker's end of its channel."""

    @abc.abstractmethod
    def force_stop(self, slot: PoolSlot, stage: int) -> str:
        """Force the slot's task to end. ``stage`` 1 is gentle, 2 is final.

        Returns a description of what was done, for the log.
        """

    def hard_pause(self, slot: PoolSlot) -> None:
        """Freeze the slot at once. Raises HardPauseUnsupported where impossible."""
        from interactive_tasks.errors import HardPauseUnsupported

        raise HardPauseUnsupported(
            f"hard pause needs the prefork pool (this worker runs --pool {self.name}); "
            "use a soft pause, which takes effect at the task's next checkpoint"
        )

    def hard_resume(self, slot: PoolSlot) -> None:
        return None

    def reap(self, slot: PoolSlot) -> str:
        """Collect a slot whose channel closed; returns how it ended."""
        return "closed"

    def stop(self, slots: list[PoolSlot], timeout: float) -> None:
        """Ask every slot to stop after its current job and wait up to ``timeout``."""
        for slot in slots:
            try:
                slot.writer.write(["stop"])
            except Exception:
                pass

    def terminate(self, slots: list[PoolSlot]) -> None:
        """Stop every slot now."""
        self.stop(slots, 0)

    def _socketpair(self) -> tuple[socket.socket, socket.socket]:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for s in (parent, child):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        os.set_inheritable(child.fileno(), True)
        return parent, child


def process_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` from /proc (``T`` = stopped), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    return data.rsplit(b")", 1)[1].split()[0].decode()


def stop_process(pid: int, timeout: float = 1.0) -> None:
    """SIGSTOP ``pid`` and return once /proc shows it stopped (``kill()`` returns before
    the process has stopped; what it writes meanwhile must not pass for written after the
    stop), after ``timeout`` seconds, or when it is gone."""
    try:
        os.kill(pid, signal.SIGSTOP)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process_state(pid) in ("T", "t", None):
            return
        time.sleep(0.0005)


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``), so that
    processes forked next do not start with them: start-up (imports, configuration) leaves
    free blocks the allocator would otherwise keep. Elsewhere than glibc, nothing."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resident_kb(pid: int) -> int | None:
    """The resident memory of ``pid`` in KB (``VmRSS`` from /proc), None if unknown."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None
