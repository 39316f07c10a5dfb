"""The smallest example: one task, one result.

    itask worker -A examples.hello --pool prefork --concurrency 2     # terminal 1
    python examples/hello.py                                          # terminal 2
"""

from interactive_tasks import App

app = App("hello")  # no broker given: the embedded default, no server needed


@app.task
def add(x, y):
    return x + y


if __name__ == "__main__":
    print(add.delay(2, 3).result(timeout=10))  # 5
