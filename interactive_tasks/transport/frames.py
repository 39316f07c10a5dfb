"""Message bodies as they travel, apart from any broker's code.

* Frames: ``b"0" + msgpack`` unsigned, ``b"1" + hmac(32 bytes) + msgpack`` signed. On
  Redis, client inboxes and worker control queues are plain lists of them
  (:mod:`.redis_fast`).
* kombu's JSON envelope of a message, as kombu's Redis transport stores it; a task waiting
  for its ``eta`` is kept in it on every broker that keeps such tasks.
* What a delivered message says about the deliveries before it (:func:`redeliveries`).

Nothing here talks to a broker, so the worker and the client import it on every broker
and load no broker module they do not use.
"""

from __future__ import annotations

import logging
from typing import Any

from .. import codec
from ..errors import ProtocolError
from . import held_prefix

logger = logging.getLogger("interactive_tasks.worker")

__all__ = ["control_frame", "decode_frame", "describe_envelope", "encode_frame", "kombu_body",
           "kombu_envelope", "redeliveries", "settle_quietly", "task_envelope"]


def _mac(secret: bytes, body: bytes) -> bytes:
    # hashlib and hmac only with a secret: they load libcrypto, which a pool process
    # forked from the worker would otherwise map for the whole run (tests/test_imports.py)
    import hashlib
    import hmac

    return hmac.new(secret, body, hashlib.sha256).digest()


def _mac_matches(secret: bytes, body: bytes, mac: bytes) -> bool:
    import hmac  # as in _mac

    return hmac.compare_digest(_mac(secret, body), mac)


def encode_frame(body: bytes, secret: bytes | None) -> bytes:
    if secret is None:
        return b"0" + body
    return b"1" + _mac(secret, body) + body


def decode_frame(raw: bytes, secret: bytes | None) -> bytes:
    """The msgpack body of an inbox frame; raises ProtocolError for a bad or unsigned one."""
    if raw[:1] == b"1":
        body = raw[33:]
        if secret is not None and not _mac_matches(secret, body, raw[1:33]):
            raise ProtocolError("inbox frame has a wrong signature")
        return body
    if raw[:1] == b"0":
        if secret is not None:
            raise ProtocolError("inbox frame is unsigned but the app has a secret")
        return raw[1:]
    raise ProtocolError("inbox frame has an unknown format")


def control_frame(raw: bytes, secret: bytes | None) -> tuple[bytes, bool]:
    """The body of an item of a worker's control list, and whether it is signed by
    ``secret``: a raw frame (:func:`encode_frame`) or a message in kombu's envelope (a kombu
    publisher). Raises ProtocolError for a frame that is bad or unsigned where ``secret``
    wants a signature."""
    if raw[:1] == b"{":
        body, signature = kombu_body(raw)
        return body, secret is not None and codec.verify(secret, body, signature)
    return decode_frame(raw, secret), secret is not None


def kombu_envelope(body: bytes, queue: str, content_type: str,
                   headers: dict[str, Any], priority: int | None = None) -> bytes:
    """A message exactly as kombu's Redis transport stores it, so kombu consumers read it."""
    import base64
    import json
    import uuid

    return json.dumps({
        "body": base64.b64encode(body).decode(),
        "content-encoding": "binary",
        "content-type": content_type,
        "headers": headers,
        "properties": {
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": priority or 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
            "delivery_mode": 2,
        },
    }).encode()


def task_envelope(body: bytes, queue: str, secret: bytes | None,
                  priority: int | None = None) -> bytes:
    """A task message body in kombu's envelope, signed when there is a ``secret``."""
    headers = {}
    if secret is not None:
        headers[codec.SIGNATURE_HEADER] = codec.sign(secret, body)
    return kombu_envelope(body, queue, codec.CONTENT_TYPE, headers, priority)


def kombu_body(raw: bytes) -> tuple[bytes, Any]:
    """``(body, signature header)`` of a message in kombu's Redis envelope.

    Raises ProtocolError for anything else.
    """
    import base64
    import binascii
    import json

    try:
        envelope = json.loads(raw)
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            data = base64.b64decode(body)
        else:
            data = body.encode() if isinstance(body, str) else bytes(body)
        headers = envelope.get("headers") or {}
        return data, headers.get(codec.SIGNATURE_HEADER)
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        raise ProtocolError(f"not a kombu message: {exc}") from exc


def describe_envelope(raw: bytes) -> tuple[str | None, str | None]:
    """(task id, task name) of a task message in kombu's envelope; Nones when it is not
    one this project can read."""
    try:
        body, _ = kombu_body(raw)
        wire = codec.loads(body)
    except Exception:
        return None, None
    if not isinstance(wire, dict):
        return None, None
    task_id, name = wire.get("id"), wire.get("task")
    return (task_id if isinstance(task_id, str) else None,
            name if isinstance(name, str) else None)


def redeliveries(message: Any, namespace: str) -> int:
    """How many deliveries of ``message`` came before this one, as far as the broker says:
    1 for the ``redelivered`` flag (RabbitMQ: requeued after its consumer went away), plus
    one per time a worker's held copy was dead-lettered back (``x-death`` entries of the
    namespace's held queues, transport/amqp_hold.py; those of other queues, e.g. delay
    queues, do not count)."""
    count = 0
    if (getattr(message, "delivery_info", None) or {}).get("redelivered") or getattr(
            message, "redelivered", False):
        count += 1
    deaths = (getattr(message, "headers", None) or {}).get("x-death")
    if isinstance(deaths, list):
        prefix = held_prefix(namespace)
        for death in deaths:
            if isinstance(death, dict) and str(death.get("queue", "")).startswith(prefix):
                value = death.get("count", 1)
                count += value if isinstance(value, int) and value > 0 else 1
    return count


def settle_quietly(message: Any, task_id: str | None, *, requeue: bool | None = None
                   ) -> None:
    """Ack ``message`` (or reject it, with ``requeue``), logging instead of raising when
    that fails: a delivery from an earlier connection cannot be settled (py-amqp and
    kombu raise ``RecoverableConnectionError``), and the broker gives it out again."""
    try:
        if requeue is None:
            message.ack()
        else:
            message.reject(requeue=requeue)
    except Exception as exc:
        logger.warning("task %s: could not %s a delivery (%s); the broker delivers it "
                       "again", task_id or "?", "acknowledge" if requeue is None else
                       "reject", exc)
