"""One repetition of one workload on one system, in its own process.

``python -m benchmarks.runner --workload W --system S --broker redis --out-file F``
writes ``{"status": "ok", "metrics": {...}}`` (or ``"error"``) to F. The orchestrator
starts one of these per repetition, so client-side state (threads, connections, thousands
of handles) never leaks from one measurement into the next.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from .harness import new_namespace
from .systems import make_system
from .workloads import WORKLOADS


class Overrun(Exception):
    """The repetition used up its time budget."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise Overrun("time budget exhausted")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.runner")
    parser.add_argument("--workload", required=True, choices=sorted(WORKLOADS))
    parser.add_argument("--system", required=True)
    parser.add_argument("--broker", required=True, choices=["redis", "amqp", "embedded"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out-file", required=True, type=Path)
    parser.add_argument("--log-dir", required=True, type=Path)
    parser.add_argument("--pgid-file", type=Path)
    parser.add_argument("--budget", type=float, default=300.0)
    args = parser.parse_args(argv)

    workload = WORKLOADS[args.workload]
    ns = new_namespace(args.workload, args.system)
    system = make_system(args.system, args.broker, ns, args.log_dir, args.pgid_file)
    out: dict[str, Any] = {"namespace": ns, "load_before": os.getloadavg()[0]}
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(max(1, int(args.budget)))
    started = time.perf_counter()
    try:
        raw = workload.run(system, args.quick)
        out["metrics"] = {k: v for k, v in raw.items() if isinstance(v, (int, float))}
        samples = {k: [round(x, 4) for x in v] for k, v in raw.items() if isinstance(v, list)}
        if samples:
            out["samples"] = samples  # raw per-sample values, kept in the JSON only
        out["status"] = "ok"
    except BaseException as exc:  # report, never hang: the orchestrator goes on
        out["status"] = "error"
        out["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        out["traceback"] = traceback.format_exc()[-4000:]
    finally:
        signal.alarm(0)
        for step in (system.close, system.cleanup):
            try:
                step()
            except Exception as exc:
                out.setdefault("warnings", []).append(f"{step.__name__}: {exc}")
    out["elapsed_s"] = time.perf_counter() - started
    out["load_after"] = os.getloadavg()[0]
    args.out_file.write_text(json.dumps(out))
    return 0 if out["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
