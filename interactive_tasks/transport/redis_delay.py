"""Delayed delivery on Redis: countdown / eta tasks wait in the broker, not in a worker.

A task whose ``eta`` is ahead is added to the sorted set ``<ns>.delayed`` instead of its
queue: the member is the list it is due on, the task id and the message in kombu's
envelope, NUL-separated (unique: the envelope carries a fresh delivery tag); the score is
its ``eta`` (epoch seconds). ``<ns>.delayed.ids`` maps the task id to its member, so a
revoke takes the task out at once (:meth:`DelayedTasks.unschedule`). Every worker runs
:data:`DUE_SCRIPT` a few times a second: in one atomic step it moves the members that are
due onto their lists and rings their queues' bells, so two workers never move one task
twice and a task waits in exactly one place at a time.

So a delayed task survives the death of every worker, costs an idle worker no memory, and
``itask inspect scheduled`` can list it. It starts within :data:`.upkeep.DUE_INTERVAL` of its
``eta`` plus the usual fetch (a message fetched a fraction of a second early is held by
the worker until its ``eta``).
"""

from __future__ import annotations

import time
from typing import Any

from .frames import describe_envelope
from .redis_fetch import BELL_EXPIRES_MS, BELL_KEEP, BELL_SUFFIX
from .redis_liveness import PRIORITY_SEP
from .upkeep import ScheduledTask

#: tasks moved by one run of the script at most (the next run takes the rest)
DUE_BATCH = 500

# KEYS: [1] the delayed set, [2] its id index. ARGV: [1] now (epoch s), [2] batch,
# [3] priority separator, [4] bell suffix, [5] bells kept, [6] bell expiry (ms).
# Returns the number moved.
DUE_SCRIPT = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, member in ipairs(due) do
  local cut = string.find(member, '\\0', 1, true)
  local cut2 = cut and string.find(member, '\\0', cut + 1, true)
  if cut2 then
    local list = string.sub(member, 1, cut - 1)
    local id = string.sub(member, cut + 1, cut2 - 1)
    if redis.call('HGET', KEYS[2], id) == member then redis.call('HDEL', KEYS[2], id) end
    redis.call('LPUSH', list, string.sub(member, cut2 + 1))
    local queue = list
    local sep = string.find(list, ARGV[3], 1, true)
    if sep then queue = string.sub(list, 1, sep - 1) end
    local bell = queue .. ARGV[4]
    redis.call('LPUSH', bell, '1')
    redis.call('LTRIM', bell, 0, tonumber(ARGV[5]) - 1)
    redis.call('PEXPIRE', bell, tonumber(ARGV[6]))
  end
  redis.call('ZREM', KEYS[1], member)
end
return #due
"""


# KEYS: [1] the delayed set, [2] its id index. ARGV: [1] task id.
# Returns the member taken out, or false.
UNSCHEDULE_SCRIPT = """
local member = redis.call('HGET', KEYS[2], ARGV[1])
if not member then return false end
redis.call('HDEL', KEYS[2], ARGV[1])
if redis.call('ZREM', KEYS[1], member) == 0 then return false end
return member
"""


def delayed_key(namespace: str) -> str:
    """The sorted set of tasks waiting for their ``eta``."""
    return f"{namespace}.delayed"


def delayed_ids_key(namespace: str) -> str:
    """Task id -> its member of the delayed set."""
    return f"{namespace}.delayed.ids"


def _member(list_key: str, task_id: str, envelope: bytes) -> bytes:
    return list_key.encode() + b"\x00" + task_id.encode() + b"\x00" + envelope


def _split(member: bytes) -> tuple[str, str, bytes]:
    """(list key, task id, envelope) of a member."""
    list_key, _, rest = member.partition(b"\x00")
    task_id, _, envelope = rest.partition(b"\x00")
    return list_key.decode(errors="replace"), task_id.decode(errors="replace"), envelope


class DelayedTasks:
    """A worker's (or a tool's) view of ``<ns>.delayed``; ``client`` is redis-py's.

    Every method raises the client's connection errors.
    """

    def __init__(self, client: Any, namespace: str) -> None:
        self.client = client
        self.key = delayed_key(namespace)
        self.ids_key = delayed_ids_key(namespace)
        self._script = client.register_script(DUE_SCRIPT)
        self._unschedule = client.register_script(UNSCHEDULE_SCRIPT)

    def schedule(self, list_key: str, task_id: str, envelope: bytes, eta: float) -> None:
        """Keep ``envelope`` until ``eta``, then push it on ``list_key``."""
        member = _member(list_key, task_id, envelope)
        pipe = self.client.pipeline(transaction=True)
        pipe.zadd(self.key, {member: float(eta)})
        pipe.hset(self.ids_key, task_id, member)
        pipe.execute()

    def find(self, task_id: str) -> bytes | None:
        """The envelope of ``task_id`` if it waits here."""
        member = self.client.hget(self.ids_key, task_id)
        return _split(bytes(member))[2] if member else None

    def unschedule(self, task_id: str) -> bytes | None:
        """Take ``task_id`` out (a revoke); its envelope, or None when it is not here
        (never scheduled, already moved to its queue, or taken by another worker)."""
        member = self._unschedule(keys=[self.key, self.ids_key], args=[task_id])
        return _split(bytes(member))[2] if member else None

    def move_due(self, now: float | None = None) -> int:
        """Move every task due by ``now`` (default: this clock) onto its queue."""
        moved = 0
        when = time.time() if now is None else now
        while True:
            batch = int(self._script(keys=[self.key, self.ids_key], args=self._due_args(when)))
            moved += batch
            if batch < DUE_BATCH:
                return moved

    def move_due_command(self, now: float | None = None) -> tuple[Any, ...]:
        """The ``EVALSHA`` of one batch of :meth:`move_due`, to send without waiting (the
        worker's loop); its reply is the number moved (:data:`DUE_BATCH`: send again).
        ``NOSCRIPT`` in reply: :meth:`load`."""
        when = time.time() if now is None else now
        return ("EVALSHA", self._script.sha, 2, self.key, self.ids_key,
                *self._due_args(when))

    @staticmethod
    def _due_args(when: float) -> list[Any]:
        return [repr(when), DUE_BATCH, PRIORITY_SEP, BELL_SUFFIX, BELL_KEEP, BELL_EXPIRES_MS]

    def load(self) -> None:
        """Load the scripts into Redis (after a restart emptied its script cache)."""
        self.client.script_load(DUE_SCRIPT)

    def listing(self, limit: int = 100) -> list[ScheduledTask]:
        """The first ``limit`` scheduled tasks, soonest first."""
        out = []
        for member, score in self.client.zrange(self.key, 0, limit - 1, withscores=True):
            list_key, _, raw = _split(bytes(member))
            queue = list_key.split(PRIORITY_SEP, 1)[0]
            task_id, name = describe_envelope(raw)
            out.append(ScheduledTask(task_id, name, queue, float(score)))
        return out
