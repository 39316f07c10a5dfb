"""Periodic tasks: the crontab parser, the scheduling rules, the locks, and real beats.

The end-to-end tests run ``itask beat`` processes against Redis with one worker that
records every run (``tests/apps/beat_app.py``), so they count runs, not log lines.
"""

from __future__ import annotations

import itertools
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from interactive_tasks import App, ConfigurationError
from interactive_tasks.schedules import Entry, crontab, entries_for, every, schedule_from
from interactive_tasks.worker.beat import (
    AmqpLock,
    Beat,
    FileLock,
    MemoryState,
    NoLock,
    RedisLock,
    stores_for,
)

from .conftest import (
    AMQP_URL,
    REDIS_URL,
    ROOT,
    BrokerEnv,
    make_broker_env,
    require_broker,
    wait_for,
)

UTC = timezone.utc


def utc(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


def as_utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC).replace(tzinfo=None)


# -- crontab parser ----------
def test_crontab_fields():
    c = crontab.parse("*/15 9-17 1,15 jan-mar,dec mon-fri")
    assert sorted(c.minutes) == [0, 15, 30, 45]
    assert sorted(c.hours) == list(range(9, 18))
    assert sorted(c.days_of_month) == [1, 15]
    assert sorted(c.months) == [1, 2, 3, 12]
    assert sorted(c.days_of_week) == [1, 2, 3, 4, 5]
    assert sorted(crontab.parse("0-30/10 * * * *").minutes) == [0, 10, 20, 30]
    assert sorted(crontab.parse("5/20 * * * *").minutes) == [5, 25, 45]
    assert sorted(crontab.parse("0 22-2 * * *").hours) == [0, 1, 2, 22, 23]  # wraps
    assert sorted(crontab.parse("0 0 * * fri-mon").days_of_week) == [0, 1, 5, 6]
    assert sorted(crontab.parse("0 0 * * 7").days_of_week) == [0]  # 7 is Sunday too
    assert sorted(crontab.parse("0 0 * * 5-7").days_of_week) == [0, 5, 6]
    assert sorted(crontab.parse("0 0 * * Sunday,SAT").days_of_week) == [0, 6]
    assert crontab(minute=0, hour=[3, 4]) == crontab.parse("0 3,4 * * *")
    assert crontab.parse("@daily") == crontab.parse("0 0 * * *")
    assert crontab.parse("@hourly") == crontab(minute=0)
    assert crontab.parse("@weekly") == crontab.parse("0 0 * * sun")
    assert crontab.parse("@yearly") == crontab.parse("@annually") == crontab.parse("0 0 1 1 *")
    assert repr(crontab.parse("*/5 * * * *", tz="UTC")) == "crontab.parse('*/5 * * * *', tz='UTC')"


@pytest.mark.parametrize("expr, message", [
    ("* * * *", "needs 5"),
    ("* * * * * *", "needs 5"),
    ("60 * * * *", "minute 60 is out of range 0-59"),
    ("* 24 * * *", "hour 24 is out of range"),
    ("* * 0 * *", "day_of_month 0 is out of range 1-31"),
    ("* * * 13 *", "month_of_year 13 is out of range"),
    ("* * * * 8", "day_of_week 8 is out of range 0-7"),
    ("*/0 * * * *", "step '0'"),
    ("*/x * * * *", "step 'x'"),
    ("1,,2 * * * *", "empty item"),
    ("* * * foo *", "'foo' is not a number or a name"),
    ("a * * * *", "'a' is not a number"),
    ("0 0 30 2 *", "never matches"),
    ("@reboot", "unknown crontab alias"),
])
def test_crontab_errors(expr: str, message: str):
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        crontab.parse(expr)


@pytest.mark.parametrize("expr, after, expected", [
    ("*/5 * * * *", (2024, 1, 1, 10, 3), (2024, 1, 1, 10, 5)),
    ("*/5 * * * *", (2024, 1, 1, 10, 5), (2024, 1, 1, 10, 10)),  # strictly after
    ("0 * * * *", (2024, 1, 1, 23, 30), (2024, 1, 2, 0, 0)),
    ("30 9 * * mon-fri", (2024, 1, 5, 10, 0), (2024, 1, 8, 9, 30)),  # Friday -> Monday
    ("0 0 1 * *", (2024, 1, 31, 12, 0), (2024, 2, 1, 0, 0)),
    ("0 0 31 * *", (2024, 2, 1, 0, 0), (2024, 3, 31, 0, 0)),  # skips short months
    ("0 0 29 2 *", (2024, 3, 1, 0, 0), (2028, 2, 29, 0, 0)),  # next leap day
    ("0 12 13 * fri", (2024, 1, 1, 0, 0), (2024, 1, 5, 12, 0)),  # cron: either day field
    ("0 12 13 * *", (2024, 1, 1, 0, 0), (2024, 1, 13, 12, 0)),
    ("15 14 1 jan *", (2024, 6, 1, 0, 0), (2025, 1, 1, 14, 15)),
    ("59 23 31 12 *", (2024, 12, 31, 23, 59), (2025, 12, 31, 23, 59)),
])
def test_crontab_next_after(expr: str, after: tuple[int, ...], expected: tuple[int, ...]):
    c = crontab.parse(expr, tz="UTC")
    due = c.next_after(utc(*after))
    assert as_utc(due) == datetime(*expected)
    assert c.next_after(due - 0.5) == due
    assert c.matches(datetime(*expected, tzinfo=UTC))
    assert not c.matches(datetime(*expected, tzinfo=UTC) + timedelta(minutes=1)) or \
        expr.startswith("*")


def test_crontab_across_daylight_saving_changes():
    c = crontab.parse("30 2 * * *", tz="Europe/Paris")
    # 2024-03-31 02:00 CET -> 03:00 CEST: 02:30 does not exist; it runs once, at 03:30 CEST
    first = c.next_after(utc(2024, 3, 30, 12, 0))
    assert as_utc(first) == datetime(2024, 3, 31, 1, 30)
    assert as_utc(c.next_after(first)) == datetime(2024, 4, 1, 0, 30)  # 02:30 CEST
    # 2024-10-27 03:00 CEST -> 02:00 CET: 02:30 happens twice; it runs once, the first time
    first = c.next_after(utc(2024, 10, 26, 12, 0))
    assert as_utc(first) == datetime(2024, 10, 27, 0, 30)
    assert as_utc(c.next_after(first)) == datetime(2024, 10, 28, 1, 30)  # 02:30 CET
    # once per wall-clock time: the repeated hour is not run again
    hourly = crontab.parse("0 * * * *", tz="Europe/Paris")
    t = utc(2024, 10, 26, 23, 30)
    hours = []
    for _ in range(4):
        t = hourly.next_after(t)
        hours.append(as_utc(t).hour)
    assert hours == [0, 2, 3, 4]  # 02:00 CEST, 03:00 CET, 04:00 CET, 05:00 CET


def test_every_and_schedule_from():
    e = every(10)
    assert e.next_after(100) == 110
    assert e.missed(100, 105) == (0, 110)
    assert e.missed(100, 135) == (3, 140)  # 110, 120, 130 missed; the grid resumes at 140
    assert every(timedelta(minutes=2)).seconds == 120
    assert schedule_from(5) == every(5)
    assert schedule_from(timedelta(seconds=3)) == every(3)
    assert schedule_from("0 * * * *") == crontab(minute=0)
    c = crontab(minute=1)
    assert schedule_from(c) is c
    assert c.missed(utc(2024, 1, 1, 0, 0), utc(2024, 1, 1, 3, 30))[0] == 4
    for bad in (0, -1, float("nan"), True, None, [1]):
        with pytest.raises(ConfigurationError):
            schedule_from(bad)


# -- entries: beat_schedule and @app.periodic ----------
def test_entries_from_beat_schedule_and_periodic():
    app = App("entries", broker="redis://127.0.0.1:1/0")

    @app.task
    def t1(x: int) -> int:
        return x

    app.beat_schedule = {
        "fast": {"task": t1.name, "schedule": 2.5, "args": [1], "options": {"queue": "q"}},
        "nightly": {"task": "other.task", "schedule": "0 3 * * *", "kwargs": {"a": 1}},
    }

    @app.periodic(every=30)
    @app.task
    def t2() -> str:
        return "t2"

    @app.periodic(crontab=crontab(minute="*/5"), name="five", args=(7,))
    def plain(n: int) -> int:
        return n

    assert t2.name in app.tasks and plain.name in app.tasks  # a plain function is registered
    assert plain(3) == 3  # and is still callable as the function
    entries = entries_for(app)
    assert set(entries) == {"fast", "nightly", t2.name, "five"}
    assert entries["fast"] == Entry("fast", t1.name, every(2.5), (1,), {}, {"queue": "q"})
    assert entries["nightly"].schedule == crontab(minute=0, hour=3)
    assert entries[t2.name].schedule == every(30) and entries[t2.name].task == t2.name
    assert entries["five"].args == (7,) and entries["five"].schedule == crontab(minute="*/5")

    with pytest.raises(ConfigurationError, match="exactly one"):
        app.periodic()
    with pytest.raises(ConfigurationError, match="exactly one"):
        app.periodic(every=1, crontab="* * * * *")
    app.beat_schedule["five"] = {"task": "x", "schedule": 1}
    with pytest.raises(ConfigurationError, match="'five' is in beat_schedule"):
        entries_for(app)
    for spec, message in [({"schedule": 1}, "needs 'task'"), ({"task": "x"}, "needs 'schedule'"),
                          ({"task": "x", "schedule": 1, "every": 2}, "unknown key"),
                          ({"task": "x", "schedule": 1, "args": "a"}, "'args' must be a list"),
                          ({"task": "x", "schedule": 1, "options": {"priority": 10}},
                           "periodic task 'bad': priority must be an integer from 0 to 9")]:
        app.beat_schedule = {"bad": spec}
        with pytest.raises(ConfigurationError, match=message):
            entries_for(app)


# -- scheduling rules, on a fake clock ----------
class FakeSend:
    def __init__(self) -> None:
        self.sent: list[str] = []
        self.slots: list[float] = []
        self.fail = False

    def __call__(self, entry: Entry, due: float) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        self.sent.append(entry.name)
        self.slots.append(due)


def _beat(state: MemoryState, send: FakeSend, now: float, *, catch_up: bool = False,
          schedule: Any = None) -> Beat:
    app = App("unit", broker="redis://127.0.0.1:1/0")  # never contacted
    entries = {"e": Entry("e", "t", schedule or every(10))}
    beat = Beat(app, entries=entries, lock=NoLock(), state=state, catch_up=catch_up,
                send=send)
    assert beat.try_acquire(now)
    beat.start_schedule(now)
    return beat


def test_interval_runs_on_its_grid_and_never_bursts():
    state, send = MemoryState(), FakeSend()
    beat = _beat(state, send, 1000.0)
    assert state.data == {"e": 1000.0}  # first seen: the grid starts here
    assert beat.tick(1005) == 5
    assert beat.tick(1010) == 10 and send.sent == ["e"] and state.data["e"] == 1010
    # the beat fell far behind (a suspended machine): one run, not a burst
    beat.tick(1047)
    assert send.slots == [1010, 1020] and state.data["e"] == 1020 and beat.due["e"] == 1050
    beat.tick(1049)
    assert len(send.sent) == 2


def test_restart_skips_missed_runs_unless_catch_up():
    state = MemoryState({"e": 1000.0})
    send = FakeSend()
    beat = _beat(state, send, 1100.0)  # 10 runs missed while no beat ran
    assert beat.tick(1100) == 10 and send.sent == []  # skipped; the grid resumes at 1110
    beat.tick(1110)
    assert send.slots == [1110]

    state = MemoryState({"e": 1000.0})
    beat = _beat(state, send := FakeSend(), 1100.0, catch_up=True)
    beat.tick(1100)
    assert send.slots == [1100]  # once, at once
    beat.tick(1100.5)
    assert send.sent == ["e"] and beat.due["e"] == 1110

    # a restart within the interval keeps the schedule
    beat = _beat(MemoryState({"e": 1000.0}), send := FakeSend(), 1004.0)
    assert beat.due["e"] == 1010


def test_failed_send_is_retried_and_not_recorded():
    state, send = MemoryState({"e": 1000.0}), FakeSend()
    beat = _beat(state, send, 1005.0)
    send.fail = True
    assert beat.tick(1010) == 1.0
    assert state.data["e"] == 1000.0
    send.fail = False
    beat.tick(1011)
    assert send.sent == ["e"] and state.data["e"] == 1010  # the slot it was due for


def test_no_send_without_the_lock():
    state, send = MemoryState(), FakeSend()
    beat = _beat(state, send, 1000.0)
    beat.give_up_lock(release=True)
    beat.tick(2000)
    assert send.sent == []


def test_crontab_entry_on_fake_clock():
    state, send = MemoryState(), FakeSend()
    beat = _beat(state, send, utc(2024, 1, 1, 10, 3), schedule=crontab.parse("*/5 * * * *",
                                                                             tz="UTC"))
    assert beat.tick(utc(2024, 1, 1, 10, 4)) == 60
    beat.tick(utc(2024, 1, 1, 10, 5, 0))
    assert send.sent == ["e"] and beat.due["e"] == utc(2024, 1, 1, 10, 10)


# -- locks ----------
def test_redis_lock_is_exclusive_renewable_and_expires():
    require_broker("redis")
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    key = f"t{uuid.uuid4().hex[:8]}.beat.lock"
    a, b = RedisLock(client, key, ttl=0.5), RedisLock(client, key, ttl=0.5)
    try:
        assert a.acquire() and not b.acquire()
        assert b.holder() == a.token
        assert a.renew() and not b.renew()
        b.release()  # not the holder: no effect
        assert not b.acquire()
        a.release()
        assert b.acquire() and not a.acquire()
        # b stops renewing (it "crashed"): the lock expires and a takes over
        wait_for(a.acquire, 5, 0.05, message="the lock to expire")
        assert not b.renew()
    finally:
        client.delete(key)
        client.close()


def test_file_lock_is_exclusive(tmp_path: Path):
    a, b = FileLock(tmp_path / "beat.lock"), FileLock(tmp_path / "beat.lock")
    assert a.acquire() and not b.acquire()
    assert str(a.holder()).split(":")[1] == str(__import__("os").getpid())
    a.release()
    assert b.acquire() and not a.acquire()
    b.close()
    # a process that dies holding it frees it
    code = ("import sys, time; from interactive_tasks.worker.beat import FileLock; "
            f"assert FileLock({str(tmp_path / 'beat.lock')!r}).acquire(); print('held', "
            "flush=True); time.sleep(60)")  # holds the lock until killed
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        assert not a.acquire()
        proc.kill()
        proc.wait(10)
        wait_for(a.acquire, 5, message="the dead holder's lock to be freed")
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
        a.close()


def test_amqp_exclusive_queue_lock():
    require_broker("amqp")
    queue = f"t{uuid.uuid4().hex[:8]}.beat.lock"
    a, b = AmqpLock(AMQP_URL, queue, heartbeat=4), AmqpLock(AMQP_URL, queue, heartbeat=4)
    try:
        assert a.acquire()
        assert not b.acquire() and not b.acquire()  # refused, and b's connection survives
        assert a.renew()
        a.release()  # closing the connection deletes the exclusive queue
        wait_for(b.acquire, 5, 0.05, message="the released lock")
        assert b.renew() and not a.acquire()
    finally:
        a.close()
        b.close()


def test_lock_backend_follows_the_broker(tmp_path: Path):
    lock, _state = stores_for(App("x", broker=f"embedded://{tmp_path / 'b'}"), "s")
    assert isinstance(lock, FileLock) and lock.path.parent == tmp_path / "b-beat"
    lock, _state = stores_for(App("x", broker=AMQP_URL), "s")
    assert isinstance(lock, AmqpLock)
    lock, _state = stores_for(App("x", broker=AMQP_URL, result_backend="redis://h:1/0"), "s")
    assert isinstance(lock, RedisLock) and lock.key == "it.beat.s.lock"
    with pytest.raises(ConfigurationError, match="--no-lock"):
        stores_for(App("x", broker="sqs://"), "s")
    lock, _state = stores_for(App("x", broker="sqs://"), "s", no_lock=True,
                              state_path=str(tmp_path / "state.json"))
    assert isinstance(lock, NoLock)


# -- real beats (Redis) ----------
class BeatProcess:
    """A real ``itask beat`` subprocess; its log goes to a file."""

    def __init__(self, env: BrokerEnv, log_dir: Path, name: str, label: str,
                 every_s: float = 1.0, extra: tuple[str, ...] = ()) -> None:
        self.log_path = log_dir / f"beat-{label}-{uuid.uuid4().hex[:4]}.log"
        run_env = env.env()
        run_env.update(BEAT_TEST_LABEL=label, BEAT_TEST_EVERY=str(every_s))
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "interactive_tasks.cli.main", "beat", "-A",
             "tests.apps.beat_app", "--name", name, "--lock-timeout", "3",
             "--max-interval", "0.5", "-l", "info", *extra],
            env=run_env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 15.0) -> None:
        wait_for(lambda: text in self.log() or self.proc.poll() is not None, timeout,
                 message=f"{text!r} in the beat log")
        assert text in self.log(), self.log()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(15)
        finally:
            self._log.close()

    def kill(self) -> None:
        """SIGKILL (a crash) if it still runs; always releases the log file."""
        try:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(15)
        finally:
            self._log.close()


@pytest.fixture(scope="module")
def beat_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerEnv]:
    """A Redis broker space with one worker that runs the beat app's tasks."""
    from .conftest import WorkerProcess

    tmp = tmp_path_factory.mktemp("beat")
    env = make_broker_env("redis", tmp)
    worker = WorkerProcess(env, tmp, pool="threads", concurrency=4,
                           extra_args=["-A", "tests.apps.beat_app"])
    try:
        worker.wait_ready()
        yield env
    finally:
        worker.stop()


@pytest.fixture
def beats(beat_env: BrokerEnv, tmp_path: Path,
          request: pytest.FixtureRequest) -> Iterator[Any]:
    started: list[BeatProcess] = []

    def start(name: str, label: str, **kwargs: Any) -> BeatProcess:
        b = BeatProcess(beat_env, tmp_path, name, label, **kwargs)
        started.append(b)
        return b

    yield start
    for b in started:
        b.kill()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for b in started:
            sys.stderr.write(f"\n--- {b.log_path.name} ---\n{b.log()[-3000:]}\n")


def runs(env: BrokerEnv, label: str) -> list[float]:
    """When each run of ``label`` ran (in the worker)."""
    return [run for run, _slot in _records(env, label)]


def slots(env: BrokerEnv, label: str) -> list[float]:
    """The slot (due time) the beat sent each run of ``label`` for."""
    return [slot for _run, slot in _records(env, label)]


def _records(env: BrokerEnv, label: str) -> list[tuple[float, float]]:
    path = env.record_dir / f"runs-{label}.txt"
    if not path.exists():
        return []
    return [(float(a), float(b)) for a, b in
            (line.split() for line in path.read_text().splitlines() if line.strip())]


def _stamp(log: str, text: str) -> float:
    """Time of the first log line containing ``text``."""
    for line in log.splitlines():
        if text in line:
            stamp = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})", line)
            assert stamp, line
            return datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    raise AssertionError(f"{text!r} not in log:\n{log}")


def test_beat_sends_every_second(beat_env: BrokerEnv, beats: Any):
    label = f"every-{uuid.uuid4().hex[:6]}"
    b = beats(f"s-{label}", label)
    wait_for(lambda: len(runs(beat_env, label)) >= 4, 20, message="4 runs")
    due = slots(beat_env, label)
    assert [round(b - a, 6) for a, b in itertools.pairwise(due)][:3] == [1.0, 1.0, 1.0]
    times = runs(beat_env, label)
    assert all(0 <= t - s < 2.0 for t, s in zip(times, due, strict=True)), (times, due)
    assert b.stop() == 0
    assert "sending due task tick" in b.log() and "stopped" in b.log()


def test_two_beats_only_one_sends_and_the_standby_takes_over(beat_env: BrokerEnv,
                                                              beats: Any):
    label = f"pair-{uuid.uuid4().hex[:6]}"
    name = f"s-{label}"
    a = beats(name, label)
    a.wait_log("acquired the schedule lock")
    b = beats(name, label)
    b.wait_log("standby: another beat holds the schedule lock")
    before, t0 = len(runs(beat_env, label)), time.time()
    wait_for(lambda: len(runs(beat_env, label)) >= before + 4, 20, message="4 runs")
    elapsed = time.time() - t0
    assert len(runs(beat_env, label)) - before <= elapsed + 1.5  # one sender, not two
    assert "sending due task" not in b.log()

    a.stop()  # a clean stop releases the lock: the standby takes over at once
    b.wait_log("acquired the schedule lock", 10)
    count = len(runs(beat_env, label))
    wait_for(lambda: len(runs(beat_env, label)) >= count + 2, 20, message="runs from b")

    c = beats(name, label)
    c.wait_log("standby")
    b.kill()  # a crash: the lock expires after --lock-timeout 3
    c.wait_log("acquired the schedule lock", 15)
    count = len(runs(beat_env, label))
    wait_for(lambda: len(runs(beat_env, label)) >= count + 2, 20, message="runs from c")
    due = slots(beat_env, label)
    assert len(set(due)) == len(due), due  # never two beats sending the same slot
    assert due == sorted(due)
    assert "sending due task" in c.log()


def test_restart_sends_no_burst_and_catch_up_sends_once(beat_env: BrokerEnv, beats: Any):
    from .conftest import holds_for

    label = f"restart-{uuid.uuid4().hex[:6]}"
    name = f"s-{label}"
    a = beats(name, label)
    wait_for(lambda: len(runs(beat_env, label)) >= 2, 20, message="2 runs")
    assert a.stop() == 0
    n = len(runs(beat_env, label))
    holds_for(lambda: len(runs(beat_env, label)) == n, 2.6,
              message="no run while no beat runs")  # at least 2 runs are missed

    last = slots(beat_env, label)[-1]
    b = beats(name, label)
    wait_for(lambda: len(runs(beat_env, label)) >= n + 2, 20, message="2 runs after restart")
    due = slots(beat_env, label)[n:]
    # no burst: the missed slots are not sent; the grid resumes with its phase kept
    assert due[0] - last >= 3 and (due[0] - last) % 1.0 == pytest.approx(0.0), (last, due)
    assert due[1] - due[0] == pytest.approx(1.0)
    assert re.search(r"entry tick missed [2-9] run\(s\) .* skipped", b.log()), b.log()

    assert b.stop() == 0
    n = len(runs(beat_env, label))
    holds_for(lambda: len(runs(beat_env, label)) == n, 2.6, message="no run while down")
    last = slots(beat_env, label)[-1]
    c = beats(name, label, extra=("--catch-up",))
    wait_for(lambda: len(runs(beat_env, label)) >= n + 2, 20, message="2 runs after catch-up")
    due = slots(beat_env, label)[n:]
    # the missed runs are sent once, not once per missed slot, then a new grid starts
    assert due[0] - last > 2.5 and due[1] - due[0] == pytest.approx(1.0), (last, due)
    log = c.log()
    assert "--catch-up: sending it once now" in log
    # sent at once on taking the lock, not at the next slot
    assert _stamp(log, "sending due task tick") - _stamp(log, "acquired the schedule") < 0.3


def test_beat_list_shows_both_kinds_of_entries(beat_env: BrokerEnv):
    out = subprocess.run(
        [sys.executable, "-m", "interactive_tasks.cli.main", "beat", "-A", "tests.apps.beat_app",
         "--name", f"list-{uuid.uuid4().hex[:6]}", "--list"],
        env=beat_env.env(), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["entry", "schedule", "task", "last", "run", "next", "run"]
    assert any(line.startswith("tick ") and "every 1s" in line for line in lines)
    assert any("tests.apps.beat_app.nightly_report" in line and "'0 3 * * mon-fri'" in line
               for line in lines)
    assert any(line.startswith("hourly-cleanup ") and "every 3600s" in line for line in lines)


def test_beat_without_a_lock_backend_is_a_usage_error():
    out = subprocess.run(
        [sys.executable, "-m", "interactive_tasks.cli.main", "beat", "-A", "tests.apps.beat_app",
         "-b", "sqs://"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--no-lock" in out.stderr, out.stderr


@pytest.mark.parametrize("broker_name", ["embedded", "amqp"])
def test_standby_takeover_on_embedded_and_amqp(broker_name: str, tmp_path: Path,
                                               request: pytest.FixtureRequest):
    """The flock (embedded) and exclusive-queue (RabbitMQ) locks in real beats."""
    env = make_broker_env(broker_name, tmp_path)
    label = f"lock-{uuid.uuid4().hex[:6]}"
    started: list[BeatProcess] = []
    try:
        a = BeatProcess(env, tmp_path, f"s-{label}", label, every_s=0.5)
        started.append(a)
        a.wait_log("acquired the schedule lock")
        b = BeatProcess(env, tmp_path, f"s-{label}", label, every_s=0.5)
        started.append(b)
        b.wait_log("standby: another beat holds the schedule lock")
        wait_for(lambda: a.log().count("sending due task tick") >= 3, 20,
                 message="a to send 3 times")
        assert "sending due task" not in b.log()
        a.kill()  # the lock goes with the process (flock) or its connection (RabbitMQ)
        b.wait_log("acquired the schedule lock", 20)
        wait_for(lambda: b.log().count("sending due task tick") >= 2, 20,
                 message="b to send")
        assert b.stop() == 0
    finally:
        for proc in started:
            proc.kill()
        if broker_name == "amqp":
            from kombu import Connection

            with Connection(env.url) as conn:
                conn.default_channel.queue_delete(f"{env.namespace}.tasks.default")
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            for proc in started:
                sys.stderr.write(f"\n--- {proc.log_path.name} ---\n{proc.log()[-3000:]}\n")
