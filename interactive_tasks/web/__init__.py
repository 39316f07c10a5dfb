"""``itask web``: a live dashboard in the browser that attaches to running tasks.

Needs the ``web`` extra (``pip install "interactive_tasks[web]"``: Starlette and uvicorn).
:func:`serve` runs it; :func:`interactive_tasks.web.server.create_app` gives the ASGI
application to mount elsewhere. Nothing here imports Starlette until it is used, so a
plain install can import the package and say which extra is missing.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..app import App

__all__ = ["AUTH_ENV", "HINT", "WebUnavailable", "check_port", "serve"]

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


def check_port(address: str, port: int) -> None:
    """Raise OSError, in one readable line, when ``address:port`` cannot be listened on.

    Checked before the server starts so that a port in use is one line, not the ASGI
    server's start-up log and traceback.
    """
    try:
        infos = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(f"cannot listen on {address}: {exc.strerror}") from None
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        # As the server itself binds: SO_REUSEADDR, so a port in TIME_WAIT is not "in use".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            raise OSError(f"cannot listen on {address}:{port}: {exc.strerror} "
                          f"(choose another with --port)") from None


def serve(app: App, *, address: str = "127.0.0.1", port: int = 5555,
          auth: str | None = None, read_only: bool = False, log_level: str = "info",
          **uvicorn_options: Any) -> None:
    """Run the dashboard until interrupted.

    Raises :class:`WebUnavailable` without the ``web`` extra and ValueError for a bad
    ``auth`` or a public ``address`` without one, OSError when ``address:port`` cannot
    be listened on (a port in use).
    """
    try:
        import uvicorn

        from .server import create_app
    except ImportError as exc:
        raise WebUnavailable(HINT) from exc
    credentials = check_auth(address, auth)
    check_port(address, port)
    asgi = create_app(app, read_only=read_only, auth=credentials)
    uvicorn.run(asgi, host=address, port=port, log_level=log_level, **uvicorn_options)
