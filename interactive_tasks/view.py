"""The view model every front end shares: rate and ETA, short display strings, outcomes.

``itask attach`` / ``itask top`` (:mod:`interactive_tasks.cli.render`), the Jupyter widget
(:mod:`interactive_tasks.widgets`) and the web dashboard (``itask web``) all take their
numbers and words from here, so for the same events they show the same rate, the same
ETA and the same outcome line. Pure: no I/O, no clock (times come from the events).

One treatment of pauses: the rate measures running time only. A pause, a retry or the end
of the task clears the measurement, so paused time never lowers the speed, and after a
resume the rate and ETA come back once two new progress events have arrived.
"""

from __future__ import annotations

import collections
import json
from typing import Any

from .protocol import TaskSnapshot, TaskState

__all__ = [
    "RATE_WINDOW",
    "RateMeter",
    "cut",
    "format_duration",
    "format_eta",
    "format_rate",
    "outcome_text",
    "show",
]

#: Seconds of progress the rate is measured over.
RATE_WINDOW = 10.0
#: Characters of an outcome line (result, error, cancellation).
OUTCOME_CHARS = 300


def cut(text: str, limit: int) -> str:
    """``text`` shortened to ``limit`` characters, the last one an ellipsis when cut."""
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"


def show(value: Any, limit: int) -> str:
    """A short display string for any value a task sent (never raises).

    Strings as they are, anything else as JSON (``repr`` for what JSON cannot say).
    """
    if isinstance(value, str):
        return cut(value, limit)
    try:
        text = json.dumps(value, default=repr, ensure_ascii=False)
    except Exception:
        try:
            text = repr(value)
        except Exception as exc:  # a broken __repr__ must not break a view
            text = f"<unrepresentable {type(value).__name__}: {exc}>"
    return cut(text, limit)


def format_duration(seconds: float) -> str:
    """``42s``, ``1m05s``, ``2h03m``, ``3d04h``; negative durations count as zero."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_rate(rate: float) -> str:
    """Items per second: ``123/s``, ``12.5/s``, ``0.25/s``."""
    if rate >= 100:
        return f"{rate:.0f}/s"
    if rate >= 10:
        return f"{rate:.1f}/s"
    return f"{rate:.2f}/s"


def format_eta(seconds: float) -> str:
    """``ETA 1m05s``: the seconds left, as every front end writes them."""
    return f"ETA {format_duration(seconds)}"


def _num(x: float) -> str:
    if isinstance(x, int) or float(x).is_integer():
        return str(int(x))
    return f"{x:.1f}"


class RateMeter:
    """Progress per second over the last :data:`RATE_WINDOW` seconds of running.

    Feed it the task's snapshot after each change (:meth:`observe`); a snapshot whose
    progress event it has already seen (same ``run`` and ``seq``) adds no sample, so
    feeding it often is harmless. ``current`` going backwards (a new run) starts over.
    """

    def __init__(self, window: float = RATE_WINDOW) -> None:
        if window <= 0:
            raise ValueError("window must be a positive number of seconds")
        self.window = window
        self._samples: collections.deque[tuple[float, float]] = collections.deque(maxlen=256)
        self._key: tuple[int, int] | None = None

    def observe(self, snap: TaskSnapshot) -> tuple[float | None, float | None]:
        """Feed the latest snapshot; returns ``(rate, eta)`` (None when unknown)."""
        progress = snap.progress
        if snap.state is not TaskState.RUNNING or progress is None or progress.current is None:
            # A pause (or a retry, or the end) restarts the measurement.
            self._samples.clear()
            return None, None
        key = (progress.run, progress.seq)
        samples = self._samples
        if key != self._key:
            self._key = key
            current = float(progress.current)
            if samples and (current < samples[-1][1] or progress.ts < samples[-1][0]):
                samples.clear()  # a new run started over
            samples.append((progress.ts, current))
        while len(samples) > 2 and samples[-1][0] - samples[1][0] >= self.window:
            samples.popleft()
        if len(samples) < 2:
            return None, None
        dt = samples[-1][0] - samples[0][0]
        done = samples[-1][1] - samples[0][1]
        if dt <= 0 or done <= 0:
            return None, None
        rate = done / dt
        total = progress.total
        eta = max(0.0, (float(total) - samples[-1][1]) / rate) if total else None
        return rate, eta


def outcome_text(snap: TaskSnapshot, limit: int = OUTCOME_CHARS) -> str:
    """How the task ended (or why it retries), one line; empty while it runs.

    ``result: 42``, ``ValueError: bad input``, ``cancelled at 40/100``,
    ``revoked: …``, ``retrying after OSError: …``.
    """
    state = snap.state
    error = snap.error or {}
    if state is TaskState.SUCCEEDED:
        return "result: " + show(snap.result, max(1, limit - 8))
    if state is TaskState.FAILED:
        kind = error.get("type") or "error"
        message = error.get("message") or ""
        return cut(f"{kind}: {message}" if message else str(kind), limit)
    if state in (TaskState.CANCELLED, TaskState.REVOKED):
        text = "cancelled" if state is TaskState.CANCELLED else "revoked"
        progress = snap.progress
        if progress is not None and progress.current is not None:
            text += f" at {_num(progress.current)}"
            if progress.total:
                text += f"/{_num(progress.total)}"
        if error.get("message"):
            text += f": {error['message']}"
        return cut(text, limit)
    if state is TaskState.RETRY and error:
        return cut(f"retrying after {error.get('type') or 'an error'}: "
                   f"{error.get('message') or ''}", limit)
    return ""
