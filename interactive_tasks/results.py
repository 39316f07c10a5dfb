"""Result stores: where a finished task's final state lives so any process can read it.

The contract is :class:`ResultStore`; :class:`RedisResultStore` (used when the broker is
Redis, or for a ``redis://`` or ``sentinel://`` ``result_backend``),
:class:`FileResultStore` (the embedded default), :class:`MemoryResultStore` (the in-memory
broker's, for tests) and :class:`NullResultStore` (AMQP without a ``result_backend``:
results reach the starting client through its inbox only) implement it.

A record is the final :class:`~interactive_tasks.protocol.TaskSnapshot` in wire form.

No key per task: Redis records go into one hash per hour (``<ns>.results.<hour>``) whose
key expires ``result_expires`` after its hour ends, so the number of keys stays fixed
however many tasks run (docs/architecture.md, 'Queues and exchanges').
"""

from __future__ import annotations

import abc
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import codec
from .errors import ConfigurationError, TransportError

#: Records are bucketed by this many seconds.
BUCKET_SECONDS = 3600


class ResultStore(abc.ABC):
    """Stores and fetches final task records, each kept for ``expires`` seconds."""

    def __init__(self, namespace: str, expires: float) -> None:
        self.namespace = namespace
        self.expires = expires

    @abc.abstractmethod
    def put(self, task_id: str, record: dict[str, Any]) -> None:
        """Store ``record``; raises :class:`TransportError` when the store is unreachable."""

    def put_many(self, records: list[tuple[str, dict[str, Any]]]) -> None:
        for task_id, record in records:
            self.put(task_id, record)

    @abc.abstractmethod
    def get(self, task_id: str) -> dict[str, Any] | None:
        """The record for ``task_id`` or ``None``; raises :class:`TransportError`."""

    def forget(self, task_id: str) -> None:  # noqa: B027 - nothing kept: nothing to drop
        """Drop ``task_id``'s record (Celery's ``res.forget()``); raises
        :class:`TransportError` when the store is unreachable."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    def add_revoked(self, entries: dict[str, list[Any]]) -> None:  # noqa: B027
        """Remember revoked task ids: ``{id: [expires_epoch, token | None, signed]}``."""

    def revoked(self) -> dict[str, list[Any]]:
        """Revoked ids that have not expired (so a restarted worker still refuses them)."""
        return {}

    def chord_incr(self, chord_id: str) -> int:
        """Atomically count one finished member of a chord; returns the new count."""
        raise NotImplementedError(f"{type(self).__name__} cannot count chord members")

    def chord_forget(self, chord_id: str) -> None:  # noqa: B027 - optional hook
        """Drop a finished chord's counter."""

    @property
    def durable(self) -> bool:
        """Whether records can be read by a process other than the starter."""
        return True

    def _buckets(self, now: float) -> list[int]:
        newest = int(now // BUCKET_SECONDS)
        count = int(self.expires // BUCKET_SECONDS) + 2
        return [newest - i for i in range(count)]


class NullResultStore(ResultStore):
    """No shared store: results reach only the client that started the task."""

    def put(self, task_id: str, record: dict[str, Any]) -> None:
        return None

    def get(self, task_id: str) -> dict[str, Any] | None:
        return None

    @property
    def durable(self) -> bool:
        return False


class MemoryResultStore(ResultStore):
    """Records in the process's in-memory broker (``memory://``): every client and worker
    of the process reads them; nothing expires, nothing survives the process."""

    def __init__(self, namespace: str, expires: float) -> None:
        from .transport import memory

        super().__init__(namespace, expires)
        self._lock = memory.STATE.lock
        self._results = memory.STATE.results

    @property
    def _space(self) -> dict[str, dict[str, Any]]:
        # looked up on each use: MemoryBroker.reset() empties the broker between tests
        return self._results.setdefault(self.namespace,
                                        {"records": {}, "revoked": {}, "chords": {}})

    def put(self, task_id: str, record: dict[str, Any]) -> None:
        # stored as the wire form, as other stores do: a caller's later change to the dict
        # does not reach the stored record
        with self._lock:
            self._space["records"][task_id] = codec.dumps(record)

    def forget(self, task_id: str) -> None:
        with self._lock:
            self._space["records"].pop(task_id, None)

    def get(self, task_id: str) -> dict[str, Any] | None:
        with self._lock:
            raw = self._space["records"].get(task_id)
        if raw is None:
            return None
        record = codec.loads(raw)
        return record if isinstance(record, dict) else None

    def add_revoked(self, entries: dict[str, list[Any]]) -> None:
        with self._lock:
            self._space["revoked"].update(entries)

    def revoked(self) -> dict[str, list[Any]]:
        now = time.time()
        with self._lock:
            return {k: list(v) for k, v in self._space["revoked"].items() if v[0] > now}

    def chord_incr(self, chord_id: str) -> int:
        with self._lock:
            count = self._space["chords"].get(chord_id, 0) + 1
            self._space["chords"][chord_id] = count
            return count

    def chord_forget(self, chord_id: str) -> None:
        with self._lock:
            self._space["chords"].pop(chord_id, None)


class RedisResultStore(ResultStore):
    """Records in one Redis hash per hour of completion.

    ``options``: the transport options of a ``sentinel://`` URL (``master_name`` …); the
    store then follows the primary through failovers (``transport.redis_urls``).
    """

    def __init__(self, url: str, namespace: str, expires: float,
                 options: Mapping[str, Any] | None = None) -> None:
        super().__init__(namespace, expires)
        from .transport.redis_urls import redis_client

        self.url = url
        self._client = redis_client(url, options, socket_connect_timeout=5, socket_timeout=10)

    def _key(self, bucket: int) -> str:
        return f"{self.namespace}.results.{bucket}"

    def current_bucket(self) -> tuple[str, int]:
        """The hash records written now go to, and when that hash expires (epoch s)."""
        bucket = int(time.time() // BUCKET_SECONDS)
        return self._key(bucket), (bucket + 1) * BUCKET_SECONDS + int(self.expires)

    def put(self, task_id: str, record: dict[str, Any]) -> None:
        self.put_many([(task_id, record)])

    def put_many(self, records: list[tuple[str, dict[str, Any]]]) -> None:
        import redis

        bucket = int(time.time() // BUCKET_SECONDS)
        key = self._key(bucket)
        try:
            pipe = self._client.pipeline(transaction=False)
            for task_id, record in records:
                pipe.hset(key, task_id, codec.dumps(record))
            pipe.expireat(key, (bucket + 1) * BUCKET_SECONDS + int(self.expires))
            pipe.execute()
        except redis.RedisError as exc:
            raise TransportError(f"result store {self.url} unreachable: {exc}") from exc

    def get(self, task_id: str) -> dict[str, Any] | None:
        import redis

        buckets = self._buckets(time.time())
        try:
            pipe = self._client.pipeline(transaction=False)
            for bucket in buckets:
                pipe.hget(self._key(bucket), task_id)
            found = pipe.execute()
        except redis.RedisError as exc:
            raise TransportError(f"result store {self.url} unreachable: {exc}") from exc
        for raw in found:
            if raw is not None:
                record = codec.loads(raw)
                return record if isinstance(record, dict) else None
        return None

    def forget(self, task_id: str) -> None:
        import redis

        try:
            pipe = self._client.pipeline(transaction=False)
            for bucket in self._buckets(time.time()):
                pipe.hdel(self._key(bucket), task_id)
            pipe.execute()
        except redis.RedisError as exc:
            raise TransportError(f"result store {self.url} unreachable: {exc}") from exc

    def close(self) -> None:
        self._client.close()

    def add_revoked(self, entries: dict[str, list[Any]]) -> None:
        import redis

        key = f"{self.namespace}.revoked"
        try:
            pipe = self._client.pipeline(transaction=False)
            for task_id, entry in entries.items():
                pipe.hset(key, task_id, codec.dumps(entry))
            ttl = int(max((e[0] for e in entries.values()), default=0) - time.time()) + 60
            # NX for a new hash, GT for an existing one: a short-lived revoke never
            # shortens the life of earlier, longer ones
            pipe.expire(key, ttl, nx=True)
            pipe.expire(key, ttl, gt=True)
            pipe.execute()
        except redis.RedisError as exc:
            raise TransportError(f"result store {self.url} unreachable: {exc}") from exc

    def chord_incr(self, chord_id: str) -> int:
        import redis

        key = f"{self.namespace}.chords"
        try:
            pipe = self._client.pipeline(transaction=True)
            pipe.hincrby(key, chord_id, 1)
            pipe.expire(key, int(self.expires))
            count, _ = pipe.execute()
        except redis.RedisError as exc:
            raise TransportError(f"result store {self.url} unreachable: {exc}") from exc
        return int(count)

    def chord_forget(self, chord_id: str) -> None:
        self._client.hdel(f"{self.namespace}.chords", chord_id)

    def revoked(self) -> dict[str, list[Any]]:
        import redis

        key = f"{self.namespace}.revoked"
        try:
            raw = self._client.hgetall(key)
        except redis.RedisError as exc:
            raise TransportError(f"result store {self.url} unreachable: {exc}") from exc
        now = time.time()
        out: dict[str, list[Any]] = {}
        stale = []
        for k, v in raw.items():
            entry = codec.loads(v if isinstance(v, bytes) else str(v).encode())
            if isinstance(entry, list) and entry and entry[0] > now:
                out[k.decode() if isinstance(k, bytes) else str(k)] = entry
            else:
                stale.append(k)
        if stale:
            self._client.hdel(key, *stale)
        return out


def _fsync_dir(path: str) -> None:
    """Force ``path``'s entries to disk (the embedded broker's helper, loaded only by a
    store that fsyncs: a process on another broker never imports the embedded modules)."""
    from .transport.embedded_files import fsync_dir as embedded_fsync_dir

    embedded_fsync_dir(path)


class FileResultStore(ResultStore):
    """Records as files under ``<dir>/<hour>/<task id>``, written atomically.

    ``fsync``: a record (and a revoke, a chord's count) is on disk, with its directory
    entry, before the call returns, so it survives a power cut; a worker acknowledges a
    task only after its record is stored, so a task redelivered after a crash finds it
    and does not run again.
    """

    def __init__(self, directory: Path, namespace: str, expires: float,
                 fsync: bool = False) -> None:
        super().__init__(namespace, expires)
        self.fsync = fsync
        self.directory = Path(directory) / namespace
        try:
            # mode applies to the last directory only: a missing store directory too is 0700
            self.directory.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.directory.mkdir(exist_ok=True, mode=0o700)
            if fsync:  # the namespace and store directories' own entries
                _fsync_dir(str(self.directory.parent))
                _fsync_dir(str(self.directory.parent.parent))
        except OSError as exc:  # e.g. another user's store
            raise TransportError(f"result store {self.directory} unreachable: {exc}") from exc
        self._last_sweep = 0.0

    def _path(self, bucket: int, task_id: str) -> Path:
        if not task_id or "/" in task_id or task_id.startswith("."):
            raise ConfigurationError(f"invalid task id {task_id!r}")
        return self.directory / str(bucket) / task_id

    def put(self, task_id: str, record: dict[str, Any]) -> None:
        now = time.time()
        path = self._path(int(now // BUCKET_SECONDS), task_id)
        try:
            path.parent.mkdir(mode=0o700)
            if self.fsync:  # a new hour's directory
                _fsync_dir(str(self.directory))
        except FileExistsError:
            pass
        tmp = path.with_name(f".{task_id}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(codec.dumps(record))
            if self.fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if self.fsync:
            _fsync_dir(str(path.parent))
        if now - self._last_sweep > 60:
            self._sweep(now)

    def get(self, task_id: str) -> dict[str, Any] | None:
        for bucket in self._buckets(time.time()):
            try:
                raw = self._path(bucket, task_id).read_bytes()
            except FileNotFoundError:
                continue
            except OSError as exc:  # e.g. another user's store: its directories are 0700
                raise TransportError(f"result store {self.directory} unreachable: {exc}") from exc
            record = codec.loads(raw)
            return record if isinstance(record, dict) else None
        return None

    def forget(self, task_id: str) -> None:
        for bucket in self._buckets(time.time()):
            try:
                self._path(bucket, task_id).unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise TransportError(f"result store {self.directory} unreachable: {exc}") from exc

    def add_revoked(self, entries: dict[str, list[Any]]) -> None:
        path = self.directory / "revoked"
        with open(path, "ab") as fh:  # one append per call: atomic enough for one machine
            fh.write(b"".join(codec.dumps([k, v]).hex().encode() + b"\n"
                              for k, v in entries.items()))
            if self.fsync:
                fh.flush()
                os.fsync(fh.fileno())

    def revoked(self) -> dict[str, list[Any]]:
        try:
            lines = (self.directory / "revoked").read_bytes().splitlines()
        except FileNotFoundError:
            return {}
        now = time.time()
        out: dict[str, list[Any]] = {}
        for line in lines:
            try:
                task_id, entry = codec.loads(bytes.fromhex(line.decode()))
            except Exception:
                continue
            if entry[0] > now:
                out[task_id] = entry
        return out

    def chord_incr(self, chord_id: str) -> int:
        import fcntl

        directory = self.directory / "chords"
        directory.mkdir(exist_ok=True, mode=0o700)
        path = directory / self._path(0, chord_id).name
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = os.read(fd, 64)
            count = int(raw or b"0") + 1
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
            os.write(fd, str(count).encode())
            if self.fsync:
                os.fsync(fd)
            return count
        finally:
            os.close(fd)

    def chord_forget(self, chord_id: str) -> None:
        try:
            (self.directory / "chords" / chord_id).unlink()
        except FileNotFoundError:
            pass

    def _sweep(self, now: float) -> None:
        """Remove hour directories whose records are all past their expiry."""
        self._last_sweep = now
        import shutil  # here only: it imports bz2, lzma and zlib, which nothing else needs

        oldest_kept = min(self._buckets(now))
        for child in self.directory.iterdir():
            if child.name.isdigit() and int(child.name) < oldest_kept:
                shutil.rmtree(child, ignore_errors=True)


def result_store_for(
    broker_url: str, backend_url: str | None, namespace: str, expires: float,
    broker_options: Mapping[str, Any] | None = None,
    backend_options: Mapping[str, Any] | None = None,
) -> ResultStore:
    """Pick the store: the ``result_backend`` URL (with ``backend_options``), else one
    matching the broker (with ``broker_options``); the choice lives with the brokers
    (:func:`interactive_tasks.transport.result_stores.result_store_for`).

    Raises ConfigurationError for a ``result_backend`` URL no store takes.
    """
    from .transport.result_stores import result_store_for as pick

    return pick(broker_url, backend_url, namespace, expires, broker_options,
                backend_options)
