"""File-level building blocks of the embedded broker's store (``embedded_store``).

Queue and exchange names made safe for the file system; message names that sort in publish
order and count how often a message was returned; the identity of a process
(``<pid>~<start time>``, so a reused pid is not taken for a dead owner); files written whole
or not at all, and forced to disk with their directory entry when asked (``fsync``); and
when a directory's mtime can be trusted to show a change. Nothing here knows the store's
directory layout, or kombu.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time

__all__ = [
    "MSG",
    "current_owner",
    "delivery_count",
    "dir_version",
    "fsync_dir",
    "idle_seconds",
    "mkdirs",
    "mtime_trusted",
    "new_stem",
    "owner_alive",
    "parse_owner",
    "process_start_time",
    "producer_of",
    "returned_name",
    "safe_name",
    "write_atomic",
    "write_file",
]

#: A directory mtime closer than this to "now" may not yet reflect a change made in the
#: same kernel tick, so a listing or table read that recent is not trusted as unchanged.
_RACY_NS = 50_000_000
#: The same for file systems that store whole seconds (their mtimes end in zeros).
_RACY_COARSE_NS = 2_000_000_000
#: The suffix of a ready (or reserved) message file.
MSG = ".msg"
_O_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
_SAFE_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def safe_name(name: str) -> str:
    """A file name for a queue or exchange name: reversible, never hidden, never ``..``.

    Bytes outside ``[A-Za-z0-9._-]`` and a leading dot are percent-encoded; a long name is
    cut and suffixed with ``+`` and a digest (``+`` and ``~`` never occur otherwise).
    """
    if not name:
        return "%"
    raw = name.encode("utf-8")
    out = "".join(
        chr(b) if b in _SAFE_BYTES and not (i == 0 and b == 0x2E) else f"%{b:02X}"
        for i, b in enumerate(raw)
    )
    if len(out) > 180:
        out = out[:140] + "+" + hashlib.sha256(raw).hexdigest()[:40]
    return out


# -- process identity -------------------------------------------------------------------

_HAVE_PROC = os.path.exists("/proc/self/stat")


def _proc_stat(pid: int) -> tuple[bytes, bytes] | None:
    """(state, start time) of ``pid`` from ``/proc``, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may hold spaces and parentheses: fields 3.. follow the last ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    return fields[0], fields[19]


def process_start_time(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (None: no such process or a zombie).

    Without ``/proc`` (macOS, BSD) it is ``"0"`` for any live process: pid reuse then goes
    undetected.
    """
    if not _HAVE_PROC:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "0"
    stat = _proc_stat(pid)
    if stat is None or stat[0] in (b"Z", b"X"):  # a zombie can no longer ack
        return None
    return stat[1].decode()


def owner_alive(pid: int, start: str) -> bool:
    """True if process ``pid`` is alive and is the one that started at ``start``."""
    return process_start_time(pid) == start


_owner_cache: tuple[int, str] = (-1, "")


def current_owner() -> str:
    """``<pid>~<start>`` of this process; recomputed after a fork."""
    global _owner_cache
    pid = os.getpid()
    if _owner_cache[0] != pid:
        _owner_cache = (pid, f"{pid}~{process_start_time(pid)}")
    return _owner_cache[1]


def parse_owner(name: str) -> tuple[str, int, str] | None:
    """``(base, pid, start)`` from ``<base>~<pid>~<start>``."""
    parts = name.rsplit("~", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1]), parts[2]


# -- message names ----------------------------------------------------------------------


class _Clock:
    """Message stems that sort in publish order within a process (threads included)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = 0
        self._counter = 0

    def stem(self) -> str:
        with self._lock:
            # A wall clock stepped back must not reorder this process's messages.
            self._last = max(self._last + 1, time.time_ns())
            self._counter += 1
            return f"{self._last:020d}-{os.getpid():08d}-{self._counter:012d}"


_clock = _Clock()


def new_stem() -> str:
    """A message stem, ``<time_ns>-<pid>-<counter>``, after every one this process made."""
    return _clock.stem()


def producer_of(name: str) -> str:
    """The pid part of message ``name``: messages with the same one sort in publish order."""
    return name[21:29]


def returned_name(name: str) -> str:
    """The name a message returns to its queue under: same position, return count + 1."""
    base, sep, count = name[: -len(MSG)].partition(".r")
    return f"{base}.r{int(count) + 1 if sep else 1}{MSG}"


def delivery_count(name: str) -> int:
    """The delivery count of message ``name`` if delivered now: 1 + times it was returned."""
    _, sep, count = name[: -len(MSG)].partition(".r")
    return int(count) + 1 if sep else 1


# -- files ------------------------------------------------------------------------------


def mkdirs(path: str) -> None:
    """Create ``path`` and missing parents with mode 0700."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent and parent != path:
        mkdirs(parent)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)


def write_file(path: str, data: bytes, fsync: bool = False) -> None:
    """Create ``path`` (mode 0600; it must not exist) holding ``data``; with ``fsync``, on
    disk before this returns (its directory entry is the caller's: :func:`fsync_dir`)."""
    fd = os.open(path, _O_CREATE, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Force ``path``'s entries (files created, renamed in or out, removed) to disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(directory: str, name: str, data: bytes, tmpdir: str | None = None,
                 fsync: bool = False) -> None:
    """Replace ``directory/name`` atomically; the temp file is a dotfile readers skip.
    With ``fsync`` the file and its new name are on disk before this returns."""
    tmp = os.path.join(tmpdir or directory, f".tmp~{current_owner()}~{_clock.stem()}")
    write_file(tmp, data, fsync)
    os.replace(tmp, os.path.join(directory, name))
    if fsync:
        fsync_dir(directory)


def mtime_trusted(before_stat_ns: int, mtime_ns: int) -> bool:
    """Would any change after a stat taken at ``before_stat_ns`` move ``mtime_ns``?"""
    racy = _RACY_COARSE_NS if mtime_ns % 1_000_000_000 == 0 else _RACY_NS
    return before_stat_ns - mtime_ns >= racy


def idle_seconds(paths: list[str]) -> float:
    """Seconds since the latest mtime among ``paths`` (missing ones are skipped)."""
    latest = 0.0
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            latest = max(latest, os.stat(path).st_mtime)
    return time.time() - latest


def dir_version(path: str) -> tuple[tuple[int, int], bool] | None:
    """``((inode, mtime_ns), trusted)`` of directory ``path``; None if it does not exist.

    ``trusted``: any later change to the directory will move the mtime (``mtime_trusted``).
    """
    before_stat = time.time_ns()
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns), mtime_trusted(before_stat, st.st_mtime_ns)


def _after_fork_in_child() -> None:
    # Another thread of the parent may have held the lock at fork time; the child has only
    # the forking thread, so nobody would ever release it.
    _clock._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
