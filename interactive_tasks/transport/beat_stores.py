"""Where ``itask beat`` keeps its schedule lock and last-run times, per broker.

Only one beat of a schedule sends at a time; the others wait as standbys. The lock and the
last-run times live with the broker (or the result backend) when it can hold them:

========================  ====================================  ============================
broker / result backend   lock                                  last-run times
========================  ====================================  ============================
Redis (either)            ``SET NX PX`` key, renewed            a Redis hash
embedded                  ``flock`` on a file beside the broker  a JSON file beside it
                          directory
RabbitMQ without Redis    an exclusive queue (RabbitMQ drops it  a local JSON file
                          when its connection closes)            (``--state``)
anything else (SQS …)     none: refuse, unless ``--no-lock``     a local JSON file
========================  ====================================  ============================
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import json
import logging
import os
import socket
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError
from . import default_home, is_amqp, is_redis
from .connections import beside_broker

if TYPE_CHECKING:
    from ..app import App

__all__ = ["DEFAULT_LOCK_TIMEOUT", "AmqpLock", "BeatLock", "BeatState", "FileLock",
           "FileState", "MemoryState", "NoLock", "RedisLock", "RedisState", "holder_id",
           "stores_for"]

logger = logging.getLogger("interactive_tasks.beat")

#: seconds a lock lives without renewal (a crashed beat's standby waits this long)
DEFAULT_LOCK_TIMEOUT = 30.0


def holder_id() -> str:
    """This process, as a lock holder: ``host:pid:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


# -- locks ----------
class BeatLock(abc.ABC):
    """Only one beat per schedule. ``acquire`` never blocks; ``renew`` says if it is kept."""

    #: seconds the lock outlives its last renewal (``None``: held as long as the process)
    ttl: float | None = None

    @abc.abstractmethod
    def acquire(self) -> bool:
        """Take the lock if it is free; True when this process holds it now."""

    @abc.abstractmethod
    def renew(self) -> bool:
        """Extend the lock; False when it was lost (then stop sending)."""

    @abc.abstractmethod
    def release(self) -> None:
        """Give the lock up so a standby takes over at once."""

    def holder(self) -> str | None:
        """Who holds it, when the backend can tell."""
        return None

    def tick(self) -> None:  # noqa: B027 - optional hook
        """Called every loop turn while holding (connection keep-alive)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    @property
    @abc.abstractmethod
    def where(self) -> str:
        """The lock's location, for logs."""


class NoLock(BeatLock):
    """``--no-lock``: the operator guarantees a single beat."""

    def acquire(self) -> bool:
        return True

    def renew(self) -> bool:
        return True

    def release(self) -> None:
        return None

    @property
    def where(self) -> str:
        return "no lock (--no-lock)"


_RENEW_SCRIPT = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE_SCRIPT = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


class RedisLock(BeatLock):
    """``SET key token NX PX ttl``; renewed and released only by its holder (Lua)."""

    def __init__(self, client: Any, key: str, ttl: float, token: str | None = None) -> None:
        self.client = client
        self.key = key
        self.ttl: float = ttl
        self.token = token or holder_id()

    def acquire(self) -> bool:
        return bool(self.client.set(self.key, self.token, nx=True, px=int(self.ttl * 1000)))

    def renew(self) -> bool:
        assert self.ttl is not None
        return bool(self.client.eval(_RENEW_SCRIPT, 1, self.key, self.token,
                                     int(self.ttl * 1000)))

    def release(self) -> None:
        self.client.eval(_RELEASE_SCRIPT, 1, self.key, self.token)

    def holder(self) -> str | None:
        value = self.client.get(self.key)
        return value.decode(errors="replace") if isinstance(value, bytes) else value

    @property
    def where(self) -> str:
        return f"redis key {self.key}"


class FileLock(BeatLock):
    """``flock`` on a file: held while this process keeps it open, freed when it dies."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> bool:
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder_id().encode(), 0)
        self._fd = fd
        return True

    def renew(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing drops the flock

    def holder(self) -> str | None:
        try:
            return self.path.read_text().strip() or None
        except OSError:
            return None

    def close(self) -> None:
        self.release()

    @property
    def where(self) -> str:
        return f"lock file {self.path}"


class AmqpLock(BeatLock):
    """An exclusive queue on RabbitMQ: one connection may declare it; it goes with that
    connection (clean close, crash, or missed heartbeats), which frees the lock."""

    def __init__(self, url: str, queue: str, heartbeat: float = 10.0,
                 transport_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.queue = queue
        self.heartbeat = heartbeat
        self.ttl = heartbeat * 2
        self.transport_options = transport_options or {}
        self._conn: Any = None
        self._channel: Any = None

    def _connection(self) -> Any:
        # a plain kombu connection, not connection_for: RabbitMQ only (``is_amqp``), whose
        # transport is kombu's own, with its own heartbeat
        from kombu import Connection

        if self._conn is None:
            conn = Connection(self.url, heartbeat=self.heartbeat, connect_timeout=5,
                              transport_options=dict(self.transport_options))
            conn.ensure_connection(max_retries=1)
            self._conn = conn
        return self._conn

    def acquire(self) -> bool:
        if self._channel is not None:
            return True
        conn = self._connection()
        try:
            channel = conn.channel()
            channel.queue_declare(queue=self.queue, exclusive=True, auto_delete=True,
                                  durable=False)
        except conn.channel_errors:
            # 405 RESOURCE_LOCKED: another connection holds it; the server closed our
            # channel, the connection stays usable.
            return False
        except conn.connection_errors:
            self._drop()
            raise
        self._channel = channel
        return True

    def renew(self) -> bool:
        if self._channel is None or self._conn is None:
            return False
        try:
            self._conn.heartbeat_check()
            # a passive declare of our own exclusive queue proves the connection and the
            # queue are still there
            self._channel.queue_declare(queue=self.queue, passive=True)
            return True
        except Exception as exc:
            logger.warning("beat lock connection failed: %s", exc)
            self._drop()
            return False

    def tick(self) -> None:
        """Keep heartbeats flowing (call at least every ``heartbeat / 2`` seconds)."""
        if self._conn is not None:
            try:
                self._conn.heartbeat_check()
            except Exception as exc:
                logger.warning("beat lock connection failed: %s", exc)
                self._drop()

    def release(self) -> None:
        self._drop()

    def _drop(self) -> None:
        conn, self._conn, self._channel = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.release()

    def close(self) -> None:
        self._drop()

    @property
    def where(self) -> str:
        return f"exclusive queue {self.queue}"


# -- last-run times ----------
class BeatState(abc.ABC):
    """Each entry's last run (the due time it was sent for), kept across restarts."""

    @abc.abstractmethod
    def load(self) -> dict[str, float]:
        """Every entry's last run."""

    @abc.abstractmethod
    def save(self, name: str, last_run: float) -> None:
        """Record a run of entry ``name``."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    @property
    @abc.abstractmethod
    def where(self) -> str:
        """The state's location, for logs."""


class MemoryState(BeatState):
    """Kept in memory only (tests, or ``--state memory``)."""

    def __init__(self, initial: dict[str, float] | None = None) -> None:
        self.data = dict(initial or {})

    def load(self) -> dict[str, float]:
        return dict(self.data)

    def save(self, name: str, last_run: float) -> None:
        self.data[name] = last_run

    @property
    def where(self) -> str:
        return "memory"


class RedisState(BeatState):
    """One Redis hash: entry name -> last run."""

    def __init__(self, client: Any, key: str) -> None:
        self.client = client
        self.key = key

    def load(self) -> dict[str, float]:
        raw = self.client.hgetall(self.key) or {}
        result = {}
        for name, value in raw.items():
            with contextlib.suppress(ValueError):
                result[_text(name)] = float(_text(value))
        return result

    def save(self, name: str, last_run: float) -> None:
        self.client.hset(self.key, name, repr(last_run))

    @property
    def where(self) -> str:
        return f"redis hash {self.key}"


class FileState(BeatState):
    """A JSON file, replaced atomically on every save."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._data: dict[str, float] | None = None

    def load(self) -> dict[str, float]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            raw = {}
        except (OSError, ValueError) as exc:
            logger.warning("beat state %s unreadable (%s); starting afresh", self.path, exc)
            raw = {}
        data = {str(k): float(v) for k, v in raw.items()
                if isinstance(v, (int, float))} if isinstance(raw, dict) else {}
        self._data = data
        return dict(data)

    def save(self, name: str, last_run: float) -> None:
        data = self._data if self._data is not None else self.load()
        data[name] = last_run
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)

    @property
    def where(self) -> str:
        return f"file {self.path}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _redis_client(app: App) -> Any:
    """A redis-py client of the broker, else of the result backend, if either is Redis."""
    for url, options in ((app.broker_url, app.conf.broker_transport_options),
                         (app.result_backend or "", app.conf.result_backend_transport_options)):
        if is_redis(url):
            from .redis_urls import redis_client

            return redis_client(url, options, socket_connect_timeout=5, socket_timeout=10)
    return None


def stores_for(
    app: App,
    name: str,
    *,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    state_path: str | None = None,
    no_lock: bool = False,
) -> tuple[BeatLock, BeatState]:
    """The lock and last-run store for schedule ``name`` of ``app`` (see the module doc).

    ``state_path``: a JSON file for the last-run times (``"memory"``: keep none).
    Raises :class:`ConfigurationError` when the broker offers no lock and ``no_lock`` is
    false.
    """
    ns = app.conf.namespace
    key = f"{ns}.beat.{name}"
    client = _redis_client(app)
    # Beside the broker directory, never inside it: the broker owns every entry there.
    beside = beside_broker(app.broker_url, "-beat")
    state: BeatState
    if state_path == "memory":
        state = MemoryState()
    elif state_path:
        state = FileState(Path(state_path))
    elif client is not None:
        state = RedisState(client, key + ".state")
    elif beside is not None:
        state = FileState(beside / f"{key}.state.json")
    else:
        state = FileState(default_home() / "beat" / f"{key}.state.json")
    lock: BeatLock
    if no_lock:
        lock = NoLock()
    elif client is not None:
        lock = RedisLock(client, key + ".lock", lock_timeout)
    elif beside is not None:
        lock = FileLock(beside / f"{key}.lock")
    elif is_amqp(app.broker_url):
        lock = AmqpLock(app.broker_url, key + ".lock",
                        heartbeat=max(2.0, min(lock_timeout / 2, 30.0)),
                        transport_options=app.conf.broker_transport_options)
    else:
        raise ConfigurationError(
            f"no beat lock on broker {app.broker_url_display}: give a redis:// "
            "result_backend (the lock and last-run times go there), or run exactly one "
            "beat with --no-lock")
    return lock, state
