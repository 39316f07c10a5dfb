"""``itask beat``: sends periodic tasks on their schedule, one beat per schedule at a time.

The beat is a loop: take the schedule lock (else wait as a standby), load every entry's
last-run time, then sleep until the next entry is due, send it with
:meth:`App.send_task`, record its run, and renew the lock as it goes. A second beat of the
same schedule waits as a standby and takes over when the lock is released (clean stop)
or expires (the holder died).

Where the lock and the last-run times live:

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

Missed runs (the beat was stopped, or a standby took over late) are skipped by default:
the schedule resumes on its grid with no burst. With ``catch_up=True`` an entry that
missed runs is sent once, at once, when the beat takes the lock.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from interactive_tasks.app import App
from interactive_tasks.errors import ConfigurationError
from interactive_tasks.schedules import Entry, entries_for
from interactive_tasks.transport import default_home, embedded_directory

logger = logging.getLogger("interactive_tasks.beat")

#: seconds a lock lives without renewal (a crashed beat's standby waits this long)
DEFAULT_LOCK_TIMEOUT = 30.0
#: longest sleep between checks, whatever the schedule says
DEFAULT_MAX_INTERVAL = 5.0
#: a failed send is tried again after this many seconds
SEND_RETRY = 1.0
#: a due time this close to the start is on time, not missed
ON_TIME_GRACE = 1.0


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
    from interactive_tasks.transport.redis_urls import is_redis, redis_client

    for url, options in ((app.broker_url, app.conf.broker_transport_options),
                         (app.result_backend or "", app.conf.result_backend_transport_options)):
        if is_redis(url):
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
    state: BeatState
    if state_path == "memory":
        state = MemoryState()
    elif state_path:
        state = FileState(Path(state_path))
    elif client is not None:
        state = RedisState(client, key + ".state")
    elif app.is_embedded:
        state = FileState(_embedded_beat_dir(app) / f"{key}.state.json")
    else:
        state = FileState(default_home() / "beat" / f"{key}.state.json")
    lock: BeatLock
    if no_lock:
        lock = NoLock()
    elif client is not None:
        lock = RedisLock(client, key + ".lock", lock_timeout)
    elif app.is_embedded:
        lock = FileLock(_embedded_beat_dir(app) / f"{key}.lock")
    elif app.broker_url.split("://", 1)[0] in ("amqp", "amqps", "pyamqp"):
        lock = AmqpLock(app.broker_url, key + ".lock",
                        heartbeat=max(2.0, min(lock_timeout / 2, 30.0)),
                        transport_options=app.conf.broker_transport_options)
    else:
        raise ConfigurationError(
            f"no beat lock on broker {app.broker_url_display}: give a redis:// "
            "result_backend (the lock and last-run times go there), or run exactly one "
            "beat with --no-lock")
    return lock, state


def _embedded_beat_dir(app: App) -> Path:
    # Beside the broker directory, never inside it: the broker owns every entry there.
    broker_dir = embedded_directory(app.broker_url)
    return broker_dir.with_name(broker_dir.name + "-beat")


# -- the beat ----------
class Beat:
    """Sends ``app``'s periodic entries; ``Beat(app).run()`` blocks until SIGTERM/SIGINT.

    ``send(entry, due)`` publishes the run of ``entry`` due at ``due`` (default:
    :meth:`App.send_task`, with headers ``itask-beat`` (schedule/entry) and
    ``itask-beat-due`` (the slot's epoch time)); ``clock`` gives epoch seconds. Both exist
    so the scheduling can be tested without a broker.
    """

    def __init__(
        self,
        app: App,
        *,
        name: str | None = None,
        entries: dict[str, Entry] | None = None,
        lock: BeatLock | None = None,
        state: BeatState | None = None,
        catch_up: bool = False,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
        max_interval: float = DEFAULT_MAX_INTERVAL,
        send: Callable[[Entry, float], Any] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.app = app
        self.name = name or app.main
        self.entries = entries if entries is not None else entries_for(app)
        if lock is None or state is None:
            default_lock, default_state = stores_for(app, self.name, lock_timeout=lock_timeout)
            lock = lock or default_lock
            state = state or default_state
        self.lock = lock
        self.state = state
        self.catch_up = catch_up
        self.max_interval = max_interval
        self._send = send or self._send_task
        self.clock = clock
        self.due: dict[str, float] = {}
        self._retry_at: dict[str, float] = {}
        self.sent = 0
        self.holding = False
        self._valid_until = 0.0
        self._next_renew = 0.0
        self._stop = threading.Event()

    # -- scheduling (no I/O but ``send`` and the state store) ----------
    def start_schedule(self, now: float) -> None:
        """Plan every entry from its last run: on time, missed (skipped), or caught up."""
        last_runs = self.state.load()
        self.due.clear()
        self._retry_at.clear()
        for name, entry in self.entries.items():
            last = last_runs.get(name)
            if last is None or last > now + 60:  # never ran, or a clock that went back
                # Remember when the entry was first seen, so an interval longer than the
                # beat's uptime still comes due after restarts.
                self._save(name, now)
                self.due[name] = entry.schedule.next_after(now)
                continue
            due = entry.schedule.next_after(last)
            if due > now - ON_TIME_GRACE:
                self.due[name] = due
                continue
            missed, following = entry.schedule.missed(last, now)
            if self.catch_up:
                logger.info("entry %s missed %d run(s) since %s; --catch-up: sending it once "
                            "now", name, missed, _when(last))
                self.due[name] = now
            else:
                logger.info("entry %s missed %d run(s) since %s; skipped (no burst; "
                            "--catch-up sends one now), next at %s", name, missed,
                            _when(last), _when(following))
                self.due[name] = following

    def tick(self, now: float) -> float:
        """Send what is due at ``now``; returns the seconds until the next due entry."""
        for name, entry in self.entries.items():
            due = self.due.get(name)
            if due is None or due > now or self._retry_at.get(name, 0.0) > now:
                continue
            if not self.lock_valid(now):
                break
            try:
                self._send(entry, due)
            except Exception as exc:
                # keep the slot (the grid does not move); try again shortly
                logger.error("could not send %s (%s): %s; trying again in %.0fs", name,
                             entry.task, exc, SEND_RETRY)
                self._retry_at[name] = now + SEND_RETRY
                continue
            self._retry_at.pop(name, None)
            self.sent += 1
            self._save(name, due)
            following = entry.schedule.next_after(due)
            if following <= now:
                missed, following = entry.schedule.missed(due, now)
                logger.warning("entry %s: the beat fell behind by %d run(s); skipped them",
                               name, missed)
            self.due[name] = following
        if not self.due:
            return self.max_interval
        soonest = min(max(due, self._retry_at.get(name, 0.0)) for name, due in self.due.items())
        return max(0.0, soonest - now)

    def _save(self, name: str, last_run: float) -> None:
        try:
            self.state.save(name, last_run)
        except Exception as exc:
            logger.warning("could not record the run of %s (%s): %s", name, self.state.where,
                           exc)

    def lock_valid(self, now: float) -> bool:
        return self.holding and now < self._valid_until

    def _send_task(self, entry: Entry, due: float) -> None:
        options = dict(entry.options)
        headers = dict(options.pop("headers", None) or {})
        headers.setdefault("itask-beat", f"{self.name}/{entry.name}")
        headers.setdefault("itask-beat-due", due)
        logger.info("sending due task %s (%s)", entry.name, entry.task)
        self.app.send_task(entry.task, entry.args, entry.kwargs, headers=headers, **options)

    # -- the lock ----------
    def _renew_every(self) -> float:
        ttl = self.lock.ttl
        return 1.0 if ttl is None else max(0.2, ttl / 3)

    def try_acquire(self, now: float) -> bool | None:
        """True: holding the lock now; False: another beat holds it; None: unreachable."""
        try:
            got = self.lock.acquire()
        except Exception as exc:
            logger.warning("cannot reach the beat lock (%s): %s", self.lock.where, exc)
            return None
        if got:
            self.holding = True
            self._valid_until = self._validity(now)
            self._next_renew = now + self._renew_every()
        return got

    def _validity(self, started: float) -> float:
        ttl = self.lock.ttl
        # stop sending a little before the lock could expire under another beat
        return float("inf") if ttl is None else started + ttl * 0.9

    def _renew(self, now: float) -> bool:
        """Renew when it is time; False when the lock is lost for good."""
        if now < self._next_renew:
            return True
        try:
            kept = self.lock.renew()
        except Exception as exc:
            logger.warning("could not renew the beat lock (%s): %s", self.lock.where, exc)
            self._next_renew = now + min(1.0, self._renew_every())
            return now < self._valid_until  # retry until it would have expired
        if not kept:
            return False
        self._valid_until = self._validity(now)
        self._next_renew = now + self._renew_every()
        return True

    # -- running ----------
    def stop(self) -> None:
        """Ask :meth:`run` to return (thread-safe; also SIGTERM/SIGINT)."""
        self._stop.set()

    def run(self, install_signals: bool = True) -> int:
        """Serve until stopped; returns an exit code."""
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda signum, frame: self.stop())
        logger.info("beat %s starting: %d entr%s, broker %s, lock: %s, last runs: %s",
                    self.name, len(self.entries), "y" if len(self.entries) == 1 else "ies",
                    self.app.broker_url_display, self.lock.where, self.state.where)
        for entry in self.entries.values():
            logger.info("  %s: %s -> %s", entry.name, entry.schedule.describe(), entry.task)
        if not self.entries:
            logger.warning("no periodic entries: set app.beat_schedule or use @app.periodic")
        standby_logged = False
        retry = min(5.0, max(0.2, (self.lock.ttl or 3.0) / 3))
        try:
            while not self._stop.is_set():
                now = self.clock()
                if not self.holding:
                    got = self.try_acquire(now)
                    if got is None:
                        self._stop.wait(retry)
                        continue
                    if not got:
                        if not standby_logged:
                            logger.info("standby: another beat holds the schedule lock (%s, "
                                        "holder %s); trying every %.1fs", self.lock.where,
                                        self._holder(), retry)
                            standby_logged = True
                        self._stop.wait(retry)
                        continue
                    standby_logged = False
                    logger.info("acquired the schedule lock (%s); this beat sends the "
                                "schedule", self.lock.where)
                    try:
                        self.start_schedule(now)
                    except Exception as exc:
                        logger.error("cannot load the last-run times (%s): %s",
                                     self.state.where, exc)
                        self.give_up_lock(release=True)
                        self._stop.wait(retry)
                        continue
                if not self._renew(now):
                    logger.warning("lost the schedule lock (%s); standing by", self.lock.where)
                    self.give_up_lock(release=False)
                    continue
                wait = self.tick(now)
                self.lock.tick()
                until_renew = self._next_renew - self.clock()
                self._stop.wait(max(0.0, min(wait, until_renew, self.max_interval)))
        finally:
            if self.holding:
                self.give_up_lock(release=True)
            self.lock.close()
            self.state.close()
            logger.info("beat %s stopped (%d task(s) sent)", self.name, self.sent)
        return 0

    def give_up_lock(self, release: bool) -> None:
        """Stop sending; ``release`` also frees the lock for a standby."""
        self.holding = False
        self._valid_until = 0.0
        if release:
            try:
                self.lock.release()
            except Exception as exc:
                logger.warning("could not release the beat lock: %s", exc)

    def _holder(self) -> str:
        try:
            return self.lock.holder() or "unknown"
        except Exception:
            return "unknown"


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))

