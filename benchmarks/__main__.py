"""``python -m benchmarks``: run the workloads on every system, write JSON + markdown.

Each repetition of each workload on each system runs in a fresh runner process
(``benchmarks.runner``) with a fresh worker and a namespace of its own. Repetitions are
interleaved across systems (rep 1 of each system, then rep 2 …) so slow drifts of this
shared machine hit every system alike.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

from .harness import (
    BROKERS,
    ROOT,
    base_env,
    broker_reachable,
    git_commit,
    kill_group,
    python,
)
from .report import aggregate, fmt, markdown
from .systems import SYSTEMS
from .workloads import WORKLOADS

PEER_PACKAGES = {"celery": "celery", "dramatiq": "dramatiq"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark interactive_tasks against Celery and Dramatiq.")
    parser.add_argument("--broker", default="redis",
                        help="redis, amqp, embedded (itask only), both (redis,amqp), or a "
                             "comma-separated list")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions per workload")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--only", help="comma-separated workloads: " + ",".join(WORKLOADS))
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help="comma-separated: itask,celery,dramatiq")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    args.workloads = _pick(args.only, list(WORKLOADS), "workload", parser)
    args.system_list = _pick(args.systems, list(SYSTEMS), "system", parser)
    args.brokers = (["redis", "amqp"] if args.broker == "both"
                    else _pick(args.broker, list(BROKERS), "broker", parser))
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def _pick(value: str | None, known: list[str], what: str,
          parser: argparse.ArgumentParser) -> list[str]:
    if not value:
        return known
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in known]
    if unknown:
        parser.error(f"unknown {what}(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return [k for k in known if k in chosen]


def versions() -> str:
    out = [f"Python {platform.python_version()}"]
    for dist in ("interactive_tasks", "celery", "dramatiq", "kombu", "redis", "billiard"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out.append(f"{dist} {metadata.version(dist)}")
    return ", ".join(out)


def peer_missing(system: str) -> str | None:
    package = PEER_PACKAGES.get(system)
    if package is None:
        return None
    try:
        metadata.version(package)
    except metadata.PackageNotFoundError:
        return f"{package} is not installed (pip install -e '.[bench]')"
    return None


def run_one(workload: str, system: str, broker: str, quick: bool, log_dir: Path,
            scratch: Path) -> dict[str, Any]:
    """One repetition in a runner process; its workers are killed if it overruns."""
    spec = WORKLOADS[workload]
    budget = spec.budget_for(quick)
    out_file = scratch / f"{workload}-{system}-{uuid.uuid4().hex[:8]}.json"
    pgid_file = out_file.with_suffix(".pgids")
    cmd = [python(), "-m", "benchmarks.runner", "--workload", workload, "--system", system,
           "--broker", broker, "--out-file", str(out_file), "--log-dir", str(log_dir),
           "--pgid-file", str(pgid_file), "--budget", str(budget)]
    if quick:
        cmd.append("--quick")
    log_path = log_dir / f"runner-{out_file.stem}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=str(ROOT), env=base_env(), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(budget + 30)
        except subprocess.TimeoutExpired:
            pass
        finally:
            if proc.poll() is None:  # overran, or we are interrupted
                kill_group(proc.pid)
                proc.wait(10)
            # whatever happened, no worker of this repetition survives it
            if pgid_file.exists():
                for line in pgid_file.read_text().split():
                    kill_group(int(line))
    if out_file.exists():
        result: dict[str, Any] = json.loads(out_file.read_text())
    else:
        tail = log_path.read_text(errors="replace")[-1500:]
        result = {"status": "error",
                  "error": f"runner exited {proc.returncode} without a result: {tail}"}
    result["log"] = str(log_path)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    brokers = args.brokers
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    log_dir = args.out / f"logs-{stamp}"
    log_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "host": socket.gethostname(), "cpus": os.cpu_count(), "repeat": args.repeat,
        "quick": args.quick, "brokers": brokers, "systems": args.system_list,
        "workloads": args.workloads, "versions": versions(), "commit": git_commit(),
        "argv": sys.argv[1:] if argv is None else argv,
    }
    results: dict[str, dict[str, Any]] = {}
    begun = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="itask-bench-") as scratch:
        for broker in brokers:
            reachable = broker_reachable(broker)
            results[broker] = {}
            for name in args.workloads:
                spec = WORKLOADS[name]
                runs: dict[str, list[dict[str, Any]]] = {s: [] for s in args.system_list}
                for rep in range(args.repeat):
                    for system in args.system_list:
                        if system not in spec.systems:
                            continue
                        reason = peer_missing(system) or (
                            None if reachable else f"{broker} is not reachable") or (
                            "the embedded broker is itask's own"
                            if broker == "embedded" and system != "itask" else None)
                        if reason:
                            runs[system].append({"status": "error", "error": reason})
                            continue
                        result = run_one(name, system, broker, args.quick, log_dir,
                                         Path(scratch))
                        runs[system].append(result)
                        _progress(broker, name, system, rep, args.repeat, spec, result)
                systems: dict[str, Any] = {}
                for system in args.system_list:
                    if system not in spec.systems:
                        systems[system] = {"status": "n/a",
                                           "reason": "no natural equivalent"}
                    else:
                        systems[system] = aggregate(spec, runs[system])
                results[broker][name] = {"title": spec.title, "systems": systems}
    meta["elapsed_s"] = round(time.perf_counter() - begun, 1)
    loads = [run["load_before"] for workloads in results.values() for data in workloads.values()
             for entry in data["systems"].values() for run in entry.get("runs", ())
             if isinstance(run.get("load_before"), (int, float))]
    if loads:
        meta["load"] = {"median": statistics.median(loads), "min": min(loads),
                        "max": max(loads)}
    document = {"meta": meta, "brokers": results}
    json_path = args.out / f"results-{stamp}.json"
    md_path = args.out / f"results-{stamp}.md"
    json_path.write_text(json.dumps(document, indent=1))
    report = markdown(results, meta)
    md_path.write_text(report + "\n")
    print(report)
    print(f"\nwrote {json_path} and {md_path} (worker logs in {log_dir})")
    return 0


def _progress(broker: str, name: str, system: str, rep: int, repeat: int, spec: Any,
              result: dict[str, Any]) -> None:
    if result.get("status") == "ok":
        metric = spec.primary
        value = result["metrics"].get(metric.key)
        what = f"{metric.label} {fmt(value)} {metric.unit}"
    else:
        what = "ERROR " + str(result.get("error", "")).splitlines()[0][:200]
    print(f"[{broker}] {name} {system} {rep + 1}/{repeat}: {what}", file=sys.stderr,
          flush=True)


if __name__ == "__main__":
    sys.exit(main())
