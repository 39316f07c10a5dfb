"""The benchmark suite runs end to end (tiny sizes, itask only) and reports every workload."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _require_redis() -> None:
    """Skip without Redis on 127.0.0.1:6379; fail instead under CI."""
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1):
            return
    except OSError:
        pass
    message = "Redis is not reachable on 127.0.0.1:6379"
    if IN_CI:
        pytest.fail(message + " (CI=true: the benchmark smoke test must run)")
    pytest.skip(message)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_quick_benchmark_reports_every_workload(tmp_path: Path) -> None:
    _require_redis()
    from benchmarks.workloads import WORKLOADS

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--systems", "itask",
         "--repeat", "1", "--out", str(tmp_path)],
        cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=140,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(tmp_path.glob("results-*.json"))
    assert len(files) == 1, list(tmp_path.iterdir())
    assert files[0].with_suffix(".md").exists()
    data = json.loads(files[0].read_text())
    workloads = data["brokers"]["redis"]
    assert set(workloads) == set(WORKLOADS)
    for name, entry in workloads.items():
        itask = entry["systems"]["itask"]
        value = itask.get("value")
        assert itask["status"] == "ok", (name, itask.get("errors"))
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, \
            (name, value)
    assert "| `throughput` |" in proc.stdout  # the markdown table is printed


@pytest.mark.timeout(120)
def test_floor_reports_every_chain() -> None:
    _require_redis()
    from benchmarks.floor import ONE_WAY, PROGRESS_CHAIN, ROUND_TRIP

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.floor", "--rounds", "1", "--samples", "30",
         "--json"],
        cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=100,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    p50 = json.loads(proc.stdout)["p50_ms"]
    expected = {*ONE_WAY, *(f"{name} (round trip)" for name in ROUND_TRIP),
                f"{PROGRESS_CHAIN} (progress)"}
    assert set(p50) == expected
    for name, values in p50.items():
        assert len(values) == 1 and math.isfinite(values[0]) and 0 < values[0] < 1000, \
            (name, values)


@pytest.mark.timeout(120)
def test_amqp_floor_reports_every_chain() -> None:
    """``python -m benchmarks.floor_amqp``: both py-amqp chains echo every item."""
    from benchmarks.floor_amqp import ROUND_TRIP

    from .conftest import require_broker

    require_broker("amqp")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.floor_amqp", "--rounds", "1", "--samples", "30",
         "--json"],
        cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=100,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    p50 = json.loads(proc.stdout)["p50_ms"]
    assert set(p50) == set(ROUND_TRIP)
    for name, values in p50.items():
        assert len(values) == 1 and math.isfinite(values[0]) and 0 < values[0] < 1000, \
            (name, values)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_celery_bridge_benchmark_reports_every_system(tmp_path: Path) -> None:
    """``python -m benchmarks.celery_bridge``: the bridge, Celery's workaround and the
    itask worker each give a latency for every control workload."""
    _require_redis()
    pytest.importorskip("celery")
    from benchmarks.celery_bridge import SYSTEMS, WORKLOAD_NAMES

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "bridge"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.celery_bridge", "--quick", "--repeat", "1",
         "--broker", "redis", "--out", str(out)],
        cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=230,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    workloads = data["brokers"]["redis"]
    assert tuple(workloads) == WORKLOAD_NAMES
    for name, entry in workloads.items():
        for system in SYSTEMS:
            result = entry["systems"][system]
            assert result["status"] == "ok", (name, system, result.get("errors"))
            value = result["value"]
            assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, \
                (name, system, value)
    assert "| `control_roundtrip` | p50 (ms) |" in out.with_suffix(".md").read_text()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_scale_reports_every_point(tmp_path: Path) -> None:
    """``python -m benchmarks.scale --quick``: a latency, CPU and memory figure for a
    point of each axis, a markdown table, and watchers that really see the probe's events."""
    _require_redis()
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "scale"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.scale", "--quick", "--out", str(out)],
        cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=110,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    points = {(p["axis"], p["n"]): p for p in data["points"]}
    assert set(points) == {("gevent", 10), ("prefork", 2), ("watchers", 1), ("watchers", 3)}
    for key, point in points.items():
        (run,) = point["runs"]
        assert run["status"] == "ok", (key, run.get("error"))
        for metric in ("p50_ms", "p99_ms", "cpu_pct", "rss_mb"):
            assert math.isfinite(run[metric]) and run[metric] > 0, (key, metric, run[metric])
    assert points[("gevent", 10)]["runs"][0]["background_tasks"] == 9
    # the two extra watchers each saw the probe's echoes and progress
    assert all(n > 0 for n in points[("watchers", 3)]["runs"][0]["watcher_events"])
    assert "| gevent worker, concurrent tasks (`-c`) | 10 |" in out.with_suffix(".md").read_text()


@pytest.mark.timeout(150)
def test_redis_control_profile_times_every_leg(tmp_path: Path) -> None:
    """``python -m benchmarks.redis_control_profile``: every probe of the control path
    stamps each message (a renamed method would leave its probe empty and no legs)."""
    _require_redis()
    from benchmarks.redis_control_profile import LEGS, SIDE_LEGS

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "profile.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.redis_control_profile", "--rounds", "1", "--n",
         "30", "--floor-samples", "30", "--out", str(out)],
        cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=140,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    probed = json.loads(out.read_text())["rounds"][0]["probed"]
    assert "error" not in probed, probed
    assert probed["messages_aligned"] >= 15
    assert set(probed["legs_us"]) == {leg for leg, _, _ in (*LEGS, *SIDE_LEGS)}
    assert math.isfinite(probed["one_way_p50_us"]) and probed["one_way_p50_us"] > 0


def test_slot_wakeups_reports_the_flush_thread(tmp_path: Path) -> None:
    """``python -m benchmarks.slot_wakeups --only channel``: the flush thread's and the
    task thread's context switches, and the last progress event reached the reader."""
    out = tmp_path / "wakeups.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.slot_wakeups", "--only", "channel", "--rounds",
         "1", "--seconds", "0.5", "--out", str(out)],
        cwd=str(ROOT), capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run,) = json.loads(out.read_text())["channel"]["this"]["runs"]
    assert run["last_progress_arrived"], run
    assert run["progress_per_s"] > 0 and run["flush_thread_switches_per_s"] >= 0
    assert run["reader_thread_switches_per_s"] >= 0


def test_saturation_counts_the_pool_threads_switches() -> None:
    """``benchmarks.saturation``: the worker's child processes' threads are found, and
    their switches are split into task (main), reader (first other thread) and other."""
    from benchmarks.saturation import _pool_switches, _switch_rates

    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    try:
        wait_for(lambda: (child.pid, child.pid) in _pool_switches(os.getpid()),
                 message="the child's main thread")
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(30)
    before = {(10, 10): 0, (10, 11): 0, (10, 12): 0, (20, 20): 0, (20, 21): 0}
    after = {(10, 10): 4, (10, 11): 10, (10, 12): 2, (20, 20): 6, (20, 21): 20}
    assert _switch_rates(before, after, 2.0) == {"task": 5.0, "reader": 15.0, "other": 1.0}


def test_control_handling_cost_passes_each_message_to_the_slot() -> None:
    """``python -m benchmarks.control_handling_cost``: each control frame goes through the
    worker's router to the slot's socketpair (``run`` asserts the slot read it), and the
    hand-written frames of ``--null`` too."""
    from benchmarks.control_handling_cost import run

    assert len(run(5, 0.0)) == 5
    assert len(run(5, 0.0, null=True)) == 5
