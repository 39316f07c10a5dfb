"""Volume: many tasks, many clients, nothing lost, nothing run twice, nothing left behind."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest

from .conftest import ROOT

CLIENT = """
import sys, tests.apps.tasks as t
prefix, count = sys.argv[1], int(sys.argv[2])
handles = [t.mark.delay(f"{prefix}-{i}") for i in range(count)]
results = [h.result(timeout=600) for h in handles]
assert results == [f"{prefix}-{i}" for i in range(count)], "results out of place"
print("ok", len(results))
"""


@pytest.mark.slow
@pytest.mark.parametrize("broker", ["embedded"], indirect=True)
def test_ten_thousand_tasks_from_four_clients_exactly_once(tasks, start_worker, broker):
    start_worker(concurrency=2)
    clients = [subprocess.Popen([sys.executable, "-c", CLIENT, f"c{n}", "2500"],
                                env=broker.env(), cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for n in range(4)]
    try:
        for proc in clients:
            out, err = proc.communicate(timeout=900)
            assert proc.returncode == 0, err[-2000:]
            assert out.strip() == "ok 2500"
    finally:  # a failed or timed-out run leaves no client behind
        for proc in clients:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    runs = Counter()
    for path in broker.record_dir.glob("runs-*.txt"):
        runs.update(path.read_text().split())
    expected = {f"c{n}-{i}" for n in range(4) for i in range(2500)}
    assert set(runs) == expected
    assert [k for k, v in runs.items() if v != 1] == []


@pytest.mark.slow
@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_no_key_per_task_after_ten_thousand_interactive_tasks(tasks, start_worker, broker):
    import redis

    start_worker(concurrency=2)
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    ns = broker.namespace
    handles = [tasks.tiny.start(i) for i in range(10_000)]
    assert sum(h.result(timeout=600) for h in handles) == sum(range(10_000))
    tasks.app.close()  # the client deletes its inbox on close
    keys = sorted(k.decode() for k in client.scan_iter(f"{ns}*"))
    # a fixed set, whatever the number of tasks: the task queue may be gone (empty),
    # the worker's control queue, one result hash per hour, the live workers' heartbeats
    allowed_prefixes = (f"{ns}.tasks.", f"{ns}.ctl.", f"{ns}.results.")
    assert [k for k in keys if not k.startswith(allowed_prefixes)
            and k != f"{ns}.workers"] == []
    assert len(keys) <= 5, keys
