"""Delayed delivery on the embedded broker: a ``scheduled/`` directory beside the queues.

A task whose ``eta`` is ahead is written (atomically: a temp file renamed into place) to
``<root>/scheduled/<eta in ns>-<stem>-<task id>.msg`` with its queue and its message in
kombu's form; names sort by ``eta``, and a revoke finds a task by its id. Any process that
moves due tasks (every worker, a few times a second) claims a due file by renaming it into
``scheduled/.moving/`` under a name that records the claimer's pid and start time,
publishes its message to the queue, then removes it. A claimer that dies in between leaves
its claim to be returned by the next sweep (the same lease-of-a-dead-owner rule the queues
use), so a scheduled task is never lost; a claimer killed between publishing and removing
would publish it a second time — a window of one ``unlink``. With the store's
``fsync`` on, a scheduled file and the removal of a moved one reach the disk before the
call returns (the publish itself is the store's).
"""

from __future__ import annotations

import contextlib
import json
import os
import time

from .embedded_files import (
    current_owner,
    fsync_dir,
    mkdirs,
    new_stem,
    owner_alive,
    parse_owner,
    safe_name,
    write_atomic,
)
from .embedded_store import Store
from .frames import describe_envelope
from .upkeep import ScheduledTask

SCHEDULED = "scheduled"
MOVING = ".moving"
TMP = ".tmp"
SUFFIX = ".msg"


class EmbeddedDelayed:
    """The scheduled directory of the embedded broker rooted at ``store.root``.

    Methods raise ``OSError`` when the directory cannot be written or read.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.path = os.path.join(store.root, SCHEDULED)
        self._ready = False

    def _ensure(self) -> None:
        if not self._ready:
            self.store.ensure()
            for sub in (self.path, os.path.join(self.path, MOVING),
                        os.path.join(self.path, TMP)):
                mkdirs(sub)
            if self.store.fsync:  # scheduled/ and .moving/ themselves
                fsync_dir(self.store.root)
                fsync_dir(self.path)
            self._ready = True

    def schedule(self, queue: str, task_id: str, message: bytes, eta: float) -> None:
        """Keep ``message`` (kombu's JSON form) until ``eta``, then put it on ``queue``."""
        self._ensure()
        name = f"{int(eta * 1e9):020d}-{new_stem()}-{safe_name(task_id)}{SUFFIX}"
        data = json.dumps({"queue": queue, "eta": eta, "message": message.decode()}).encode()
        write_atomic(self.path, name, data, os.path.join(self.path, TMP),
                     fsync=self.store.fsync)

    def _due_names(self, now: float) -> list[str]:
        limit = f"{int(now * 1e9):020d}"
        return [n for n in sorted(os.listdir(self.path))
                if n.endswith(SUFFIX) and n[0] != "." and n[:20] <= limit]

    def move_due(self, now: float | None = None) -> int:
        """Put every task due by ``now`` on its queue; returns how many this call moved."""
        self._ensure()
        self._return_dead_claims()
        moved = 0
        owner = current_owner()
        for name in self._due_names(time.time() if now is None else now):
            claimed = os.path.join(self.path, MOVING, f"{name}~{owner}")
            try:
                os.rename(os.path.join(self.path, name), claimed)
            except FileNotFoundError:
                continue  # another process claimed it first
            with open(claimed, "rb") as fh:
                entry = json.loads(fh.read())
            self.store.put(entry["queue"], entry["message"].encode())
            os.unlink(claimed)
            if self.store.fsync:  # a claim back after a power cut would publish it twice
                fsync_dir(os.path.dirname(claimed))
            moved += 1
        return moved

    def _named(self, task_id: str) -> str | None:
        tail = f"-{safe_name(task_id)}{SUFFIX}"
        for name in os.listdir(self.path):
            if name.endswith(tail) and name[0] != ".":
                return name
        return None

    def find(self, task_id: str) -> bytes | None:
        """The message of ``task_id`` if it waits here."""
        self._ensure()
        name = self._named(task_id)
        if name is None:
            return None
        try:
            return _message_in(os.path.join(self.path, name))
        except FileNotFoundError:
            return None

    def unschedule(self, task_id: str) -> bytes | None:
        """Take ``task_id`` out (a revoke); its message, or None if it was not here."""
        self._ensure()
        name = self._named(task_id)
        if name is None:
            return None
        claimed = os.path.join(self.path, MOVING, f"{name}~{current_owner()}")
        try:
            os.rename(os.path.join(self.path, name), claimed)
        except FileNotFoundError:
            return None  # moved or taken out by another process meanwhile
        message = _message_in(claimed)
        os.unlink(claimed)
        if self.store.fsync:  # a revoked task back after a power cut would run
            fsync_dir(os.path.dirname(claimed))
        return message

    def _return_dead_claims(self) -> None:
        moving = os.path.join(self.path, MOVING)
        for claim in os.listdir(moving):
            parsed = parse_owner(claim)
            if parsed is None:
                continue
            name, pid, start = parsed
            if not owner_alive(pid, start):
                with contextlib.suppress(FileNotFoundError):
                    os.rename(os.path.join(moving, claim), os.path.join(self.path, name))

    def listing(self, limit: int = 100) -> list[ScheduledTask]:
        """The first ``limit`` scheduled tasks, soonest first."""
        self._ensure()
        out = []
        for name in sorted(os.listdir(self.path)):
            if not name.endswith(SUFFIX) or name[0] == ".":
                continue
            try:
                with open(os.path.join(self.path, name), "rb") as fh:
                    entry = json.loads(fh.read())
            except (OSError, ValueError):
                continue
            task_id, task_name = describe_envelope(entry["message"].encode())
            out.append(ScheduledTask(task_id, task_name, entry["queue"], float(entry["eta"])))
            if len(out) >= limit:
                break
        return out


def _message_in(path: str) -> bytes:
    """The kombu message a scheduled file holds; raises OSError and ValueError."""
    with open(path, "rb") as fh:
        return str(json.loads(fh.read())["message"]).encode()
