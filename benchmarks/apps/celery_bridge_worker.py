"""``celery -A benchmarks.apps.celery_bridge_worker worker``: the bridged app for
``BENCH_NS``."""

from __future__ import annotations

import os

from benchmarks.apps.celery_bridge_tasks import make_app

bench = make_app(os.environ["BENCH_NS"], os.environ["BENCH_BROKER_URL"],
                 os.environ["BENCH_RESULTS_URL"])
app = bench.app
