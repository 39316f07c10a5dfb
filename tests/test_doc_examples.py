"""Every fenced example in README.md and docs/*.md runs as written, or says why it cannot.

:data:`COVERAGE` names what happens to each block, by its file and first line:

* :class:`Demo` / :class:`Output`: ``itask worker -A examples.doc_tasks …`` then
  ``python -m examples.<name>`` — :func:`test_demo` checks the commands are the ones its
  worker and script run, runs them, and matches the documented output line by line;
* :class:`Snippet`: Python run in a fresh interpreter, after a prelude that gives the names
  a fragment assumes (``add``, ``app`` …), on a private embedded broker or against the
  docs' worker; a ``# raises X`` comment makes the statement expect ``X``;
* :class:`Transcript`: ``$ command`` lines and what they print, run and compared;
* :class:`RunBy`: run by another test, named here, which reads the block itself (or, for
  a message excerpt, matches the real message against it);
* :class:`NotRunnable`: why it cannot run here (it names a deployment's hosts, a
  placeholder project, or is a synopsis).

A block missing from :data:`COVERAGE` (a new example) or an entry whose block is gone fails
:func:`test_every_fenced_block_is_accounted_for`.

One ``itask worker -A examples.doc_tasks -c 2 -Q default,images,io -E`` on the embedded
broker (ITASK_HOME in a temporary directory) serves the demos and the snippets that need a
worker, as in the docs.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import ROOT, isolated_env, require_broker, wait_for
from .doc_blocks import Block, all_blocks, doc_block, doc_pattern, documented

WORKER_ARGS = ["-A", "examples.doc_tasks", "-c", "2", "-Q", "default,images,io", "-E"]


# -- what happens to each block ---------------------------------------------------------------
@dataclass(frozen=True)
class Demo:
    name: str


@dataclass(frozen=True)
class Output:
    name: str
    ordered: bool = True


@dataclass(frozen=True)
class Snippet:
    prelude: str = ""
    worker: bool = False  # against the docs' worker; else a private broker, no worker
    check: str = ""


@dataclass(frozen=True)
class Transcript:
    pass


@dataclass(frozen=True)
class RunBy:
    test: str  # path::name


@dataclass(frozen=True)
class NotRunnable:
    reason: str


#: the first line of each user-guide page's "Run it" block
DOC_WORKER = "itask worker -A examples.doc_tasks -c 2 -Q default,images,io -E     # terminal 1"
APP = "from interactive_tasks import App, InteractiveTask\napp = App('proj')\n"
HERE = "tests/test_doc_examples.py::"
EXCERPT = "an excerpt of a message that needs a running task: "

COVERAGE: dict[tuple[str, str], object] = {
    # README.md
    ("README.md", "import time"): RunBy(HERE + "test_readme_first_example"),
    ("README.md", 'pip install -e ".[dev]"'): RunBy(HERE + "test_readme_setup_is_what_ci_runs"),
    ("README.md", "itask demo"):
        RunBy("tests/test_examples.py::test_itask_demo_without_a_terminal"),
    ("README.md", "# examples/hello.py"): RunBy(HERE + "test_readme_hello_is_examples_hello"),
    ("README.md", "itask worker -A examples.hello --pool prefork --concurrency 2     # terminal 1"):
        RunBy("tests/test_examples.py::test_hello_as_in_the_readme"),
    ("README.md", "export ITASK_BROKER_URL=redis://127.0.0.1:6379/0"):
        RunBy(HERE + "test_readme_broker_urls_reach_the_brokers"),
    ("README.md", "@app.task(base=InteractiveTask)          # the first parameter is the running "
                  "task"): RunBy(HERE + "test_task_definitions_run_on_a_worker"),
    # docs/beat.md
    ("docs/beat.md", "itask worker -A proj -c 4        # somewhere"): NotRunnable(
        "commands for a project 'proj'; tests/test_beat.py runs itask beat and --list"),
    ("docs/beat.md", "from datetime import timedelta"): Snippet(check=(
        "from interactive_tasks.schedules import entries_for\n"
        "assert sorted(entries_for(app)) == ['cleanup', 'nightly', 'report', 'sync']")),
    ("docs/beat.md", "@app.periodic(every=30)"): Snippet(
        prelude=APP + "from interactive_tasks.schedules import crontab\n",
        check=("from interactive_tasks.schedules import entries_for\n"
               "assert len(entries_for(app)) == 3")),
    # docs/celery.md
    ("docs/celery.md", "itask worker -A proj -c 2                      # terminal 1"): RunBy(
        "tests/test_django_example.py::test_a_worker_runs_the_discovered_task_and_the_view_"
        "shows_its_progress"),
    # docs/deploy.md: a deployment's hosts; the Python settings are built (checked) here
    ("docs/deploy.md", "export ITASK_BROKER_URL=redis://redis.internal:6379/0"):
        NotRunnable("names the hosts of a deployment"),
    ("docs/deploy.md", "itask multi start w1 w2 -A proj -c 4 --pool prefork -Q default -c:w2 8 \\"):
        NotRunnable("a project 'proj' on a deployment's hosts; tests/test_multi.py runs multi"),
    ("docs/deploy.md", "ITASK_BROKER_URL=redis://:PASSWORD@redis.internal:6379/0     # rediss:// "
                       "for TLS"): NotRunnable("names the hosts of a deployment"),
    ("docs/deploy.md", 'app = App("proj", broker="redis://redis.internal:6379/0", '
                       "worker_lost_timeout=30,"): Snippet(prelude="from interactive_tasks "
                                                           "import App\n"),
    ("docs/deploy.md", 'app = App("proj", broker_transport_options={"fsync": True})'): Snippet(
        prelude="from interactive_tasks import App\n"),
    ("docs/deploy.md", "# redis.conf"): RunBy(
        "tests/test_failover.py::test_redis_restart_with_aof_under_load_loses_no_task_and_"
        "runs_none_twice"),
    ("docs/deploy.md", "ITASK_BROKER_URL='sentinel://:PASSWORD@s1.internal:26379;"
                       "sentinel://s2.internal:26379;sentinel://s3.internal:26379'"):
        NotRunnable("names the hosts of a deployment"),
    ("docs/deploy.md", 'app = App("proj", broker="sentinel://s1:26379;sentinel://s2:26379;'
                       'sentinel://s3:26379",'): Snippet(
        prelude="from interactive_tasks import App\n"),
    ("docs/deploy.md", "ITASK_BROKER_URL=amqp://itask:PASSWORD@rabbit.internal:5672/itask"):
        NotRunnable("names the hosts of a deployment"),
    ("docs/deploy.md", "ITASK_BROKER_URL=sqs://                       # credentials from the "
                       "usual AWS sources"): NotRunnable("needs AWS"),
    ("docs/deploy.md", 'app = App("proj", broker="sqs://", result_backend='
                       '"redis://redis.internal:6379/1",'): Snippet(
        prelude="from interactive_tasks import App\n"),
    # docs/interactive.md
    ("docs/interactive.md", "from interactive_tasks import App, InteractiveTask"):
        RunBy(HERE + "test_task_definitions_run_on_a_worker"),
    ("docs/interactive.md", "handle = app.attach(task_id, token=None)      # any process, any "
                            "time"): Snippet(
        worker=True, prelude="from examples.doc_tasks import add, app\n"
                             "task_id = add.delay(1, 2).id\n",
        check="assert handle.result(timeout=30) == 3"),
    ("docs/interactive.md", "@app.task(base=InteractiveTask)"):
        RunBy(HERE + "test_task_definitions_run_on_a_worker"),
    ("docs/interactive.md", "itask worker -A examples.tasks -c 2     # terminal 1"):
        RunBy("tests/test_examples.py::test_interactive_examples"),
    ("docs/interactive.md", "itask worker -A examples.doc_tasks -c 2 -Q default,images,io -E"):
        Demo("async_demo"),
    ("docs/interactive.md", "task sent: {'echo': 'ping'}"): Output("async_demo"),
    # docs/jupyter.md: the cells run in order, as in a notebook (without the display)
    ("docs/jupyter.md", "handle = train.start(epochs=3)"): RunBy(HERE + "test_jupyter_cells"),
    ("docs/jupyter.md", 'pip install "interactive_tasks[jupyter]"'):
        RunBy("tests/test_packaging.py::test_python_versions_say_what_is_tested"),
    ("docs/jupyter.md", "result = await handle              # or: state = await "
                        "handle.wait_async()"): RunBy(HERE + "test_jupyter_cells"),
    ("docs/jupyter.md", "runs = [train.start(epochs=2) for _ in range(3)]"):
        RunBy(HERE + "test_jupyter_cells"),
    # docs/web.md
    ("docs/web.md", 'pip install "interactive_tasks[web]"          # Starlette and uvicorn'):
        NotRunnable("for a project 'proj'; tests/test_web.py runs itask web (also --auth, "
                    "--address, --read-only) on tests.apps.tasks"),
    ("docs/web.md", "scrape_configs:"): NotRunnable(
        "a Prometheus configuration; tests/test_web.py parses /metrics"),
    # docs/monitoring.md
    ("docs/monitoring.md", "itask events -A proj                     # JSON lines until "
                           "Ctrl-C"): NotRunnable(
        "for a project 'proj'; test_itask_events_prints_json_lines runs it on doc_tasks"),
    ("docs/monitoring.md", '{"type": "task-received", "id": "441c…", "name": "proj.add", '
                           '"worker": "w1@host", "ts": 1795263513.81, "state": "pending"}'):
        RunBy(HERE + "test_itask_events_prints_json_lines"),
    # no worker: with one, its heartbeats (every 2 s) keep events(timeout=5) going
    ("docs/monitoring.md", "from interactive_tasks.monitor import EventReceiver"):
        Snippet(prelude=APP),
    ("docs/monitoring.md", DOC_WORKER): Demo("monitoring_demo"),
    ("docs/monitoring.md", "heartbeat from worker3219@vm: pool=prefork processed=33"):
        Output("monitoring_demo", ordered=False),
    # docs/options.md: sent to a private broker (task_id order-42 is the demo's too)
    ("docs/options.md", "from datetime import datetime, timedelta, timezone"): Snippet(
        prelude="from examples.doc_tasks import add\n"),
    ("docs/options.md", "@app.task(bind=True)"): Snippet(prelude=APP),
    ("docs/options.md", DOC_WORKER): Demo("options_demo"),
    ("docs/options.md", "countdown: 5 after 1.0s"): Output("options_demo"),
    # docs/rate-limits.md
    ("docs/rate-limits.md", '@app.task(rate_limit="10/s")     # also "100/m", "1000/h"; "10" '
                            "alone means per second"): Snippet(prelude=APP),
    ("docs/rate-limits.md", DOC_WORKER): Demo("rate_limit_demo"),
    ("docs/rate-limits.md", "gaps between starts (s): [0.2, 0.2, 0.2, 0.2, 0.2]"):
        Output("rate_limit_demo"),
    # docs/retries.md
    ("docs/retries.md", "@app.task(bind=True, max_retries=3)"): Snippet(prelude=APP),
    ("docs/retries.md", "@app.task(autoretry_for=(ConnectionError, TimeoutError), "
                        "max_retries=5,"): Snippet(prelude=APP),
    ("docs/retries.md", 'handle = fetch.apply_async(("https://example.org",), watch="all")'):
        Snippet(worker=True, prelude="from examples.doc_tasks import fetch\n"),
    ("docs/retries.md", DOC_WORKER): Demo("retries_demo"),
    ("docs/retries.md", "retry: attempt 2 in 0.2s after 'attempt 1 failed'"):
        Output("retries_demo"),
    # docs/revoke.md
    ("docs/revoke.md", "handle = add.apply_async((1, 2), countdown=60)"): Snippet(
        worker=True,
        prelude=("from examples.doc_tasks import add, app, sleep_then\n"
                 "first, second = (add.apply_async((i, i), countdown=60) for i in (1, 2))\n"
                 "id1, token1, id2, token2 = first.id, first.token, second.id, second.token\n"
                 "running = sleep_then.delay(30)\n"
                 "task_id = running.id\n"),
        check=("for h in (first, second, running):\n"
               "    assert h.wait(30).value in ('revoked', 'cancelled'), h\n")),
    ("docs/revoke.md", "itask revoke ID [ID …] [--terminate] [--token T] -A proj"):
        NotRunnable("the command's synopsis; tests/test_cli.py runs itask revoke"),
    ("docs/revoke.md", DOC_WORKER): Demo("revoke_demo"),
    ("docs/revoke.md", "revoked before start: revoked - task 1df8… was revoked: revoked"):
        Output("revoke_demo"),
    # docs/routing.md
    ("docs/routing.md", 'app = App("proj", task_routes={'): Snippet(
        prelude="from interactive_tasks import App\n",
        check=("assert app.route('proj.images.resize') == 'images'\n"
               "assert app.route('proj.reports.nightly') == 'reports'\n"
               "assert fetch.queue == 'io'")),
    ("docs/routing.md", "itask worker -A proj -Q default,io          # comma separated"):
        NotRunnable("for a project 'proj'; the docs' worker runs -Q default,images,io"),
    ("docs/routing.md", DOC_WORKER): Demo("routing_demo"),
    ("docs/routing.md", "image_resize -> images : cat.png resized to 128px"):
        Output("routing_demo"),
    # docs/workflows.md: the fragment's tasks stand for one-argument ones of doc_tasks
    ("docs/workflows.md", "from interactive_tasks import chain, chord, group"): Snippet(
        worker=True,
        prelude=("from examples.doc_tasks import add, double, total\n"
                 "store = resize = count = double\n"
                 "paths, files = [1, 2], [3, 4]\n")),
    ("docs/workflows.md", DOC_WORKER): Demo("workflows_demo"),
    ("docs/workflows.md", "progress: step 1 of 4"): Output("workflows_demo"),
    # docs/testing.md
    ("docs/testing.md", "# test_tasks.py — run with pytest"):
        RunBy(HERE + "test_testing_page_example_passes_under_pytest"),
    # docs/troubleshooting.md
    ("docs/troubleshooting.md", "$ itask ping -b foo://bar"): Transcript(),
    ("docs/troubleshooting.md", "$ itask ping -b redis://127.0.0.1:6380/0"): Transcript(),
    ("docs/troubleshooting.md", "$ itask ping"): Transcript(),
    ("docs/troubleshooting.md", "interactive_tasks.errors.TransportError: cannot reach the "
                                "broker at redis://127.0.0.1:6380/0: Error 111 connecting to "
                                "127.0.0.1:6380. Connection refused. (check that the broker "
                                "runs and that its URL gives its address and credentials: "
                                "App(broker=...), -b or ITASK_BROKER_URL)"):
        RunBy("tests/test_bad_input.py::test_unreachable_broker_says_what_to_do_in_python"),
    ("docs/troubleshooting.md", "$ itask worker -A examples/tasks.py"): Transcript(),
    ("docs/troubleshooting.md", "$ itask attach 0c4f6a1e-7d1b-4a53-9b3e-51f0c2b1c2d3"):
        Transcript(),
    ("docs/troubleshooting.md", "itask: app module 'proj' raised NameError while importing at "
                                "/home/ada/proj.py:3: name 'undefined_name' is not defined"):
        RunBy("tests/test_cli.py::test_every_typo_ends_in_one_line_that_says_what_to_do"),
    ("docs/troubleshooting.md", "TaskFailed: task 6f1c… failed: UnknownTask: no task named "
                                "'proj.tasks.ad' is registered with app 'proj'; did you mean "
                                "'proj.tasks.add'? start the worker with -A the module that "
                                "defines it (itask inspect registered lists a worker's tasks)"):
        RunBy("tests/test_bad_input.py::test_unknown_task_name_reaches_the_client"),
    ("docs/troubleshooting.md", "itask: no token to control task 6f1c…: pass token= to "
                                "app.attach() (or --token), or set the app's operator secret "
                                "(ITASK_SECRET)"): RunBy(HERE + "test_messages_without_a_task"),
    ("docs/troubleshooting.md", "itask: not authorised to pause task 6f1c…: wrong or missing "
                                "token (use the token of the handle that started it, "
                                "handle.token, or the operator secret ITASK_SECRET)"):
        RunBy("tests/test_cli.py::test_steering_typos_and_cancel_of_an_ended_task"),
    ("docs/troubleshooting.md", "itask: task 6f1c… had already ended (cancelled); nothing to "
                                "cancel"):
        RunBy("tests/test_cli.py::test_steering_typos_and_cancel_of_an_ended_task"),
    ("docs/troubleshooting.md", "TaskTimeout: task 6f1c… did not pause within 5.0s (state "
                                "running): a soft pause waits for the task's next checkpoint"):
        RunBy("tests/test_interactive.py::test_pause_and_resume_can_wait_for_the_task"),
    ("docs/troubleshooting.md", "TypeError: cannot serialize 'object' with msgpack; send plain "
                                "data (dict, list, str, int, float, bytes, datetime, UUID)"):
        RunBy(HERE + "test_messages_without_a_task"),
    ("docs/celery-bridge.md", "# examples/celery_bridge/proj.py"):
        RunBy("tests/test_celery_bridge.py::test_the_documented_example_project"),
    ("docs/celery-bridge.md",
     "celery -A examples.celery_bridge.proj worker -l info   # terminal 1"):
        RunBy("tests/test_celery_bridge.py::test_the_documented_example_project"),
    ("docs/celery-bridge.md", "progress: 1 / 5"):
        RunBy("tests/test_celery_bridge.py::test_the_documented_example_project"),
    ("docs/celery-bridge.md", "itask top -A examples.celery_bridge.proj"):
        NotRunnable("a full-screen dashboard and a placeholder id and token; "
                    "tests/test_celery_bridge.py::test_itask_commands_and_top_on_a_celery_app "
                    "runs the commands and the dashboard's source on a Celery app"),
}

#: whole files of diagrams, whose blocks are not examples
NO_EXAMPLES = {"docs/architecture.md": "diagrams of the design"}


def _covered(kind: type) -> list[tuple[Block, object]]:
    found = []
    for block in all_blocks():
        how = COVERAGE.get((block.path, block.first))
        if isinstance(how, kind):
            found.append((block, how))
    return found


def test_every_fenced_block_is_accounted_for():
    blocks = [b for b in all_blocks() if b.path not in NO_EXAMPLES]
    keys = [(b.path, b.first) for b in blocks]
    missing = [str(b) for b in blocks if (b.path, b.first) not in COVERAGE]
    assert not missing, "fenced blocks no test runs or explains (add them to COVERAGE): " + \
        "; ".join(missing)
    assert len(set(keys)) == len(keys), "two blocks of one file start alike"
    stale = [k for k in COVERAGE if k not in set(keys)]
    assert not stale, f"COVERAGE names blocks that are gone: {stale}"
    for path in NO_EXAMPLES:
        langs = {b.lang for b in all_blocks() if b.path == path}
        assert langs <= {""}, f"{path} has code blocks now: run them ({langs})"
    for how in COVERAGE.values():
        if isinstance(how, RunBy):
            path, name = how.test.split("::")
            assert f"def {name}(" in (ROOT / path).read_text(), f"no test {how.test}"
        if isinstance(how, NotRunnable):
            assert how.reason
    demos = {how.name for _, how in _covered(Demo)}
    assert demos == {how.name for _, how in _covered(Output)}, "a demo without its output"
    assert demos == set(DEMO_CHECKS), "a documented demo without checks, or checks for none"


def test_python_blocks_compile():
    import asyncio  # noqa: F401 - the flag below lets a notebook cell's top-level await in

    for block in all_blocks():
        if block.lang == "python":
            compile(block.text, str(block), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


# -- the docs' worker and demos ---------------------------------------------------------------
@pytest.fixture(scope="module")
def doc_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    env = isolated_env(tmp_path_factory.mktemp("doc-examples") / "home")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _start_worker(args: list[str], env: dict[str, str], log: Path,
                  cwd: Path = ROOT) -> subprocess.Popen[bytes]:
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "interactive_tasks.cli.main", "worker", *args],
            env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: "ready" in log.read_text() or proc.poll() is not None, 30,
                 message=f"itask worker {' '.join(args)}")
        assert proc.poll() is None, log.read_text()
    except BaseException:
        _stop(proc)
        raise
    return proc


@pytest.fixture(scope="module")
def doc_worker(doc_env: dict[str, str],
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    log = tmp_path_factory.mktemp("doc-worker") / "worker.log"
    proc = _start_worker(WORKER_ARGS, doc_env, log)
    try:
        yield log
    finally:
        _stop(proc)


def run_demo(name: str, env: dict[str, str], worker_log: Path | None = None) -> str:
    out = subprocess.run([sys.executable, "-m", f"examples.{name}"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    worker = f"\n--- worker log ---\n{worker_log.read_text()[-6000:]}" if worker_log else ""
    assert out.returncode == 0, out.stdout + out.stderr + worker
    assert "Traceback" not in out.stderr, out.stderr
    return out.stdout


def match_output(documented_text: str, actual: str, ordered: bool = True) -> None:
    """Each documented line (a lone ``…`` line: any lines) matches an actual line, in order
    unless ``ordered`` is false; ids, numbers and worker names match by shape."""
    lines = actual.splitlines()
    at = 0
    for doc_line in documented_text.splitlines():
        if doc_line.strip() in ("", "…"):
            continue
        pattern = doc_pattern(doc_line)
        candidates = range(at, len(lines)) if ordered else range(len(lines))
        found = next((i for i in candidates if pattern.match(lines[i])), None)
        assert found is not None, f"documented {doc_line!r} not in the output:\n{actual}"
        if ordered:
            at = found + 1


def _options(out: str) -> None:
    took = float(re.search(r"countdown: 5 after ([\d.]+)s", out).group(1))
    assert took >= 1.0
    assert "eta: 9" in out
    assert "expires: revoked - " in out and "expired before it started" in out
    assert "task_id: order-42 headers: {'tenant': 'acme'}" in out


def _routing(out: str) -> None:
    assert "image_resize -> images : cat.png resized to 128px" in out
    assert "fetch -> io : fetched https://example.org" in out
    assert "add -> io : 4" in out
    assert "add -> default : 6" in out


def _retries(out: str) -> None:
    assert "retry: attempt 2 in 0.2s after 'attempt 1 failed'" in out
    assert "retry: attempt 3 in 0.2s after 'attempt 2 failed'" in out
    assert "succeeded -> succeeded on attempt 3" in out
    assert ("autoretry: retried as attempts [2, 3], then failed with ConnectionError: "
            "service down (attempt 3)") in out


def _rate_limit(out: str) -> None:
    smallest = float(re.search(r"smallest gap: ([\d.]+)", out).group(1))
    assert smallest >= 0.18, out  # 5/s: one start every 0.2 s, even with 2 free slots


def _revoke(out: str) -> None:
    assert "revoked before start: revoked - " in out
    assert "workers told: ['" in out
    assert "app.revoke: revoked" in out
    assert "terminated while running: cancelled" in out


def _workflows(out: str) -> None:
    assert "  progress: step 4 of 4" in out
    assert "chain: 14" in out
    assert "group: [0, 2, 4, 6, 8]" in out
    assert "chord: 12" in out
    assert "chain failed: ValueError bad input" in out
    assert "next step: revoked - " in out and "chain stopped" in out


def _monitoring(out: str) -> None:
    for line in ("add  task-received ", "add  task-started ", "add  task-succeeded ",
                 "fail task-failed "):
        assert line in out, out
    assert "heartbeat from " in out and "pool=prefork" in out
    assert "no task events" not in out


def _async(out: str) -> None:
    assert "task sent: {'echo': 'ping'}" in out
    assert "task asks: Your name?" in out
    assert "result: {'echoed': ['ping'], 'name': 'Ada'}" in out


#: what each demo must print beyond the shape of its documented output
DEMO_CHECKS = {
    "options_demo": _options, "routing_demo": _routing, "retries_demo": _retries,
    "rate_limit_demo": _rate_limit, "revoke_demo": _revoke, "workflows_demo": _workflows,
    "monitoring_demo": _monitoring, "async_demo": _async,
}
#: commands a demo's block may list besides the worker and the demo, and the test running it
OTHER_COMMANDS = {"itask events -A examples.doc_tasks": "test_itask_events_prints_json_lines"}


@pytest.mark.parametrize("name", sorted(DEMO_CHECKS))
def test_demo(name, doc_worker, doc_env):
    """The demo's commands are the ones run here, and its output is the documented one."""
    (commands,) = [b for b, how in _covered(Demo) if how.name == name]
    (output,) = [(b, how) for b, how in _covered(Output) if how.name == name]
    lines = [" ".join(words) for words in commands.commands()]
    assert lines[0] == "itask worker " + " ".join(WORKER_ARGS), commands
    assert lines[1] == f"python -m examples.{name}", commands
    assert set(lines[2:]) <= set(OTHER_COMMANDS), commands
    out = run_demo(name, doc_env, doc_worker)
    DEMO_CHECKS[name](out)
    match_output(output[0].text, out, ordered=output[1].ordered)


def test_itask_events_prints_json_lines(doc_worker, doc_env, tmp_path):
    """``itask events -A examples.doc_tasks`` as in docs/monitoring.md: the events have the
    documented types and fields."""
    out_path = tmp_path / "events.jsonl"
    with open(out_path, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "interactive_tasks.cli.main", "events",
             "-A", "examples.doc_tasks"],
            env=doc_env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        def events() -> list[dict]:
            return [json.loads(line) for line in out_path.read_text().splitlines()
                    if line.startswith("{")]

        # a heartbeat (every 2 s) proves it listens before the task is sent
        wait_for(lambda: any(e["type"] == "worker-heartbeat" for e in events()), 15,
                 message="a heartbeat on itask events")
        code = "from examples.doc_tasks import add; print(add.delay(20, 22).id)"
        task_id = subprocess.run([sys.executable, "-c", code], env=doc_env, cwd=ROOT,
                                 capture_output=True, text=True, timeout=60,
                                 check=True).stdout.strip()
        wait_for(lambda: any(e.get("id") == task_id and e["type"] == "task-succeeded"
                             for e in events()), 15, message="task-succeeded")
        mine = [e for e in events() if e.get("id") == task_id]
        assert [e["type"] for e in mine] == ["task-received", "task-started", "task-succeeded"]
    finally:
        _stop(proc)
    real = {e["type"]: e for e in [*mine, *events()]}
    example = doc_block("docs/monitoring.md", next(first for path, first in COVERAGE
                                                   if path == "docs/monitoring.md"
                                                   and first.startswith('{"type"')))
    for line in example.lines:
        fields = re.findall(r'"(\w+)": ', line.replace("{…}", "{}"))
        kind = re.search(r'"type": "([\w-]+)"', line).group(1)
        assert sorted(fields) == sorted(real[kind]), (kind, sorted(real[kind]))


# -- Python snippets ---------------------------------------------------------------------------
def snippet_script(block: Block, how: Snippet) -> str:
    """The prelude, the block's statements (``# raises X`` ones made to expect X), the check."""
    source = block.text
    lines = source.splitlines()
    parts = [how.prelude]
    for stmt in ast.parse(source).body:
        first = min([stmt.lineno, *(d.lineno for d in getattr(stmt, "decorator_list", ()))])
        text = "\n".join(lines[first - 1:stmt.end_lineno])
        raises = re.search(r"#\s*raises (\w+)", lines[stmt.end_lineno - 1])
        if raises:
            name = raises.group(1)
            error = f"(getattr(__import__('interactive_tasks'), {name!r}, None) or {name})"
            text = (f"try:\n{textwrap.indent(text, '    ')}\nexcept {error}:\n    pass\n"
                    f"else:\n    raise AssertionError({text!r} + ' did not raise {name}')")
        parts.append(text)
    parts.append(how.check)
    return "\n".join(parts) + "\n"


def run_python(script: str, env: dict[str, str], cwd: Path = ROOT) -> str:
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=cwd,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"{script}\n--- output:\n{out.stdout}{out.stderr}"
    assert "Traceback" not in out.stderr, out.stderr
    return out.stdout


@pytest.fixture
def private_env(tmp_path: Path) -> dict[str, str]:
    """A broker of its own (embedded, under tmp_path), no worker."""
    return isolated_env(tmp_path / "home")


@pytest.mark.parametrize("block", [b for b, how in _covered(Snippet) if not how.worker],
                         ids=str)
def test_snippet(block, private_env):
    run_python(snippet_script(block, COVERAGE[(block.path, block.first)]), private_env)


@pytest.mark.parametrize("block", [b for b, how in _covered(Snippet) if how.worker], ids=str)
def test_snippet_on_the_docs_worker(block, doc_worker, doc_env):
    run_python(snippet_script(block, COVERAGE[(block.path, block.first)]), doc_env)


def test_messages_without_a_task():
    """Troubleshooting's excerpts that need no running task, against the real messages."""
    from interactive_tasks import App, NotAuthorized, TaskHandle, codec

    app = App("proj", broker="redis://127.0.0.1:6379/0")  # refused before any connection
    handle = TaskHandle(app, "6f1c2d3e-0000-4000-8000-000000000000", watch=False)
    with pytest.raises(NotAuthorized) as info:
        handle.pause()
    assert documented("itask: no token to control task").match(f"itask: {info.value}")
    with pytest.raises(TypeError) as error:
        codec.dumps({"value": object()})
    assert documented("TypeError: cannot serialize").match(f"TypeError: {error.value}")


# -- the README -------------------------------------------------------------------------------
def test_readme_setup_is_what_ci_runs():
    commands = [" ".join(words) for words in
                doc_block("README.md", 'pip install -e ".[dev]"').commands()]
    ci = (ROOT / ".ci" / "run").read_text().replace(" -q", "")
    for command in commands:
        assert re.search(rf"^{re.escape(command)}( |$)", ci, re.M), command


def test_readme_hello_is_examples_hello():
    block = doc_block("README.md", "# examples/hello.py")
    module = ast.parse((ROOT / "examples" / "hello.py").read_text())
    module.body = module.body[1:]  # its docstring: the README shows the code
    assert ast.dump(ast.parse(block.text)) == ast.dump(module)


def test_readme_first_example(tmp_path, private_env):
    """Saved as yourmodule.py, served by ``itask worker -A yourmodule``, run as a script."""
    (tmp_path / "yourmodule.py").write_text(
        doc_block("README.md", "import time").text)
    env = dict(private_env, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    proc = _start_worker(["-A", "yourmodule"], env, tmp_path / "worker.log", cwd=tmp_path)
    try:
        out = subprocess.run([sys.executable, "yourmodule.py"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)
    finally:
        _stop(proc)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stdout + out.stderr
    events = out.stdout.splitlines()
    assert " started " in events[0] and " succeeded result=300" in events[-1], out.stdout
    assert any(" paused " in e for e in events) and any(" resumed " in e for e in events)
    assert any(" log " in e and "text=\"got {'speed': 2}\"" in e for e in events), out.stdout


@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_readme_broker_urls_reach_the_brokers(broker, private_env):
    require_broker(broker)
    block = doc_block("README.md", "export ITASK_BROKER_URL=redis://127.0.0.1:6379/0")
    (url,) = [words[1].split("=", 1)[1] for words in block.commands()
              if words[1].split("=", 1)[1].startswith(broker)]
    out = subprocess.run([sys.executable, "-m", "interactive_tasks.cli.main", "ping",
                          "--timeout", "0.5"], env=dict(private_env, ITASK_BROKER_URL=url),
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode in (0, 1), out.stderr  # connected: a reply, or none (not 2 or 3)


def test_testing_page_example_passes_under_pytest(tmp_path, private_env):
    """docs/testing.md's test module, saved as test_tasks.py and run by pytest (warnings are
    errors): every test in it passes."""
    (tmp_path / "test_tasks.py").write_text(
        doc_block("docs/testing.md", "# test_tasks.py — run with pytest").text)
    env = dict(private_env, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-W", "error", "test_tasks.py"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "5 passed" in out.stdout, out.stdout


# -- task definitions on a worker --------------------------------------------------------------
def _serve(module: str, code: str, tmp_path: Path, private_env: dict[str, str],
           driver: str) -> str:
    """Save ``code`` as ``module``.py, serve it with a worker, run ``driver`` against it."""
    (tmp_path / f"{module}.py").write_text(code)
    env = dict(private_env, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    proc = _start_worker(["-A", module, "-c", "2"], env, tmp_path / f"{module}.log",
                         cwd=tmp_path)
    try:
        return run_python(driver, env, cwd=tmp_path)
    finally:
        _stop(proc)


def test_task_definitions_run_on_a_worker(tmp_path, private_env):
    readme = doc_block("README.md", "@app.task(base=InteractiveTask)          # the first "
                                    "parameter is the running task")
    echo = doc_block("docs/interactive.md", "@app.task(base=InteractiveTask)")
    code = f"import asyncio\n{APP}\n\n{readme.text}\n\n{echo.text}"
    driver = textwrap.dedent("""
        from snippets import echo, long_task

        handle = long_task.start(3)
        for event in handle.events(timeout=60):
            if event.kind == "question":
                handle.answer("Ada")
            if event.kind == "log":
                print("log", event.text)
        print("result", handle.result(timeout=30))

        handle = echo.start(50)
        sent = False
        for event in handle.events(timeout=60):
            if event.kind == "progress" and not sent:  # while paused: no race with its loop
                handle.pause(wait=True, timeout=30)
                handle.send("hi")
                handle.resume()
                sent = True
            if event.kind == "message":
                print("message", event.data)
            if event.kind == "question":
                handle.answer("Ada")
        print("result", handle.result(timeout=30))
    """)
    (tmp_path / "a").mkdir()
    out = _serve("snippets", code, tmp_path / "a", private_env, driver)
    assert out.splitlines() == ["log hello Ada", "result {'n': 3, 'name': 'Ada'}",
                                "message {'echo': 'hi'}", "result Ada"], out

    rows = doc_block("docs/interactive.md", "from interactive_tasks import App, InteractiveTask")
    stubs = ("def load(path):\n    return ['a', 'b', 'c']\n\n"
             "def store(row):\n    pass\n\ndef publish():\n    print('published')\n\n")
    driver = textwrap.dedent("""
        from rows import app, import_rows

        handle = import_rows.start("rows.csv")
        for event in handle.events(timeout=60):
            if event.kind == "question":
                handle.answer("yes")
            if event.kind == "log":
                print("log", event.text)
        print("result", handle.result(timeout=30))
        print("class form", app.get_task("proj.deploy").name)
    """)
    (tmp_path / "b").mkdir()
    out = _serve("rows", stubs + rows.text, tmp_path / "b", private_env, driver)
    assert out.splitlines() == ["log published", "result 3", "class form proj.deploy"], out


@pytest.fixture(scope="module")
def notebook_worker(doc_env: dict[str, str],
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The notebook's worker (its app has its own namespace beside the docs' worker)."""
    log = tmp_path_factory.mktemp("notebook-worker") / "worker.log"
    proc = _start_worker(["-A", "examples.notebook_tasks", "-c", "2"], doc_env, log)
    try:
        yield
    finally:
        _stop(proc)


def test_jupyter_cells(notebook_worker, doc_env):
    """docs/jupyter.md's cells in order, in one namespace, top-level ``await`` included."""
    cells = [doc_block("docs/jupyter.md", first).text for first in (
        "handle = train.start(epochs=3)",
        "result = await handle              # or: state = await handle.wait_async()",
        "runs = [train.start(epochs=2) for _ in range(3)]")]
    body = "\n".join(cells) + textwrap.dedent("""
        print("loss", result["loss"] > 0, "rows", type(app.watch(runs)).__name__)
        for run in runs:
            assert run.cancel(grace=0)
    """)
    script = ("import asyncio\nfrom examples.notebook_tasks import app, train\n\n"
              "async def cells():\n" + textwrap.indent(body, "    ") + "\nasyncio.run(cells())\n")
    assert run_python(script, doc_env).strip() == "loss True rows WatchWidget"


# -- troubleshooting transcripts ---------------------------------------------------------------
@pytest.mark.parametrize("block", [b for b, _ in _covered(Transcript)], ids=str)
def test_transcript(block, private_env, tmp_path):
    """Each ``$ command`` runs as typed (in a shell, from the repository) and prints the
    documented lines."""
    if "redis://" in block.text:
        require_broker("redis")
    if "amqp://" in block.text:
        require_broker("amqp")
    env = dict(private_env, PATH=f"{Path(sys.executable).parent}{os.pathsep}"
                                 f"{os.environ.get('PATH', '')}")
    steps: list[tuple[str, list[str]]] = []
    for line in block.text.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        elif line.strip():
            steps[-1][1].append(line)
    for command, expected in steps:
        out = subprocess.run(["bash", "-c", command], env=env, cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
        printed = (out.stdout + out.stderr).splitlines()
        assert "Traceback" not in out.stderr, out.stderr
        for line in expected:
            assert line in printed, f"$ {command}\nexpected: {line}\nprinted:\n" + \
                "\n".join(printed)
