"""The prefork pool: one billiard process per slot, each with its own socketpair.

Not ``billiard.Pool``: its shared in/out queues cannot address one child, and a child
stopped while holding the shared queue lock froze its siblings (docs/architecture.md,
'Pools'). With a channel per child the worker knows exactly which pid runs which task, so
signals go to the right process only.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import time

import billiard

# A billiard child imports billiard.util (with billiard.compat, subprocess, resource and
# cffi when installed) first thing after the fork (``BaseProcess._bootstrap``). Imported
# here, in the worker before it forks, those modules are shared copy-on-write by every
# child instead of being built again in each (some 2 MB of each child's own memory).
import billiard.util

from interactive_tasks import signals
from interactive_tasks.app import App

from ..child import Slot
from ..ipc import BlockingChannel
from .base import Pool, PoolSlot, stop_process, use_switch_interval

logger = logging.getLogger("interactive_tasks.worker.prefork")

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this child when the worker dies (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:  # not Linux: the closed channel ends the child instead
        pass


def _child_main(app: App, sock: socket.socket, parent_sock_fd: int, hostname: str) -> None:
    # The worker's handlers must not run here: SIGTERM ends the child (the forced step
    # of a cancel), Ctrl-C in a terminal is the worker's to handle.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    _die_with_parent()
    try:
        os.close(parent_sock_fd)
    except OSError:
        pass
    use_switch_interval(app)
    signals.worker_process_init.send(sender=None)
    Slot(app, BlockingChannel(sock), hostname, nice=app.conf.worker_task_nice).serve()
    signals.worker_process_shutdown.send(sender=None, pid=os.getpid(), exitcode=0)
    os._exit(0)


class PreforkPool(Pool):
    name = "prefork"
    supports_hard_pause = True
    separate_processes = True

    def spawn(self, index: int) -> PoolSlot:
        parent, child = self._socketpair()
        process = billiard.Process(
            target=_child_main,
            args=(self.app, child, parent.fileno(), self.hostname),
            name=f"itask-pool-{index}",
            daemon=True,
        )
        process.start()
        child.close()
        return PoolSlot(index=index, pid=process.pid, sock=parent, handle=process)

    def _signal(self, slot: PoolSlot, sig: int) -> bool:
        if slot.closed or slot.pid is None:
            return False
        try:
            os.kill(slot.pid, sig)
            return True
        except ProcessLookupError:
            return False

    def force_stop(self, slot: PoolSlot, stage: int) -> str:
        if slot.hard_paused:
            # A stopped process does not act on SIGTERM until continued.
            self._signal(slot, signal.SIGCONT)
        sig = signal.SIGTERM if stage == 1 else signal.SIGKILL
        sent = self._signal(slot, sig)
        return f"{signal.Signals(sig).name} to pid {slot.pid}" + ("" if sent else " (gone)")

    def hard_pause(self, slot: PoolSlot) -> None:
        if not slot.closed and slot.pid is not None:
            stop_process(slot.pid)
        slot.hard_paused = True
        slot.hard_paused_at = time.monotonic()

    def hard_resume(self, slot: PoolSlot) -> None:
        self._signal(slot, signal.SIGCONT)
        slot.hard_paused = False

    def reap(self, slot: PoolSlot) -> str:
        process = slot.handle
        try:
            process.join(1.0)
        except Exception:
            pass
        code = process.exitcode
        if code is None:
            self._signal(slot, signal.SIGKILL)
            process.join(1.0)
            code = process.exitcode
        if code is not None and code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited with code {code}"

    def stop(self, slots: list[PoolSlot], timeout: float) -> None:
        super().stop(slots, timeout)
        deadline = time.monotonic() + timeout
        for slot in slots:
            process = slot.handle
            remaining = max(0.0, deadline - time.monotonic())
            if slot.hard_paused:
                self._signal(slot, signal.SIGCONT)
            process.join(remaining)
            if process.exitcode is None:
                self._signal(slot, signal.SIGKILL)
                process.join(1.0)

    def terminate(self, slots: list[PoolSlot]) -> None:
        for slot in slots:
            self._signal(slot, signal.SIGCONT)
            self._signal(slot, signal.SIGKILL)
        for slot in slots:
            slot.handle.join(1.0)
