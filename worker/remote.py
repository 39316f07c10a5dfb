"""Worker-wide remote control: Celery's ``rate_limit``, ``time_limit``, ``add_consumer``,
``cancel_consumer`` and ``shutdown``, and the inspect replies ``reserved``, ``revoked``
and ``query_task``.

A change here alters the worker for every task it runs, so it is applied only from a
message signed with the operator secret (a task's capability token does not reach that
far); everything else is refused with a reply that says so. Changes last for the life of
the worker process, as in Celery: a restarted worker starts from its app and flags again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from interactive_tasks.protocol import Verb
from interactive_tasks.task import parse_rate

if TYPE_CHECKING:
    from interactive_tasks.transport.worker_side import WorkerIntake

    from .state import WorkerState

logger = logging.getLogger("interactive_tasks.worker")

NEEDS_SECRET = ("{verb} changes the whole worker: it needs the operator secret "
                "(ITASK_SECRET or the secret setting, the same on the worker and the sender)")


class ControlRefused(Exception):
    """A worker-wide request that cannot be applied; its message goes back to the sender."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _count(value: Any, label: str, default: int | None = None, least: int = 1) -> int:
    """A whole number of slots from a control message (``default`` when absent)."""
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ControlRefused("ControlError", f"{label} must be a whole number of at least "
                                             f"{least}, not {value!r}")
    return value


class WorkerControl:
    """Applies worker-wide requests; one per worker.

    ``buckets`` is the worker's rate-limit buckets by task name (dropped here so the next
    dispatch rebuilds one from the task's new ``rate_limit``), ``intake`` its task intake,
    ``begin_shutdown`` starts a warm shutdown as SIGTERM does, ``rates_changed`` lets the
    worker start what an old rate limit held back, ``default_limits`` gives the worker's
    (soft, hard) limits for tasks that set none (``--soft-time-limit``, ``--time-limit``),
    ``resize_pool(verb, n, minimum)`` applies ``pool_grow`` / ``pool_shrink`` /
    ``autoscale`` and returns what it did (or raises ControlRefused).
    """

    def __init__(self, state: WorkerState, buckets: dict[str, Any], intake: WorkerIntake,
                 begin_shutdown: Callable[[str], None],
                 rates_changed: Callable[[], None],
                 default_limits: Callable[[], tuple[float | None, float | None]],
                 resize_pool: Callable[[str, int, int | None], str] | None = None) -> None:
        self.resize_pool = resize_pool
        self.state = state
        self.buckets = buckets
        self.intake = intake
        self.begin_shutdown = begin_shutdown
        self.rates_changed = rates_changed
        self.default_limits = default_limits

    def apply(self, verb: str, data: Any, signed: bool) -> str:
        """Apply ``verb`` with its ``data`` map; returns what was done, in one line.

        Raises :class:`ControlRefused` for an unsigned request, a bad argument or an
        unknown task name.
        """
        if not signed:
            raise ControlRefused("NotAuthorized", NEEDS_SECRET.format(verb=verb))
        args = data if isinstance(data, dict) else {}
        if verb == Verb.RATE_LIMIT:
            return self.rate_limit(args.get("task_name"), args.get("rate_limit"))
        if verb == Verb.TIME_LIMIT:
            return self.time_limit(args.get("task_name"), args.get("soft"), args.get("hard"))
        if verb == Verb.ADD_CONSUMER:
            return self.add_consumer(args.get("queue"))
        if verb == Verb.CANCEL_CONSUMER:
            return self.cancel_consumer(args.get("queue"))
        if verb == Verb.SHUTDOWN:
            self.begin_shutdown("remote control shutdown")
            return "warm shutdown started"
        if verb in (Verb.POOL_GROW, Verb.POOL_SHRINK, Verb.AUTOSCALE) and self.resize_pool:
            if verb == Verb.AUTOSCALE:
                high = _count(args.get("max"), "max")
                low = None if args.get("min") is None else _count(args["min"], "min", least=0)
                if low is not None and low > high:
                    high, low = low, high  # either order, as Celery
                return self.resize_pool(verb, high, low)
            return self.resize_pool(verb, _count(args.get("n"), "n", 1), None)
        raise ControlRefused("ControlError", f"unknown worker control {verb!r}")

    def _task(self, name: Any) -> Any:
        if not isinstance(name, str) or not name:
            raise ControlRefused("ControlError", "a task name is required")
        task = self.state.app.tasks.get(name)
        if task is None:
            raise ControlRefused("UnknownTask", f"no task named {name!r} is registered on "
                                                f"{self.state.hostname}")
        return task

    def rate_limit(self, name: Any, rate: Any) -> str:
        task = self._task(name)
        if rate in (None, "", 0, "0"):
            rate = None
        else:
            try:
                parse_rate(str(rate))
            except ValueError as exc:
                raise ControlRefused("ControlError", str(exc)) from None
            rate = str(rate)
        task.rate_limit = rate
        self.buckets.pop(task.name, None)
        logger.info("rate limit of %s set to %s by remote control", task.name,
                    rate or "none")
        self.rates_changed()
        return f"rate limit of {task.name} set to {rate or 'none'}"

    def time_limit(self, name: Any, soft: Any, hard: Any) -> str:
        task = self._task(name)
        limits = {}
        for label, value in (("soft", soft), ("hard", hard)):
            if value is not None and (isinstance(value, bool) or
                                      not isinstance(value, (int, float)) or value <= 0):
                raise ControlRefused("ControlError", f"{label} time limit must be a positive "
                                                     f"number of seconds, not {value!r}")
            limits[label] = None if value is None else float(value)
        task.soft_time_limit, task.time_limit = limits["soft"], limits["hard"]
        # Tasks accepted but not started yet take the new limits too (None: the worker's
        # own default, as for a task accepted from now on).
        default_soft, default_hard = self.default_limits()
        for record in self.state.ready:
            if record.name == task.name:
                record.soft_time_limit = default_soft if limits["soft"] is None \
                    else limits["soft"]
                record.time_limit = default_hard if limits["hard"] is None else limits["hard"]
        logger.info("time limits of %s set to soft=%s hard=%s by remote control", task.name,
                    limits["soft"], limits["hard"])
        return (f"time limits of {task.name} set to soft={limits['soft']} "
                f"hard={limits['hard']}")

    def _queue(self, queue: Any) -> str:
        if not isinstance(queue, str) or not queue or len(queue) > 200:
            raise ControlRefused("ControlError", f"bad queue name {queue!r}")
        return queue

    def add_consumer(self, queue: Any) -> str:
        name = self._queue(queue)
        names = self.state.queue_names
        if name in names:
            return f"already consuming from {name}"
        from interactive_tasks.transport.worker_side import QueueRefused

        try:
            self.intake.add_queue(name)
        except QueueRefused as exc:
            raise ControlRefused("QueueRefused", str(exc)) from exc
        names.append(name)  # in place: the next connection consumes it too
        logger.info("consuming from queue %s (remote control)", name)
        return f"now consuming from {name}"

    def cancel_consumer(self, queue: Any) -> str:
        name = self._queue(queue)
        names = self.state.queue_names
        if name not in names:
            raise ControlRefused("ControlError", f"{self.state.hostname} does not consume "
                                                 f"from {name}")
        if len(names) == 1:
            raise ControlRefused("ControlError", f"{name} is the last queue of "
                                                 f"{self.state.hostname}; use shutdown")
        self.intake.cancel_queue(name)
        names.remove(name)
        logger.info("no longer consuming from queue %s (remote control)", name)
        return f"no longer consuming from {name}"

    # -- inspect ----------
    def reserved(self) -> list[dict[str, Any]]:
        """Tasks taken from the broker that have not started (Celery's reserved)."""
        s = self.state
        return [r.summary() for r in s.records.values() if r.slot is None and not r.is_final]

    def revoked(self) -> list[str]:
        """The revoked ids this worker refuses (until each expires)."""
        now = time.time()
        return sorted(i for i, entry in self.state.revoked.items() if entry[0] >= now)

    def query_task(self, ids: Any) -> dict[str, Any]:
        """The tasks among ``ids`` held here or finished lately, by id."""
        s = self.state
        found: dict[str, Any] = {}
        for task_id in ids if isinstance(ids, list) else ():
            if not isinstance(task_id, str):
                continue
            record = s.records.get(task_id) or s.finished.get(task_id)
            if record is not None:
                # the digest (never the token) lets a holder of the operator secret, such
                # as itask web, check a token a user presents for this task
                found[task_id] = {**record.summary(),
                                  "token_digest": record.message.token_digest}
        return found
