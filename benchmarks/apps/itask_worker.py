"""``itask worker -A benchmarks.apps.itask_worker``: the app for ``BENCH_NS``
(``BENCH_SETTINGS``: a JSON object of extra App settings)."""

from __future__ import annotations

import json
import os

from benchmarks.apps.itask_tasks import make_app

bench = make_app(os.environ["BENCH_NS"], os.environ["BENCH_BROKER_URL"],
                 os.environ.get("BENCH_RESULTS_URL") or None)
app = bench.app
app.configure(**json.loads(os.environ.get("BENCH_SETTINGS") or "{}"))
