"""A stream of messages into one running task: ``handle.send(data, wait=False)`` as fast
as one client thread can call it → ``self.receive()`` in a pool child (itask only).

The task checks that every message came, in order. ``send_per_s`` is the client's rate
(it returns once the message is published); ``delivered_per_s`` runs from the first
``send`` to the task receiving the last message, so it counts the whole path.
"""

from __future__ import annotations

import time
from typing import Any

from ..systems import System
from .common import size, wait_itask_started


def stream_in(system: System, quick: bool) -> dict[str, Any]:
    n = size(quick, 50_000, 2_000)
    if system.name != "itask":
        raise NotImplementedError(system.name)
    with system.worker():
        handle = system.bench.stream_sink.start(n)
        wait_itask_started(handle)
        send = handle.send
        start = time.time()
        t0 = time.perf_counter()
        for i in range(n):
            send({"i": i}, wait=False)
        sent = time.perf_counter() - t0
        out = handle.result(120)
    if out["received"] != n or not out["in_order"]:
        raise RuntimeError(f"task received {out['received']} of {n} messages, "
                           f"in order: {out['in_order']}")
    return {"delivered_per_s": n / (out["last"] - start), "send_per_s": n / sent,
            "messages": n}
