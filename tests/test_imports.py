"""A process loads the code of the broker it uses and no other broker's.

Every module loaded costs an idle worker (and each prefork child) its memory for the whole
run, so the broker modules of ``interactive_tasks/transport/`` (``redis_*``, ``amqp_*``,
``embedded*``, ``memory*``) are imported only on their own broker's branch, and what they
share lives in broker-neutral modules (``transport/frames.py``, ``transport/__init__.py``).
Each case runs in a fresh interpreter and connects to nothing.

The package itself imports no broker client: kombu (with py-amqp), redis-py and asyncio
are imported on the way to a connection or where used, so the pool processes of a prefork
worker, forked after the app is imported but before the worker connects, carry none of
them (transport.kombu_transports).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import ROOT, wait_for

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


def _modules_printed_by(script: str, url: str, home: str) -> list[str]:
    """Run ``script`` against the broker at ``url``; the module names its last line lists."""
    env = {**os.environ, "ITASK_HOME": home, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script, url], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    modules: list[str] = json.loads(out.stdout.strip().splitlines()[-1])
    return modules


def _loaded_by_worker(url: str, home: str) -> list[str]:
    return _modules_printed_by(PROBE, url, home)


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


#: what a pool process running plain tasks does not need: the broker clients (kombu with
#: py-amqp, redis-py), asyncio (with ssl; an ``async def`` task imports it), and the
#: terminal UI's libraries
NOT_IN_A_POOL_PROCESS = ["kombu", "amqp", "redis", "asyncio", "ssl", "rich", "prompt_toolkit"]


#: what a prefork worker has not imported when its pool forks, on a broker that keeps no
#: files (the embedded broker's code hashes with hashlib): hashlib, hmac and secrets (they
#: load libcrypto; signing and tokens import them where used) and json (the command line's,
#: for the commands that print or read it)
NOT_AT_THE_FORK = [*NOT_IN_A_POOL_PROCESS, "hashlib", "hmac", "secrets", "json"]

#: nor does ``import interactive_tasks``; nor shutil (with bz2, lzma and zlib), which only a
#: file result store's sweep needs (argparse imports it in a worker)
NOT_IN_THE_PACKAGE = [*NOT_AT_THE_FORK, "shutil", "bz2", "lzma"]


def test_the_package_imports_no_broker_client():
    code = ("import sys, interactive_tasks; "
            "from interactive_tasks import App, InteractiveTask, shared_task; "
            f"loaded = [m for m in {NOT_IN_THE_PACKAGE!r} if m in sys.modules]; "
            "import json; print(json.dumps(loaded))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


#: ``itask worker --pool prefork -c 1 -b URL`` up to the fork of its pool process, where it
#: prints the modules it has loaded and ends (before it connects). The probe itself
#: imports json only then.
AT_THE_FORK = """
import os, sys

def at_fork():
    loaded = sorted(sys.modules)
    import json
    print(json.dumps(loaded), flush=True)
    os._exit(0)

os.register_at_fork(before=at_fork)
from interactive_tasks.cli.main import main
sys.argv = ["itask", "worker", "-b", sys.argv[1], "--pool", "prefork", "-c", "1",
            "-n", "probe@host"]
main()
"""


def _loaded_at_the_fork(url: str, home: str) -> list[str]:
    modules = _modules_printed_by(AT_THE_FORK, url, home)
    assert "interactive_tasks.worker.pools.prefork" in modules  # the fork was the pool's
    return modules


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0",
                                 "amqp://guest:guest@127.0.0.1:5672//"])
def test_a_prefork_worker_forks_its_pool_before_importing_what_it_alone_uses(url, tmp_path):
    """Every module loaded before the fork is in each pool process's memory (and its RSS)
    for the whole run."""
    modules = set(_loaded_at_the_fork(url, str(tmp_path)))
    assert modules & set(NOT_AT_THE_FORK) == set()


def test_a_redis_worker_forks_its_pool_before_importing_its_redis_code(tmp_path):
    """The worker's Redis modules (liveness, fetch, commands on the loop, URLs) are read
    when it connects (``RedisUpkeep.transport_options``), after the fork."""
    modules = _loaded_at_the_fork("redis://127.0.0.1:6379/0", str(tmp_path))
    assert [m for m in modules if m.startswith("interactive_tasks.transport.redis_")] == []


#: imports the package and then kombu's transports, as a program making its own kombu
#: connections does; prints whether embedded:// is known and what memory:// is, before and
#: after ``kombu_transports()``, and what connecting to embedded:// said before
PLAIN_KOMBU = """
import json, interactive_tasks, kombu
from kombu.transport import TRANSPORT_ALIASES
before = ["embedded" in TRANSPORT_ALIASES, TRANSPORT_ALIASES["memory"]]
try:
    kombu.Connection("embedded:///nonexistent/itask").connect()
    refused = ""
except KeyError as exc:
    refused = str(exc)
from interactive_tasks.transport import kombu_transports
kombu_transports()
after = ["embedded" in TRANSPORT_ALIASES, TRANSPORT_ALIASES["memory"]]
print(json.dumps([before, refused, after]))
"""


def test_importing_the_package_enters_nothing_in_kombus_transport_table():
    """No import-time side effect on kombu: a plain kombu connection to embedded:// in a
    process that never went through the package's connections gets kombu's own error;
    ``kombu_transports()`` enters the schemes."""
    out = subprocess.run([sys.executable, "-c", PLAIN_KOMBU], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    before, refused, after = json.loads(out.stdout.strip().splitlines()[-1])
    assert before == [False, "kombu.transport.memory:Transport"]
    assert "No such transport: embedded" in refused
    assert after == [True, "interactive_tasks.transport.memory:Transport"]


@pytest.mark.parametrize("broker", ["redis", "amqp", "embedded"], indirect=True)
def test_prefork_pool_processes_start_without_broker_clients(tasks, start_worker):
    """A real ``itask worker``: its pool processes fork before it connects, from a process
    that has imported the app and the worker's code but none of the broker's client."""
    w = start_worker(pool="prefork", concurrency=1)
    wait_for(lambda: " ready" in w.log(), 20, message="the worker to be ready")
    handle = tasks.loaded_modules.delay(NOT_IN_A_POOL_PROCESS)
    assert handle.result(timeout=20) == []
