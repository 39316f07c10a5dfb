"""Every install a user can type, tested: the built wheel in fresh virtualenvs.

``python tests/smoke_install.py`` (run by ``.ci/run`` before the test suite) builds the
wheel once, then for each entry of :data:`INSTALLS` makes a fresh virtualenv with that
Python, installs the wheel with that extra alone (never the dev tools, which would hide
a missing dependency), and in a directory outside the repository runs :func:`check` on
every broker: the ``itask worker`` console script starts, an interactive task streams
its progress and echoes a message, ``pause(wait=True)`` holds it still,
``resume(wait=True)`` lets it go on, ``cancel()`` ends it. A plain install also runs
``itask demo`` and says in one line which extra ``itask web`` needs; the ``jupyter`` extra
builds the widget classes; the ``web`` extra builds the dashboard's ASGI application from
the installed package (its page, script and style included); the ``gevent`` extra runs
its worker with ``-P gevent``, the ``eventlet`` extra with ``-P eventlet``, and the others
say in one line what ``-P gevent`` / ``-P eventlet`` needs.

Exits non-zero when anything failed, after a line per install and broker. Needs Redis on
127.0.0.1:6379 and RabbitMQ on 127.0.0.1:5672 (``.ci/run`` starts them). Only the
standard library is imported here: :func:`check` runs inside the fresh virtualenvs.

``ITASK_SMOKE_PYTHONS=3.10=/path/python,3.13=/path/python`` overrides where each Python is.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYENV = Path("/root/.pyenv/versions")
#: minor version -> interpreter: every supported one (requires-python and the classifiers
#: say these, tests/test_packaging.py checks)
PYTHONS = {
    "3.10": PYENV / "3.10.13/bin/python",
    "3.11": PYENV / "3.11.7/bin/python",
    "3.12": PYENV / "3.12.1/bin/python",
    "3.13": PYENV / "3.13.0/bin/python",
}
BROKERS = {
    "embedded": "embedded://",  # a directory of its own per check: see check()
    "redis": "redis://127.0.0.1:6379/0",
    "amqp": "amqp://guest:guest@127.0.0.1:5672//",
}


@dataclass(frozen=True)
class Install:
    python: str  # a key of PYTHONS
    extra: str = ""  # "" = no extras

    @property
    def label(self) -> str:
        return f"python {self.python}, " + (f"[{self.extra}]" if self.extra else "no extras")


#: plain on every Python; each extra alone on one of them
INSTALLS = [
    Install("3.10"),
    Install("3.11"),
    Install("3.12"),
    Install("3.13"),
    Install("3.13", "jupyter"),
    Install("3.10", "gevent"),
    Install("3.12", "web"),
    Install("3.13", "eventlet"),
]

SMOKE_APP = '''
import os
import time

from interactive_tasks import App, InteractiveTask

app = App("smoke", broker=os.environ["SMOKE_BROKER"], namespace=os.environ["SMOKE_NS"])


@app.task(base=InteractiveTask)
def steps(self, n, delay):
    for i in range(n):
        self.progress(i + 1, n)
        message = self.receive(timeout=0)
        if message is not None:
            self.send({"echo": message})
        time.sleep(delay)
    return n


@app.task
def add(x, y):
    return x + y
'''


# -- inside a fresh virtualenv ---------------------------------------------------------------
def check(broker: str, pool: str, workdir: Path) -> None:
    """One broker: a worker, a streaming task steered by pause, resume and cancel.

    Raises AssertionError (or the library's error) on the first thing that is wrong.
    """
    import interactive_tasks

    where = Path(interactive_tasks.__file__).resolve()
    assert Path(sys.prefix).resolve() in where.parents, f"imported from {where}"
    from interactive_tasks import TaskCancelled, TaskState

    (workdir / "smoke_app.py").write_text(SMOKE_APP)
    os.environ["SMOKE_BROKER"] = (f"embedded://{workdir / 'broker'}" if broker == "embedded"
                                  else BROKERS[broker])
    os.environ["SMOKE_NS"] = f"smoke{uuid.uuid4().hex[:8]}"
    os.environ["ITASK_HOME"] = str(workdir / "home")
    sys.path.insert(0, str(workdir))
    import smoke_app

    log = workdir / "worker.log"
    itask = Path(sys.executable).with_name("itask")
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            [str(itask), "worker", "-A", "smoke_app", "-P", pool, "-c", "2", "-l", "info"],
            cwd=workdir, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    app = smoke_app.app
    try:
        deadline = time.monotonic() + 30
        while not app.ping(timeout=0.5, expect=1):
            assert worker.poll() is None, f"the worker exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no worker:\n{log.read_text()}"
        assert smoke_app.add.delay(2, 3).result(timeout=30) == 5

        handle = smoke_app.steps.start(100000, 0.01)
        handle.send("hello")
        echoed = False
        for event in handle.events(timeout=30):
            echoed = echoed or (event.kind == "message" and event.data == {"echo": "hello"})
            if echoed and handle.progress is not None and handle.progress.current >= 3:
                break
        assert echoed, "no echo of the message"
        handle.pause(wait=True, timeout=20)
        assert handle.state is TaskState.PAUSED, handle.state
        held = handle.progress.current
        time.sleep(0.3)  # a window in which a paused task must not move (no condition to poll)
        assert handle.progress.current == held, "progress moved while paused"
        handle.resume(wait=True, timeout=20)
        assert handle.cancel(grace=0) is True
        try:
            handle.result(timeout=30)
            raise AssertionError("the cancelled task succeeded")
        except TaskCancelled:
            pass
        assert handle.cancel() is False
    finally:
        app.close()
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(5)
        _delete_task_queue(app)
    text = log.read_text()
    assert worker.returncode == 0, f"worker exit code {worker.returncode}:\n{text}"
    assert "Traceback" not in text, text


def _delete_task_queue(app) -> None:  # type: ignore[no-untyped-def]
    """Remove this check's (durable) task queue from a shared broker."""
    if app.embedded_directory is not None:
        return
    with app.connection() as conn:
        app.names.task_queue("default")(conn.default_channel).delete()


def check_widget() -> None:
    """The ``jupyter`` extra: the widget classes build (anywidget and ipywidgets import)."""
    from interactive_tasks.widgets import _classes

    task_widget, _ = _classes()
    assert task_widget.__name__ == "TaskWidget", task_widget


def check_web(workdir: Path) -> None:
    """The ``web`` extra: the dashboard's ASGI application builds; its assets are installed."""
    from interactive_tasks import App
    from interactive_tasks.web import server

    for name in ("index.html", "app.js", "app.css"):
        assert (server.STATIC / name).is_file(), f"{name} is not in the installed package"
    app = App("smoke-web", broker=f"embedded://{workdir / 'broker'}")
    asgi = server.create_app(app, read_only=True)
    paths = {getattr(route, "path", "") for route in asgi.routes}
    assert {"/", "/metrics", "/api/tasks"} <= paths, paths


# -- the driver ------------------------------------------------------------------------------
def _pythons() -> dict[str, Path]:
    override = os.environ.get("ITASK_SMOKE_PYTHONS")
    if not override:
        return PYTHONS
    return {k: Path(v) for k, v in (item.split("=", 1) for item in override.split(","))}


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None,
         timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def build_wheel(python: Path, work: Path) -> Path:
    """The wheel of a copy of the source tree (a build in place would leave build/ here)."""
    source = work / "source"
    ignore = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                    "__pycache__", ".*_cache", "test-artifacts")
    shutil.copytree(ROOT, source, symlinks=True, ignore=ignore)
    out = _run([str(python), "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(work / "dist"),
                str(source)], cwd=work)
    if out.returncode != 0:
        raise RuntimeError(f"building the wheel failed:\n{out.stdout}{out.stderr}")
    (wheel,) = (work / "dist").glob("*.whl")
    return wheel


def smoke(install: Install, python: Path, wheel: Path, work: Path) -> list[tuple[str, str]]:
    """Install into a fresh virtualenv and run every check; (what, error or "") each."""
    venv = work / f"venv-{install.python}-{install.extra or 'plain'}"
    results: list[tuple[str, str]] = []
    started = time.monotonic()
    out = _run([str(python), "-m", "venv", str(venv)], cwd=work)
    requirement = f"{wheel}[{install.extra}]" if install.extra else str(wheel)
    if out.returncode == 0:
        out = _run([str(venv / "bin/python"), "-m", "pip", "install", "-q", requirement],
                   cwd=work, timeout=600)
    if out.returncode != 0:
        return [("install", (out.stdout + out.stderr)[-3000:])]
    results.append((f"install ({time.monotonic() - started:.0f}s)", ""))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ITASK_", "PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    pool = install.extra if install.extra in ("gevent", "eventlet") else "prefork"
    for broker in BROKERS:
        checkdir = work / f"check-{venv.name}-{broker}"
        checkdir.mkdir()
        out = _run([str(venv / "bin/python"), str(Path(__file__).resolve()), "--check", broker,
                    "--pool", pool, "--workdir", str(checkdir)], cwd=checkdir, env=env)
        results.append((f"{broker} broker, -P {pool}",
                        "" if out.returncode == 0 else (out.stdout + out.stderr)[-3000:]))
    if install.extra == "jupyter":
        out = _run([str(venv / "bin/python"), str(Path(__file__).resolve()), "--widget"],
                   cwd=work, env=env)
        results.append(("widget classes",
                        "" if out.returncode == 0 else (out.stdout + out.stderr)[-3000:]))
    if install.extra == "web":
        out = _run([str(venv / "bin/python"), str(Path(__file__).resolve()), "--web",
                    "--workdir", str(work / f"web-{install.python}")], cwd=work, env=env)
        results.append(("dashboard application",
                        "" if out.returncode == 0 else (out.stdout + out.stderr)[-3000:]))
    if not install.extra:  # without the extra, itask web says which one to install
        out = _run([str(venv / "bin/itask"), "web"], cwd=work, env=env)
        ok = out.returncode == 2 and out.stderr.strip() == (
            'itask: itask web needs the web extra: pip install "interactive_tasks[web]"')
        results.append(("itask web without the extra",
                        "" if ok else out.stdout + out.stderr))
    for green in ("gevent", "eventlet"):
        if install.extra == green:
            continue
        # without the extra, -P gevent / -P eventlet says how to get it
        out = _run([str(venv / "bin/itask"), "worker", "-P", green], cwd=work, env=env)
        ok = out.returncode == 2 and out.stderr.strip() == (
            f'itask: --pool {green} needs {green}: pip install "interactive_tasks[{green}]"')
        results.append((f"-P {green} without the extra", "" if ok else out.stdout + out.stderr))
    if not install.extra:
        demo_env = dict(env, ITASK_HOME=str(work / f"demo-home-{install.python}"))
        out = _run([str(venv / "bin/itask"), "demo"], cwd=work, env=demo_env, timeout=180)
        ok = out.returncode == 0 and "Traceback" not in out.stdout + out.stderr \
            and "succeeded -> {'steps': 10, 'shipped': True}" in out.stdout
        results.append(("itask demo", "" if ok else (out.stdout + out.stderr)[-3000:]))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", choices=sorted(BROKERS), help="(inside a virtualenv)")
    parser.add_argument("--pool", default="prefork")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--widget", action="store_true", help="(inside a virtualenv)")
    parser.add_argument("--web", action="store_true", help="(inside a virtualenv)")
    parser.add_argument("--jobs", type=int, default=2, help="installs smoke-tested at once")
    parser.add_argument("--only", metavar="TEXT",
                        help="only the installs whose label has TEXT (\"3.13, [eventlet]\")")
    args = parser.parse_args()
    if args.check:
        check(args.check, args.pool, args.workdir)
        return 0
    if args.widget:
        check_widget()
        return 0
    if args.web:
        args.workdir.mkdir(parents=True, exist_ok=True)
        check_web(args.workdir)
        return 0

    installs = [i for i in INSTALLS if not args.only or args.only in i.label]
    pythons = _pythons()
    missing = sorted({i.python for i in installs if not pythons.get(i.python, Path()).is_file()})
    if missing:
        print(f"smoke: no interpreter for Python {', '.join(missing)} "
              f"(set ITASK_SMOKE_PYTHONS)", file=sys.stderr)
        return 1
    started = time.monotonic()
    failed = 0
    with tempfile.TemporaryDirectory(prefix="itask-smoke-") as tmp:
        work = Path(tmp)
        wheel = build_wheel(pythons[installs[-1].python], work)
        print(f"smoke: built {wheel.name} in {time.monotonic() - started:.0f}s", flush=True)
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            futures = {pool.submit(smoke, i, pythons[i.python], wheel, work): i
                       for i in installs}
            for future in concurrent.futures.as_completed(futures):
                install = futures[future]
                for what, error in future.result():
                    failed += bool(error)
                    print(f"smoke: {install.label}: {what}: {'FAILED' if error else 'ok'}",
                          flush=True)
                    if error:
                        print("    " + error.replace("\n", "\n    "), flush=True)
    print(f"smoke: {len(installs)} installs in {time.monotonic() - started:.0f}s, "
          f"{failed} check(s) failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
