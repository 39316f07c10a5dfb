"""Kill experiment: SIGKILL a worker over and over under a stream of tasks; count losses.

::

    python -m benchmarks.kill --tasks 3000 --seconds 30

Queues ``--tasks`` short tasks on Redis, starts one worker that stays and one that is
SIGKILLed (whole process group) every 0.3-0.8 s and started again, then waits for every
task to have run. A task that never started is **lost**: the broker no longer has it in a
queue or among the unacknowledged messages. With kombu's ``BRPOP`` consumer this lost 1
of 3,000 tasks to 48 kills here; with ``transport.redis_fetch`` none. Exit status 1 when
a task was lost.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from interactive_tasks import App

from .soak import ROOT, transport_options

URL = "redis://127.0.0.1:6379/0"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--seconds", type=float, default=30.0, help="how long to keep killing")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    ns = f"kill{uuid.uuid4().hex[:6]}"
    run_dir = Path(f"/tmp/itask-kill-{ns}")
    run_dir.mkdir(parents=True)
    env = dict(os.environ, ITASK_BROKER_URL=URL, ITASK_SOAK_NS=ns, ITASK_SOAK_DIR=str(run_dir),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1")

    def start(name: str) -> subprocess.Popen[bytes]:
        with open(run_dir / f"{name}.log", "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "interactive_tasks.cli.main", "worker", "-A",
                 "benchmarks.soak", "--pool", "prefork", "-c", "2", "-n", name],
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT),
                start_new_session=True)

    client = App("kill", broker=URL, namespace=ns,
                 broker_transport_options=transport_options(URL, ns))
    keys = [f"add-{i}" for i in range(args.tasks)]
    for i, key in enumerate(keys):
        client.send_task("benchmarks.soak.soak_add", [key, i, 1])
    stay, victim = start("stay"), start("victim-0")
    kills = 0
    rng = random.Random(args.seed)
    end = time.monotonic() + args.seconds
    try:
        while time.monotonic() < end:
            time.sleep(rng.uniform(0.3, 0.8))  # the pace of the kills, not a wait
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait()
            kills += 1
            victim = start(f"victim-{kills}")

        def marked(what: str) -> set[str]:
            path = run_dir / f"{what}.log"
            return {line.split()[0] for line in path.read_text().splitlines()} \
                if path.exists() else set()

        deadline = time.monotonic() + 120  # redeliveries wait for the visibility timeout
        while time.monotonic() < deadline and len(marked("done")) < len(keys):
            time.sleep(0.5)
        lost = sorted(set(keys) - marked("started"))
        report = {"tasks": len(keys), "kills": kills, "done": len(marked("done")),
                  "lost": len(lost), "lost_keys": lost[:20], "directory": str(run_dir)}
        print(json.dumps(report, indent=2))
        return 1 if lost else 0
    finally:
        for proc in (victim, stay):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        client.close()


if __name__ == "__main__":
    sys.exit(main())
