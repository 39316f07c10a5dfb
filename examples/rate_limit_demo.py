"""rate_limit="5/s": starts of one task type are spaced on each worker (docs/rate-limits.md).

    itask worker -A examples.doc_tasks -c 2 -Q default,images,io -E     # terminal 1
    python -m examples.rate_limit_demo                                  # terminal 2
"""

import itertools

from examples.doc_tasks import limited

if __name__ == "__main__":
    handles = [limited.start() for _ in range(6)]  # start(): every event, 'started' too
    for handle in handles:
        handle.wait(timeout=30)
    # when the worker started each one (the task's own clock adds its pool's latency)
    starts = sorted(handle.snapshot().started for handle in handles)
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(starts)]
    print("gaps between starts (s):", gaps)
    print("smallest gap:", min(gaps))
