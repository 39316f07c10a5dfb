"""``itask web``: a live dashboard in the browser that attaches to running tasks.

Needs the ``web`` extra (``pip install "interactive_tasks[web]"``: Starlette and uvicorn).
:func:`serve` runs it; :func:`interactive_tasks.web.server.create_app` gives the ASGI
application to mount elsewhere. Nothing here imports Starlette until it is used, so a
plain install can import the package and say which extra is missing.
"""

from __future__ import annotations

import ipaddress
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..app import App

__all__ = ["AUTH_ENV", "HINT", "WebUnavailable", "serve"]

HINT = 'itask web needs the web extra: pip install "interactive_tasks[web]"'
#: The environment variable that gives ``--auth`` (``user:password``).
AUTH_ENV = "ITASK_WEB_AUTH"


class WebUnavailable(ImportError):
    """Starlette or uvicorn cannot be imported (the ``web`` extra is not installed)."""


def is_loopback(address: str) -> bool:
    """Whether ``address`` only accepts connections from this machine."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def check_auth(address: str, auth: str | None) -> str | None:
    """The credentials to require, or None; raises ValueError when a login is required.

    Beyond the loopback interface nothing shows before a login.
    """
    auth = auth or os.environ.get(AUTH_ENV) or None
    if auth is not None and (":" not in auth or auth.startswith(":")):
        raise ValueError("--auth takes user:password")
    if auth is None and not is_loopback(address):
        raise ValueError(f"itask web on {address} (beyond this machine) needs a login: "
                         f"--auth user:password or {AUTH_ENV}")
    return auth


def serve(app: App, *, address: str = "127.0.0.1", port: int = 5555,
          auth: str | None = None, read_only: bool = False, log_level: str = "info",
          **uvicorn_options: Any) -> None:
    """Run the dashboard until interrupted.

    Raises :class:`WebUnavailable` without the ``web`` extra and ValueError for a bad
    ``auth`` or a public ``address`` without one.
    """
    try:
        import uvicorn

        from .server import create_app
    except ImportError as exc:
        raise WebUnavailable(HINT) from exc
    credentials = check_auth(address, auth)
    asgi = create_app(app, read_only=read_only, auth=credentials)
    uvicorn.run(asgi, host=address, port=port, log_level=log_level, **uvicorn_options)
