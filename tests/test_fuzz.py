"""Hostile input: fuzzed task and control messages, bad tokens, huge and deep payloads, forgery.

Two levels:

* in-process: a :class:`~interactive_tasks.worker.main.Worker` that is built but never run
  gets hypothesis-generated messages into its task consumer and control router, each one
  published into the in-memory broker (``memory://``) and fetched from it as kombu
  delivers it. No exception may escape, no task record may come from a malformed message,
  and every rejection is dead-lettered (read back from the broker, with its reason), its
  original settled, and logged.
* real workers: ~200 byte-mutated task messages published to a live worker, control
  messages a client should never send, and a process without the operator secret.
"""

from __future__ import annotations

import logging
import os
import random
import time
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu import Producer
from kombu.asynchronous import Hub

from interactive_tasks import (
    App,
    ControlError,
    InteractiveTask,
    NotAuthorized,
    TaskCancelled,
    TaskFailed,
    TaskFinished,
    TaskState,
    codec,
)
from interactive_tasks.errors import PayloadTooLarge, ProtocolError
from interactive_tasks.protocol import (
    ALL_VERBS,
    HEADER_DELIVERIES,
    ControlMessage,
    TaskMessage,
)
from interactive_tasks.task import build_message
from interactive_tasks.transport.memory import MemoryBroker
from interactive_tasks.worker.main import Worker

from .conftest import holds_for, wait_for

redis_only = pytest.mark.parametrize("broker", ["redis"], indirect=True)
embedded_only = pytest.mark.parametrize("broker", ["embedded"], indirect=True)


# -- in-process harness ----------------------------------------------------------------------------
UNIT_APP = App("fuzz", broker="memory://", namespace="fz", max_message_size=64 * 1024,
               max_deliveries=3)
SECRET_APP = App("fuzz", broker="memory://", namespace="fz", max_message_size=64 * 1024,
                 secret="unit-secret")


@UNIT_APP.task
def add(x: int, y: int) -> int:
    return x + y


@UNIT_APP.task(base=InteractiveTask)
def steps(self: Any, n: int) -> int:
    return n


SECRET_APP.tasks.update(UNIT_APP.tasks)
TASK_QUEUE = UNIT_APP.names.task_queue_name("default")


class UnitBroker:
    """The in-memory broker as level (a) uses it: each message is published into
    ``memory://`` for real and fetched as kombu delivers it (ack, reject and requeue are
    the broker's), and dead letters are read back from the broker."""

    def __init__(self, app: App = UNIT_APP) -> None:
        self.memory = MemoryBroker.for_app(app)
        self.conn = app.connection()
        self.conn.connect()
        self.channel = self.conn.channel()
        #: a worker that is never run leaves its timers here, unrun
        self.hub = Hub()
        names = app.names
        for queue in (names.task_queue("default"), names.dead_letter_queue,
                      names.control_queue("fuzz@test")):
            queue.bind(self.channel).declare()

    def deliver(self, body: bytes, *, headers: dict[str, Any] | None = None,
                content_type: str | None = codec.CONTENT_TYPE, redelivered: bool = False,
                queue: str = TASK_QUEUE) -> Any:
        """Publish ``body`` to ``queue`` and fetch it (unacknowledged); a ``redelivered``
        one is requeued once first, so the broker marks it."""
        channel = self.channel
        raw = channel.prepare_message(body, None, content_type,
                                      "binary" if content_type else None, dict(headers or {}))
        channel.basic_publish(raw, exchange="", routing_key=queue)
        message = channel.basic_get(queue, no_ack=False)
        if redelivered:
            message.reject(requeue=True)
            message = channel.basic_get(queue, no_ack=False)
        assert message is not None and message.body == body
        return message

    def clear(self) -> None:
        """Settle what an example left in flight and empty the queues."""
        qos = self.channel.qos
        for tag in list(qos.in_flight):
            qos.ack(tag)
        for name in (TASK_QUEUE, UNIT_APP.names.dead_letter_name):
            self.channel.queue_purge(name)


@pytest.fixture(scope="module")
def unit_broker() -> Any:
    broker = UnitBroker()
    yield broker
    broker.clear()
    broker.hub.close()
    broker.conn.release()


class LogRecorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, level: int = logging.DEBUG) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level]


@pytest.fixture(scope="module")
def worker_log() -> Any:
    recorder = LogRecorder()
    logger = logging.getLogger("interactive_tasks")
    old_level = logger.level
    logger.addHandler(recorder)
    logger.setLevel(logging.DEBUG)
    yield recorder
    logger.removeHandler(recorder)
    logger.setLevel(old_level)


def unit_worker(broker: UnitBroker, app: App = UNIT_APP) -> Worker:
    """A worker that is built but never run, publishing into the in-memory broker."""
    worker = Worker(app, hostname="fuzz@test", pool="threads", concurrency=1)
    worker.producer = Producer(broker.channel)
    worker.hub = broker.hub
    return worker


def valid_wire(**over: Any) -> dict[str, Any]:
    message, _token = build_message(add.name, [1, 2], {}, queue="default", reply_to=None)
    wire = message.to_wire()
    wire.update(over)
    return wire


# -- strategies --------------------------------------------------------------------------------
scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
           | st.binary(max_size=12))


def _containers(inner: Any) -> Any:
    return inner | st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=3)


values = _containers(_containers(scalars))  # up to two levels of lists and maps
TASK_FIELDS = list(valid_wire())


@st.composite
def task_bodies(draw: Any) -> bytes:
    """Random bytes, random maps, or a valid task message with one thing broken."""
    kind = draw(st.sampled_from(["bytes", "map", "field", "header", "drop", "flip", "truncate",
                                 "valid"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "map":
        keys = st.sampled_from(TASK_FIELDS) | st.text(max_size=6)
        return codec.dumps(draw(st.dictionaries(keys, values, max_size=8)))
    wire = valid_wire(task=draw(st.sampled_from([add.name, steps.name])))
    if kind == "field":
        wire[draw(st.sampled_from(TASK_FIELDS))] = draw(values)
    elif kind == "header":
        wire["headers"] = {draw(st.sampled_from([HEADER_DELIVERIES, "deliveries"])): draw(
            st.integers(-5, 2**64 - 1) | values)}
    elif kind == "drop":
        wire.pop(draw(st.sampled_from(TASK_FIELDS)))
    body = codec.dumps(wire)
    if kind == "flip":
        data = bytearray(body)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "truncate":
        return body[: draw(st.integers(0, len(body) - 1))]
    return body


content_types = st.sampled_from([codec.CONTENT_TYPE, codec.CONTENT_TYPE, codec.CONTENT_TYPE,
                                 None, "", codec.PICKLE_CONTENT_TYPE, "application/json",
                                 "text/plain"])


def expected_acceptance(app: App, body: bytes, headers: dict[str, Any] | None = None,
                        content_type: str | None = codec.CONTENT_TYPE,
                        redelivered: bool = False) -> TaskMessage | None:
    """The spec: the task message a worker must accept, or None when it must reject."""
    if app.secret is not None and not codec.verify(
            app.secret, body, (headers or {}).get(codec.SIGNATURE_HEADER)):
        return None
    if content_type not in (codec.CONTENT_TYPE, None, ""):
        return None
    try:
        parsed = TaskMessage.from_wire(codec.loads(body, app.conf.max_message_size))
    except ProtocolError:
        return None
    if parsed.task not in app.tasks:
        return None
    raw = parsed.headers.get(HEADER_DELIVERIES, 1)  # a bad count is taken as 1
    delivery = (raw if isinstance(raw, int) and raw > 0 else 1) + (1 if redelivered else 0)
    if delivery > app.conf.max_deliveries:
        return None
    return parsed


def check_task_message(app: App, broker: UnitBroker, body: bytes, log: LogRecorder, *,
                       headers: dict[str, Any] | None = None,
                       content_type: str | None = codec.CONTENT_TYPE,
                       redelivered: bool = False) -> None:
    broker.clear()
    worker = unit_worker(broker, app)
    message = broker.deliver(body, headers=headers, content_type=content_type,
                             redelivered=redelivered)
    before = len(log.records)
    expected = expected_acceptance(app, body, headers, content_type, redelivered)
    worker._on_task_message(message)  # nothing may escape
    new_logs = [r.getMessage() for r in log.records[before:]]
    accepted = set(worker.records) | set(worker.finished)
    letters = broker.memory.dead_letters()
    if expected is None:
        assert accepted == set(), f"a task record came from a malformed message: {accepted}"
        assert not worker.ready
        # dead-lettered, and the original settled, not requeued
        assert len(letters) == 1 and letters[0].body == body
        assert message.acknowledged and broker.memory.in_flight() == 0
        assert broker.memory.queue_size() == 0
        reason = letters[0].reason
        assert isinstance(reason, str) and reason
        assert letters[0].queue == TASK_QUEUE and letters[0].worker == "fuzz@test"
        assert [m for m in new_logs if m.startswith("rejected message") and reason in m], \
            new_logs
    else:
        assert not [m for m in new_logs if m.startswith("could not accept task")], new_logs
        assert accepted == {expected.id}
        assert letters == []
        # held by the worker: delivered, not settled
        assert not message.acknowledged and broker.memory.in_flight() == 1


# -- level (a): in-process -----------------------------------------------------------------------
def fuzz_settings(examples: int) -> Any:
    """Same examples on every run (a red CI run reproduces); ITASK_FUZZ_RANDOM=1 explores."""
    return settings(max_examples=examples, deadline=None, database=None,
                    derandomize=os.environ.get("ITASK_FUZZ_RANDOM") != "1",
                    suppress_health_check=[HealthCheck.too_slow])


@fuzz_settings(1000)
@given(body=task_bodies(), content_type=content_types, redelivered=st.booleans(),
       headers=st.dictionaries(st.text(max_size=10), values, max_size=3))
def test_fuzzed_task_messages_are_accepted_or_dead_lettered_never_crash(
        worker_log, unit_broker, body, content_type, redelivered, headers):
    check_task_message(UNIT_APP, unit_broker, body, worker_log, headers=headers,
                       content_type=content_type, redelivered=redelivered)


@fuzz_settings(300)
@given(body=task_bodies(), sign=st.sampled_from(["none", "right", "wrong", "garbage"]))
def test_fuzzed_task_messages_with_a_secret_need_the_right_signature(worker_log, unit_broker,
                                                                    body, sign):
    headers: dict[str, Any] = {}
    if sign == "right":
        headers[codec.SIGNATURE_HEADER] = codec.sign(b"unit-secret", body)
    elif sign == "wrong":
        headers[codec.SIGNATURE_HEADER] = codec.sign(b"other-secret", body)
    elif sign == "garbage":
        headers[codec.SIGNATURE_HEADER] = ["not", "a", "signature"]
    check_task_message(SECRET_APP, unit_broker, body, worker_log, headers=headers)
    if sign != "right":
        assert any("signature" in m for m in worker_log.messages(logging.ERROR)[-1:])


def test_the_unit_harness_accepts_a_valid_message(worker_log, unit_broker):
    """The fuzz above proves something only if valid messages do get through."""
    unit_broker.clear()
    worker = unit_worker(unit_broker)
    message = unit_broker.deliver(codec.dumps(valid_wire(id="ok-1")))
    worker._on_task_message(message)
    assert list(worker.records) == ["ok-1"] and len(worker.ready) == 1
    assert not message.acknowledged and unit_broker.memory.dead_letters() == []


def test_the_unit_harness_sees_a_rejection(worker_log, unit_broker):
    """…and only if a rejection shows: a dead letter on the broker, the original settled."""
    body = codec.dumps(valid_wire(id="bad-1", task="no.such.task"))
    check_task_message(UNIT_APP, unit_broker, body, worker_log)
    assert "no.such.task" in (unit_broker.memory.dead_letters()[0].reason or "")


TARGET_TOKEN = "the-right-token"


def control_worker(broker: UnitBroker) -> tuple[Worker, Any]:
    """A worker holding one queued task whose token is TARGET_TOKEN."""
    broker.clear()
    worker = unit_worker(broker)
    wire = valid_wire(id="target", task=steps.name, token=codec.token_digest(TARGET_TOKEN))
    worker._on_task_message(broker.deliver(codec.dumps(wire)))
    return worker, worker.records["target"]


CONTROL_QUEUE = UNIT_APP.names.control_queue_name("fuzz@test")


control_maps = st.fixed_dictionaries(
    {},
    optional={
        "v": values,
        "verb": st.sampled_from(sorted(ALL_VERBS)) | st.text(max_size=8) | values,
        "task_id": st.sampled_from(["target", "other", ""]) | values,
        "data": values | st.fixed_dictionaries({}, optional={
            "grace": values, "hard": values, "renew": values, "qid": values,
            "value": values, "what": values, "ids": values, "tokens": values,
            "expires": values, "terminate": values, "since": values, "run": values}),
        "sender": st.sampled_from(["fz.inbox.abc", ""]) | values,
        "rid": values, "cseq": values,
        "token": st.sampled_from([None, "wrong-token", ""]) | values,
        "ts": values,
    })


@st.composite
def control_bodies(draw: Any) -> bytes:
    kind = draw(st.sampled_from(["bytes", "map", "flip"]))
    if kind == "bytes":
        return draw(st.binary(max_size=120))
    body = codec.dumps(draw(control_maps))
    if kind == "flip" and body:
        data = bytearray(body)
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    return body


@fuzz_settings(1000)
@given(body=control_bodies(), content_type=content_types)
def test_fuzzed_control_messages_never_crash_and_never_steer_without_the_token(
        worker_log, unit_broker, body, content_type):
    worker, record = control_worker(unit_broker)
    message = unit_broker.deliver(body, content_type=content_type, queue=CONTROL_QUEUE)
    before = len(worker_log.records)
    worker.control.on_message(message)  # nothing may escape
    new = [r.getMessage() for r in worker_log.records[before:]]
    assert not [m for m in new if m.startswith("error handling control")], new
    # the task was not touched: no pause, cancel, message or answer without its token
    assert record.state is TaskState.PENDING and not record.is_final
    assert not record.start_paused and not record.cancel_requested
    assert record.early_messages == []
    assert worker.records.get("target") is record and list(worker.ready) == [record]
    try:
        parsed = ControlMessage.from_wire(codec.loads(body, UNIT_APP.conf.max_message_size))
        valid = content_type in (codec.CONTENT_TYPE, None, "")
    except ProtocolError:
        valid = False
    if not valid:
        assert [m for m in new if m.startswith("refused control message")], new
    elif parsed.verb in ("pause", "resume", "cancel", "message", "answer") and \
            parsed.task_id == "target":
        assert [m for m in new if m.startswith(f"refused {parsed.verb} for task target")], new


def test_the_unit_harness_steers_with_the_right_token(worker_log, unit_broker):
    worker, record = control_worker(unit_broker)
    body = codec.dumps(ControlMessage(verb="pause", task_id="target", token=TARGET_TOKEN,
                                      sender="fz.inbox.abc", rid="r1").to_wire())
    worker.control.on_message(unit_broker.deliver(body, queue=CONTROL_QUEUE))
    assert record.start_paused


# -- level (b): a real worker --------------------------------------------------------------------
def publish_raw(app: App, body: bytes, *, queue: str | None = None,
                content_type: str = codec.CONTENT_TYPE, headers: dict[str, Any] | None = None,
                conn: Any = None) -> None:
    target = app.names.task_queue(queue or "default")
    if conn is None:
        with app.connection() as fresh:
            publish_raw(app, body, queue=queue, content_type=content_type, headers=headers,
                        conn=fresh)
        return
    headers = dict(headers or {})
    if app.secret is not None:  # the embedded broker always signs: sign like a client
        headers.setdefault(codec.SIGNATURE_HEADER, codec.sign(app.secret, body))
    conn.Producer().publish(body, routing_key=target.routing_key, exchange="",
                            content_type=content_type, content_encoding="binary",
                            headers=headers, declare=[target])


def publish_control(app: App, worker: str, body: bytes) -> None:
    queue = app.names.control_queue(worker)
    with app.connection() as conn:
        conn.Producer().publish(body, routing_key=queue.routing_key, exchange="",
                                content_type=codec.CONTENT_TYPE, content_encoding="binary",
                                declare=[queue])


def mutate(rng: random.Random, body: bytes) -> bytes:
    data = bytearray(body)
    how = rng.choice(["flip", "flip", "truncate", "insert", "splice"])
    if how == "flip":
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif how == "truncate":
        del data[rng.randrange(len(data)):]
    elif how == "insert":
        extra = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        data[rng.randrange(len(data)):0] = extra
    else:
        start = rng.randrange(len(data))
        data[start:start + rng.randint(1, 8)] = b""
    return bytes(data)


def stats(app: App, worker: str) -> dict[str, Any]:
    for reply in app.inspect("stats", timeout=5, expect=1):
        if reply.get("worker") == worker:
            return reply["data"]
    raise AssertionError(f"no stats from {worker}")


@redis_only
def test_mutated_task_messages_against_a_real_worker(tasks, start_worker, broker):
    """~200 byte-mutated copies of a valid message: the worker stays up, runs exactly the
    mutants that are still valid task messages, and logs one rejection (with its reason)
    for every other one."""
    w = start_worker(concurrency=2)
    app = tasks.app
    rng = random.Random(20261121)
    mutants = []
    while len(mutants) < 200:
        # a fresh id per mutant (two valid mutants never share one); seeded: same run each time
        base_msg = TaskMessage(id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                               task=tasks.fuzz_target.name, args=["base"],
                               token_digest=codec.token_digest("t"), created=1_763_700_000.0)
        base = codec.dumps(base_msg.to_wire())
        body = mutate(rng, base)
        if body != base:
            mutants.append(body)
    accepted, rejected, delayed = [], 0, 0
    for body in mutants:
        parsed = expected_acceptance(app, body)
        if parsed is None:
            rejected += 1
        elif parsed.eta is not None and parsed.eta > time.time() + 1:
            delayed += 1
        else:
            accepted.append(parsed)
    assert rejected > 100 and len(accepted) >= 10  # both paths are exercised
    with app.connection() as conn:
        for body in mutants:
            publish_raw(app, body, conn=conn)
    wait_for(lambda: w.log().count("rejected message from") >= rejected, 30,
             message=f"{rejected} rejections logged")
    wait_for(lambda: stats(app, w.name)["processed"] >= len(accepted), 30,
             message=f"{len(accepted)} accepted mutants processed")
    holds_for(lambda: w.log().count("rejected message from") == rejected, 0.5,
              message="no extra rejections")
    assert stats(app, w.name)["processed"] == len(accepted)
    reasons = [line.split("rejected message from ", 1)[1] for line in w.log().splitlines()
               if "rejected message from " in line]
    assert all(": " in r and r.split(": ", 1)[1].strip() for r in reasons), reasons[:5]
    # only valid mutants ran (a mutant may still be valid: same id, other args …)
    ran = {p.name for p in broker.record_dir.glob("*.jsonl")}
    assert ran <= {f"{p.id}.jsonl" for p in accepted}
    assert w.proc.poll() is None
    assert tasks.add.delay(20, 22).result(timeout=20) == 42


@pytest.mark.parametrize("broker", ["embedded", "redis"], indirect=True)
def test_non_integer_delivery_count_header_is_not_fatal(tasks, start_worker):
    """A raw message whose 'itask-deliveries' header is not a count (found by this suite: it
    used to stop the worker on Redis and wedge the message on the embedded broker)."""
    w = start_worker(concurrency=1)
    poison = TaskMessage(id=str(uuid.uuid4()), task=tasks.add.name, args=[1, 1],
                         headers={HEADER_DELIVERIES: "x"})
    publish_raw(tasks.app, codec.dumps(poison.to_wire()))

    def settled() -> bool:
        record = tasks.app.results.get(poison.id)
        return bool(record and record["state"] == "succeeded") or "rejected message" in w.log()

    wait_for(settled, 10, message="the message run (count ignored) or dead-lettered")
    assert w.proc.poll() is None and "Traceback" not in w.log()
    assert tasks.add.delay(1, 2).result(timeout=10) == 3


def nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


DEEP_BODY = b"\x91" * 10_000 + b"\xc0"  # 10,000 nested one-element lists, as msgpack


def control_reply(app: App, worker: str, **fields: Any) -> dict[str, Any]:
    """Send one raw control message (as a client that skips its own checks would)."""
    [reply] = app.client.request(ControlMessage(**fields), worker, 5)
    return reply


# -- hostile control against a real worker -------------------------------------------------------
@redis_only
def test_hostile_control_gets_clear_errors_and_log_lines(tasks, start_worker):
    w = start_worker(concurrency=2)
    app = tasks.app
    a = tasks.steerable.start(100000, 0.01)
    b = tasks.steerable.start(100000, 0.01)
    wait_for(lambda: a.state is TaskState.RUNNING and b.state is TaskState.RUNNING,
             message="both running")

    # no token at all, as a raw message (the client library refuses before sending)
    reply = control_reply(app, w.name, verb="pause", task_id=a.id)
    assert reply["ok"] is False and reply["error"]["type"] == "NotAuthorized"
    assert f"refused pause for task {a.id} from {app.client.inbox.name}: wrong or missing " \
           "token" in w.log()
    # task B's token cannot steer task A
    with pytest.raises(NotAuthorized):
        app.attach(a.id, token=b.token).cancel()
    assert f"refused cancel for task {a.id}" in w.log()
    # an unknown verb
    reply = control_reply(app, w.name, verb="explode", task_id=a.id, token=a.token)
    assert reply["ok"] is False and "unknown control verb 'explode'" in reply["error"]["message"]
    assert "refused control message: unknown control verb 'explode'" in w.log()
    # an answer nobody asked for
    with pytest.raises(ControlError, match="no pending question"):
        a.answer("nobody asked")
    # oversized: the client refuses; a raw one is refused and logged by the worker
    limit = app.conf.max_message_size
    with pytest.raises(PayloadTooLarge):
        a.send("x" * (limit + 1))
    big = codec.dumps(ControlMessage(verb="message", task_id=a.id, token=a.token,
                                     data="x" * (limit + 10)).to_wire())
    publish_control(app, w.name, big)
    wait_for(lambda: f"refused control message: body of {len(big)} bytes is over "
             f"max_message_size={limit}" in w.log(), message="oversized control refused")
    # 10,000 nested lists: the client cannot encode them, a raw body is refused and logged
    with pytest.raises((TypeError, ValueError), match=r"(?i)recursion|nest|deep"):
        a.send(nested(10_000))
    publish_control(app, w.name, DEEP_BODY)
    wait_for(lambda: w.log().count("refused control message: body is not valid msgpack") >= 1,
             message="deep control refused")
    # a message to a finished task: the client knows; a raw one gets TaskFinished
    b.cancel(grace=0)
    with pytest.raises(TaskCancelled):
        b.result(timeout=10)
    with pytest.raises(TaskFinished):
        b.send("too late")
    reply = control_reply(app, w.name, verb="message", task_id=b.id, token=b.token,
                          data="too late", cseq=99)
    assert reply["ok"] is False and reply["error"]["type"] == "TaskFinished"
    # none of it touched task A, which still takes orders from its owner
    assert a.state is TaskState.RUNNING
    a.send("still here")
    wait_for(lambda: [e.data for e in a.snapshot().events if e.kind == "message"] == [
        {"echo": "still here"}], message="A still steerable")
    a.cancel(grace=0)
    with pytest.raises(TaskCancelled):
        a.result(timeout=10)
    assert w.proc.poll() is None


@redis_only
def test_answer_to_a_question_already_answered_is_refused(tasks, start_worker):
    w = start_worker(concurrency=1)
    handle = tasks.asker.start("Who?")
    wait_for(lambda: handle.question is not None, message="the question")
    reply = control_reply(tasks.app, w.name, verb="answer", task_id=handle.id,
                          token=handle.token, data={"qid": "not-that-one", "value": "X"})
    assert reply["ok"] is False and "already answered" in reply["error"]["message"]
    handle.answer("Ada")
    assert handle.result(timeout=10) == "hello Ada"


@redis_only
def test_deep_and_huge_task_messages_are_refused_clearly(tasks, start_worker):
    w = start_worker(concurrency=1)
    with pytest.raises((TypeError, ValueError), match=r"(?i)recursion|nest|deep"):
        tasks.add.delay(nested(10_000), 1)
    with pytest.raises(PayloadTooLarge):
        tasks.add.delay("x" * (tasks.app.conf.max_message_size + 1), "y")
    publish_raw(tasks.app, DEEP_BODY)
    wait_for(lambda: "rejected message from" in w.log() and "not valid msgpack" in w.log(),
             message="deep task message dead-lettered")
    assert tasks.add.delay(1, 1).result(timeout=10) == 2


@embedded_only
def test_task_args_nested_near_the_limit_fail_clearly(tasks, start_worker):
    w = start_worker(concurrency=1)
    try:
        handle = tasks.sleep_then.delay(0, nested(1021))
    except (TypeError, ValueError, ProtocolError):
        return  # refused up front: fine
    try:
        handle.result(timeout=4)
    except TaskFailed:
        pass  # a clear failure: fine
    except Exception as exc:
        w.kill()  # wedged: do not wait for its warm shutdown
        raise AssertionError(f"{type(exc).__name__}: {exc}") from None
    assert tasks.add.delay(1, 1).result(timeout=10) == 2


@embedded_only
def test_task_id_the_result_store_refuses_does_not_wedge_the_worker(tasks, start_worker):
    w = start_worker(concurrency=1)
    try:
        bad = tasks.add.apply_async((1, 1), task_id="a/b")
    except Exception:
        bad = None  # refused by the client: fine
    if bad is not None:
        with pytest.raises(Exception):  # noqa: B017 - any clear failure will do
            bad.result(timeout=5)
    try:
        assert tasks.add.delay(2, 2).result(timeout=3) == 4
    except TimeoutError as exc:
        raise AssertionError(f"the next task never finished: {exc}; worker log: "
                       f"{w.log().splitlines()[-1]}") from None


# -- a process without the secret ----------------------------------------------------------------
@redis_only
def test_without_the_secret_nobody_can_submit_control_or_forge_events(
        tasks, start_worker, broker):
    broker.extra["ITASK_SECRET"] = "s3cret"
    w = start_worker(concurrency=1)
    legit = App("tests", broker=broker.url, namespace=broker.namespace, secret="s3cret")
    guesser = App("tests", broker=broker.url, namespace=broker.namespace, secret="guess")
    try:
        handle = legit.send_task(tasks.steerable.name, [100000, 0.01], watch="all")
        wait_for(lambda: handle.state is TaskState.RUNNING, message="the legit task runs")
        assert tasks.app.secret is None

        # submit: unsigned, and signed with the wrong secret -> dead letters, never run
        unsigned = tasks.add.delay(1, 1)
        wrong = guesser.send_task(tasks.add.name, [2, 2])
        wait_for(lambda: w.log().count("rejected message from") >= 2, message="two rejections")
        assert w.log().count("message is unsigned or its signature is wrong") >= 2
        assert legit.results.get(unsigned.id) is None and legit.results.get(wrong.id) is None

        # control with the task's (leaked) token but without the secret: refused, logged
        for thief_app in (tasks.app, guesser):
            thief = thief_app.attach(handle.id, token=handle.token, timeout=0.5)
            with pytest.raises(ControlError):
                thief.pause(timeout=1.0)
        assert w.log().count("refused control message: control message is unsigned") >= 2
        holds_for(lambda: handle.state is TaskState.RUNNING, 0.3, message="not paused")

        # a forged final event pushed into the legit client's inbox is dropped
        forged = codec.dumps({"t": "events", "worker": w.name, "e": [
            [handle.id, 10**6, "succeeded", time.time(), {"result": "forged"}, 1]]})
        with tasks.app.connection() as conn:
            conn.Producer().publish(forged, routing_key=legit.client.inbox.name, exchange="",
                                    content_type=codec.CONTENT_TYPE,
                                    content_encoding="binary")
        holds_for(lambda: handle.state is TaskState.RUNNING, 0.5, message="forgery ignored")

        # the holder of the secret still steers it
        handle.pause()
        wait_for(lambda: handle.state is TaskState.PAUSED, message="paused by its owner")
        handle.cancel(grace=0)
        with pytest.raises(TaskCancelled):
            handle.result(timeout=10)
    finally:
        legit.close()
        guesser.close()


def test_capability_tokens_never_read_as_options():
    # `itask revoke ID --token T` failed in CI when T began with "-" (argparse took it for
    # an option): URL-safe base64 tokens did one time in 64.
    from interactive_tasks.codec import new_token

    tokens = {new_token() for _ in range(5000)}
    assert len(tokens) == 5000
    assert [t for t in tokens if t.startswith("-")] == []
