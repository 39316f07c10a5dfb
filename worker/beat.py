"""``itask beat``: sends periodic tasks on their schedule, one beat per schedule at a time.

The beat is a loop: take the schedule lock (else wait as a standby), load every entry's
last-run time, then sleep until the next entry is due, send it with
:meth:`App.send_task`, record its run, and renew the lock as it goes. A second beat of the
same schedule waits as a standby and takes over when the lock is released (clean stop)
or expires (the holder died).

Where the lock and the last-run times live depends on the broker
(:mod:`interactive_tasks.transport.beat_stores`, :func:`stores_for`).

Missed runs (the beat was stopped, or a standby took over late) are skipped by default:
the schedule resumes on its grid with no burst. With ``catch_up=True`` an entry that
missed runs is sent once, at once, when the beat takes the lock.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from interactive_tasks.app import App
from interactive_tasks.schedules import Entry, entries_for
from interactive_tasks.transport.beat_stores import (
    DEFAULT_LOCK_TIMEOUT,
    AmqpLock,
    BeatLock,
    BeatState,
    FileLock,
    FileState,
    MemoryState,
    NoLock,
    RedisLock,
    RedisState,
    holder_id,
    stores_for,
)

__all__ = ["DEFAULT_LOCK_TIMEOUT", "AmqpLock", "Beat", "BeatLock", "BeatState", "FileLock",
           "FileState", "MemoryState", "NoLock", "RedisLock", "RedisState", "holder_id",
           "stores_for"]

logger = logging.getLogger("interactive_tasks.beat")

#: longest sleep between checks, whatever the schedule says
DEFAULT_MAX_INTERVAL = 5.0
#: a failed send is tried again after this many seconds
SEND_RETRY = 1.0
#: a due time this close to the start is on time, not missed
ON_TIME_GRACE = 1.0


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

