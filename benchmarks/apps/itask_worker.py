"""``itask worker -A benchmarks.apps.itask_worker``: the app for ``BENCH_NS``."""

from __future__ import annotations

import os

from benchmarks.apps.itask_tasks import make_app

bench = make_app(os.environ["BENCH_NS"], os.environ["BENCH_BROKER_URL"],
                 os.environ.get("BENCH_RESULTS_URL") or None)
app = bench.app
