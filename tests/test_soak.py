"""Two minutes of the soak benchmark (benchmarks/soak.py) on Redis, as part of the suite.

Mixed interactive tasks (streams paused/resumed/messaged, questions answered, plain tasks)
from six client threads, watchers attaching and detaching from a second client, and one of
the two workers restarted every 30 s (warm shutdown, then SIGKILL, then warm again): no
task may be lost or run to the end twice, and the worker that stays up must not grow.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import soak

from .conftest import require_broker

#: RSS growth allowed for the worker that runs the whole two minutes (supervisor, KiB):
#: allocator noise and a full FINISHED_KEPT record cache (1000 finished tasks) fit in it.
RSS_TOLERANCE_KB = 16 * 1024


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_soak_two_minutes_on_redis(tmp_path):
    require_broker("redis")
    report = soak.run(minutes=2, broker="redis", workers=2, concurrency=2, drivers=6,
                      restart_every=30, workdir=tmp_path, warmup=10)
    summary = {k: report[k] for k in ("submitted", "completed", "failed", "lost",
                                      "duplicated", "rerun", "restarts", "errors")}
    print("soak:", json.dumps({**summary, "workers": report["workers"]}))
    assert report["lost"] == 0, (report["lost_tasks"], summary)
    assert report["duplicated"] == 0, summary
    assert report["wrong_result"] == 0, report["wrong_tasks"]
    assert report["failed"] == 0, summary
    assert report["errors"] == [], summary
    assert report["completed"] == report["submitted"] >= 300, summary
    assert [r["how"] for r in report["restarts"]][:3] == ["term", "kill", "term"], summary
    assert report["watchers_attached"] >= 20, summary
    stable = report["workers"][0]  # never restarted: it saw all two minutes
    assert stable["ended_by"] == "end"
    growth = stable["rss_end_kb"] - stable["rss_start_kb"]
    assert growth < RSS_TOLERANCE_KB, report["workers"]
    for run in report["workers"]:
        if run["rss_start_kb"] and run["rss_end_kb"]:
            assert run["rss_end_kb"] - run["rss_start_kb"] < RSS_TOLERANCE_KB, run
