"""The embedded broker's on-disk store: queues, messages and bindings as files.

``embedded.py`` puts kombu's virtual transport on top of this (``embedded://`` URLs);
``embedded_files`` holds the file-level helpers. Every process using one directory shares
it through the file system alone: there is no server. POSIX only.

On-disk layout (directories 0700, files 0600)::

    <root>/
      .lock                         flock: declarations (shared) vs. queue deletion (exclusive)
      queues/<queue>/               one directory per queue (name percent-encoded)
        .meta                       {"queue": name, "expires": seconds or null}
        .active                     mtime: last declaration, or last poll by a consumer
        .tmp/<stem>~<pid>~<start>   a message being written
        .reserved/<msg>~<pid>~<start>
                                    delivered, not yet acknowledged, and by whom
        .consumers/<pid>~<start>    a process with a registered consumer
        .bad/                       files that did not decode, moved aside for a human
        <time_ns>-<pid>-<counter>[.rN].msg
                                    a ready message; N = times it was returned
      exchanges/<exchange>/
        .meta                       {"exchange": name, "type": "direct" | "fanout"}
        <queue>~<digest>.bind       one file per binding: {"queue", "routing_key", "pattern"}
      trash/                        queues and exchanges being deleted (renamed here, then removed)
      bells/<pid>~<start>~<n>       a FIFO that wakes one waiting connection (``embedded_bells``)

Guarantees:

* **No loss.** A publish writes ``.tmp/…`` and renames it into the queue directory, so a
  consumer sees a whole file or none. Messages survive the death of any process. They
  survive an OS crash or power cut only with ``fsync`` on (the ``fsync`` transport option,
  :func:`store_for`): a publish to a queue without ``expires`` (task queues, dead letters)
  then returns once the file and its name in the queue directory are on disk (and, the
  first time, the directories above), and an ack from such a queue once its removal is.
  Claims and returns to the queue are not forced: after a crash a message is either ready
  or reserved by a process that is gone, and is delivered either way. Queues with
  ``expires`` (inboxes, control queues) are never forced: they do not outlive their
  processes. Without ``fsync`` a power cut may lose the latest messages (their files
  missing or empty) and undo the latest acks.
* **Order.** Names sort in publish order: wall-clock nanoseconds forced strictly increasing
  within a process, then pid and counter. Consumers list, sort and take the first file they
  can claim, so one producer's messages reach a queue's consumers in publish order; between
  producers the order is their publish time.
* **One consumer per delivery, leases.** A claim renames the file into ``.reserved/`` under
  a name recording the owner's pid and start time (``/proc/<pid>/stat`` field 22, so a
  reused pid is not taken for the owner). Ack deletes it; reject with requeue, channel
  close and kombu's restore rename it back under its original name, so it keeps its
  position, with the return count bumped (``delivery_info`` gets ``redelivered`` and
  ``delivery_count``). Every process polling a queue sweeps its ``.reserved/`` each
  ``sweep_interval`` and returns the messages of dead or zombie owners. A live owner keeps
  its lease forever: on one machine "the owner is alive" is exact, while a time limit would
  redeliver the task of a slow or stopped (SIGSTOP) worker. So every process sharing a
  directory must see the same pid namespace.
* **Routing.** Direct and fanout exchanges (topic routes too, but is not advertised).
  Bindings are files, so a producer routes to queues bound by other processes. A process
  caches each table and revalidates it with one ``stat`` of the exchange directory per
  publish: its mtime moves on every bind and unbind; a read within 50 ms of a change (2 s on
  whole-second file systems) is not trusted, since mtimes are only as fine as the kernel
  tick; and every table is re-read at least once a second anyway.
* **Expiry.** A queue declared with ``expires`` (``x-expires``) is deleted with its messages
  and bindings once it has no live consumer (as on RabbitMQ, a registered consumer keeps
  it even when its process is not reading) and nobody has published to it, claimed from
  it, polled it or declared it for that long. Any process using the directory checks every
  ``housekeeping_interval``. A process that declared a queue and polls it re-creates it if
  it was deleted meanwhile. Queues without ``expires`` live until deleted.

The intervals and ``expires`` come from the caller (``embedded.Channel`` passes its transport
options). ``Store`` is one process's view of one directory (``store_for``), shared by all its
connections; it holds caches and what this process declared, never state other processes
need.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from interactive_tasks.transport.embedded_bells import Bell, Ringer, remove_dead_bells
from interactive_tasks.transport.embedded_files import (
    MSG,
    current_owner,
    dir_version,
    fsync_dir,
    idle_seconds,
    mkdirs,
    new_stem,
    owner_alive,
    parse_owner,
    producer_of,
    returned_name,
    safe_name,
    write_atomic,
    write_file,
)

__all__ = ["RELIST_INTERVAL", "Store", "store_for"]

# The store's messages keep the logger name they had when it was part of ``embedded``.
logger = logging.getLogger("interactive_tasks.transport.embedded")

#: Even an unchanged-looking directory is listed again this often (clock steps, odd file
#: systems whose directory mtimes do not move).
RELIST_INTERVAL = 1.0
#: Besides the queue directory itself, whose mtime moves on every publish and claim.
_ACTIVITY = (".active", ".reserved")


def _dumps(obj: dict[str, Any]) -> bytes:
    # What kombu.utils.json gives for these plain values, without depending on kombu.
    return json.dumps(obj).encode()


def _loads(data: bytes) -> Any:
    return json.loads(data.decode("utf-8"))


def _ready_names(qdir: str) -> list[str]:
    return sorted(n for n in os.listdir(qdir) if n.endswith(MSG) and n[0] != ".")


@dataclass
class _Table:
    key: tuple[int, int]
    trusted: bool
    read_at: float
    type: str | None
    bindings: list[tuple[str, str | None, str]]


class Store:
    """The files under one root, shared by every connection of this process to it."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.queues = os.path.join(root, "queues")
        self.exchanges = os.path.join(root, "exchanges")
        self.trash = os.path.join(root, "trash")
        self.bells = os.path.join(root, "bells")
        self._ringer = Ringer(self.bells)
        self.lockfile = os.path.join(root, ".lock")
        #: Bumped whenever this process returns a message to a queue: listings cached by
        #: channels may then miss a message at an earlier position.
        self.generation = 0
        self._ready = False
        self._tables: dict[str, _Table] = {}
        self._metas: dict[str, tuple[tuple[int, int], str, float | None]] = {}
        #: Per polled queue: when ``maintain`` is next due (monotonic).
        self.next_maintenance: dict[str, float] = {}
        self._paths: dict[str, str] = {}
        self._housekept = 0.0
        self._housekeeping = threading.Lock()
        # What this process declared, to re-create a queue expired while it was suspended.
        self._declared: dict[str, float | None] = {}
        self._declared_bindings: dict[str, set[tuple[str, str, str | None]]] = {}
        #: Consumers this process has registered per queue (one marker file per process).
        self._consuming: dict[str, int] = {}
        #: Force publishes and acks of queues without ``expires`` to disk (see the module doc).
        self.fsync = False
        #: Queue directories whose own entries this process has forced to disk.
        self._synced_dirs: set[str] = set()

    def ensure(self) -> None:
        """Create the top-level directories (once per process)."""
        if not self._ready:
            for path in (self.queues, self.exchanges, self.trash):
                mkdirs(path)
            self._ready = True

    @contextlib.contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        fd = os.open(self.lockfile, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def queue_path(self, queue: str) -> str:
        path = self._paths.get(queue)
        if path is None:
            path = self._paths[queue] = os.path.join(self.queues, safe_name(queue))
        return path

    def exchange_path(self, exchange: str) -> str:
        return os.path.join(self.exchanges, safe_name(exchange))

    # -- queues ---------------------------------------------------------------------------

    def _make_queue_dirs(self, qdir: str) -> None:
        self.ensure()
        for sub in (".tmp", ".reserved"):
            mkdirs(os.path.join(qdir, sub))

    def declare_queue(self, queue: str, expires: float | None) -> None:
        """Create ``queue`` or update its ``expires`` (seconds; None: never), and mark it used."""
        with self._locked(exclusive=False):
            self._create_queue(queue, expires, replace=True)
        self._declared[queue] = expires

    def _create_queue(self, queue: str, expires: float | None, replace: bool) -> None:
        qdir = self.queue_path(queue)
        self._make_queue_dirs(qdir)
        meta = _dumps({"queue": queue, "expires": expires})
        try:
            with open(os.path.join(qdir, ".meta"), "rb") as f:
                current: bytes | None = f.read()
        except FileNotFoundError:
            current = None
        if current is None or (replace and current != meta):
            write_atomic(qdir, ".meta", meta, tmpdir=os.path.join(qdir, ".tmp"))
        self._touch(qdir)

    @staticmethod
    def _touch(qdir: str) -> bool:
        try:
            os.utime(os.path.join(qdir, ".active"))
        except FileNotFoundError:
            try:
                os.close(os.open(os.path.join(qdir, ".active"), os.O_WRONLY | os.O_CREAT, 0o600))
            except FileNotFoundError:
                return False
        return True

    def has_queue(self, queue: str) -> bool:
        return os.path.isdir(self.queue_path(queue))

    def expires(self, queue: str) -> float | None:
        """The queue's ``expires`` in seconds (None: never)."""
        meta = self._meta(safe_name(queue))
        return meta[1] if meta is not None else None

    def _meta(self, safe: str) -> tuple[str, float | None] | None:
        """``(queue name, expires)`` from a queue's ``.meta``, cached until it is replaced."""
        path = os.path.join(self.queues, safe, ".meta")
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        key = (st.st_ino, st.st_mtime_ns)
        cached = self._metas.get(safe)
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        try:
            with open(path, "rb") as f:
                meta = _loads(f.read())
            queue, expires = meta["queue"], meta.get("expires")
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None
        self._metas[safe] = (key, queue, expires)
        return queue, expires

    def put(self, queue: str, data: bytes) -> None:
        """Append a message to ``queue``, creating the queue if needed.

        Raises ``OSError`` if it cannot be written; its temp file is then removed.
        """
        stem = new_stem()
        qdir = self.queue_path(queue)
        tmp = os.path.join(qdir, ".tmp", f"{stem}~{current_owner()}")
        try:
            try:
                self._publish(queue, tmp, stem + MSG, data)
            except FileNotFoundError:
                # A queue nobody declared is created by publishing to it, as on Redis; so is
                # one deleted between our write and our rename (its temp file went with it).
                self._create_queue(queue, None, replace=False)
                self._publish(queue, tmp, stem + MSG, data)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._ringer.ring(qdir)

    def bell(self) -> Bell | None:
        """A new doorbell for a connection that waits for messages; None (log line) when
        the file system cannot hold one: the connection then relies on polling alone."""
        try:
            return Bell(self.bells)
        except OSError as exc:
            logger.warning("embedded broker %s: no doorbell (%s); consumers poll only",
                           self.root, exc)
            return None

    def _publish(self, queue: str, tmp: str, name: str, data: bytes) -> None:
        durable = self.durable(queue)
        qdir = self.queue_path(queue)
        write_file(tmp, data, fsync=durable)
        os.rename(tmp, os.path.join(qdir, name))
        if durable:
            fsync_dir(qdir)
            if qdir not in self._synced_dirs:
                # the queue directory itself must survive too (created by whoever came
                # first): its entry in queues/, and queues/ in the root
                fsync_dir(self.queues)
                fsync_dir(self.root)
                self._synced_dirs.add(qdir)

    def durable(self, queue: str) -> bool:
        """Whether publishes and acks of ``queue`` are forced to disk (``fsync`` is on and
        the queue has no ``expires``)."""
        return self.fsync and self.expires(queue) is None

    def queue_version(self, queue: str) -> tuple[tuple[int, int], bool] | None:
        """``((inode, mtime_ns), trusted)`` of the queue's directory (``dir_version``).

        Its mtime moves whenever a message is renamed in or out.
        """
        return dir_version(self.queue_path(queue))

    def list_ready(self, qdir: str) -> list[str]:
        """Names of the ready messages in queue directory ``qdir``, in delivery order.

        ``readdir`` is not a snapshot: a file renamed in while the directory is being read
        can be missed while a later one is returned (ext4 walks its hash order), which
        would hand one producer's messages out of order. So unless the directory provably
        did not change during the read, read it again and add the late arrivals that sort
        before a listed message of the same producer: each was renamed in before that one,
        so before the second read began, and the second read returns it.

        Raises FileNotFoundError if ``qdir`` does not exist.
        """
        before = dir_version(qdir)
        names = _ready_names(qdir)
        if before is not None and before[1]:
            after = dir_version(qdir)
            if after is not None and after[0] == before[0]:
                return names
        newest: dict[str, str] = {}
        for name in names:
            producer = producer_of(name)
            if name > newest.get(producer, ""):
                newest[producer] = name
        listed = set(names)
        late = [
            name
            for name in _ready_names(qdir)
            if name not in listed and name < newest.get(producer_of(name), "")
        ]
        return sorted(names + late) if late else names

    def claim(self, queue: str, name: str) -> tuple[str, bytes] | None:
        """Reserve message ``name`` for this process: ``(reserved name, bytes)`` or None."""
        qdir = self.queue_path(queue)
        reserved = f"{name}~{current_owner()}"
        src = os.path.join(qdir, name)
        dst = os.path.join(qdir, ".reserved", reserved)
        try:
            os.rename(src, dst)
        except FileNotFoundError:
            if not os.path.exists(src):
                return None  # another consumer won, or the queue was deleted
            self._make_queue_dirs(qdir)
            try:
                os.rename(src, dst)
            except FileNotFoundError:
                return None
        try:
            with open(dst, "rb") as f:
                return reserved, f.read()
        except FileNotFoundError:
            return None

    def settle(self, queue: str, reserved: str) -> None:
        """Delete a reserved message for good (ack, reject without requeue); on disk
        before this returns when the queue is :meth:`durable`."""
        rdir = os.path.join(self.queue_path(queue), ".reserved")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(rdir, reserved))
            if self.durable(queue):
                fsync_dir(rdir)

    def unreserve(self, queue: str, reserved: str) -> None:
        """Return a reserved message to its original position in the queue."""
        parsed = parse_owner(reserved)
        if parsed is None:
            return
        qdir = self.queue_path(queue)
        with contextlib.suppress(FileNotFoundError):  # the queue was deleted meanwhile
            os.rename(
                os.path.join(qdir, ".reserved", reserved),
                os.path.join(qdir, returned_name(parsed[0])),
            )
        self.generation += 1
        self._ringer.ring(qdir)

    def set_aside(self, queue: str, reserved: str) -> None:
        """Move an undecodable message out of the way so it cannot block the queue."""
        qdir = self.queue_path(queue)
        mkdirs(os.path.join(qdir, ".bad"))
        with contextlib.suppress(FileNotFoundError):
            os.rename(
                os.path.join(qdir, ".reserved", reserved), os.path.join(qdir, ".bad", reserved)
            )

    def sweep(self, queue: str) -> int:
        """Return the reserved messages of dead owners to the queue; how many."""
        rdir = os.path.join(self.queue_path(queue), ".reserved")
        try:
            names = os.listdir(rdir)
        except FileNotFoundError:
            return 0
        me, alive, returned = current_owner(), {}, 0
        for reserved in names:
            parsed = parse_owner(reserved)
            if parsed is None or not parsed[0].endswith(MSG):
                continue
            owner = f"{parsed[1]}~{parsed[2]}"
            if owner == me:
                continue
            if owner not in alive:
                alive[owner] = owner_alive(parsed[1], parsed[2])
            if not alive[owner]:
                self.unreserve(queue, reserved)
                returned += 1
        if returned:
            logger.info("returned %d message(s) of dead consumers to %r", returned, queue)
        return returned

    def maintain(self, queue: str, interval: float) -> None:
        """Every ``interval`` per polled queue: sweep leases and mark the queue in use."""
        now = time.monotonic()
        if now < self.next_maintenance.get(queue, 0.0):
            return
        expires = self.expires(queue)
        if expires:
            interval = min(interval, expires / 4)
        self.next_maintenance[queue] = now + interval
        qdir = self.queue_path(queue)
        if not self._touch(qdir) and queue in self._declared:
            self._redeclare(queue)
        self.sweep(queue)

    def _redeclare(self, queue: str) -> None:
        logger.warning("queue %r expired while still consumed here; declaring it again", queue)
        self.declare_queue(queue, self._declared[queue])
        for exchange, routing_key, pattern in self._declared_bindings.get(queue, ()):
            self.bind(exchange, routing_key, pattern, queue)
        if self._consuming.get(queue):
            self._mark_consumer(queue)

    def add_consumer(self, queue: str) -> None:
        """Record that this process consumes ``queue``: while it lives, the queue is in use."""
        self._consuming[queue] = self._consuming.get(queue, 0) + 1
        if self._consuming[queue] == 1:
            self._mark_consumer(queue)

    def remove_consumer(self, queue: str) -> None:
        """Undo one ``add_consumer``; the last one removes this process's marker."""
        count = self._consuming.get(queue, 0) - 1
        if count > 0:
            self._consuming[queue] = count
            return
        self._consuming.pop(queue, None)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.queue_path(queue), ".consumers", current_owner()))

    def _mark_consumer(self, queue: str) -> None:
        cdir = os.path.join(self.queue_path(queue), ".consumers")
        with contextlib.suppress(FileNotFoundError):  # consuming a queue nobody declared
            with contextlib.suppress(FileExistsError):
                os.mkdir(cdir, 0o700)
            os.close(os.open(os.path.join(cdir, current_owner()), os.O_WRONLY | os.O_CREAT, 0o600))

    @staticmethod
    def _has_live_consumer(qdir: str) -> bool:
        cdir = os.path.join(qdir, ".consumers")
        try:
            names = os.listdir(cdir)
        except FileNotFoundError:
            return False
        for name in names:
            pid, _, start = name.partition("~")
            if pid.isdigit() and owner_alive(int(pid), start):
                return True
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(cdir, name))
        return False

    def size(self, queue: str) -> int:
        try:
            return sum(1 for n in os.listdir(self.queue_path(queue)) if n.endswith(MSG))
        except FileNotFoundError:
            return 0

    def purge(self, queue: str) -> int:
        qdir = self.queue_path(queue)
        try:
            names = self.list_ready(qdir)
        except FileNotFoundError:
            return 0
        count = 0
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(qdir, name))
                count += 1
        return count

    def delete_queue(self, queue: str, idle_for: float | None = None) -> bool:
        """Delete a queue, its messages and its bindings (only if idle that long, if given)."""
        qdir = self.queue_path(queue)
        with self._locked(exclusive=True):
            if idle_for is not None and (
                idle_seconds([qdir, *(os.path.join(qdir, n) for n in _ACTIVITY)]) < idle_for
                or self._has_live_consumer(qdir)
            ):
                return False
            self._unbind_all(queue)
            trash = os.path.join(self.trash, f"{safe_name(queue)}~{uuid.uuid4().hex}")
            try:
                os.rename(qdir, trash)
            except FileNotFoundError:
                return False
        shutil.rmtree(trash, ignore_errors=True)
        self._metas.pop(safe_name(queue), None)
        self.next_maintenance.pop(queue, None)
        return True

    def forget(self, queue: str) -> None:
        """Stop re-creating ``queue`` and its bindings if it expires (it is being deleted)."""
        self._declared.pop(queue, None)
        self._declared_bindings.pop(queue, None)

    # -- exchanges and bindings -----------------------------------------------------------

    def declare_exchange(self, exchange: str, type: str) -> None:
        exdir = self.exchange_path(exchange)
        if self.exchange_type(exchange) == type:
            return
        self.ensure()
        mkdirs(exdir)
        write_atomic(exdir, ".meta", _dumps({"exchange": exchange, "type": type}))
        self._tables.pop(exchange, None)

    def exchange_type(self, exchange: str) -> str | None:
        table = self._table(exchange)
        return table.type if table is not None else None

    def delete_exchange(self, exchange: str) -> None:
        exdir = self.exchange_path(exchange)
        trash = os.path.join(self.trash, f"{safe_name(exchange)}~{uuid.uuid4().hex}")
        with contextlib.suppress(FileNotFoundError):
            os.rename(exdir, trash)
            shutil.rmtree(trash, ignore_errors=True)
        self._tables.pop(exchange, None)

    @staticmethod
    def _binding_name(routing_key: str, pattern: str | None, queue: str) -> str:
        digest = hashlib.sha1(json.dumps([routing_key, pattern]).encode()).hexdigest()[:20]
        return f"{safe_name(queue)}~{digest}.bind"

    def bind(self, exchange: str, routing_key: str, pattern: str | None, queue: str) -> None:
        """Add a binding file (idempotent); remembered to re-create it after an expiry."""
        exdir = self.exchange_path(exchange)
        name = self._binding_name(routing_key, pattern, queue)
        self._declared_bindings.setdefault(queue, set()).add((exchange, routing_key, pattern))
        if os.path.exists(os.path.join(exdir, name)):
            return
        data = _dumps({"queue": queue, "routing_key": routing_key, "pattern": pattern})
        with self._locked(exclusive=False):
            self.ensure()
            mkdirs(exdir)
            write_atomic(exdir, name, data)
        self._tables.pop(exchange, None)

    def unbind(self, exchange: str, routing_key: str, pattern: str | None, queue: str) -> None:
        self._declared_bindings.get(queue, set()).discard((exchange, routing_key, pattern))
        name = self._binding_name(routing_key, pattern, queue)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.exchange_path(exchange), name))
        self._tables.pop(exchange, None)

    def _unbind_all(self, queue: str) -> None:
        prefix = safe_name(queue) + "~"
        for exdir in self._exchange_dirs():
            with contextlib.suppress(FileNotFoundError):
                for name in os.listdir(exdir):
                    if name.startswith(prefix) and name.endswith(".bind"):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(os.path.join(exdir, name))
        self._tables.clear()

    def _exchange_dirs(self) -> list[str]:
        try:
            return [os.path.join(self.exchanges, n) for n in os.listdir(self.exchanges)]
        except FileNotFoundError:
            return []

    def table(self, exchange: str) -> list[tuple[str, str | None, str]]:
        """Bindings of ``exchange`` as kombu's ``(routing_key, pattern, queue)`` tuples."""
        table = self._table(exchange)
        return table.bindings if table is not None else []

    def _table(self, exchange: str) -> _Table | None:
        exdir = self.exchange_path(exchange)
        version = dir_version(exdir)
        if version is None:
            self._tables.pop(exchange, None)
            return None
        key, trusted = version
        now = time.monotonic()
        cached = self._tables.get(exchange)
        if (
            cached is not None
            and cached.trusted
            and cached.key == key
            and now - cached.read_at < RELIST_INTERVAL
        ):
            return cached
        type_, bindings = None, []
        try:
            names = os.listdir(exdir)
        except FileNotFoundError:
            return None
        for name in names:
            if name != ".meta" and not name.endswith(".bind"):
                continue
            try:
                with open(os.path.join(exdir, name), "rb") as f:
                    entry = _loads(f.read())
            except (FileNotFoundError, ValueError):
                continue
            if name == ".meta":
                type_ = entry.get("type")
            else:
                bindings.append((entry["routing_key"], entry["pattern"], entry["queue"]))
        table = _Table(key, trusted, now, type_, bindings)
        self._tables[exchange] = table
        return table

    def all_bindings(self) -> Iterator[tuple[str, str, str]]:
        """``(queue, exchange, routing_key)`` for every binding on disk."""
        for exdir in self._exchange_dirs():
            try:
                with open(os.path.join(exdir, ".meta"), "rb") as f:
                    exchange = _loads(f.read())["exchange"]
            except (FileNotFoundError, ValueError, KeyError):
                continue
            for routing_key, _, queue in self.table(exchange):
                yield queue, exchange, routing_key

    # -- housekeeping -------------------------------------------------------------------

    def maybe_housekeep(self, interval: float) -> None:
        """``housekeep`` if ``interval`` seconds passed since the last time (one thread only)."""
        now = time.monotonic()
        if now < self._housekept or not self._housekeeping.acquire(blocking=False):
            return
        try:
            self._housekept = now + interval
            self.housekeep()
        finally:
            self._housekeeping.release()

    def housekeep(self) -> None:
        """Expire idle queues, return dead owners' messages, remove dead writers' temp files."""
        try:
            names = os.listdir(self.queues)
        except FileNotFoundError:
            return
        me = current_owner()
        for safe in names:
            qdir = os.path.join(self.queues, safe)
            meta = self._meta(safe)
            if meta is None:
                continue  # being created, or not ours
            queue, expires = meta
            if (
                expires is not None
                and idle_seconds([qdir, *(os.path.join(qdir, n) for n in _ACTIVITY)]) >= expires
                and self.delete_queue(queue, idle_for=expires)
            ):
                logger.info("deleted queue %r: unused for %s s", queue, expires)
                continue
            self.sweep(queue)
            self._remove_dead_temps(os.path.join(qdir, ".tmp"), me)
        for exdir in self._exchange_dirs():
            self._remove_dead_temps(exdir, me)
        remove_dead_bells(self.bells)
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.trash):  # left by a deleter that died
                shutil.rmtree(os.path.join(self.trash, name), ignore_errors=True)

    @staticmethod
    def _remove_dead_temps(directory: str, me: str) -> None:
        try:
            names = os.listdir(directory)
        except (FileNotFoundError, NotADirectoryError):
            return
        for name in names:
            if name.startswith(".tmp~"):
                # ``.tmp~<pid>~<start>~<stem>`` from write_atomic
                parts = name.split("~")
                if len(parts) != 4 or not parts[1].isdigit():
                    continue
                pid, start = int(parts[1]), parts[2]
            else:
                parsed = parse_owner(name)
                if parsed is None or name.endswith((".bind", MSG)):
                    continue
                _, pid, start = parsed
            if f"{pid}~{start}" != me and not owner_alive(pid, start):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, name))


_stores: dict[str, Store] = {}
_stores_lock = threading.Lock()


def _after_fork_in_child() -> None:
    # Another thread of the parent may have held these at fork time; the child has only
    # the forking thread, so nobody would ever release them.
    global _stores_lock
    _stores_lock = threading.Lock()
    for store in _stores.values():
        store._housekeeping = threading.Lock()
        store._ringer.after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def store_for(root: str, fsync: bool = False) -> Store:
    """The one ``Store`` of this process for directory ``root``; ``fsync`` turns forcing
    to disk on for it (for every connection of this process to ``root``: once on, it
    stays on)."""
    root = os.path.abspath(root)
    with _stores_lock:
        store = _stores.get(root)
        if store is None:
            store = _stores[root] = Store(root)
        store.fsync = store.fsync or bool(fsync)
        return store
