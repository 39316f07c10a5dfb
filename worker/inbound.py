"""What the worker checks in every message the broker hands it: the signature and the body.

Used for tasks (``Worker``) and for control (``ControlRouter``) alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from interactive_tasks import codec
from interactive_tasks.errors import ProtocolError

if TYPE_CHECKING:
    from interactive_tasks.app import App


def signed_by(app: App, message: Any) -> bool:
    """Whether the kombu ``message`` carries a good signature of ``app``'s secret (True
    when the app has no secret: nothing to check)."""
    secret = app.secret
    if secret is None:
        return True
    return codec.verify(secret, message.body,
                        (message.headers or {}).get(codec.SIGNATURE_HEADER))


def decode_body(app: App, message: Any) -> Any:
    """The kombu ``message``'s body, decoded; raises ProtocolError for pickle the app does
    not allow, an unsupported content type, or a body ``codec.loads`` refuses."""
    content_type = message.content_type
    body = message.body
    if content_type == codec.PICKLE_CONTENT_TYPE:
        if not app.conf.allow_pickle:
            raise ProtocolError("pickle is refused (set allow_pickle=True to accept it)",
                                body)
        return codec.pickle_loads(body)
    if content_type not in (codec.CONTENT_TYPE, None, ""):
        raise ProtocolError(f"unsupported content type {content_type!r}", body)
    return codec.loads(body, app.conf.max_message_size)
