"""``itask web``: a real server process, real workers, and the pages in headless Chromium.

The server runs as ``itask web`` (uvicorn) against the embedded broker, with a ``-E``
worker; the browser is Playwright driving /usr/bin/chromium (never a downloaded one).
Screenshots of each page go to ``test-artifacts/web/`` (docs/screenshots_web.py makes
the ones in docs/).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import IN_CI, ROOT, BrokerEnv, holds_for, wait_for

ARTIFACTS = ROOT / "test-artifacts" / "web"
CHROMIUM = os.environ.get("ITASK_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]

on_embedded = pytest.mark.parametrize("broker", ["embedded"], indirect=True)


def _require(ok: bool, message: str) -> None:
    if ok:
        return
    if IN_CI:
        pytest.fail(message + " (CI=true: the dashboard must be tested)")
    pytest.skip(message)


@pytest.fixture
def web_tools() -> None:
    missing = [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]
    _require(not missing, f"not installed: {', '.join(missing)} (the web extra)")


@pytest.fixture
def browser_tools(web_tools: None) -> None:
    _require(importlib.util.find_spec("playwright") is not None, "playwright not installed")
    _require(os.access(CHROMIUM, os.X_OK),
             f"{CHROMIUM} not found (apt-get install -y chromium; never `playwright install`)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class WebServer:
    """``itask web`` in its own process group, its output in a log file."""

    def __init__(self, env: BrokerEnv, log_dir: Path, *args: str,
                 extra_env: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"web-{self.port}.log"
        self._log = open(self.log_path, "ab")
        run_env = env.env()
        run_env.update(extra_env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "interactive_tasks.cli.main", "web", "-A", "tests.apps.tasks",
             "--port", str(self.port), *args],
            env=run_env, stdout=self._log, stderr=subprocess.STDOUT, cwd=str(ROOT),
            start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> WebServer:
        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"itask web exited:\n{self.log()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return True
            except OSError:
                return False

        wait_for(up, 20, message="itask web to listen")
        return self

    def request(self, path: str, *, method: str = "GET", body: Any = None,
                headers: dict[str, str] | None = None) -> tuple[int, str, dict[str, str]]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json",
                                              **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read().decode(), dict(resp.headers)
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode(), dict(err.headers)

    def csrf(self) -> dict[str, str]:
        """Headers of a same-origin control request with the page's CSRF token."""
        _, body, _ = self.request("/api/config")
        token = json.loads(body)["csrf"]
        return {"X-CSRF-Token": token, "Cookie": f"itask_csrf={token}"}

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()


class Proxy:
    """A TCP relay in front of the server whose connections the test can cut mid-stream."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.open: list[socket.socket] = []
        self.dropped = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_RDWR)

    def drop(self) -> None:
        """Cut every open connection (the listener stays: clients can come back)."""
        for sock in self.open:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.dropped += len(self.open) // 2
        self.open = []

    def close(self) -> None:
        self.drop()
        self.listener.close()


@pytest.fixture
def web(broker: BrokerEnv, tmp_path: Path, web_tools: None
        ) -> Iterator[Callable[..., WebServer]]:
    servers: list[WebServer] = []

    def start(*args: str, **kwargs: Any) -> WebServer:
        server = WebServer(broker, tmp_path, *args, **kwargs)
        servers.append(server)
        return server.wait_ready()

    yield start
    for server in servers:
        server.stop()
        assert "Traceback" not in server.log(), server.log()[-3000:]


@pytest.fixture
def chromium(browser_tools: None, tmp_path: Path) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()


def _page(browser: Any, server: WebServer | Proxy, where: str, key: str | None = None) -> Any:
    page = browser.new_context(viewport={"width": 1200, "height": 800}).new_page()
    page.goto(f"{server.url}/#/{where}")
    page.wait_for_selector("body[data-ready=true]", timeout=10_000)
    if key is not None:
        page.fill("#key", key)
        page.dispatch_event("#key", "change")
    return page


def _shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _progress(page: Any) -> str:
    return str(page.inner_text("#progress"))


def _settled(page: Any) -> str:
    """The progress text once it read the same twice, 0.2 s apart (10 s at most)."""
    seen: list[str] = []

    def same() -> bool:
        seen.append(_progress(page))
        return len(seen) > 1 and seen[-1] == seen[-2]

    wait_for(same, 10, interval=0.2, message="the progress to settle")
    return seen[-1]


def _state(page: Any) -> str:
    return str(page.inner_text("#state"))


def _seqs(page: Any) -> list[str]:
    return list(page.eval_on_selector_all("#lines .line", "rows => rows.map(r => r.dataset.seq)"))


# -- in the browser ---------------------------------------------------------------------------


@on_embedded
def test_a_running_task_appears_on_the_tasks_page_within_a_second(
        broker, start_worker, tasks, web, chromium):
    start_worker(extra_args=["-E"])
    server = web()
    page = _page(chromium, server, "tasks")
    page.wait_for_selector("#live.on", timeout=10_000)
    handle = tasks.steerable.start(100_000, 0.02)
    started = time.monotonic()
    page.wait_for_selector(f'tr[data-id="{handle.id}"]', timeout=1_000)
    took = time.monotonic() - started
    row = page.inner_text(f'tr[data-id="{handle.id}"]')
    assert "tests.apps.tasks.steerable" in row
    # the filters: by state, by name, by id prefix
    page.select_option("#f-state", "succeeded")
    page.wait_for_selector(f'tr[data-id="{handle.id}"]', state="detached", timeout=5_000)
    page.select_option("#f-state", "running")
    page.fill("#f-q", handle.id[:6])
    page.wait_for_selector(f'tr[data-id="{handle.id}"]', timeout=5_000)
    _shot(page, "tasks")
    print(f"task on the Tasks page {took * 1000:.0f} ms after start()")
    handle.cancel()


@on_embedded
def test_pause_resume_answer_and_cancel_from_the_task_page(
        broker, start_worker, tasks, web, chromium):
    start_worker(extra_args=["-E"])
    server = web()
    secret = tasks.app.secret.decode()
    handle = tasks.steerable.start(100_000, 0.02)
    page = _page(chromium, server, f"task/{handle.id}", key=secret)
    wait_for(lambda: _state(page) == "running" and _progress(page), 10,
             message="the task page to show it running")
    # polled from here: page.wait_for_function evaluates a string, which the dashboard's
    # Content-Security-Policy (no 'unsafe-eval') refuses once it has to poll
    wait_for(lambda: "/s" in page.text_content("#speed"), 10, message="a rate on the page")
    page.click("button[data-action=pause]")
    wait_for(lambda: _state(page) == "paused", 10, message="paused on the page")
    assert handle.state.value == "paused"
    frozen = _settled(page)  # a progress update already on its way may still land
    holds_for(lambda: _progress(page) == frozen, 1.0, message="the progress standing still")
    assert page.is_visible(".paused-note")
    _shot(page, "task-paused")
    page.click("button[data-action=resume]")
    wait_for(lambda: _state(page) == "running" and _progress(page) != frozen, 10,
             message="progress moving again after Resume")
    page.click("button[data-action=hard-pause]")  # the pool process is stopped at once
    wait_for(lambda: _state(page) == "paused", 10, message="hard-paused on the page")
    frozen = _settled(page)
    holds_for(lambda: _progress(page) == frozen, 0.5, message="the progress standing still")
    page.click("button[data-action=resume]")
    wait_for(lambda: _state(page) == "running" and _progress(page) != frozen, 10,
             message="progress moving again after the hard pause")
    page.fill("#message", '{"hello": 1}')
    page.click("button[data-action=send]")
    wait_for(lambda: any(r["what"] == "message" and r["data"] == {"hello": 1}
                         for r in broker.records(handle.id)), 10,
             message="the message to reach the task")
    page.wait_for_selector("#lines .k-message", timeout=10_000)  # the task's echo
    page.click("button[data-action=cancel]")
    wait_for(lambda: _state(page) == "cancelled", 10, message="cancelled on the page")
    assert page.inner_text("#outcome").startswith("cancelled at ")
    assert page.locator("#controls button:visible").count() == 0

    asker = tasks.asker.start("Your name?")
    page = _page(chromium, server, f"task/{asker.id}", key=secret)
    page.wait_for_selector("#answer", timeout=10_000)
    assert "Your name?" in page.inner_text("#question")
    _shot(page, "task-question")
    page.fill("#answer", "Ada")
    page.click("#question button[data-action=answer]")
    wait_for(lambda: _state(page) == "succeeded", 10, message="the answered task to end")
    assert page.inner_text("#outcome") == "result: hello Ada"
    assert asker.result(5) == "hello Ada"


@on_embedded
def test_two_browsers_see_the_same_events_and_a_reconnect_misses_nothing(
        broker, start_worker, tasks, web, chromium):
    start_worker(extra_args=["-E"])
    server = web()
    handle = tasks.narrate.start(60, 0.05)
    proxy = Proxy(server.port)
    one = _page(chromium, server, f"task/{handle.id}")
    two = _page(chromium, proxy, f"task/{handle.id}")  # through a line the test can cut
    # cut the second page's stream mid-task: EventSource reconnects with Last-Event-ID
    # (after ~1 s, while the task logs a line every 50 ms)
    wait_for(lambda: len(_seqs(two)) >= 5, 20, message="the first events")
    proxy.drop()
    wait_for(lambda: proxy.open, 10, message="the page to reconnect")
    wait_for(lambda: _state(one) == "succeeded" and _state(two) == "succeeded", 30,
             message="both pages to see the end")
    assert _seqs(one) == _seqs(two)
    seqs = _seqs(one)
    assert len(seqs) == len(set(seqs)), "an event shown twice"
    numbers = [int(s.split(".")[1]) for s in seqs]
    assert numbers == sorted(numbers)
    logs = one.eval_on_selector_all("#lines .k-log", "rows => rows.length")
    assert logs == 60  # one line a step: none lost, none doubled
    assert proxy.dropped >= 1
    proxy.close()


@on_embedded
def test_a_resumed_stream_starts_after_the_last_event_id(broker, start_worker, tasks, web):
    start_worker(extra_args=["-E"])
    server = web()
    handle = tasks.narrate.start(30, 0.02)

    def read(last: str | None) -> list[tuple[str, dict[str, Any]]]:
        req = urllib.request.Request(f"{server.url}/api/stream/task/{handle.id}",
                                     headers={"Last-Event-ID": last} if last else {})
        out = []
        with urllib.request.urlopen(req, timeout=10) as resp:
            ident = ""
            for raw in resp:
                line = raw.decode().rstrip("\n")
                if line.startswith("id: "):
                    ident = line[4:]
                elif line.startswith("data: "):
                    out.append((ident, json.loads(line[6:])))
                    break  # a finished task: the first message carries everything
        return out

    read(None)  # from now on the server follows the task
    assert handle.wait(30).value == "succeeded"
    wait_for(lambda: read(None)[0][1]["view"]["final"], 10, message="the end on the server")
    ((ident, full),) = read(None)
    epoch, _, count = ident.partition("-")
    assert full["reset"] and int(count) == len(full["entries"]) > 30
    ((_, rest),) = read(f"{epoch}-10")
    assert not rest["reset"] and rest["entries"] == full["entries"][10:]
    ((_, other),) = read("otherepoch-10")  # another server's numbers: everything again
    assert other["reset"] and other["entries"] == full["entries"]


@on_embedded
def test_control_without_authority_is_refused_and_changes_nothing(
        broker, start_worker, tasks, web, chromium):
    start_worker(extra_args=["-E"])
    server = web()
    handle = tasks.steerable.start(100_000, 0.02)
    wait_for(lambda: handle.state.value == "running", 10, message="the task to start")
    path = f"/api/task/{handle.id}/control"
    secret = tasks.app.secret.decode()
    csrf = server.csrf()
    cases = [
        ({}, 403),  # no CSRF token
        ({"X-CSRF-Token": "forged", "Cookie": "itask_csrf=forged", "X-Itask-Key": secret},
         403),
        ({**csrf, "X-Itask-Key": secret, "Origin": "http://evil.example"}, 403),
        (csrf, 401),  # no authority at all
        ({**csrf, "X-Itask-Key": "not-the-secret"}, 403),
        ({**csrf, "X-Itask-Key": handle.token + "x"}, 403),  # another task's, say
    ]
    for headers, expected in cases:
        for action in ("pause", "cancel"):
            status, body, _ = server.request(path, method="POST", body={"action": action},
                                             headers=headers)
            assert status == expected, (headers.keys(), body)
    holds_for(lambda: handle.state.value == "running", 0.5, message="the task running")
    assert [r["what"] for r in broker.records(handle.id)] == ["start"]

    page = _page(chromium, server, f"task/{handle.id}")  # no key typed
    page.wait_for_selector("button[data-action=pause]", timeout=10_000)
    page.click("button[data-action=pause]")
    page.wait_for_selector("#status.error", timeout=10_000)
    assert "401" in page.inner_text("#status")
    assert handle.state.value == "running"
    # the task's own token is authority too: checked against the digest its worker holds
    status, _, _ = server.request(path, method="POST", body={"action": "pause"},
                                  headers={**csrf, "X-Itask-Key": handle.token})
    assert status == 200
    wait_for(lambda: handle.state.value == "paused", 10, message="the pause with the token")
    status, _, _ = server.request(path, method="POST", body={"action": "resume"},
                                  headers={**csrf, "X-Itask-Key": secret})
    assert status == 200
    wait_for(lambda: handle.state.value == "running", 10, message="the operator's resume")
    handle.cancel()
    assert secret not in server.log() and handle.token not in server.log()


@on_embedded
def test_read_only_shows_no_buttons_and_refuses_control(
        broker, start_worker, tasks, web, chromium):
    start_worker(extra_args=["-E"])
    server = web("--read-only")
    handle = tasks.asker.start("Proceed?")
    page = _page(chromium, server, f"task/{handle.id}")
    wait_for(lambda: "Proceed?" in page.inner_text("#question"), 10,
             message="the question on the page")
    assert page.locator("button").count() == 0 and page.locator("#answer").count() == 0
    assert page.is_hidden("#key-box") and page.is_visible("#readonly")
    secret = tasks.app.secret.decode()
    for action in ("pause", "cancel", "answer"):
        status, body, _ = server.request(
            f"/api/task/{handle.id}/control", method="POST",
            body={"action": action, "value": "yes"},
            headers={**server.csrf(), "X-Itask-Key": secret})
        assert status == 403 and "read-only" in body
    holds_for(lambda: handle.state.value == "running", 0.5, message="the task waiting")
    handle.cancel()


@on_embedded
def test_workers_and_overview_pages(broker, start_worker, tasks, web, chromium):
    worker = start_worker(extra_args=["-E"])
    server = web()
    handle = tasks.steerable.start(100_000, 0.02)
    page = _page(chromium, server, "workers")
    page.wait_for_selector("tr.worker", timeout=10_000)
    wait_for(lambda: "busy" in page.inner_text("table.workers"), 10,
             message="a busy pool process")
    text = page.inner_text("table.workers")
    assert worker.name in text and "online" in text and str(worker.pid) in text
    _shot(page, "workers")
    page.goto(f"{server.url}/#/overview")
    page.wait_for_selector("#dead-letters", timeout=10_000)
    wait_for(lambda: "default" in page.inner_text("table.queues"), 10,
             message="the default queue's depth")
    _shot(page, "overview")
    handle.cancel()


# -- without a browser ------------------------------------------------------------------------


@on_embedded
def test_metrics_parse_with_the_prometheus_parser(broker, start_worker, tasks, web):
    parser = pytest.importorskip("prometheus_client.parser")
    start_worker(extra_args=["-E"])
    server = web()
    handle = tasks.steerable.start(100_000, 0.02)

    def families() -> dict[str, Any]:
        status, body, headers = server.request("/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain")
        return {f.name: f for f in parser.text_string_to_metric_families(body)}

    def running() -> bool:
        found = families()
        workers = {s.labels["status"]: s.value for s in found["itask_workers"].samples}
        busy = [s for s in found["itask_pool_processes"].samples if s.labels["state"] == "busy"]
        return workers.get("online") == 1 and busy and any(
            s.labels == {"state": "running", "name": "tests.apps.tasks.steerable"}
            and s.value == 1 for s in found["itask_tasks"].samples)

    wait_for(running, 10, message="the running task and its worker in /metrics")
    found = families()
    for name in ("itask_queue_depth", "itask_dead_letters", "itask_workers",
                 "itask_pool_processes", "itask_worker_processed", "itask_monitor_events"):
        assert name in found, name
    assert {s.labels["status"]: s.value for s in found["itask_workers"].samples} == \
        {"online": 1, "offline": 0}
    busy = [s for s in found["itask_pool_processes"].samples if s.labels["state"] == "busy"]
    assert busy and busy[0].value == 1
    assert found["itask_monitor_events"].type == "counter"
    handle.cancel()


@on_embedded
def test_a_login_is_needed_with_auth_and_beyond_localhost(broker, web, tmp_path):
    server = web("--auth", "ops:s3cret")
    assert server.request("/")[0] == 401
    assert server.request("/metrics")[0] == 401
    import base64

    good = {"Authorization": "Basic " + base64.b64encode(b"ops:s3cret").decode()}
    bad = {"Authorization": "Basic " + base64.b64encode(b"ops:wrong").decode()}
    assert server.request("/api/config", headers=bad)[0] == 401
    assert server.request("/api/config", headers=good)[0] == 200
    out = subprocess.run(
        [sys.executable, "-m", "interactive_tasks.cli.main", "web", "-A", "tests.apps.tasks",
         "--address", "0.0.0.0", "--port", "1"],
        env=broker.env(), capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "itask: itask web on 0.0.0.0 (beyond this machine) needs a login: "
        "--auth user:password or ITASK_WEB_AUTH"]


def test_without_the_web_extra_itask_web_says_which_extra_to_install(tmp_path):
    code = ("import sys; sys.modules['starlette'] = None; "
            "from interactive_tasks.cli.main import main; "
            "sys.exit(main(['web', '-A', 'tests.apps.tasks']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=str(ROOT),
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        'itask: itask web needs the web extra: pip install "interactive_tasks[web]"']


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_without_an_operator_secret_the_worker_checks_the_token(
        broker, start_worker, tasks, web):
    assert tasks.app.secret is None  # a Redis cluster without ITASK_SECRET
    start_worker(extra_args=["-E"])
    server = web()
    handle = tasks.steerable.start(100_000, 0.02)
    wait_for(lambda: handle.state.value == "running", 10, message="the task to start")
    path = f"/api/task/{handle.id}/control"
    csrf = server.csrf()
    status, body, _ = server.request(path, method="POST", body={"action": "pause"},
                                     headers={**csrf, "X-Itask-Key": "not-its-token"})
    assert status == 403 and "NotAuthorized" not in body and "token" in body, body
    holds_for(lambda: handle.state.value == "running", 0.3, message="the task running")
    status, body, _ = server.request(path, method="POST", body={"action": "pause"},
                                     headers={**csrf, "X-Itask-Key": handle.token})
    assert status == 200, body
    wait_for(lambda: handle.state.value == "paused", 10, message="the pause with the token")
    _, text, _ = server.request("/metrics")
    assert 'itask_queue_depth{queue="default"}' in text  # measured on Redis too
    handle.cancel()


def test_a_feed_numbers_its_entries_across_the_ones_it_drops(web_tools, monkeypatch):
    from interactive_tasks import App
    from interactive_tasks.handle import TaskHandle
    from interactive_tasks.protocol import Event
    from interactive_tasks.web import state

    monkeypatch.setattr(state, "MAX_ENTRIES", 20)
    app = App("web-unit", broker="embedded:///nonexistent-web-unit")
    handle: TaskHandle[Any] = TaskHandle(app, "t1", name="job", watch=False)
    feed = state.TaskFeed(handle)
    try:
        for i in range(1, 26):
            handle._on_event(Event("t1", i, "log", 100.0 + i, {"level": "info",
                                                                "text": f"line {i}"}))
        entries, _, count, gone = feed.since(0)
        assert count == 25 and gone and len(entries) <= 20
        assert entries[-1]["text"] == "line 25"
        entries, _, _, gone = feed.since(10)  # a reader that saw 10: entries 11.. are kept
        assert not gone and [e["text"] for e in entries] == [f"line {i}" for i in range(11, 26)]
        assert feed.since(25)[0] == [] and not feed.since(25)[3]
        assert feed.since(2)[3]  # entries 3.. are partly gone: that reader starts over
    finally:
        app.close()


def test_a_port_in_use_is_one_line_and_exit_code_2(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "interactive_tasks.cli.main", "web", "-A",
             "tests.apps.tasks", "--port", str(port)],
            capture_output=True, text=True, timeout=60, cwd=str(ROOT),
            env={**os.environ, "PYTHONPATH": str(ROOT), "ITASK_HOME": str(tmp_path)})
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"itask: cannot listen on 127.0.0.1:{port}: Address already in use "
        "(choose another with --port)"]
