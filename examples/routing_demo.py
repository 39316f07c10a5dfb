"""Routing tasks to queues, and workers that consume them (docs/routing.md).

    itask worker -A examples.doc_tasks -c 2 -Q default,images,io -E     # terminal 1
    python -m examples.routing_demo                                     # terminal 2
"""

from examples.doc_tasks import add, app, fetch, image_resize

if __name__ == "__main__":
    # task_routes (glob "examples.doc_tasks.image_*" -> images)
    print("image_resize ->", app.route(image_resize.name), ":",
          image_resize.delay("cat.png", 128).result(timeout=30))
    # the decorator's queue= ("io")
    print("fetch ->", fetch.queue, ":", fetch.delay("https://example.org").result(timeout=30))
    # apply_async(queue=) for one call, above both
    print("add -> io :", add.apply_async((2, 2), queue="io").result(timeout=30))
    # everything else: task_default_queue
    print("add ->", app.route(add.name), ":", add.delay(3, 3).result(timeout=30))
