"""``benchmarks.combine`` pairs two sides' runs round by round (synthetic documents, no run)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import combine


def _run(started: str | None, tasks_per_s: float, p50_ms: float,
         file: str = "/tmp/x/results-20260101-000000.json") -> dict[str, Any]:
    def workload(metrics: dict[str, float]) -> dict[str, Any]:
        return {"systems": {"itask": {"runs": [{"status": "ok", "metrics": metrics}]}}}

    document: dict[str, Any] = {"brokers": {"redis": {
        "throughput": workload({"tasks_per_s": tasks_per_s}),
        "roundtrip": workload({"p50_ms": p50_ms, "p99_ms": p50_ms * 4})}}}
    if started is not None:
        document["meta"] = {"started": started}
    return {"file": file, "document": document}


def test_every_summarised_metric_has_a_direction() -> None:
    summarised = {m for metrics in combine.METRICS.values() for m in metrics}
    assert summarised <= set(combine.HIGHER_IS_BETTER)
    assert combine.HIGHER_IS_BETTER["tasks_per_s"] is True
    assert combine.HIGHER_IS_BETTER["p50_ms"] is False
    assert combine.HIGHER_IS_BETTER["pss_mb"] is False


def test_runs_pair_in_start_order_and_better_follows_the_direction() -> None:
    # Listed out of start order (as a sorted glob of base-r1, base-r10, base-r2 lists them):
    # pairing by list position would match round 1 of A with round 2 of B.
    a = [_run("2026-01-01T10:02:00", 100, 2.0), _run("2026-01-01T10:00:00", 200, 1.0)]
    b = [_run("2026-01-01T10:01:00", 300, 0.5), _run("2026-01-01T10:03:00", 50, 4.0)]
    got = combine.same_round(a, b)["redis"]
    throughput = got["throughput"]["tasks_per_s"]
    # Round 1: 300/200 = 1.5, B better (higher); round 2: 50/100 = 0.5, B worse.
    assert throughput["ratio"] == {"median": 1.0, "min": 0.5, "max": 1.5, "n": 2}
    assert throughput["b_better_in"] == 1
    assert throughput["rounds"] == 2
    p50 = got["roundtrip"]["p50_ms"]
    # Round 1: 0.5/1.0, B better (lower); round 2: 4.0/2.0, B worse.
    assert (p50["ratio"]["min"], p50["ratio"]["max"]) == (0.5, 2.0)
    assert p50["b_better_in"] == 1


def test_a_lower_latency_counts_as_better_and_a_lower_throughput_does_not() -> None:
    a = [_run("2026-01-01T10:00:00", 100, 2.0)]
    b = [_run("2026-01-01T10:01:00", 90, 1.0)]
    got = combine.same_round(a, b)["redis"]
    assert got["throughput"]["tasks_per_s"]["b_better_in"] == 0
    assert got["roundtrip"]["p50_ms"]["b_better_in"] == 1
    assert got["roundtrip"]["p99_ms"]["b_better_in"] == 1


def test_start_time_falls_back_to_the_file_name() -> None:
    a = [_run(None, 100, 1.0, "/tmp/a/results-20260101-100200.json"),
         _run(None, 200, 1.0, "/tmp/a/results-20260101-100000.json")]
    b = [_run(None, 400, 1.0, "/tmp/b/results-20260101-100100.json"),
         _run(None, 100, 1.0, "/tmp/b/results-20260101-100300.json")]
    ratio = combine.same_round(a, b)["redis"]["throughput"]["tasks_per_s"]["ratio"]
    assert (ratio["min"], ratio["max"]) == (1.0, 2.0)
    with pytest.raises(ValueError, match=r"no meta\.started"):
        combine.same_round([_run(None, 1, 1, "/tmp/a/run.json")],
                           [_run(None, 1, 1, "/tmp/b/run.json")])


def test_different_run_counts_are_refused() -> None:
    a = [_run("2026-01-01T10:00:00", 100, 1.0), _run("2026-01-01T10:02:00", 100, 1.0)]
    b = [_run("2026-01-01T10:01:00", 100, 1.0)]
    with pytest.raises(ValueError, match="2 against 1"):
        combine.same_round(a, b)
    with pytest.raises(ValueError, match="2 against 1"):
        combine.combine_runs({"base": a, "new": b}, None)


def test_report_recomputes_from_the_kept_runs(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    a = [_run("2026-01-01T10:00:00", 1000, 2.0), _run("2026-01-01T10:03:00", 1200, 2.0)]
    b = [_run("2026-01-01T10:01:00", 1500, 1.0), _run("2026-01-01T10:02:00", 1800, 3.0)]
    document = combine.combine_runs({"base": a, "new": b}, None)
    assert document["same_round"]["of"].startswith("new/base")
    # An older combined file: its summary only, no same_round.
    del document["same_round"]
    path = tmp_path / "ab.json"
    path.write_text(json.dumps(document))
    assert combine.main(["--report", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| metric | base | new | new ÷ base, same round | new better in |"
    assert ("| throughput (tasks/s) | 1,100 (1,000–1,200) | 1,650 (1,500–1,800) "
            "| 1.50 (1.50–1.50) | 2 of 2 |") in lines
    assert "| task round trip p50 (ms) | 2.00 (2.00–2.00) | 2.00 (1.00–3.00) " \
           "| 1.00 (0.50–1.50) | 1 of 2 |" in lines
