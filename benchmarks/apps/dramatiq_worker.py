"""``dramatiq benchmarks.apps.dramatiq_worker:broker``: the broker for ``BENCH_NS``."""

from __future__ import annotations

import os

import dramatiq

from benchmarks.apps.dramatiq_tasks import make_broker

bench = make_broker(os.environ["BENCH_NS"], os.environ["BENCH_BROKER_URL"],
                    os.environ["BENCH_RESULTS_URL"])
broker = bench.broker
dramatiq.set_broker(broker)
