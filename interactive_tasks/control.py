"""Remote control of workers with Celery's names: ``app.control`` and ``app.control.inspect()``.

::

    app.control.rate_limit("proj.add", "10/m")
    app.control.time_limit("proj.crawl", soft=60, hard=120, destination=["w1@host"])
    app.control.add_consumer("io"); app.control.cancel_consumer("io")
    app.control.shutdown(destination=["w1@host"])
    app.control.pool_grow(2); app.control.pool_shrink(1); app.control.autoscale(10, 2)
    app.control.inspect().reserved()      # {"w1@host": [...], ...}

Each command goes to every worker, or only to those ``destination`` names, and returns
Celery's reply shape: one ``{worker: {"ok": "..."}}`` (or ``{"error": "..."}``) per
worker that answered within ``timeout``. The worker-wide changes need the operator secret
(``ITASK_SECRET``): without it they are refused here, before anything is sent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import NotAuthorized
from .protocol import ControlMessage, Verb
from .task import parse_rate

if TYPE_CHECKING:
    from .app import App

#: what ``inspect`` asks of each worker (``scheduled`` is read from the broker instead)
INSPECT_WHAT = ("active", "reserved", "revoked", "registered", "stats", "tasks",
                "query_task")


def _destination(destination: str | list[str] | None) -> list[str] | None:
    if destination is None:
        return None
    names = [destination] if isinstance(destination, str) else list(destination)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"destination must name workers, not {destination!r}")
    return names


def _slots(value: Any, label: str, least: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{label} must be a whole number of at least {least}, not {value!r}")
    return value


class Control:
    """Celery's ``app.control``: commands for every worker or the ``destination`` ones."""

    def __init__(self, app: App) -> None:
        self.app = app

    def broadcast(self, verb: str, data: dict[str, Any] | None = None, *,
                  destination: str | list[str] | None = None, timeout: float = 1.0,
                  reply: bool = True) -> list[dict[str, Any]]:
        """Send ``verb`` to the workers; the raw replies (``worker``, ``ok``, ``data`` or
        ``error``), or ``[]`` without waiting when ``reply`` is false.

        Raises ValueError for a bad ``destination`` and the client's transport errors.
        """
        names = _destination(destination)
        body = dict(data or {})
        if names is not None:
            body["destination"] = names
        message = ControlMessage(verb=verb, data=body)
        client = self.app.client
        if not reply:
            client.send_control(message, None)
            return []
        return client.request(message, None, timeout, many=True,
                              until=(lambda rs: len(rs) >= len(names)) if names else None)

    def _worker_wide(self, verb: str, data: dict[str, Any],
                     destination: str | list[str] | None, timeout: float,
                     reply: bool) -> list[dict[str, Any]]:
        if self.app.secret is None:
            raise NotAuthorized(f"{verb} changes whole workers: it needs the operator secret "
                                "(ITASK_SECRET or the secret setting, the same as the "
                                "workers')")
        replies = self.broadcast(verb, data, destination=destination, timeout=timeout,
                                 reply=reply)
        return [celery_reply(r) for r in replies]

    def rate_limit(self, task_name: str, rate_limit: str | None, *,
                   destination: str | list[str] | None = None, timeout: float = 1.0,
                   reply: bool = True) -> list[dict[str, Any]]:
        """Set ``task_name``'s rate limit on the workers (``"10/s"``, ``"100/m"``,
        ``"5/h"``; ``None`` or ``"0"``: none) until they restart.

        Raises ValueError for a bad rate, NotAuthorized without the operator secret.
        """
        if rate_limit not in (None, "", 0, "0"):
            parse_rate(str(rate_limit))
        return self._worker_wide(Verb.RATE_LIMIT, {"task_name": task_name,
                                                   "rate_limit": rate_limit},
                                 destination, timeout, reply)

    def time_limit(self, task_name: str, soft: float | None = None, hard: float | None = None,
                   *, destination: str | list[str] | None = None, timeout: float = 1.0,
                   reply: bool = True) -> list[dict[str, Any]]:
        """Set ``task_name``'s soft and hard time limits (seconds; ``None``: the worker's
        ``--soft-time-limit`` / ``--time-limit``, if any) for the tasks the workers have
        not started yet, until they restart.

        Raises ValueError for a limit that is not a positive number, NotAuthorized
        without the operator secret.
        """
        for label, value in (("soft", soft), ("hard", hard)):
            if value is not None and (isinstance(value, bool) or
                                      not isinstance(value, (int, float)) or value <= 0):
                raise ValueError(f"{label} time limit must be a positive number of seconds, "
                                 f"not {value!r}")
        return self._worker_wide(Verb.TIME_LIMIT, {"task_name": task_name, "soft": soft,
                                                   "hard": hard},
                                 destination, timeout, reply)

    def add_consumer(self, queue: str, *, destination: str | list[str] | None = None,
                     timeout: float = 1.0, reply: bool = True) -> list[dict[str, Any]]:
        """Make the workers take tasks from ``queue`` too (as ``-Q`` would have).

        Raises NotAuthorized without the operator secret.
        """
        return self._worker_wide(Verb.ADD_CONSUMER, {"queue": queue}, destination, timeout,
                                 reply)

    def cancel_consumer(self, queue: str, *, destination: str | list[str] | None = None,
                        timeout: float = 1.0, reply: bool = True) -> list[dict[str, Any]]:
        """Make the workers stop taking tasks from ``queue`` (the ones they hold still run;
        a worker refuses to drop its last queue).

        Raises NotAuthorized without the operator secret.
        """
        return self._worker_wide(Verb.CANCEL_CONSUMER, {"queue": queue}, destination,
                                 timeout, reply)

    def shutdown(self, *, destination: str | list[str] | None = None, timeout: float = 1.0,
                 reply: bool = True) -> list[dict[str, Any]]:
        """Warm shutdown of the workers, as SIGTERM: running tasks finish (up to the
        worker's ``--shutdown-timeout``), tasks not started go back to their queue.

        Raises NotAuthorized without the operator secret.
        """
        return self._worker_wide(Verb.SHUTDOWN, {}, destination, timeout, reply)

    def pool_grow(self, n: int = 1, *, destination: str | list[str] | None = None,
                  timeout: float = 1.0, reply: bool = True) -> list[dict[str, Any]]:
        """Start ``n`` more pool slots on the workers (not with ``--autoscale``: change its
        range with :meth:`autoscale`); they reserve for the new size from then on.

        Raises ValueError for ``n`` below 1, NotAuthorized without the operator secret.
        """
        return self._worker_wide(Verb.POOL_GROW, {"n": _slots(n, "n")}, destination,
                                 timeout, reply)

    def pool_shrink(self, n: int = 1, *, destination: str | list[str] | None = None,
                    timeout: float = 1.0, reply: bool = True) -> list[dict[str, Any]]:
        """Stop up to ``n`` idle pool slots on the workers (a busy one is never stopped,
        the last one stays; not with ``--autoscale``).

        Raises ValueError for ``n`` below 1, NotAuthorized without the operator secret.
        """
        return self._worker_wide(Verb.POOL_SHRINK, {"n": _slots(n, "n")}, destination,
                                 timeout, reply)

    def autoscale(self, max: int, min: int | None = None, *,  # Celery's argument names
                  destination: str | list[str] | None = None, timeout: float = 1.0,
                  reply: bool = True) -> list[dict[str, Any]]:
        """Change the ``--autoscale`` range of the workers started with it (``min``
        unchanged when None).

        Raises ValueError for a bad size, NotAuthorized without the operator secret.
        """
        data: dict[str, Any] = {"max": _slots(max, "max")}
        if min is not None:
            data["min"] = _slots(min, "min", least=0)
        return self._worker_wide(Verb.AUTOSCALE, data, destination, timeout, reply)

    def ping(self, *, destination: str | list[str] | None = None,
             timeout: float = 1.0) -> list[dict[str, Any]]:
        """``[{worker: {"ok": "pong"}}, ...]`` for the workers that answered."""
        return [{str(r.get("worker")): {"ok": "pong"}}
                for r in self.broadcast(Verb.PING, destination=destination, timeout=timeout)]

    def revoke(self, task_id: str | list[str], *, terminate: bool = False,
               tokens: dict[str, str] | None = None,
               timeout: float = 1.0) -> list[dict[str, Any]]:
        """:meth:`App.revoke` under Celery's name."""
        return self.app.revoke(task_id, terminate=terminate, tokens=tokens, timeout=timeout)

    def inspect(self, destination: str | list[str] | None = None,
                timeout: float = 1.0) -> Inspect:
        """Celery's ``app.control.inspect()``."""
        return Inspect(self, _destination(destination), timeout)


class Inspect:
    """Celery's inspect: each method returns ``{worker: its answer}`` for the workers
    that replied within the timeout (an empty dict when none did)."""

    def __init__(self, control: Control, destination: list[str] | None,
                 timeout: float) -> None:
        self.control = control
        self.destination = destination
        self.timeout = timeout

    def _ask(self, what: str, **extra: Any) -> dict[str, Any]:
        replies = self.control.broadcast(Verb.INSPECT, {"what": what, **extra},
                                         destination=self.destination, timeout=self.timeout)
        return {str(r.get("worker")): r.get("data") for r in replies if r.get("ok")}

    def active(self) -> dict[str, Any]:
        """Tasks running on each worker."""
        return self._ask("active")

    def reserved(self) -> dict[str, Any]:
        """Tasks each worker took from the broker and has not started yet."""
        return self._ask("reserved")

    def revoked(self) -> dict[str, Any]:
        """The revoked task ids each worker refuses."""
        return self._ask("revoked")

    def registered(self) -> dict[str, Any]:
        """The task names each worker knows."""
        return self._ask("registered")

    def stats(self) -> dict[str, Any]:
        """Each worker's pool, pids, counters and queues."""
        return self._ask("stats")

    def tasks(self) -> dict[str, Any]:
        """Each worker's held, running and recent tasks (``itask ls``)."""
        return self._ask("tasks")

    def query_task(self, *ids: str) -> dict[str, Any]:
        """``{worker: {task id: summary}}`` for the ``ids`` each worker holds or finished
        lately (ids given as one list work too)."""
        flat = [i for item in ids for i in ([item] if isinstance(item, str) else item)]
        return self._ask("query_task", ids=flat)

    def scheduled(self) -> list[Any]:
        """Tasks waiting in the broker for their eta (not per worker: the broker holds
        them, see :meth:`App.scheduled`)."""
        return list(self.control.app.scheduled())


def celery_reply(reply: dict[str, Any]) -> dict[str, Any]:
    """A worker's reply in Celery's shape: ``{worker: {"ok": text}}`` or
    ``{worker: {"error": text}}``."""
    worker = str(reply.get("worker"))
    if reply.get("ok"):
        data = reply.get("data")
        text = data.get("ok") if isinstance(data, dict) else None
        return {worker: {"ok": text or "ok"}}
    error = reply.get("error") or {}
    return {worker: {"error": error.get("message") or "refused",
                     "type": error.get("type") or "ControlError"}}
