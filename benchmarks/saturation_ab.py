"""Alternated A/B of ``benchmarks.saturation`` between two checkouts of the code.

Each round runs every profile on both sides, the side that goes first alternating from
one round to the next, so that the drift of a shared machine's load falls on both. Each
run is ``python -m benchmarks.saturation`` from that checkout's root (its own code and
its own copy of the benchmark). The output keeps every run whole and adds, per side and
profile, the median and min–max over the rounds of the idle p50, the loaded p50 and p99,
the loaded p99 as a multiple of the idle p50, and the worker's CPU while loaded.

    python -m benchmarks.saturation_ab --side base=/tmp/base --side new=. --rounds 3 \\
        --out benchmarks/results/control_first_ab.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: name: (profile, tasks)
PROFILES = {"gevent-1000": ("gevent", 1000), "gevent-5000": ("gevent", 5000),
            "prefork-8": ("prefork", 8)}

SUMMARISED = {
    "idle_p50_ms": lambda r: r["idle"]["p50_ms"],
    "loaded_p50_ms": lambda r: r["loaded"]["p50_ms"],
    "loaded_p99_ms": lambda r: r["loaded"]["p99_ms"],
    "ratio_p99_to_idle_p50": lambda r: r["ratio_p99_to_idle_p50"],
    "worker_cpu_pct": lambda r: r["worker_cpu_pct"],
    # prefork: voluntary context switches a second of the pool processes' threads
    # (benchmarks.saturation._switch_rates; absent from runs of older checkouts)
    "pool_task_switches_per_s": lambda r: r["pool_switches_per_s"]["task"],
    "pool_reader_switches_per_s": lambda r: r["pool_switches_per_s"]["reader"],
    "pool_other_switches_per_s": lambda r: r["pool_switches_per_s"]["other"],
}


def _git_head(root: Path) -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                         capture_output=True, text=True, check=False)
    return out.stdout.strip() or "not a git checkout"


def _run(root: Path, profile: str, tasks: int, samples: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="itask-satab-") as scratch:
        out = Path(scratch) / "run.json"
        env = {**os.environ, "PYTHONPATH": str(root)}
        started = time.time()
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.saturation", "--profile", profile,
             "--tasks", str(tasks), "--samples", str(samples), "--out", str(out)],
            cwd=root, env=env, capture_output=True, text=True, timeout=900, check=False)
        if proc.returncode != 0 or not out.exists():
            return {"status": "error", "error": proc.stderr[-2000:], "started": started}
        run = json.loads(out.read_text())["runs"][0]
        run.update(status="ok", started=started, load_before=os.getloadavg()[0])
        return dict(run)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if r.get("status") == "ok"]
    summary: dict[str, Any] = {"runs_ok": len(ok), "runs": len(runs)}
    for name, pick in SUMMARISED.items():
        values = []
        for run in ok:
            try:
                values.append(pick(run))
            except KeyError:  # a figure the run's checkout does not measure
                continue
        if values:
            summary[name] = {"median": statistics.median(values), "min": min(values),
                             "max": max(values)}
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.saturation_ab")
    parser.add_argument("--side", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--profiles", default=",".join(PROFILES))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    sides = [(name, Path(path).resolve()) for name, path in
             (side.split("=", 1) for side in args.side)]
    profiles = args.profiles.split(",")
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        name: {p: [] for p in profiles} for name, _ in sides}
    for rnd in range(args.rounds):
        for profile in profiles:
            kind, tasks = PROFILES[profile]
            order = sides if rnd % 2 == 0 else list(reversed(sides))
            for name, root in order:
                result = _run(root, kind, tasks, args.samples)
                runs[name][profile].append(result)
                brief = {k: result.get(k) for k in ("status", "ratio_p99_to_idle_p50",
                                                    "worker_cpu_pct")}
                print(f"round {rnd + 1} {profile} {name}: {json.dumps(brief)}", flush=True)
    document = {
        "script": "python -m benchmarks.saturation_ab " + " ".join(argv or sys.argv[1:]),
        "sides": {name: {"root": str(root), "commit": _git_head(root)}
                  for name, root in sides},
        "cpus": os.cpu_count(),
        "summary": {name: {p: summarise(runs[name][p]) for p in profiles}
                    for name, _ in sides},
        "runs": runs,
    }
    args.out.write_text(json.dumps(document, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
