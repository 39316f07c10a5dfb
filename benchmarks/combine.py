"""Merge alternated ``python -m benchmarks`` runs of two code versions into one JSON.

An A/B comparison on a shared machine runs the base and the new code from two
``git worktree`` checkouts, alternately, several times (``--repeat 1`` each). This reads
every ``results-*.json`` of each side, keeps them whole, and adds a summary: per side,
broker, workload and metric the median and min–max over the runs; and per side, for each
metric measured on two brokers in the same run, the ratio of the second to the first.

    python -m benchmarks.combine --side base=/tmp/ab/base-* --side new=/tmp/ab/new-* \\
        --ratio embedded/redis --out benchmarks/results/embedded_bells_ab.json

``--system`` picks the system whose figures are summarised (``itask`` unless told; the
Celery bridge's runs are ``celery-bridge``).

Files written by ``python -m benchmarks.scale`` are summarised per point instead (axis and
size: the medians over each file's repetitions of ``SCALE_METRICS``), with, for the
prefork axis, the growth of the PSS sum per child between its smallest and largest size.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
from pathlib import Path
from typing import Any

#: Metrics summarised, per workload (the rest stay in the raw runs).
METRICS = {
    "throughput": ["tasks_per_s"],
    "roundtrip": ["p50_ms", "p99_ms"],
    "control_roundtrip": ["p50_ms", "p99_ms"],
    "control_oneway": ["p50_ms", "p99_ms"],
    "control_roundtrip_nowait": ["p50_ms", "p99_ms"],
    "control_oneway_nowait": ["p50_ms", "p99_ms"],
    "idle_memory": ["rss_mb", "pss_mb"],
    "stream_in": ["delivered_per_s", "send_per_s"],
}


#: Metrics summarised per point of a ``benchmarks.scale`` file.
SCALE_METRICS = ["pss_mb", "rss_mb", "p50_ms", "p99_ms", "cpu_pct"]


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def _metric(doc: dict[str, Any], broker: str, workload: str, metric: str,
            system: str = "itask") -> float | None:
    try:
        runs = doc["brokers"][broker][workload]["systems"][system]["runs"]
    except KeyError:
        return None
    values = [r["metrics"][metric] for r in runs
              if r.get("status") == "ok" and metric in r.get("metrics", {})]
    return statistics.median(values) if values else None


def _scale_summary(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per point (``"<axis> <n>"``) and metric, the spread over files of each file's median;
    ``prefork pss_mb per child``: (PSS sum at the largest −c − at the smallest) / (their
    difference in children), one value per file."""
    values: dict[str, dict[str, list[float]]] = {}
    for doc in docs:
        prefork: dict[int, float] = {}
        for point in doc["points"]:
            runs = [r for r in point["runs"] if r.get("status") == "ok"]
            for metric in SCALE_METRICS:
                got = [r[metric] for r in runs if metric in r]
                if got:
                    values.setdefault(f"{point['axis']} {point['n']}", {}) \
                        .setdefault(metric, []).append(statistics.median(got))
            if point["axis"] == "prefork" and runs:
                prefork[point["n"]] = statistics.median(r["pss_mb"] for r in runs)
        if len(prefork) > 1:
            low, high = min(prefork), max(prefork)
            values.setdefault("prefork pss_mb per child", {}).setdefault("pss_mb", []) \
                .append((prefork[high] - prefork[low]) / (high - low))
    return {point: {m: _spread(v) for m, v in ms.items()} for point, ms in values.items()}


def combine(sides: dict[str, list[Path]], ratio: tuple[str, str] | None,
            system: str = "itask") -> dict[str, Any]:
    out: dict[str, Any] = {"system": system, "sides": {}, "summary": {}, "ratios": {}}
    for side, files in sides.items():
        docs = [json.loads(f.read_text()) for f in files]
        out["sides"][side] = [{"file": str(f), "document": d}
                              for f, d in zip(files, docs, strict=True)]
        if all("points" in d for d in docs):  # benchmarks.scale
            out["summary"][side] = _scale_summary(docs)
            continue
        summary: dict[str, Any] = {}
        for doc in docs:
            for broker, workloads in doc["brokers"].items():
                for workload in workloads:
                    for metric in METRICS.get(workload, []):
                        value = _metric(doc, broker, workload, metric, system)
                        if value is not None:
                            summary.setdefault(broker, {}).setdefault(workload, {}) \
                                .setdefault(metric, []).append(value)
        out["summary"][side] = {
            b: {w: {m: _spread(v) for m, v in ms.items()} for w, ms in ws.items()}
            for b, ws in summary.items()}
        if ratio is not None:
            top, bottom = ratio
            ratios: dict[str, Any] = {}
            for doc in docs:
                for workload, metrics in METRICS.items():
                    for metric in metrics:
                        a = _metric(doc, top, workload, metric, system)
                        b = _metric(doc, bottom, workload, metric, system)
                        if a is not None and b:
                            ratios.setdefault(workload, {}).setdefault(metric, []).append(a / b)
            out["ratios"][side] = {
                "of": f"{top}/{bottom}, each run on its own",
                **{w: {m: _spread(v) for m, v in ms.items()} for w, ms in ratios.items()}}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.combine")
    parser.add_argument("--side", action="append", required=True,
                        help="NAME=GLOB of run directories or result files (repeatable)")
    parser.add_argument("--ratio", help="BROKER/BROKER: same-run ratios, e.g. embedded/redis")
    parser.add_argument("--system", default="itask",
                        help="the system whose figures are summarised (default itask)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    sides: dict[str, list[Path]] = {}
    for spec in args.side:
        name, _, pattern = spec.partition("=")
        files: list[Path] = []
        for match in sorted(glob.glob(pattern)):
            path = Path(match)
            if path.is_dir():
                files += sorted(path.glob("results-*.json"))
            elif path.suffix == ".json":
                files.append(path)
        if not files:
            parser.error(f"no result files for {spec!r}")
        sides[name] = files
    ratio: tuple[str, str] | None = None
    if args.ratio:
        top, _, bottom = args.ratio.partition("/")
        ratio = (top, bottom)
    document = combine(sides, ratio, args.system)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1) + "\n")
    json.dump({"summary": document["summary"], "ratios": document["ratios"]}, sys.stdout,
              indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
