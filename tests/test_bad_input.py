"""Bad input gets a clear error, a log line and a dead letter; the worker keeps serving."""

from __future__ import annotations

from typing import Any

import pytest

from interactive_tasks import TaskFailed, codec
from interactive_tasks.protocol import ControlMessage

from .conftest import wait_for


def dead_letters(app: Any, expect: int, timeout: float = 10.0) -> list[Any]:
    """Read (and remove) ``expect`` messages from the dead-letter queue."""
    queue = app.names.dead_letter_queue
    got: list[Any] = []
    with app.connection() as conn:
        simple = conn.SimpleQueue(queue, no_ack=True)
        try:
            def more() -> bool:
                try:
                    message = simple.get(timeout=0.2)
                except simple.Empty:
                    return len(got) >= expect
                got.append(message)
                return len(got) >= expect

            wait_for(more, timeout, interval=0, message=f"{expect} dead letter(s)")
        finally:
            simple.close()
    return got


def publish_raw(app: Any, body: bytes, content_type: str = codec.CONTENT_TYPE) -> None:
    queue = app.names.task_queue("default")
    app.client.ensure_started()
    headers = {}
    if app.secret is not None:
        headers[codec.SIGNATURE_HEADER] = codec.sign(app.secret, body)
    with app.connection() as conn:
        conn.Producer().publish(body, routing_key=queue.routing_key, exchange="",
                                content_type=content_type, content_encoding="binary",
                                headers=headers, declare=[queue])


def test_every_kind_of_bad_task_message_is_dead_lettered(tasks, start_worker):
    w = start_worker()
    app = tasks.app

    # 1. unknown task name: the sender waiting on it gets a clear error
    handle = app.send_task("tests.no_such_task", [1])
    with pytest.raises(TaskFailed) as info:
        handle.result(timeout=20)
    assert info.value.remote_type == "UnknownTask"
    assert "tests.no_such_task" in info.value.remote_message
    assert "start the worker with -A the module that defines it" in info.value.remote_message

    # 2. not msgpack, 3. missing fields, 4. over the worker's size limit, 5. pickle
    publish_raw(app, b"\xc1\xc1 definitely not msgpack")
    publish_raw(app, codec.dumps({"v": 1, "task": "tests.apps.tasks.add"}))
    publish_raw(app, codec.dumps({"id": "big", "task": "tests.apps.tasks.add",
                                  "args": ["x" * (1024 * 1024 + 10)], "kwargs": {}}))
    publish_raw(app, b"\x80\x04K\x01.", content_type=codec.PICKLE_CONTENT_TYPE)

    letters = dead_letters(app, 5)
    reasons = sorted(m.headers["itask-reason"] for m in letters)
    assert any("no task named 'tests.no_such_task'" in r for r in reasons), reasons
    assert any("not valid msgpack" in r for r in reasons), reasons
    assert any("missing field 'id'" in r for r in reasons), reasons
    assert any("max_message_size" in r for r in reasons), reasons
    assert any("pickle is refused" in r for r in reasons), reasons
    # the raw body is kept for inspection
    assert any(m.body == b"\xc1\xc1 definitely not msgpack" for m in letters)

    log = w.log()
    assert log.count("rejected message") >= 5
    # and the worker keeps serving
    assert tasks.add.delay(2, 2).result(timeout=20) == 4
    assert w.proc.poll() is None


def test_bad_control_messages_get_clear_errors(tasks, start_worker):
    w = start_worker()
    app = tasks.app
    client = app.client
    client.ensure_started()
    # an unknown verb is refused with the list of verbs
    replies = client.request(ControlMessage(verb="explode", task_id="x"), w.name, 5)
    assert replies and replies[0]["ok"] is False
    assert "unknown control verb 'explode'" in replies[0]["error"]["message"]
    # a task verb without a task id
    replies = client.request(ControlMessage(verb="pause"), w.name, 5)
    assert replies and "needs a task_id" in replies[0]["error"]["message"]
    assert "refused control message" in w.log()
    assert tasks.add.delay(3, 3).result(timeout=20) == 6


def test_unsigned_messages_refused_when_a_secret_is_set(tasks, start_worker, broker):
    if broker.name == "embedded":
        pytest.skip("the embedded broker always signs with the per-user secret")
    broker.extra["ITASK_SECRET"] = "s3cret"
    w = start_worker()
    # this process has no secret: its task is refused and dead-lettered
    assert tasks.app.secret is None
    tasks.add.delay(1, 1)
    letters = dead_letters(tasks.app, 1)
    assert "signature" in letters[0].headers["itask-reason"]
    assert "unsigned" in w.log()


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_garbage_and_kombu_envelopes_on_the_redis_control_list(tasks, start_worker,
                                                               monkeypatch):
    """The control list holds raw frames; garbage there is refused with a log line, and a
    control message in kombu's envelope (a kombu publisher) is still served."""
    import redis

    from interactive_tasks.transport.frames import kombu_envelope

    w = start_worker()
    app = tasks.app
    client = app.client
    client.ensure_started()
    key = app.names.control_queue(w.name).name
    r = redis.Redis.from_url(app.broker_url)
    try:
        r.lpush(key, b"\x07not a frame")
        wait_for(lambda: "refused control message: inbox frame has an unknown format"
                 in w.log(), message="garbage refused")

        def publish_as_kombu(worker: str, body: bytes, settle: bool = True) -> None:
            queue = app.names.control_queue_name(worker)
            r.lpush(queue, kombu_envelope(body, queue, codec.CONTENT_TYPE, {}))

        monkeypatch.setattr(client._client_side(), "publish_control", publish_as_kombu)
        replies = client.request(ControlMessage(verb="ping"), w.name, 5)
        assert replies and replies[0]["ok"] is True and replies[0]["data"] == {"pong": True}
        assert tasks.add.delay(2, 5).result(timeout=20) == 7
    finally:
        r.close()


def test_unknown_task_name_says_what_to_do():
    from interactive_tasks import App, UnknownTask

    app = App("typos", broker="redis://127.0.0.1:6379/0")

    @app.task
    def resize(path: str) -> str:
        return path

    with pytest.raises(UnknownTask) as info:
        app.get_task(resize.name[:-1])  # a letter short
    message = str(info.value)
    assert f"did you mean {resize.name!r}?" in message
    assert "start the worker with -A the module that defines it" in message


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_unknown_task_name_reaches_the_client(tasks, start_worker):
    """A misspelt task name: the starter's TaskFailed says what to do, as documented."""
    from .doc_blocks import documented

    start_worker()
    handle = tasks.app.send_task("tests.apps.tasks.ad", [1, 2])
    with pytest.raises(TaskFailed) as info:
        handle.result(timeout=20)
    message = f"TaskFailed: {info.value}"
    assert "did you mean 'tests.apps.tasks.add'?" in message
    assert documented("TaskFailed: task 6f1c… failed: UnknownTask:").match(message), message


def test_unreachable_broker_says_what_to_do_in_python(tmp_path):
    """A Python program against a broker that is not there: its traceback ends in the
    documented one-line message, which says what to do (as ``itask`` prints it)."""
    import subprocess
    import sys

    from .conftest import ROOT, isolated_env
    from .doc_blocks import documented

    program = ("from interactive_tasks import App\n"
               "app = App('gone', broker='redis://127.0.0.1:6380/0')\n"
               "@app.task\n"
               "def add(x, y):\n"
               "    return x + y\n"
               "add.delay(2, 3).result(timeout=10)\n")
    out = subprocess.run([sys.executable, "-c", program], env=isolated_env(tmp_path),
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert documented("interactive_tasks.errors.TransportError: cannot reach").match(last), \
        out.stderr
    assert last.count("check that the broker runs") == 1
