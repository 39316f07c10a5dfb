"""What the worker's parts share: the tasks it holds and the handles of its loop.

One :class:`WorkerState` per worker, owned by its loop's one thread (no locks). The parts
(:class:`~.relay.Relay`, :class:`~.control.ControlRouter`, :class:`~.outcomes.Outcomes`,
:class:`~.canvas.Workflows`) read and update it and call each other by name; none of them
holds the :class:`~.main.Worker`.
"""

from __future__ import annotations

import collections
import os
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from interactive_tasks.protocol import TaskState

from .records import HeldControl, Subscriber, TaskRecord

if TYPE_CHECKING:
    from kombu import Producer
    from kombu.asynchronous import Hub

    from interactive_tasks.app import App

    from .autoscale import Autoscaler
    from .pools.base import Pool, PoolSlot


@dataclass(eq=False)
class WorkerState:
    """The worker's shared state (see the module doc)."""

    app: App
    hostname: str
    pool: Pool
    concurrency: int
    queue_names: list[str]
    #: ``--autoscale``: the pool's size follows the work between its MIN and MAX
    autoscaler: Autoscaler | None = None
    #: the pool's slots, by index (a dead slot is replaced in place)
    slots: list[PoolSlot] = field(default_factory=list)
    #: tasks held here, not final yet, by id
    records: dict[str, TaskRecord] = field(default_factory=dict)
    #: the last finished tasks, oldest first (for late attach and locate)
    finished: collections.OrderedDict[str, TaskRecord] = field(
        default_factory=collections.OrderedDict)
    #: accepted, waiting for a free slot, in order
    ready: collections.deque[TaskRecord] = field(default_factory=collections.deque)
    #: task verbs for tasks not here (yet), by task id
    held: dict[str, list[HeldControl]] = field(default_factory=dict)
    #: watchers of tasks not here (yet), by task id and inbox
    held_subscribers: dict[str, dict[str, Subscriber]] = field(default_factory=dict)
    #: revoked task ids -> [expires (epoch), token | None, signed]
    revoked: dict[str, list[Any]] = field(default_factory=dict)
    #: the loop while connected, else None
    hub: Hub | None = None
    #: the kombu producer of the worker's connection while connected, else None
    producer: Producer | None = None
    #: tasks finished here since the start
    processed: int = 0
    started_at: float = field(default_factory=time.time)

    def stats(self) -> dict[str, Any]:
        """The worker's figures: for ``itask inspect stats`` and its heartbeats."""
        w = self
        children = []
        for slot in w.slots:
            record = w.records.get(slot.task_id) if slot.task_id else None
            kind = "idle"
            if slot.hard_paused:
                kind = "stopped"
            elif record is not None:
                kind = "paused" if record.state is TaskState.PAUSED else "busy"
            children.append({"pid": slot.pid, "state": kind, "task_id": slot.task_id,
                             "task": record.name if record else None})
        return {
            "worker": w.hostname, "hostname": socket.gethostname(), "pid": os.getpid(),
            "pool": w.pool.name, "concurrency": w.concurrency, "children": children,
            "processed": w.processed,
            "active": sum(1 for r in w.records.values() if r.slot is not None),
            "reserved": len(w.ready), "uptime": time.time() - w.started_at,
            "broker": w.app.broker_url_display, "queues": w.queue_names,
            "online": True, "rss_kb": _rss_kb(),
            **({"autoscaler": w.autoscaler.info(len(w.slots))} if w.autoscaler else {}),
        }


def _rss_kb() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None
