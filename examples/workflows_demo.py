"""chain, group and chord (docs/workflows.md).

    itask worker -A examples.doc_tasks -c 2 -Q default,images,io -E     # terminal 1
    python -m examples.workflows_demo                                   # terminal 2
"""

from examples.doc_tasks import add, count_up, double, fail, total
from interactive_tasks import TaskFailed, TaskRevoked, chain, chord, group

if __name__ == "__main__":
    # chain: each result is prepended to the next step's arguments
    flow = chain(add.s(2, 3), double.s(), count_up.s(4)).delay()  # (2+3)*2 = 10, then +4
    for event in flow.events(timeout=30):  # every step's events, in order
        if event.kind == "progress":
            print("  progress:", event.message)
    print("chain:", flow.result(timeout=30))

    # group: in parallel, results in order
    print("group:", group(double.s(i) for i in range(5)).delay().result(timeout=30))

    # chord: a group, then one callback with the list of results
    print("chord:", chord(group(double.s(i) for i in range(4)), total.s()).delay()
          .result(timeout=30))

    # a failed step stops the chain: the steps after it end revoked and never run
    broken = chain(fail.s("bad input"), double.s()).delay()
    try:
        broken.result(timeout=30)
    except TaskFailed as exc:
        print("chain failed:", exc.remote_type, exc.remote_message)
    try:
        broken.steps[1].result(timeout=30)
    except TaskRevoked as exc:
        print("next step:", broken.steps[1].state, "-", exc)
