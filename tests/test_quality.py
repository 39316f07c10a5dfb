"""Project rules that are cheap to check on every run: lint, types, layering, public API."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import interactive_tasks

from .conftest import IN_CI, ROOT


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
    """Layering is one-way: library <- worker <- cli (docs/architecture.md, 'Layers')."""
    offenders = []
    for path in (ROOT / "interactive_tasks").rglob("*.py"):
        rel = path.relative_to(ROOT / "interactive_tasks")
        if rel.parts[0] in ("worker", "cli", "celery"):
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


def test_nothing_imports_the_celery_bridge():
    """The Celery bridge (``interactive_tasks/celery/``) is a layer of its own on top of
    the library and the worker; neither of them, nor the CLI, loads it."""
    bridge = ROOT / "interactive_tasks" / "celery"
    for path in (ROOT / "interactive_tasks").rglob("*.py"):
        if bridge in path.parents:
            continue
        text = path.read_text()
        assert "interactive_tasks.celery" not in text and "from .celery" not in text and \
            "from ..celery" not in text, path


def test_celery_bridge_loads_worker_code_only_inside_a_worker():
    """A client that imports the bridge (to call ``task.start()``) loads no worker code."""
    code = ("import sys, interactive_tasks.celery; "
            "print(sorted(m for m in sys.modules if m.startswith('interactive_tasks.worker')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout.strip()
    assert out == "[]"


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
               "monitor", "schedules", "celery", "config", "control", "view", "web",
               "shared"}
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


# -- the repository stands alone -----------------------------------------------------------

#: Files outside the repository that project files once pointed to; nothing may any more.
_OUTSIDE_POINTERS = (b"DESIGN.md", b"../shared")


def _project_files() -> list[Path]:
    """Tracked files plus new ones not ignored: what a commit of this tree would hold."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, timeout=60, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        if IN_CI:
            raise
        pytest.skip(f"not a git checkout: {exc}")
    files = [ROOT / name for name in out.stdout.decode().split("\0") if name]
    return [path for path in files if path.is_file()]


def test_no_file_points_outside_the_repository():
    """The design lives in docs/architecture.md; no file may send readers elsewhere."""
    me = Path(__file__).resolve()
    offenders = []
    for path in _project_files():
        if path.resolve() == me:
            continue
        data = path.read_bytes()
        for pointer in _OUTSIDE_POINTERS:
            if pointer in data:
                line = data[: data.index(pointer)].count(b"\n") + 1
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {pointer.decode()}")
    assert offenders == []


_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)


def _without_code(text: str) -> str:
    return _INLINE_CODE.sub("", _FENCE.sub("", text))


def _anchors(markdown: str) -> set[str]:
    """The heading anchors GitHub makes: lowercase, punctuation dropped, spaces to ``-``,
    ``-1``, ``-2`` … for repeats."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in _HEADING.findall(_FENCE.sub("", markdown)):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_relative_links_in_readme_and_docs_resolve():
    """Every relative link in README.md and docs/*.md names a path that exists, and its
    ``#anchor`` (into a markdown file) a heading there."""
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in _LINK.findall(_without_code(page.read_text())):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: …
                continue
            path_part, _, anchor = target.partition("#")
            dest = (page.parent / path_part).resolve() if path_part else page
            where = f"{page.relative_to(ROOT)}: {target}"
            if not dest.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text()):
                broken.append(f"{where} (no such heading)")
    assert broken == []


def test_pointers_into_the_architecture_doc_name_its_sections():
    """``docs/architecture.md, 'Pools'`` in a comment names a heading that exists."""
    pointer = re.compile(rb"docs/architecture\.md,\s+'([^'\n]+)'")
    doc = ROOT / "docs" / "architecture.md"
    headings = set(_HEADING.findall(_FENCE.sub("", doc.read_text())))
    stale, found = [], 0
    for path in _project_files():
        for match in pointer.finditer(path.read_bytes()):
            found += 1
            if match.group(1).decode() not in headings:
                stale.append(f"{path.relative_to(ROOT)}: {match.group(1).decode()!r}")
    assert found and stale == []
