"""Monitoring stream: task events (-E) and worker heartbeats, online and offline."""

from __future__ import annotations

import pytest

from interactive_tasks.monitor import EventReceiver

from .conftest import wait_for


@pytest.mark.parametrize("broker", ["redis", "embedded"], indirect=True)
def test_task_events_and_worker_heartbeats(tasks, start_worker):
    seen: list[dict] = []
    with EventReceiver(tasks.app, seen.append):
        w = start_worker(extra_args=["-E"])
        wait_for(lambda: any(e["type"] == "worker-heartbeat" for e in seen), 15,
                 message="a heartbeat")
        beat = next(e for e in seen if e["type"] == "worker-heartbeat")
        assert beat["worker"] == w.name and beat["stats"]["pool"] == "prefork"

        ok = tasks.add.delay(1, 2)
        bad = tasks.fail.delay("x")
        assert ok.result(timeout=20) == 3

        def types_of(task_id):
            return [e["type"] for e in seen if e.get("id") == task_id]

        wait_for(lambda: "task-failed" in types_of(bad.id), 15, message="task-failed")
        wait_for(lambda: "task-succeeded" in types_of(ok.id), 15, message="task-succeeded")
        assert types_of(ok.id) == ["task-received", "task-started", "task-succeeded"]
        w.stop()
        wait_for(lambda: any(e["type"] == "worker-offline" and e["worker"] == w.name
                             for e in seen), 15, message="worker-offline")
