"""Schedules for periodic tasks, sent by ``itask beat``: fixed intervals and crontab times.

::

    from interactive_tasks.schedules import crontab

    app.beat_schedule = {
        "cleanup": {"task": "proj.cleanup", "schedule": 30.0},             # every 30 s
        "report": {"task": "proj.report", "schedule": crontab(minute=0, hour="*/3"),
                   "args": [1], "kwargs": {"full": True}, "options": {"queue": "io"}},
        "nightly": {"task": "proj.nightly", "schedule": "30 2 * * *"},     # crontab text
    }

    @app.periodic(every=30)                 # above @app.task, or on a plain function
    @app.task
    def ping_db(): ...

    @app.periodic(crontab="*/5 * * * *")
    def sweep(): ...                        # registered as a task as well

A schedule answers one question, :meth:`Schedule.next_after`: the first due time strictly
after a given time (epoch seconds). The beat keeps the time of each entry's last run, so
it resumes the grid after a restart instead of sending a burst of the runs it missed.

Crontab fields are ``minute hour day-of-month month day-of-week`` with ``*``, numbers,
names (``jan``…``dec``, ``sun``…``sat``), lists (``1,15``), ranges (``1-5``, ``fri-mon``
wraps), and steps (``*/15``, ``0-30/10``, ``5/20``); also ``@hourly``, ``@daily``,
``@midnight``, ``@weekly``, ``@monthly``, ``@yearly`` and ``@annually``. As in cron, when
both day-of-month and day-of-week are restricted a day matches if *either* does. Times are
the beat machine's local time unless ``tz="UTC"`` (or any IANA zone name) is given.
"""

from __future__ import annotations

import abc
import math
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from .errors import ConfigurationError
from .transport import check_priority

if TYPE_CHECKING:
    from .app import App
    from .task import Task

P = ParamSpec("P")
R = TypeVar("R")
TaskT = TypeVar("TaskT", bound="Task[Any, Any]")

__all__ = [
    "Entry",
    "PeriodicDecorator",
    "Schedule",
    "crontab",
    "entries_for",
    "every",
    "periodic",
    "schedule_from",
]

#: how far ahead :meth:`crontab.next_after` looks before it calls an expression impossible
_SEARCH_YEARS = 9
#: missed runs counted one by one at most (beyond this the count is reported as a bound)
_MISSED_COUNT_LIMIT = 10_000


class Schedule(abc.ABC):
    """When an entry is due: :meth:`next_after` gives the first due time after ``t``."""

    @abc.abstractmethod
    def next_after(self, t: float) -> float:
        """The first due time strictly after ``t`` (both epoch seconds)."""

    def missed(self, last: float, now: float) -> tuple[int, float]:
        """Due times in ``(last, now]`` (how many were missed) and the first one after ``now``.

        The count stops at ``_MISSED_COUNT_LIMIT``.
        """
        count = 0
        due = self.next_after(last)
        while due <= now:
            count += 1
            if count >= _MISSED_COUNT_LIMIT:
                return count, self.next_after(now)
            due = self.next_after(due)
        return count, due

    @abc.abstractmethod
    def describe(self) -> str:
        """Short human text, e.g. ``every 30s`` or ``crontab '*/5 * * * *'``."""


class every(Schedule):
    """A fixed interval in seconds (a number or a :class:`~datetime.timedelta`).

    The grid is anchored at the last run: after a run at ``t`` the next is due at
    ``t + seconds``; a beat that was away resumes on the same grid.
    """

    def __init__(self, seconds: float | timedelta) -> None:
        value = seconds.total_seconds() if isinstance(seconds, timedelta) else float(seconds)
        if not math.isfinite(value) or value <= 0:
            raise ConfigurationError(f"an interval must be a positive number of seconds, "
                                     f"not {seconds!r}")
        self.seconds = value

    def next_after(self, t: float) -> float:
        return t + self.seconds

    def missed(self, last: float, now: float) -> tuple[int, float]:
        first = last + self.seconds
        if first > now:
            return 0, first
        count = int((now - first) // self.seconds) + 1
        return count, first + count * self.seconds

    def describe(self) -> str:
        return f"every {self.seconds:g}s"

    def __repr__(self) -> str:
        return f"every({self.seconds:g})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, every) and other.seconds == self.seconds

    def __hash__(self) -> int:
        return hash(("every", self.seconds))


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int  # inclusive; day_of_week accepts 7 (= Sunday) while parsing
    names: tuple[str, ...] = ()  # names[i] is the value low + i

    def value(self, text: str, expr: str) -> int:
        token = text.strip().lower()
        if token.isdigit():
            number = int(token)
        elif self.names and (token in self.names or token in _FULL_NAMES) and \
                token[:3] in self.names:
            number = self.low + self.names.index(token[:3])
        else:
            raise ConfigurationError(f"crontab {expr!r}: {self.name} {text!r} is not a number"
                                     + (" or a name" if self.names else ""))
        if not self.low <= number <= self.high:
            raise ConfigurationError(f"crontab {expr!r}: {self.name} {number} is out of range "
                                     f"{self.low}-{self.high}")
        return number


_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_FULL_NAMES = frozenset({
    "january", "february", "march", "april", "june", "july", "august", "september",
    "october", "november", "december", "sunday", "monday", "tuesday", "wednesday",
    "thursday", "friday", "saturday",
})


_FIELDS = (
    _Field("minute", 0, 59),
    _Field("hour", 0, 23),
    _Field("day_of_month", 1, 31),
    _Field("month_of_year", 1, 12, _MONTHS),
    _Field("day_of_week", 0, 7, _DAYS),
)

_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


def _parse_field(spec: Any, fld: _Field, expr: str) -> frozenset[int]:
    """The set of values one crontab field allows."""
    if isinstance(spec, bool):
        raise ConfigurationError(f"crontab {expr!r}: {fld.name} cannot be {spec!r}")
    if isinstance(spec, int):
        values = {fld.value(str(spec), expr)}
    elif isinstance(spec, str):
        values = set()
        if not spec.strip():
            raise ConfigurationError(f"crontab {expr!r}: {fld.name} is empty")
        for part in spec.split(","):
            values.update(_parse_part(part.strip(), fld, expr))
    elif isinstance(spec, Iterable):
        values = set()
        for item in spec:
            values.update(_parse_field(item, fld, expr))
        if not values:
            raise ConfigurationError(f"crontab {expr!r}: {fld.name} is empty")
    else:
        raise ConfigurationError(f"crontab {expr!r}: {fld.name} must be text, a number or "
                                 f"numbers, not {type(spec).__name__}")
    if fld.name == "day_of_week" and 7 in values:
        values.discard(7)
        values.add(0)
    return frozenset(values)


def _parse_part(part: str, fld: _Field, expr: str) -> set[int]:
    if not part:
        raise ConfigurationError(f"crontab {expr!r}: empty item in {fld.name}")
    base, slash, step_text = part.partition("/")
    step = 1
    if slash:
        if not step_text.isdigit() or int(step_text) < 1:
            raise ConfigurationError(f"crontab {expr!r}: step {step_text!r} in {fld.name} "
                                     "must be a whole number of at least 1")
        step = int(step_text)
    high = 6 if fld.name == "day_of_week" else fld.high
    if base == "*":
        start, stop = fld.low, high
    elif "-" in base:
        first, _, last = base.partition("-")
        start, stop = fld.value(first, expr), fld.value(last, expr)
    else:
        start = fld.value(base, expr)
        # "5/20" runs from 5 to the end of the range; a bare "5" is just 5
        stop = high if slash else start
    if start <= stop:
        return set(range(start, stop + 1, step))
    # a wrapping range such as fri-mon or 22-2: to the end, then from the start
    span = list(range(start, high + 1)) + list(range(fld.low, stop + 1))
    return set(span[::step])


class crontab(Schedule):
    """A crontab schedule: ``crontab(minute="*/15")`` or ``crontab.parse("*/15 * * * *")``.

    Each field takes crontab text, a number or an iterable of numbers; unspecified fields
    are ``*`` (note: ``crontab()`` is every minute, as in Celery). ``tz`` is ``None`` for
    the local time of the beat machine, or a zone name (``"UTC"``, ``"Europe/Paris"``) or a
    :class:`datetime.tzinfo`. Raises :class:`ConfigurationError` for a malformed field.
    """

    def __init__(
        self,
        minute: Any = "*",
        hour: Any = "*",
        day_of_month: Any = "*",
        month_of_year: Any = "*",
        day_of_week: Any = "*",
        *,
        tz: str | tzinfo | None = None,
    ) -> None:
        specs = (minute, hour, day_of_month, month_of_year, day_of_week)
        self._text = " ".join(_spec_text(s) for s in specs)
        sets = [_parse_field(spec, fld, self._text)
                for spec, fld in zip(specs, _FIELDS, strict=True)]
        self.minutes, self.hours, self.days_of_month, self.months, self.days_of_week = sets
        self._dom_star = self.days_of_month == frozenset(range(1, 32))
        self._dow_star = self.days_of_week == frozenset(range(7))
        self.tz: tzinfo | None = _zone(tz)
        self._tz_name = tz if isinstance(tz, str) else None
        if self._dow_star and not any(_month_can_match(m, self.days_of_month)
                                      for m in self.months):
            raise ConfigurationError(f"crontab {self._text!r} never matches (no such day "
                                     "in the months given)")

    @classmethod
    def parse(cls, expr: str, *, tz: str | tzinfo | None = None) -> crontab:
        """A crontab from five-field text (``"*/5 * * * *"``) or an alias (``"@daily"``)."""
        text = expr.strip()
        if text.startswith("@"):
            alias = _ALIASES.get(text.lower())
            if alias is None:
                raise ConfigurationError(f"unknown crontab alias {expr!r}; use one of "
                                         f"{', '.join(sorted(_ALIASES))}")
            text = alias
        parts = text.split()
        if len(parts) != 5:
            raise ConfigurationError(
                f"crontab {expr!r} has {len(parts)} field(s); it needs 5: "
                "minute hour day-of-month month day-of-week")
        return cls(*parts, tz=tz)

    from_string = parse

    # -- matching ----------
    def _day_matches(self, dt: datetime) -> bool:
        dom = dt.day in self.days_of_month
        dow = (dt.weekday() + 1) % 7 in self.days_of_week  # cron: 0 = Sunday
        if self._dom_star or self._dow_star:
            return dom and dow
        return dom or dow  # both restricted: either, as in cron

    def matches(self, when: datetime) -> bool:
        """Whether the minute of ``when`` (wall time in this schedule's zone) is due."""
        if when.tzinfo is not None and self.tz is not None:
            when = when.astimezone(self.tz)
        return (when.minute in self.minutes and when.hour in self.hours
                and when.month in self.months and self._day_matches(when))

    def _wall(self, t: float) -> datetime:
        if self.tz is None:
            return datetime.fromtimestamp(t)
        return datetime.fromtimestamp(t, self.tz).replace(tzinfo=None)

    def _timestamp(self, wall: datetime) -> float:
        if self.tz is None:
            return wall.timestamp()
        return wall.replace(tzinfo=self.tz).timestamp()

    def next_after(self, t: float) -> float:
        dt = self._wall(t).replace(second=0, microsecond=0) + timedelta(minutes=1)
        limit = dt + timedelta(days=366 * _SEARCH_YEARS)
        while dt < limit:
            if dt.month not in self.months:
                dt = (dt.replace(day=1, hour=0, minute=0) + timedelta(days=32)).replace(day=1)
                continue
            if not self._day_matches(dt):
                dt = dt.replace(hour=0, minute=0) + timedelta(days=1)
                continue
            if dt.hour not in self.hours:
                dt = dt.replace(minute=0) + timedelta(hours=1)
                continue
            later = [m for m in self.minutes if m >= dt.minute]
            if not later:
                dt = dt.replace(minute=0) + timedelta(hours=1)
                continue
            dt = dt.replace(minute=min(later))
            ts = self._timestamp(dt)
            if ts > t:
                return ts
            # a wall time that maps to the past (the repeated hour when clocks go back)
            dt += timedelta(minutes=1)
        raise ConfigurationError(f"crontab {self._text!r} never matches")

    def describe(self) -> str:
        zone = f" {self._tz_name}" if self._tz_name else ""
        return f"crontab '{self._text}'{zone}"

    def __repr__(self) -> str:
        zone = f", tz={self._tz_name!r}" if self._tz_name else ""
        return f"crontab.parse({self._text!r}{zone})"

    def _key(self) -> tuple[Any, ...]:
        return (self.minutes, self.hours, self.days_of_month, self.months,
                self.days_of_week, self.tz)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, crontab) and other._key() == self._key()

    def __hash__(self) -> int:
        return hash(self._key())


def _spec_text(spec: Any) -> str:
    if isinstance(spec, str):
        return spec.strip() or "?"
    if isinstance(spec, int):
        return str(spec)
    if isinstance(spec, Iterable):
        return ",".join(str(s) for s in spec) or "?"
    return repr(spec)


_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _month_can_match(month: int, days: frozenset[int]) -> bool:
    return any(d <= _MONTH_DAYS[month - 1] for d in days)


def _zone(tz: str | tzinfo | None) -> tzinfo | None:
    if tz is None or isinstance(tz, tzinfo):
        return tz
    try:
        from zoneinfo import ZoneInfo
    except ImportError as exc:  # pragma: no cover - Python 3.9 without backports
        raise ConfigurationError("time zones need the zoneinfo module") from exc
    try:
        return ZoneInfo(tz)
    except Exception as exc:
        raise ConfigurationError(f"unknown time zone {tz!r}: {exc}") from exc


def schedule_from(value: Any) -> Schedule:
    """A :class:`Schedule` from a number of seconds, a timedelta, crontab text or a schedule.

    Raises :class:`ConfigurationError` for anything else.
    """
    if isinstance(value, Schedule):
        return value
    if isinstance(value, bool):
        raise ConfigurationError(f"not a schedule: {value!r}")
    if isinstance(value, (int, float, timedelta)):
        return every(value)
    if isinstance(value, str):
        return crontab.parse(value)
    raise ConfigurationError(
        f"not a schedule: {value!r}; give seconds, a timedelta, crontab text such as "
        "'*/5 * * * *', or crontab(...)")


# -- entries ----------
@dataclass
class Entry:
    """One periodic task: ``task`` sent with ``args``/``kwargs``/``options`` on ``schedule``."""

    name: str
    task: str
    schedule: Schedule
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: passed on to :meth:`App.send_task` (``queue``, ``priority``, ``expires``, ``headers``)
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Checked here, where beat starts, not when the entry falls due: send_task's
        # ValueError there would make beat retry the entry every second for ever.
        priority = self.options.get("priority")
        if priority is not None:
            try:
                check_priority(priority)
            except ValueError as exc:
                raise ConfigurationError(f"periodic task {self.name!r}: {exc}") from None

    @classmethod
    def from_dict(cls, name: str, spec: Mapping[str, Any]) -> Entry:
        """An entry from a ``beat_schedule`` item; raises :class:`ConfigurationError`."""
        if not isinstance(spec, Mapping):
            raise ConfigurationError(f"beat_schedule[{name!r}] must be a dict, "
                                     f"not {type(spec).__name__}")
        unknown = set(spec) - {"task", "schedule", "args", "kwargs", "options"}
        if unknown:
            raise ConfigurationError(f"beat_schedule[{name!r}]: unknown key(s) "
                                     f"{', '.join(sorted(unknown))}; known: task, schedule, "
                                     "args, kwargs, options")
        task = spec.get("task")
        if not isinstance(task, str) or not task:
            raise ConfigurationError(f"beat_schedule[{name!r}] needs 'task': a task name")
        if "schedule" not in spec:
            raise ConfigurationError(f"beat_schedule[{name!r}] needs 'schedule'")
        args = spec.get("args") or ()
        kwargs = spec.get("kwargs") or {}
        options = spec.get("options") or {}
        if not isinstance(args, (list, tuple)):
            raise ConfigurationError(f"beat_schedule[{name!r}]: 'args' must be a list")
        if not isinstance(kwargs, Mapping) or not isinstance(options, Mapping):
            raise ConfigurationError(f"beat_schedule[{name!r}]: 'kwargs' and 'options' "
                                     "must be dicts")
        return cls(name, task, schedule_from(spec["schedule"]), tuple(args), dict(kwargs),
                   dict(options))


#: entries added with ``@app.periodic``, per app
_periodic: weakref.WeakKeyDictionary[Any, dict[str, Entry]] = weakref.WeakKeyDictionary()


class PeriodicDecorator:
    """What ``app.periodic(...)`` returns: registers the task and its schedule."""

    def __init__(self, app: App, schedule: Schedule, name: str | None,
                 args: tuple[Any, ...], kwargs: dict[str, Any], options: dict[str, Any]) -> None:
        self.app = app
        self.schedule = schedule
        self.name = name
        self.args = args
        self.kwargs = kwargs
        self.options = options

    @overload
    def __call__(self, fn: TaskT) -> TaskT: ...

    @overload
    def __call__(self, fn: Callable[P, R]) -> Task[P, R]: ...

    def __call__(self, fn: Any) -> Any:
        from .task import Task

        task = fn if isinstance(fn, Task) else self.app.task(fn)
        entry = Entry(self.name or task.name, task.name, self.schedule, self.args,
                      dict(self.kwargs), dict(self.options))
        entries = _periodic.setdefault(self.app, {})
        if entry.name in entries and entries[entry.name] != entry:
            raise ConfigurationError(f"two periodic entries are named {entry.name!r}; "
                                     "give one of them name=")
        entries[entry.name] = entry
        return task


def periodic(
    app: App,
    every: float | timedelta | None = None,
    crontab: str | Schedule | None = None,
    name: str | None = None,
    args: tuple[Any, ...] | list[Any] = (),
    kwargs: dict[str, Any] | None = None,
    **options: Any,
) -> PeriodicDecorator:
    """``@app.periodic(every=30)`` / ``@app.periodic(crontab="0 * * * *")``.

    Decorates a task (put it above ``@app.task``) or a plain function (registered as a
    task). ``name`` names the entry (default: the task name); ``options`` go to
    :meth:`App.send_task`. Raises :class:`ConfigurationError` unless exactly one of
    ``every`` and ``crontab`` is given.
    """
    if (every is None) == (crontab is None):
        raise ConfigurationError("give periodic() exactly one of every= (seconds) or "
                                 "crontab= ('*/5 * * * *' or crontab(...))")
    schedule = schedule_from(every if every is not None else crontab)
    return PeriodicDecorator(app, schedule, name, tuple(args), dict(kwargs or {}), options)


def entries_for(app: App) -> dict[str, Entry]:
    """Every periodic entry of ``app``: its ``beat_schedule`` and its ``@app.periodic`` tasks.

    Raises :class:`ConfigurationError` for a malformed entry or a name used by both.
    """
    result: dict[str, Entry] = {}
    schedule = getattr(app, "beat_schedule", None) or {}
    if not isinstance(schedule, Mapping):
        raise ConfigurationError("app.beat_schedule must be a dict of name -> entry")
    for name, spec in schedule.items():
        result[str(name)] = Entry.from_dict(str(name), spec)
    for name, entry in _periodic.get(app, {}).items():
        if name in result:
            raise ConfigurationError(f"periodic entry {name!r} is in beat_schedule and also "
                                     "given with @app.periodic; rename one (name=)")
        result[name] = entry
    return result
