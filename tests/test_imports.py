"""A process loads the code of the broker it uses and no other broker's.

Every module loaded costs an idle worker (and each prefork child) its memory for the whole
run, so the broker modules of ``interactive_tasks/transport/`` (``redis_*``, ``amqp_*``,
``embedded*``, ``memory*``) are imported only on their own broker's branch, and what they
share lives in broker-neutral modules (``transport/frames.py``, ``transport/__init__.py``).
Each case runs in a fresh interpreter and connects to nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import ROOT

#: the start of the module names of each broker's code in interactive_tasks.transport
BROKER_PREFIXES = {"redis": "redis_", "amqp": "amqp_", "embedded": "embedded",
                   "memory": "memory"}

#: What ``itask worker -b URL`` runs up to the loop: the command line, the Worker with its
#: intake, outbound and upkeep, the result store and the (unconnected) kombu connection;
#: then a client's side of the broker. Prints the project modules it loaded.
PROBE = """
import json, sys
from interactive_tasks.worker.main import Worker

def run(self):
    self.app.results
    self.app.connection()
    from interactive_tasks.transport.client_side import client_side_for
    client_side_for(self.app, lambda *args: None)
    return 0

Worker.run = run
from interactive_tasks.cli.main import main
sys.argv = ["itask", "worker", "-b", sys.argv[1], "-c", "1", "-n", "probe@host"]
assert main() == 0
print(json.dumps(sorted(m for m in sys.modules if m.startswith("interactive_tasks"))))
"""


def _loaded_by_worker(url: str, home: str) -> list[str]:
    env = {**os.environ, "ITASK_HOME": home, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", PROBE, url], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    modules: list[str] = json.loads(out.stdout.strip().splitlines()[-1])
    return modules


@pytest.mark.parametrize("broker, url", [
    ("amqp", "amqp://guest:guest@127.0.0.1:5672//"),
    ("redis", "redis://127.0.0.1:6379/0"),
    ("embedded", "embedded://"),
    ("memory", "memory://"),
])
def test_a_worker_loads_only_its_own_brokers_code(broker, url, tmp_path):
    modules = _loaded_by_worker(url, str(tmp_path))
    transport = [m.removeprefix("interactive_tasks.transport.") for m in modules
                 if m.startswith("interactive_tasks.transport.")]
    own = [m for m in transport if m.startswith(BROKER_PREFIXES[broker])]
    foreign = [m for m in transport if m.startswith(tuple(BROKER_PREFIXES.values()))
               and m not in own]
    assert own, transport  # the probe did reach the broker's code
    assert foreign == []


def test_a_worker_loads_no_other_commands_code(tmp_path):
    """``itask multi``, ``itask control`` and ``itask beat`` (without -B) and
    ``--autoscale`` are not what a plain ``itask worker`` runs."""
    modules = set(_loaded_by_worker("amqp://guest:guest@127.0.0.1:5672//", str(tmp_path)))
    unused = {"interactive_tasks.cli.multi", "interactive_tasks.cli.control_cmd",
              "interactive_tasks.cli.beat_cmd", "interactive_tasks.worker.autoscale"}
    assert modules & unused == set()


def test_the_full_command_line_still_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "interactive_tasks.cli.main", "--help"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for command in ("worker", "inspect", "control", "status", "call", "multi", "beat"):
        assert command in out.stdout
