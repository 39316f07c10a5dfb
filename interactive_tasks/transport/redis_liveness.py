"""Worker liveness on Redis: a dead worker's tasks go back to their queues in seconds.

kombu keeps the messages a consumer holds in one unacked hash and brings them back only
after ``visibility_timeout`` (an hour by default) — so a worker killed mid-task strands its
task for an hour, and a task that outlives the timeout on a *live* worker runs twice.

Here each worker process keeps its messages in unacked keys of its own
(``<ns>.unacked.<incarnation>`` and ``<ns>.unacked_index.<incarnation>``, in kombu's format,
so kombu's ack and reject work unchanged; an *incarnation* is the worker's name plus a
random suffix per start, so a worker restarted under the same ``-n`` name does not adopt —
and strand — the keys of the process it replaces) and writes a heartbeat into the hash
``<ns>.workers`` (incarnation -> the server's time of its last beat, in ms) every
``worker_heartbeat`` seconds. With the same script every live worker looks at the others:
a worker silent for ``worker_lost_timeout`` seconds is dead, and its unacknowledged
messages are pushed back onto the lists they came from (a message's priority picks the list
as kombu's restore does), marked redelivered, their queues' bells rung, its keys and its
entry removed — all in one atomic script, so two live workers never restore one message
twice. Nothing depends on how long a task runs: no visibility timeout to tune.

The script runs on the Redis server's clock, so workers' clocks may disagree.

A worker that was declared dead while it was in fact alive (frozen, cut off from Redis for
longer than the timeout) learns it at its next beat: :meth:`WorkerLiveness.beat` returns
``False`` and the worker treats its running tasks as possibly delivered elsewhere.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from .redis_fetch import BELL_EXPIRES_MS, BELL_KEEP, BELL_SUFFIX

logger = logging.getLogger("interactive_tasks.worker")

#: kombu's Redis priority layout: a message of priority p (0-9, clamped) lives in the list
#: ``queue`` when the largest step <= p is 0, else ``queue + SEP + str(step)``.
PRIORITY_STEPS = (0, 3, 6, 9)
PRIORITY_SEP = "\x06\x16"

# A Lua function shared by the scripts below: push one entry of an unacked hash (kombu's
# format) back onto the list it came from (a message's priority picks the list, as kombu's
# restore does) and ring its queue's bell. Returns false for an entry it cannot read.
RESTORE_FUNCTION = """
local function restore(value, sep, steps, bell_suffix, bells_kept, bell_expiry)
  local ok, v = pcall(cjson.decode, value)
  if not (ok and type(v) == 'table' and type(v[1]) == 'table' and type(v[3]) == 'string') then
    return false
  end
  -- the stored value is '[' .. raw .. ',' .. exchange .. ',' .. routing key .. ']': cut
  -- the raw message out as it was, byte for byte
  local suffix = ',' .. cjson.encode(v[2]) .. ',' .. cjson.encode(v[3]) .. ']'
  local raw
  if string.sub(value, -#suffix) == suffix then
    raw = string.sub(value, 2, #value - #suffix)
  else
    raw = cjson.encode(v[1])
  end
  local priority = 0
  if type(v[1]['properties']) == 'table' then
    priority = tonumber(v[1]['properties']['priority']) or 0
  end
  priority = math.max(0, math.min(9, priority))
  local step = 0
  for k = 1, #steps do
    if steps[k] <= priority then step = steps[k] end
  end
  local queue = v[3]
  local list = queue
  if step > 0 then list = queue .. sep .. step end
  redis.call('RPUSH', list, raw)
  local bell = queue .. bell_suffix
  redis.call('LPUSH', bell, '1')
  redis.call('LTRIM', bell, 0, bells_kept - 1)
  redis.call('PEXPIRE', bell, bell_expiry)
  return true
end
"""

# KEYS: [1] workers hash, [2] redelivered-tags hash
# ARGV: [1] this worker ('' to only look), [2] dead after (ms), [3] unacked hash prefix,
#       [4] unacked index prefix, [5] priority separator, [6] JSON priority steps,
#       [7] bell suffix, [8] bells kept, [9] bell expiry (ms)
# Returns {registered_before (0/1), dead worker, messages restored, dead worker, ...}.
LIVENESS_SCRIPT = RESTORE_FUNCTION + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me = ARGV[1]
local dead_after = tonumber(ARGV[2])
local steps = cjson.decode(ARGV[6])
local known = 0
if me ~= '' then
  known = redis.call('HEXISTS', KEYS[1], me)
  redis.call('HSET', KEYS[1], me, now)
end
local out = {known}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local name, beat = all[i], tonumber(all[i + 1]) or 0
  if name ~= me and now - beat > dead_after then
    local hash = ARGV[3] .. name
    local entries = redis.call('HGETALL', hash)
    local restored = 0
    for j = 1, #entries, 2 do
      if restore(entries[j + 1], ARGV[5], steps, ARGV[7], tonumber(ARGV[8]),
                 tonumber(ARGV[9])) then
        redis.call('HSET', KEYS[2], entries[j], 1)
        restored = restored + 1
      end
    end
    redis.call('DEL', hash, ARGV[4] .. name)
    redis.call('HDEL', KEYS[1], name)
    out[#out + 1] = name
    out[#out + 1] = restored
  end
end
return out
"""

# KEYS: [1] this worker's unacked hash, [2] its index
# ARGV: [1] priority separator, [2] JSON priority steps, [3] bell suffix, [4] bells kept,
#       [5] bell expiry (ms), [6 ...] the delivery tags the worker holds
# Returns how many entries it pushed back onto their lists.
STRAYS_SCRIPT = RESTORE_FUNCTION + """
local held = {}
for i = 6, #ARGV do held[ARGV[i]] = true end
local steps = cjson.decode(ARGV[2])
local entries = redis.call('HGETALL', KEYS[1])
local returned = 0
for j = 1, #entries, 2 do
  local tag = entries[j]
  if not held[tag] and restore(entries[j + 1], ARGV[1], steps, ARGV[3], tonumber(ARGV[4]),
                               tonumber(ARGV[5])) then
    redis.call('HDEL', KEYS[1], tag)
    redis.call('ZREM', KEYS[2], tag)
    returned = returned + 1
  end
end
return returned
"""

# KEYS: [1] workers hash, [2] this worker's unacked hash, [3] its index; ARGV: [1] this
# worker. Leaves the registry only when nothing is left unacknowledged (otherwise the entry
# goes stale and a live worker restores what is left, as for a dead worker).
LEAVE_SCRIPT = """
if redis.call('HLEN', KEYS[2]) > 0 then return 0 end
redis.call('DEL', KEYS[3])
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"""


def workers_key(namespace: str) -> str:
    """The hash of live workers and their last heartbeat (server time, ms)."""
    return f"{namespace}.workers"


def redelivered_key(namespace: str) -> str:
    """Delivery tags of messages restored from a dead worker (read once by the fetch)."""
    return f"{namespace}.redelivered"


def unacked_keys(namespace: str, incarnation: str) -> dict[str, str]:
    """kombu transport options that give one worker process unacked keys of its own."""
    return {
        "unacked_key": f"{namespace}.unacked.{incarnation}",
        "unacked_index_key": f"{namespace}.unacked_index.{incarnation}",
        "unacked_mutex_key": f"{namespace}.unacked_mutex.{incarnation}",
    }


def priority_list(queue: str, priority: int | None) -> str:
    """The Redis list that holds ``queue``'s messages of ``priority`` (kombu's layout)."""
    p = max(0, min(9, int(priority or 0)))
    step = max(s for s in PRIORITY_STEPS if s <= p)
    return f"{queue}{PRIORITY_SEP}{step}" if step else queue


def return_strays(client: Any, unacked_key: str, unacked_index_key: str,
                  held: list[str]) -> int:
    """Push back onto their lists the messages recorded in a worker's own unacked keys that
    the worker does not hold (``held``: the delivery tags it received and has not settled);
    returns how many.

    A fetch records its messages in the same script that pops them, so a fetch whose
    reply was lost with its connection (the primary crashed, a link broke) leaves messages
    that no process runs, and no other worker restores them while this one beats. Run on a
    fresh connection before the worker's first fetch on it, when none of its fetches is in
    flight. Raises the client's errors.
    """
    keys = [unacked_key, unacked_index_key]
    args = [PRIORITY_SEP, json.dumps(list(PRIORITY_STEPS)), BELL_SUFFIX, BELL_KEEP,
            BELL_EXPIRES_MS, *held]
    return int(client.register_script(STRAYS_SCRIPT)(keys=keys, args=args))


class WorkerLiveness:
    """A worker's heartbeat in Redis, and the restore of dead workers' tasks.

    ``client`` is a redis-py client; every method raises its connection errors.
    """

    def __init__(self, client: Any, namespace: str, incarnation: str,
                 lost_after: float) -> None:
        self.client = client
        self.namespace = namespace
        self.worker = incarnation
        self.lost_after_ms = int(lost_after * 1000)
        self._script = client.register_script(LIVENESS_SCRIPT)
        self._leave = client.register_script(LEAVE_SCRIPT)
        self._beaten = False

    def beat(self) -> tuple[bool, dict[str, int]]:
        """Record this worker alive and restore the tasks of dead ones.

        Returns (still registered, {dead worker: messages restored}). "Still registered"
        is False when another worker declared this one dead since its last beat.
        """
        return self.read_beat(self._run(self.worker))

    def beat_command(self) -> tuple[Any, ...]:
        """The ``EVALSHA`` of :meth:`beat`, to send without waiting (the worker's loop);
        give its reply to :meth:`read_beat`. ``NOSCRIPT`` in reply: :meth:`load`."""
        keys, args = self._keys_args(self.worker)
        return ("EVALSHA", self._script.sha, len(keys), *keys, *args)

    def read_beat(self, reply: list[Any]) -> tuple[bool, dict[str, int]]:
        """What :meth:`beat` returns, from the script's reply."""
        known = bool(reply[0]) or not self._beaten
        self._beaten = True
        return known, self._dead(reply)

    def load(self) -> None:
        """Load the script into Redis (after a restart emptied its script cache)."""
        self.client.script_load(LIVENESS_SCRIPT)

    def leave(self) -> bool:
        """Leave the registry (warm shutdown) if every message was settled."""
        keys = unacked_keys(self.namespace, self.worker)
        return bool(self._leave(keys=[workers_key(self.namespace), keys["unacked_key"],
                                      keys["unacked_index_key"]], args=[self.worker]))

    def _run(self, me: str) -> list[Any]:
        keys, args = self._keys_args(me)
        return self._script(keys=keys, args=args)

    def _keys_args(self, me: str) -> tuple[list[str], list[Any]]:
        ns = self.namespace
        return ([workers_key(ns), redelivered_key(ns)],
                [me, self.lost_after_ms, f"{ns}.unacked.", f"{ns}.unacked_index.",
                 PRIORITY_SEP, json.dumps(list(PRIORITY_STEPS)), BELL_SUFFIX, BELL_KEEP,
                 BELL_EXPIRES_MS])

    @staticmethod
    def _dead(reply: list[Any]) -> dict[str, int]:
        dead: dict[str, int] = {}
        for i in range(1, len(reply), 2):
            name = reply[i].decode() if isinstance(reply[i], bytes) else str(reply[i])
            dead[name] = int(reply[i + 1])
        return dead
