"""Project rules that are cheap to check on every run: lint, types, layering, public API."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import interactive_tasks

from .conftest import ROOT


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_ruff_clean():
    out = _run("ruff", "check", ".")
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_clean():
    out = _run("mypy")
    assert out.returncode == 0, out.stdout + out.stderr


def test_library_never_imports_worker_or_cli():
    """Layering is one-way: library <- worker <- cli (DESIGN.md §2)."""
    offenders = []
    for path in (ROOT / "interactive_tasks").rglob("*.py"):
        rel = path.relative_to(ROOT / "interactive_tasks")
        if rel.parts[0] in ("worker", "cli"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = "." * node.level + (node.module or "")
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for name in names:
                if any(part in ("worker", "cli") for part in name.split(".")):
                    offenders.append(f"{rel}: {name}")
    assert offenders == []


def test_worker_never_imports_cli():
    for path in (ROOT / "worker").rglob("*.py"):
        text = path.read_text()
        assert "interactive_tasks.cli" not in text and "from ..cli" not in text, path


def test_public_api_is_sorted_and_complete():
    exported = interactive_tasks.__all__
    assert exported == sorted(exported)
    for name in exported:
        assert hasattr(interactive_tasks, name), name
    public = {n for n in vars(interactive_tasks) if not n.startswith("_")}
    modules = {"app", "client", "codec", "context", "errors", "handle", "protocol",
               "results", "task", "transport", "worker", "cli", "widgets", "canvas",
               "monitor", "schedules"}
    assert public - set(exported) - modules == set()


def test_py_typed_marker():
    assert (Path(interactive_tasks.__file__).parent / "py.typed").exists()


def test_task_signatures_are_type_checked(tmp_path):
    """``Task[P, R]``: mypy rejects wrong arguments to delay()/start()."""
    snippet = tmp_path / "snippet.py"
    snippet.write_text(
        "from interactive_tasks import App, InteractiveTask\n"
        "app = App('x')\n"
        "@app.task\n"
        "def add(x: int, y: int) -> int:\n    return x + y\n"
        "@app.task(base=InteractiveTask)\n"
        "def job(self, n: int) -> str:\n    return 'a'\n"
        "ok: int = add.delay(1, 2).result()\n"
        "add.delay('x', 2)\n"
        "job.start('no')\n"
    )
    out = _run("mypy", "--no-incremental", "--config-file", "/dev/null",
               "--ignore-missing-imports", str(snippet))
    errors = [line for line in out.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 2, out.stdout
    assert ":10:" in errors[0] and ":11:" in errors[1]
