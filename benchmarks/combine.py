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

With exactly two sides (A then B, in ``--side`` order) it also pairs their runs round by
round — the k-th run of A with the k-th of B, each side's runs in order of their start
(``meta.started``, else the ``results-YYYYMMDD-HHMMSS`` file name) — and writes, per broker,
workload and metric, ``same_round``: the spread of the per-round ratios B/A and in how many
rounds B was better (``HIGHER_IS_BETTER``). The two sides must have as many runs each.

``--report FILE`` prints the markdown table of an existing combined file (medians (min–max)
per side, B ÷ A same round, B better in N of M), recomputed from the runs the file keeps;
``--from FILE --out FILE`` writes its summary again from those runs:

    python -m benchmarks.combine --report benchmarks/results/amqp_intake_ab.json

Files written by ``python -m benchmarks.scale`` are summarised per point instead (axis and
size: the medians over each file's repetitions of ``SCALE_METRICS``), with, for the
prefork axis, the growth of the PSS sum per child between its smallest and largest size.
"""

from __future__ import annotations

import argparse
import datetime as dt
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

#: Whether a larger value of a summarised metric is better (throughputs) or worse
#: (latencies, memory); ``same_round`` counts the rounds where B was better by it.
HIGHER_IS_BETTER = {
    "tasks_per_s": True,
    "delivered_per_s": True,
    "send_per_s": True,
    "p50_ms": False,
    "p99_ms": False,
    "rss_mb": False,
    "pss_mb": False,
}

#: How ``--report`` names a workload and a metric.
WORKLOAD_LABELS = {
    "throughput": "throughput",
    "roundtrip": "task round trip",
    "control_roundtrip": "control round trip",
    "control_oneway": "control one way",
    "control_roundtrip_nowait": "control round trip, no wait",
    "control_oneway_nowait": "control one way, no wait",
    "idle_memory": "idle memory",
    "stream_in": "stream in",
}
METRIC_LABELS = {
    "tasks_per_s": "(tasks/s)",
    "delivered_per_s": "delivered (items/s)",
    "send_per_s": "sent (items/s)",
    "p50_ms": "p50 (ms)",
    "p99_ms": "p99 (ms)",
    "rss_mb": "RSS (MB)",
    "pss_mb": "PSS (MB)",
}

#: A run and the document it wrote: ``{"file": str, "document": {...}}``, as the combined
#: JSON keeps it under ``sides``.
Run = dict[str, Any]


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


def _started(run: Run) -> dt.datetime:
    """When a run began: its document's ``meta.started``, else the time in its file name.

    Raises ValueError if neither is there."""
    started = run["document"].get("meta", {}).get("started")
    if started:
        return dt.datetime.fromisoformat(started)
    stem = Path(run["file"]).stem
    if stem.startswith("results-"):
        try:
            return dt.datetime.strptime(stem[len("results-"):], "%Y%m%d-%H%M%S")
        except ValueError:
            pass
    raise ValueError(f"{run['file']}: no meta.started and no results-YYYYMMDD-HHMMSS name")


def same_round(a: list[Run], b: list[Run], system: str = "itask") -> dict[str, Any]:
    """Pair the k-th run of side A with the k-th of side B, each side in start order, and
    for every summarised metric measured in both runs of a round give the spread of B/A
    (``ratio``), the rounds where B was better by ``HIGHER_IS_BETTER`` (``b_better_in``)
    and the rounds counted (``rounds``). Per broker, workload, metric.

    Raises ValueError if the sides hold different numbers of runs, or a run has no start
    time (see ``_started``)."""
    if len(a) != len(b):
        raise ValueError(f"same-round pairing needs as many runs on each side: "
                         f"{len(a)} against {len(b)}")
    pairs = list(zip(sorted(a, key=_started), sorted(b, key=_started), strict=True))
    ratios: dict[str, dict[str, dict[str, list[float]]]] = {}
    better: dict[tuple[str, str, str], int] = {}
    for run_a, run_b in pairs:
        doc_a, doc_b = run_a["document"], run_b["document"]
        for broker in doc_a.get("brokers", {}):
            for workload, metrics in METRICS.items():
                for metric in metrics:
                    va = _metric(doc_a, broker, workload, metric, system)
                    vb = _metric(doc_b, broker, workload, metric, system)
                    if va is None or vb is None or va == 0:
                        continue
                    ratios.setdefault(broker, {}).setdefault(workload, {}) \
                        .setdefault(metric, []).append(vb / va)
                    key = (broker, workload, metric)
                    won = vb > va if HIGHER_IS_BETTER[metric] else vb < va
                    better[key] = better.get(key, 0) + won
    return {broker: {workload: {metric: {"ratio": _spread(values),
                                         "b_better_in": better[(broker, workload, metric)],
                                         "rounds": len(values)}
                                for metric, values in ms.items()}
                     for workload, ms in ws.items()}
            for broker, ws in ratios.items()}


def combine_runs(sides: dict[str, list[Run]], ratio: tuple[str, str] | None,
                 system: str = "itask") -> dict[str, Any]:
    """The combined document of each side's runs: the runs kept whole, the summary, the
    same-run broker ratios if asked, and ``same_round`` when there are exactly two sides.

    Raises ValueError if two sides hold different numbers of runs (see ``same_round``)."""
    out: dict[str, Any] = {"system": system, "sides": {}, "summary": {}, "ratios": {}}
    scale = False
    for side, runs in sides.items():
        docs = [r["document"] for r in runs]
        out["sides"][side] = runs
        if all("points" in d for d in docs):  # benchmarks.scale
            out["summary"][side] = _scale_summary(docs)
            scale = True
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
    if len(sides) == 2 and not scale:
        (name_a, runs_a), (name_b, runs_b) = sides.items()
        out["same_round"] = {
            "of": f"{name_b}/{name_a}, the k-th run of each side in start order",
            **same_round(runs_a, runs_b, system)}
    return out


def combine(sides: dict[str, list[Path]], ratio: tuple[str, str] | None,
            system: str = "itask") -> dict[str, Any]:
    """``combine_runs`` of the result files of each side.

    Raises ValueError as ``combine_runs``; OSError or json.JSONDecodeError for a file that
    cannot be read."""
    return combine_runs({side: [{"file": str(f), "document": json.loads(f.read_text())}
                                for f in files]
                         for side, files in sides.items()}, ratio, system)


def _figure(value: float) -> str:
    """Three significant figures, thousands grouped: 1,433, 12.2, 1.20, 0.943."""
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:#.3g}".rstrip(".")


def _cell(spread: dict[str, float], figure: Any = _figure) -> str:
    return f"{figure(spread['median'])} ({figure(spread['min'])}–{figure(spread['max'])})"


def report(document: dict[str, Any]) -> str:
    """The markdown table of a combined document of two sides: per metric each side's
    median (min–max), the median (min–max) of the same-round ratios B ÷ A, and in how
    many rounds B was better.

    Raises ValueError unless the document has exactly two sides (or as ``same_round``)."""
    sides = document.get("sides")
    if not isinstance(sides, dict) or not all(
            isinstance(runs, list) and all(isinstance(r, dict) and "document" in r for r in runs)
            for runs in sides.values()):
        raise ValueError("not a file written by python -m benchmarks.combine")
    if len(sides) != 2:
        raise ValueError(f"a report needs two sides, not {len(sides)}")
    redone = combine_runs(document["sides"], None, document.get("system", "itask"))
    if "same_round" not in redone:
        raise ValueError("a report needs result files of python -m benchmarks")
    (a, b), pairs = list(redone["summary"]), redone["same_round"]
    lines = [f"| metric | {a} | {b} | {b} ÷ {a}, same round | {b} better in |",
             "|---|---|---|---|---|"]
    brokers = [k for k in pairs if k != "of"]
    for broker in brokers:
        for workload, metrics in METRICS.items():
            for metric in metrics:
                got = pairs[broker].get(workload, {}).get(metric)
                if got is None:
                    continue
                label = f"{WORKLOAD_LABELS[workload]} {METRIC_LABELS[metric]}"
                if len(brokers) > 1:
                    label = f"{broker} {label}"
                side_a = redone["summary"][a][broker][workload][metric]
                side_b = redone["summary"][b][broker][workload][metric]
                lines.append(f"| {label} | {_cell(side_a)} | {_cell(side_b)} | "
                             f"{_cell(got['ratio'], lambda v: f'{v:.2f}')} | "
                             f"{got['b_better_in']} of {got['rounds']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.combine")
    parser.add_argument("--side", action="append",
                        help="NAME=GLOB of run directories or result files (repeatable)")
    parser.add_argument("--from", dest="source", type=Path, metavar="FILE",
                        help="take the sides and runs kept in a combined FILE instead")
    parser.add_argument("--report", type=Path, metavar="FILE",
                        help="print the markdown table of a combined FILE, recomputed from "
                             "the runs it keeps, and write nothing")
    parser.add_argument("--ratio", help="BROKER/BROKER: same-run ratios, e.g. embedded/redis")
    parser.add_argument("--system", default=None,
                        help="the system whose figures are summarised (default itask, or "
                             "the combined file's)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.report is not None:
        try:
            print(report(json.loads(args.report.read_text())))
        except (OSError, ValueError) as exc:
            parser.error(f"{args.report}: {exc}")
        return 0
    if args.out is None or (args.side is None) == (args.source is None):
        parser.error("give --out and either --side (repeatable) or --from")
    runs: dict[str, list[Run]] = {}
    system = args.system
    if args.source is not None:
        kept = json.loads(args.source.read_text())
        runs, system = kept["sides"], system or kept.get("system")
    for spec in args.side or []:
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
        runs[name] = [{"file": str(f), "document": json.loads(f.read_text())} for f in files]
    ratio: tuple[str, str] | None = None
    if args.ratio:
        top, _, bottom = args.ratio.partition("/")
        ratio = (top, bottom)
    try:
        document = combine_runs(runs, ratio, system or "itask")
    except ValueError as exc:
        parser.error(str(exc))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1) + "\n")
    json.dump({k: document[k] for k in ("summary", "ratios", "same_round") if k in document},
              sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
