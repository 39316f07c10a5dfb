"""``itask worker --autoscale MAX,MIN``: the pool grows under a backlog, shrinks when idle.

Celery's meaning: the pool starts with MIN slots; when more tasks are reserved here than
there are slots, it grows at once to cover them (up to MAX); slots the work no longer
needs are stopped (down to MIN) once ``keepalive`` seconds have passed since the pool
last grew, so a bursty queue does not make processes come and go. Only idle slots are
stopped. The worker reserves for MAX slots (``prefetch_multiplier × MAX``) from the
start, so a backlog is visible here to grow for.

:class:`Autoscaler` only decides; the worker gives it the numbers and does the growing
and shrinking (``grow(n)``, ``shrink(n)`` returning how many it stopped).
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: Celery's default (its ``AUTOSCALE_KEEPALIVE``)
DEFAULT_KEEPALIVE = 30.0


def parse_autoscale(text: str) -> tuple[int, int]:
    """``"MAX,MIN"`` (or ``"MAX"``: MIN 0, as Celery) → ``(max, min)``.

    Raises ValueError for anything else, or MIN above MAX, or MAX below 1.
    """
    parts = [p.strip() for p in text.split(",")]
    if not 1 <= len(parts) <= 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"expected MAX,MIN (whole numbers), not {text!r}")
    high = int(parts[0])
    low = int(parts[1]) if len(parts) == 2 else 0
    if high < 1:
        raise ValueError(f"MAX must be at least 1, not {high}")
    if low > high:
        # Celery accepts either order; so do we (``--autoscale 3,10`` means 10,3).
        high, low = low, high
    return high, low


class Autoscaler:
    """Decides how many slots the pool should have (see the module doc)."""

    def __init__(self, maximum: int, minimum: int, *, keepalive: float = DEFAULT_KEEPALIVE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max = maximum
        self.min = minimum
        self.keepalive = keepalive
        self.clock = clock
        self.last_grown = clock()

    def grow_by(self, size: int, demand: int) -> int:
        """How many slots to add now, for ``demand`` tasks (running + waiting for a slot)
        on a pool of ``size`` slots (those starting included)."""
        wanted = min(self.max, demand)
        if wanted > size:
            self.last_grown = self.clock()
            return wanted - size
        return 0

    def shrink_by(self, size: int, demand: int) -> int:
        """How many slots to stop now: those beyond ``max(MIN, demand)`` (and beyond MAX,
        which remote control may have lowered), once the pool has not grown for
        ``keepalive`` seconds."""
        if self.clock() - self.last_grown < self.keepalive:
            return 0
        return max(0, size - min(self.max, max(self.min, demand)))

    def info(self, size: int) -> dict[str, int | float]:
        """For ``inspect stats`` (Celery's ``autoscaler`` entry)."""
        return {"max": self.max, "min": self.min, "current": size,
                "keepalive": self.keepalive}
