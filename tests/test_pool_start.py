"""What a pool process starts with: it is forked before the worker first talks to the
broker, so it carries none of the broker client's modules it does not use; what it
shares with the worker stays shared (no imports after the fork, the worker's objects
frozen out of the child's garbage collector passes)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, wait_for


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_prefork_children_start_without_the_broker_client(tasks, start_worker):
    w = start_worker(pool="prefork", concurrency=1)
    wait_for(lambda: " ready" in w.log(), 20, message="the worker to be ready")
    handle = tasks.loaded_modules.delay(["redis", "kombu.transport.redis"])
    assert handle.result(timeout=20) == []


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_an_interactive_task_loads_no_asyncio_into_its_pool_process(tasks, start_worker):
    """progress, checkpoint, receive and log look for a running event loop; where asyncio
    was never imported there is none, and looking must not import it (with ssl)."""
    w = start_worker(pool="prefork", concurrency=1)
    wait_for(lambda: " ready" in w.log(), 20, message="the worker to be ready")
    handle = tasks.loaded_modules_interactive.delay(["asyncio", "ssl", "concurrent.futures"])
    assert handle.result(timeout=20) == []


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_prefork_children_start_with_the_workers_objects_frozen(tasks, start_worker):
    """The first children fork after ``gc.freeze``: a full collection in a child walks
    only what the child made, instead of writing to (and so copying) every page of the
    worker's objects."""
    w = start_worker(pool="prefork", concurrency=1)
    wait_for(lambda: " ready" in w.log(), 20, message="the worker to be ready")
    assert tasks.frozen_objects.delay().result(timeout=20) > 1000


#: forks a billiard process from an interpreter that has imported the prefork pool, as
#: the worker has when it forks; prints the modules the child imported after the fork
FORK_PROBE = """
import json, os, sys
import interactive_tasks.worker.pools.prefork
import billiard

at_fork = {}
os.register_at_fork(after_in_child=lambda: at_fork.update(modules=set(sys.modules)))

def child(fd):
    os.write(fd, json.dumps(sorted(set(sys.modules) - at_fork["modules"])).encode())

r, w = os.pipe()
process = billiard.Process(target=child, args=(w,))
process.start()
process.join(30)
os.close(w)
print(os.read(r, 1 << 20).decode())
"""


def test_a_billiard_child_imports_nothing_after_the_fork():
    """What a child imports after the fork it builds again on its own pages; billiard's
    start-up in the child imports ``billiard.util`` (with subprocess, resource and cffi)
    unless the worker has."""
    out = subprocess.run([sys.executable, "-c", FORK_PROBE], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
