"""Doorbells of the embedded broker: FIFOs that wake a consumer when a message arrives.

Layout, beside ``queues/`` in the broker's directory::

    <root>/bells/<pid>~<start>~<n>    a FIFO read by one waiting connection of a process

A connection that waits for messages (the worker's event loop, a client's inbox in
``drain_events``) opens a :class:`Bell`. A publisher, once the rename that makes a message
visible is done, writes one byte to every bell of every process with a consumer marker in
the queue's ``.consumers/`` (:class:`Ringer`). The woken connection empties its FIFO first
and then looks at its queues, so a ring that arrives meanwhile wakes it again.

A ring is only a hint and may be lost: the publisher is of a version without bells, its
cached listing of bells or consumers is a moment old, the FIFO is full (a wake-up is pending
anyway), the file system cannot hold a FIFO. Consumers keep polling every
``polling_interval``, so a lost ring costs at most one polling period, never a message.
Nothing here reads or moves a message.

FIFOs need no path length limit (unlike Unix sockets) and work on every POSIX system; the
reader opens its FIFO read-write, which Linux and the BSDs allow, so it never sees an
end-of-file when a publisher closes its end.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import select
import sys
import threading
import time
from typing import Any

from interactive_tasks.transport.embedded_files import (
    current_owner,
    dir_version,
    mkdirs,
    owner_alive,
)

__all__ = ["Bell", "Ringer", "remove_dead_bells"]

logger = logging.getLogger("interactive_tasks.transport.embedded")

#: A cached listing (of bells, of a queue's consumers) is read again at least this often,
#: even when its directory looks unchanged.
_RELIST = 1.0
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_numbers = itertools.count(1)


def _raw_os() -> Any:
    """``os`` with its own ``read`` and ``write``. eventlet's patched ones wait for the
    descriptor when it would block (EAGAIN): a worker's drain of an empty bell, or a ring
    into a full one, would wait for the next ring or for a reader instead of returning
    (an eventlet worker on the embedded broker never took a task)."""
    patcher = sys.modules.get("eventlet.patcher")
    if patcher is not None and patcher.is_monkey_patched("os"):
        return patcher.original("os")
    return os


def _owner_of(name: str) -> str | None:
    """``<pid>~<start>`` of a bell named ``<pid>~<start>~<n>``."""
    parts = name.split("~")
    if len(parts) != 3 or not parts[0].isdigit():
        return None
    return f"{parts[0]}~{parts[1]}"


class Bell:
    """The read end of one connection's doorbell.

    Raises OSError when the FIFO cannot be made or opened (the caller then only polls).
    """

    def __init__(self, directory: str) -> None:
        mkdirs(directory)
        self.path = os.path.join(directory, f"{current_owner()}~{next(_numbers)}")
        self._pid = os.getpid()
        os.mkfifo(self.path, 0o600)
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | _CLOEXEC)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            raise

    def fileno(self) -> int:
        return self.fd

    def clear(self) -> None:
        """Consume every pending ring."""
        read = _raw_os().read
        with contextlib.suppress(OSError):  # empty (EAGAIN), or closed meanwhile
            while read(self.fd, 4096):
                pass

    def ring(self) -> None:
        """Ring this bell from its own process."""
        with contextlib.suppress(OSError):  # full: a wake-up is pending already
            _raw_os().write(self.fd, b"\0")

    def wait(self, timeout: float) -> None:
        """Return after a ring or ``timeout`` seconds, whichever comes first."""
        try:
            select.select([self.fd], [], [], max(timeout, 0.0))
        except (OSError, ValueError):  # closed by another thread: fall back to sleeping
            time.sleep(max(timeout, 0.0))
            return
        self.clear()

    def close(self) -> None:
        """Close the FIFO; remove it unless this is a forked copy of another process's."""
        with contextlib.suppress(OSError):
            os.close(self.fd)
        if os.getpid() == self._pid:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


class _Listing:
    __slots__ = ("key", "listed_at", "names", "trusted")

    def __init__(self, key: tuple[int, int] | None, trusted: bool, listed_at: float,
                 names: list[str]) -> None:
        self.key = key
        self.trusted = trusted
        self.listed_at = listed_at
        self.names = names


class Ringer:
    """The publishing side: rings the bells of a queue's consumers (thread-safe)."""

    def __init__(self, bells: str) -> None:
        self.bells = bells
        self._lock = threading.Lock()
        #: Write ends of bells, by name (kept open: one write per ring).
        self._fds: dict[str, int] = {}
        self._bell_cache: dict[str, _Listing] = {}
        self._indexed: _Listing | None = None
        self._bells_by_owner: dict[str, list[str]] = {}
        self._consumers: dict[str, _Listing] = {}

    def after_fork(self) -> None:
        self._lock = threading.Lock()

    def ring(self, qdir: str) -> None:
        """Wake every process consuming the queue in ``qdir``; never raises."""
        try:
            with self._lock:
                owners = self._list(os.path.join(qdir, ".consumers"), self._consumers)
                if not owners:
                    return
                by_owner = self._current_bells()
                for owner in owners:
                    for name in by_owner.get(owner, ()):
                        self._ring_one(name)
        except OSError as exc:  # a hint only: the consumer's poll delivers anyway
            logger.debug("could not ring the consumers of %s: %s", qdir, exc)

    def _list(self, path: str, cache: dict[str, _Listing]) -> list[str]:
        now = time.monotonic()
        listing = cache.get(path)
        version = dir_version(path)
        if version is None:
            cache.pop(path, None)
            return []
        key, trusted = version
        if (listing is None or not listing.trusted or listing.key != key
                or now - listing.listed_at > _RELIST):
            try:
                names = os.listdir(path)
            except FileNotFoundError:
                names = []
            listing = cache[path] = _Listing(key, trusted, now, names)
        return listing.names

    def _current_bells(self) -> dict[str, list[str]]:
        names = self._list(self.bells, self._bell_cache)
        listing = self._bell_cache.get(self.bells)
        if listing is not self._indexed:
            self._indexed = listing
            by_owner: dict[str, list[str]] = {}
            for name in names:
                owner = _owner_of(name)
                if owner is not None:
                    by_owner.setdefault(owner, []).append(name)
            self._bells_by_owner = by_owner
            for gone in set(self._fds) - set(names):
                with contextlib.suppress(OSError):
                    os.close(self._fds.pop(gone))
        return self._bells_by_owner

    def _ring_one(self, name: str) -> None:
        fd = self._fds.get(name)
        if fd is None:
            try:
                fd = os.open(os.path.join(self.bells, name),
                             os.O_WRONLY | os.O_NONBLOCK | _CLOEXEC)
            except OSError:  # ENXIO: nobody reads it (its process died); ENOENT: removed
                return
            self._fds[name] = fd
        try:
            _raw_os().write(fd, b"\0")
        except BlockingIOError:
            pass  # full: a wake-up is pending already
        except OSError as exc:
            # EPIPE: its reader is gone. Forget the descriptor; a new bell has a new name.
            self._fds.pop(name, None)
            with contextlib.suppress(OSError):
                os.close(fd)
            if exc.errno not in (errno.EPIPE, errno.EBADF):
                raise


def remove_dead_bells(directory: str) -> None:
    """Remove the bells of processes that are gone (housekeeping)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    for name in names:
        owner = _owner_of(name)
        if owner is None:
            continue
        pid, _, start = owner.partition("~")
        if not owner_alive(int(pid), start):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, name))
