"""The wire format: msgpack with datetime, UUID and bytes; pickle only when switched on.

Bodies travel as raw bytes under :data:`CONTENT_TYPE`; kombu never decodes them, so every
decode failure surfaces here as :class:`ProtocolError` carrying the raw bytes (which is
what goes to the dead-letter queue).
"""

from __future__ import annotations

import datetime as _dt
import struct
import uuid
from typing import Any

import msgpack

from .errors import PayloadTooLarge, ProtocolError

CONTENT_TYPE = "application/x-itask-msgpack"
PICKLE_CONTENT_TYPE = "application/x-itask-pickle"
SIGNATURE_HEADER = "itask-sig"

_EXT_DATETIME = 1
_EXT_UUID = 2
_EXT_TUPLE = 3

#: The default limit for one message body. Larger payloads belong in object storage.
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024


def _default(obj: Any) -> Any:
    if isinstance(obj, _dt.datetime):
        if obj.tzinfo is None:
            # Naive datetimes keep no zone: encode the wall-clock fields with a flag.
            return msgpack.ExtType(_EXT_DATETIME, struct.pack(">?d", False, obj.timestamp()))
        return msgpack.ExtType(_EXT_DATETIME, struct.pack(">?d", True, obj.timestamp()))
    if isinstance(obj, uuid.UUID):
        return msgpack.ExtType(_EXT_UUID, obj.bytes)
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    raise TypeError(
        f"cannot serialize {type(obj).__name__!r} with msgpack; "
        "send plain data (dict, list, str, int, float, bytes, datetime, UUID)"
    )


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_DATETIME:
        aware, ts = struct.unpack(">?d", data)
        if aware:
            return _dt.datetime.fromtimestamp(ts, tz=_dt.timezone.utc)
        return _dt.datetime.fromtimestamp(ts)
    if code == _EXT_UUID:
        return uuid.UUID(bytes=data)
    return msgpack.ExtType(code, data)


def dumps(obj: Any) -> bytes:
    """Serialize ``obj``; raises ``TypeError`` naming the type msgpack cannot carry."""
    return msgpack.packb(obj, default=_default, use_bin_type=True, datetime=False)


def loads(data: bytes, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> Any:
    """Deserialize ``data``.

    Raises :class:`PayloadTooLarge` when ``data`` is over ``max_size`` bytes and
    :class:`ProtocolError` for anything that is not valid msgpack (including nesting
    deeper than msgpack's stack limit).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"body is {type(data).__name__}, expected bytes", None)
    if len(data) > max_size:
        raise PayloadTooLarge(
            f"body of {len(data)} bytes is over max_message_size={max_size}", bytes(data)
        )
    try:
        return msgpack.unpackb(
            data,
            ext_hook=_ext_hook,
            raw=False,
            strict_map_key=False,
        )
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"body is not valid msgpack: {exc}", bytes(data)) from None


def pickle_loads(data: bytes) -> Any:
    """Unpickle; only ever called when the app's ``allow_pickle`` setting is on."""
    import pickle

    try:
        return pickle.loads(data)
    except Exception as exc:
        raise ProtocolError(f"body is not a valid pickle: {exc}", bytes(data)) from None


def sign(secret: bytes, body: bytes) -> str:
    """HMAC-SHA256 of ``body`` with the shared secret, hex encoded."""
    # hashlib and hmac where used: they load libcrypto, which a pool process forked from
    # the worker would otherwise map for the whole run (tests/test_imports.py)
    import hashlib
    import hmac

    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(secret: bytes, body: bytes, signature: object) -> bool:
    """Constant-time check of a signature made by :func:`sign`."""
    import hmac  # where used, as in sign()

    if not isinstance(signature, str):
        return False
    return hmac.compare_digest(sign(secret, body), signature)


def new_token() -> str:
    """A fresh capability token: 144 random bits in hex, so it never starts with ``-``
    (``itask cancel ID --token -x…`` would be read as an option: one token in 64 did)."""
    import secrets  # where used, as hashlib in sign(): secrets imports hmac

    return secrets.token_hex(18)


def token_digest(token: str) -> str:
    """What a task message carries instead of its capability token."""
    import hashlib  # where used, as in sign()

    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: object, digest: object) -> bool:
    """Constant-time check that ``token`` hashes to ``digest``."""
    import hmac  # where used, as in sign()

    if not isinstance(token, str) or not isinstance(digest, str):
        return False
    return hmac.compare_digest(token_digest(token), digest)
