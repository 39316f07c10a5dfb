"""The README's examples, `itask demo` and every example script run exactly as shown, on
the embedded broker with no server; the commands come from the docs' own blocks."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, isolated_env, wait_for
from .doc_blocks import Block, doc_block


@pytest.fixture
def example_env(tmp_path: Path) -> dict[str, str]:
    return isolated_env(tmp_path / "home")


def worker(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``itask worker ARGS`` (the words after ``worker``), started and ready."""
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "interactive_tasks.cli.main", "worker", *args],
            env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(lambda: "ready" in log.read_text() or proc.poll() is not None, 20,
             message="example worker")
    assert proc.poll() is None, log.read_text()
    return proc


def documented_worker(block: Block) -> list[str]:
    """The arguments of the block's first line, ``itask worker ARGS  # terminal 1``."""
    words = block.commands()[0]
    assert words[:2] == ["itask", "worker"], block
    return words[2:]


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def run(args: list[str], env: dict[str, str], stdin: str = "") -> str:
    out = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, input=stdin,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    return out.stdout


def test_hello_as_in_the_readme(example_env, tmp_path):
    block = doc_block("README.md", "itask worker -A examples.hello --pool prefork "
                                   "--concurrency 2     # terminal 1")
    client = block.commands()[1]
    assert client == ["python", "examples/hello.py"], block
    proc = worker(documented_worker(block), example_env, tmp_path / "w.log")
    try:
        assert run(client[1:], example_env).strip() == "5"
        assert "embedded broker files:" in (tmp_path / "w.log").read_text()
    finally:
        stop(proc)


def _progress(out: str) -> None:
    assert "result: 4950" in out


def _pause_resume(out: str) -> None:
    assert re.search(r"^paused at \d+ state paused$", out, re.M), out
    assert "resumed" in out and "'echo': 'keep going'" in out


#: each script docs/interactive.md lists: what it must print, and its input
INTERACTIVE = {
    "examples.progress": (_progress, ""),
    "examples.pause_resume": (_pause_resume, ""),
    "examples.ask": (lambda out: _contains(out, "result: hello Ada"), "Ada\n"),
    "examples.cancel": (lambda out: _contains(out, "state cancelled"), ""),
}


def _contains(out: str, text: str) -> None:
    assert text in out, out


def test_interactive_examples(example_env, tmp_path):
    """docs/interactive.md's "Run it" block, line by line (examples.attach needs a running
    task's id: test_attach_example)."""
    block = doc_block("docs/interactive.md", "itask worker -A examples.tasks -c 2     # terminal 1")
    scripts = [words[2] for words in block.commands()[1:]]
    assert all(words[:2] == ["python", "-m"] for words in block.commands()[1:]), block
    assert set(scripts) == {*INTERACTIVE, "examples.attach"}, block
    proc = worker(documented_worker(block), example_env, tmp_path / "w.log")
    try:
        for script in scripts:
            if script in INTERACTIVE:
                check, stdin = INTERACTIVE[script]
                check(run(["-m", script], example_env, stdin))
    finally:
        stop(proc)


def test_every_example_script_is_run_here_or_by_the_docs_tests():
    from .test_doc_examples import DEMO_CHECKS

    scripts = {p.stem for p in (ROOT / "examples").glob("*.py")
               if 'if __name__ == "__main__":' in p.read_text()}
    run_here = {"hello", "attach", *(name.split(".")[1] for name in INTERACTIVE)}
    assert scripts == run_here | set(DEMO_CHECKS)


def test_itask_demo_without_a_terminal(example_env):
    assert doc_block("README.md", "itask demo").commands() == [["itask", "demo"]]
    out = subprocess.run([sys.executable, "-m", "interactive_tasks.cli.main", "demo"],
                         env=example_env, cwd=ROOT, capture_output=True, text=True,
                         timeout=120, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "succeeded -> {'steps': 10, 'shipped': True}" in out.stdout
    assert "message {'echo': 'hello from the demo'}" in out.stdout
    assert "itask attach" in out.stdout
    assert "itask worker -A examples.tasks -c 2" in out.stdout  # where the examples' tasks are
    assert "Traceback" not in out.stdout + out.stderr


def children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            state, ppid = stat.rpartition(")")[2].split()[:2]
            if int(ppid) == pid and state != "Z":
                found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie (an orphan reparented elsewhere still counts)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def test_itask_demo_stops_its_worker_on_sigterm(example_env, tmp_path):
    """SIGTERM ends the demo as Ctrl-C does: its worker stopped, its log file deleted."""
    out_path = tmp_path / "demo.out"
    env = dict(example_env, TMPDIR=str(tmp_path))  # where the demo writes its log
    with open(out_path, "wb") as out:
        demo = subprocess.Popen([sys.executable, "-m", "interactive_tasks.cli.main", "demo"],
                                env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    worker_pid = None
    try:
        log = tmp_path / f"itask-demo-{demo.pid}.log"
        wait_for(lambda: "Started task" in out_path.read_text() or demo.poll() is not None,
                 60, message="the demo's task")
        assert demo.poll() is None, out_path.read_text()
        [worker_pid] = children(demo.pid)
        assert log.exists()
        demo.send_signal(signal.SIGTERM)
        demo.wait(30)
        wait_for(lambda: not alive(worker_pid), 30, message="the demo worker to stop")
        assert not log.exists(), out_path.read_text()
        assert "Traceback" not in out_path.read_text()
    finally:
        if demo.poll() is None:
            demo.kill()
        if worker_pid is not None and alive(worker_pid):  # its own session: kill all of it
            os.killpg(worker_pid, signal.SIGKILL)


def test_attach_example(example_env, tmp_path):
    out = subprocess.run([sys.executable, "-m", "examples.attach"], env=example_env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1  # sys.exit(message)
    assert out.stderr.strip() == ("usage: python -m examples.attach TASK_ID [TOKEN]  "
                                  "(examples.progress prints an id)")
    proc = worker(["-A", "examples.tasks", "-c", "2"], example_env, tmp_path / "w.log")
    try:
        out = subprocess.run([sys.executable, "-m", "examples.attach", "no-such-id"],
                             env=example_env, cwd=ROOT, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 1 and "Traceback" not in out.stderr
        assert out.stderr.startswith("examples.attach: no task no-such-id is known")
        # a running task, attached from this second process: snapshot, then the live tail
        code = ("from examples.tasks import crunch; h = crunch.start(100, 0.02); "
                "print(h.id, h.token, flush=True); h.result(timeout=60)")
        starter = subprocess.Popen([sys.executable, "-c", code], env=example_env, cwd=ROOT,
                                   stdout=subprocess.PIPE, text=True)
        with starter:
            task_id, token = starter.stdout.readline().split()
            out_text = run(["-m", "examples.attach", task_id, token], example_env)
            assert out_text.startswith("snapshot: ")
            assert "succeeded" in out_text.splitlines()[-1]
            assert starter.wait(60) == 0
    finally:
        stop(proc)
