"""What a pool process starts with: it is forked before the worker first talks to the
broker, so it carries none of the broker client's modules it does not use."""

from __future__ import annotations

import pytest

from tests.conftest import wait_for


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_prefork_children_start_without_the_broker_client(tasks, start_worker):
    w = start_worker(pool="prefork", concurrency=1)
    wait_for(lambda: " ready" in w.log(), 20, message="the worker to be ready")
    handle = tasks.loaded_modules.delay(["redis", "kombu.transport.redis"])
    assert handle.result(timeout=20) == []
