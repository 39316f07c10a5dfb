"""The ``itask web`` ASGI application (Starlette): pages, live streams, control, metrics.

Routes:

* ``/`` the single page (``static/index.html``; pages are ``#/tasks``, ``#/task/<id>``,
  ``#/workers``, ``#/overview``), ``/static/…`` its script and style;
* ``/api/config`` what the page needs to know (read-only, CSRF token);
* ``/api/tasks?state=&name=&worker=&queue=&q=&page=`` one page of the task table;
* ``/api/stream/cluster`` (SSE) workers, overview and a change counter, pushed on change;
* ``/api/stream/task/<id>`` (SSE) the task's view and its event entries; every message
  has an ``id`` (``<epoch>-<n>``): a reconnecting ``EventSource`` sends the last one back
  as ``Last-Event-ID`` and gets only what came after it (a new server epoch: all of it);
* ``POST /api/task/<id>/control`` ``{"action", "value"?, "data"?}`` — pause, resume,
  hard-pause, cancel, answer, send;
* ``/metrics`` Prometheus text.

Security: with ``auth`` every route but none needs HTTP Basic credentials. Control needs
(1) not ``read_only``, (2) the CSRF token (the ``itask_csrf`` cookie's value echoed in the
``X-CSRF-Token`` header, and a same-origin ``Origin`` when the browser sends one), and
(3) authority over the task in the ``X-Itask-Key`` header: the operator secret, or the
task's token (when the app has an operator secret, checked here against the digest the
task's worker reports; else passed on and checked by the worker).
Secrets and tokens never travel in URLs, so access logs never hold them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import codec
from ..errors import (
    ControlError,
    HardPauseUnsupported,
    InteractiveTasksError,
    NotAuthorized,
    TaskFinished,
)
from .metrics import render_metrics
from .state import Cluster, Feeds

if TYPE_CHECKING:
    from ..app import App

STATIC = Path(__file__).resolve().parent / "static"
#: Seconds between keep-alive comments on an idle stream (proxies close silent ones).
KEEPALIVE = 15.0
#: Seconds a stream waits after a change before sending, so bursts go out as one.
COALESCE = 0.05
ACTIONS = ("pause", "hard-pause", "resume", "cancel", "answer", "send")
CSRF_COOKIE = "itask_csrf"


class BasicAuth:
    """ASGI middleware: HTTP Basic credentials on every request (``user:password``)."""

    def __init__(self, app: ASGIApp, credentials: str, realm: str = "itask web") -> None:
        self.app = app
        self.expected = credentials.encode()
        self.realm = realm

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = b""
        for key, value in scope.get("headers") or ():
            if key == b"authorization" and value[:6].lower() == b"basic ":
                try:
                    given = base64.b64decode(value[6:].strip(), validate=True)
                except (binascii.Error, ValueError):
                    given = b""
        if not hmac.compare_digest(given, self.expected):
            response = PlainTextResponse(
                "login required", status_code=401,
                headers={"WWW-Authenticate": f'Basic realm="{self.realm}", charset="UTF-8"'})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class Dashboard:
    """The state behind one ``itask web`` server (cluster, task feeds, settings)."""

    def __init__(self, app: App, *, read_only: bool = False, cluster: Cluster | None = None,
                 feeds: Feeds | None = None) -> None:
        self.app = app
        self.read_only = read_only
        self.cluster = cluster if cluster is not None else Cluster(app)
        self.feeds = feeds if feeds is not None else Feeds(app)
        self.epoch = secrets.token_hex(4)
        #: task id -> a token already checked against the task's digest
        self.proven: dict[str, str] = {}
        self.csrf = secrets.token_urlsafe(24)

    def start(self) -> None:
        self.cluster.start()

    def close(self) -> None:
        self.cluster.close()
        self.feeds.close()


def _sse(data: Any, event_id: str | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return (head + "data: " + json.dumps(data, default=str, separators=(",", ":"))
            + "\n\n").encode()


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"ok": False, "error": message}, status_code=status)


def create_app(app: App, *, read_only: bool = False, auth: str | None = None,
               dashboard: Dashboard | None = None) -> Starlette:
    """The dashboard as an ASGI application (start the :class:`Dashboard` on startup)."""
    board = dashboard if dashboard is not None else Dashboard(app, read_only=read_only)

    async def index(request: Request) -> Response:
        response = FileResponse(STATIC / "index.html", headers={
            "Cache-Control": "no-store",
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                                       "style-src 'self'; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})
        response.set_cookie(CSRF_COOKIE, board.csrf, httponly=False, samesite="strict",
                            path="/")
        return response

    async def config(request: Request) -> Response:
        return JSONResponse({"read_only": board.read_only, "csrf": board.csrf,
                             "operator": board.app.secret is not None,
                             "namespace": board.app.names.namespace})

    async def tasks(request: Request) -> Response:
        q = request.query_params
        try:
            page = int(q.get("page") or 1)
            per_page = min(500, max(1, int(q.get("per_page") or 50)))
        except ValueError:
            return _error(400, "page and per_page are whole numbers")
        started = time.perf_counter()
        rows, total = board.cluster.tasks(
            state=q.get("state", ""), name=q.get("name", ""), worker=q.get("worker", ""),
            queue=q.get("queue", ""), search=q.get("q", ""), page=page, per_page=per_page)
        return JSONResponse({"tasks": rows, "total": total, "page": page,
                             "per_page": per_page, "now": time.time(),
                             "ms": round((time.perf_counter() - started) * 1000, 2)})

    async def cluster_stream(request: Request) -> Response:
        async def body() -> Any:
            seen = -1
            while not await request.is_disconnected():
                version = await board.cluster.changes.wait(seen, KEEPALIVE)
                if version == seen:
                    yield b": keep-alive\n\n"
                    continue
                seen = version
                yield _sse({"version": version, "now": time.time(),
                            "workers": board.cluster.workers(),
                            "overview": board.cluster.overview()})
                await asyncio.sleep(0.25)  # at most four pushes a second
        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store",
                                          "X-Accel-Buffering": "no"})

    async def task_stream(request: Request) -> Response:
        task_id = request.path_params["task_id"]
        try:
            feed = await asyncio.to_thread(board.feeds.get, task_id)
        except InteractiveTasksError as exc:
            return _error(503, str(exc))
        last = request.headers.get("last-event-id", "")
        epoch, _, number = last.partition("-")
        sent = int(number) if epoch == board.epoch and number.isdigit() else 0

        async def body() -> Any:
            nonlocal sent
            seen = -1
            first = True
            while not await request.is_disconnected():
                version = await feed.changes.wait(seen, KEEPALIVE)
                if version == seen:
                    yield b": keep-alive\n\n"
                    continue
                seen = version
                entries, view, count, gone = feed.since(sent)
                message: dict[str, Any] = {"view": view, "entries": entries, "from": sent}
                if gone:  # too far behind: the page starts over with what is kept
                    message["reset"] = True
                if first:
                    message["chart"] = feed.chart_points()
                    message["reset"] = sent == 0 or gone
                    first = False
                elif view.get("current") is not None and view.get("started"):
                    points = feed.chart_points()
                    message["point"] = points[-1] if points else None
                sent = count
                yield _sse(message, f"{board.epoch}-{count}")
                await asyncio.sleep(COALESCE)
        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store",
                                          "X-Accel-Buffering": "no"})

    def _csrf_ok(request: Request) -> bool:
        header = request.headers.get("x-csrf-token", "")
        cookie = request.cookies.get(CSRF_COOKIE, "")
        if not header or not hmac.compare_digest(header, board.csrf) or \
                not hmac.compare_digest(cookie, board.csrf):
            return False
        origin = request.headers.get("origin")
        if origin is not None:
            host = request.headers.get("host", "")
            if origin.split("://", 1)[-1] != host:
                return False
        return True

    def _token_proven(task_id: str, key: str) -> bool:
        if board.proven.get(task_id) == key:
            return True
        answers = board.app.control.inspect(timeout=1.0).query_task(task_id)
        for found in answers.values():
            summary = found.get(task_id) if isinstance(found, dict) else None
            if isinstance(summary, dict) and \
                    codec.token_matches(key, summary.get("token_digest")):
                board.proven[task_id] = key
                return True
        return False

    def _control(task_id: str, key: str, body: dict[str, Any]) -> None:
        action = body.get("action")
        secret = board.app.secret
        if secret is not None:
            # Every message of this app is signed, which makes it an operator: the key
            # must be the operator secret, or the task's token checked here against the
            # digest its worker holds.
            if not hmac.compare_digest(key.encode(), secret) and \
                    not _token_proven(task_id, key):
                raise NotAuthorized(f"not authorised to steer task {task_id}: give the "
                                    "operator secret or the task's token")
            handle = board.feeds.get(task_id).handle
        else:
            handle = board.app.attach(task_id, key or None)
        if action == "pause":
            handle.pause()
        elif action == "hard-pause":
            handle.pause(hard=True)
        elif action == "resume":
            handle.resume()
        elif action == "cancel":
            if not handle.cancel():
                raise TaskFinished(f"task {task_id} already ended")
        elif action == "answer":
            handle.answer(body.get("value", ""))
        elif action == "send":
            handle.send(body.get("data", ""))

    async def control(request: Request) -> Response:
        if board.read_only:
            return _error(403, "read-only dashboard: control is turned off")
        if not _csrf_ok(request):
            return _error(403, "missing or wrong CSRF token")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body must be JSON")
        if not isinstance(body, dict) or body.get("action") not in ACTIONS:
            return _error(400, f"action must be one of {', '.join(ACTIONS)}")
        key = request.headers.get("x-itask-key", "")
        if not key:
            return _error(401, "give the operator secret or the task's token")
        try:
            await asyncio.to_thread(_control, request.path_params["task_id"], key, body)
        except NotAuthorized as exc:
            return _error(403, str(exc))
        except (TaskFinished, HardPauseUnsupported) as exc:
            return _error(409, str(exc))
        except ControlError as exc:
            return _error(502, str(exc))
        except InteractiveTasksError as exc:
            return _error(502, str(exc))
        return JSONResponse({"ok": True})

    async def metrics(request: Request) -> Response:
        text = await asyncio.to_thread(render_metrics, board.cluster)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    middleware = [Middleware(BasicAuth, credentials=auth)] if auth else []

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        board.start()
        try:
            yield
        finally:
            board.close()

    web = Starlette(
        routes=[
            Route("/", index),
            Route("/api/config", config),
            Route("/api/tasks", tasks),
            Route("/api/stream/cluster", cluster_stream),
            Route("/api/stream/task/{task_id}", task_stream),
            Route("/api/task/{task_id}/control", control, methods=["POST"]),
            Route("/metrics", metrics),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        middleware=middleware,
        lifespan=lifespan,
    )
    web.state.dashboard = board
    return web
