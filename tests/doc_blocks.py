"""The fenced blocks of README.md and docs/*.md, for the tests that run them as written."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced block: its file (relative to the repository), info string, text, line."""

    path: str
    lang: str
    text: str
    line: int

    @property
    def first(self) -> str:
        """Its first non-empty line, stripped: with the file, what names the block."""
        return next(line.strip() for line in self.text.splitlines() if line.strip())

    @property
    def lines(self) -> list[str]:
        return [line for line in self.text.splitlines() if line.strip()]

    def commands(self) -> list[list[str]]:
        """Each line as a command's words, without its ``# comment``."""
        return [line.split("#", 1)[0].split() for line in self.lines]

    def __str__(self) -> str:
        return f"{self.path}:{self.line} ({self.first[:60]})"


def doc_files() -> list[str]:
    return ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]


def blocks(path: str) -> list[Block]:
    found: list[Block] = []
    lang: str | None = None
    start = 0
    body: list[str] = []
    for number, line in enumerate((ROOT / path).read_text().splitlines(), 1):
        match = _FENCE.match(line)
        if lang is None and match:
            lang, start, body = match.group(1), number, []
        elif lang is not None and line.strip() == "```":
            found.append(Block(path, lang, "\n".join(body) + "\n", start))
            lang = None
        elif lang is not None:
            body.append(line)
    assert lang is None, f"{path}:{start}: a fenced block is never closed"
    return found


def all_blocks() -> list[Block]:
    return [block for path in doc_files() for block in blocks(path)]


def doc_block(path: str, first: str) -> Block:
    """The block of ``path`` whose first line is ``first``; fails the test if there is none."""
    matching = [b for b in blocks(path) if b.first == first]
    assert len(matching) == 1, f"{path}: {len(matching)} blocks start with {first!r}"
    return matching[0]


#: what varies between a documented line and a real one: an id cut short ("4e86…"), an
#: elision ("…"), a worker name, a quoted name, a file path, a number
_VARYING = re.compile(r"([0-9a-f]{4}…|…|[A-Za-z][\w.-]*@[\w.-]+|'[^']*'|/[\w./-]+|\d+(?:\.\d+)?)")


def doc_pattern(line: str) -> re.Pattern[str]:
    """A documented output line as a pattern: its words exact, what varies (see
    ``_VARYING``) matched by shape."""
    out = []
    for i, part in enumerate(_VARYING.split(line)):
        if i % 2 == 0:
            out.append(re.escape(part))
        elif part == "…":
            out.append(".*")
        elif part.endswith("…"):
            out.append(r"[0-9a-f-]+")
        elif "@" in part:
            out.append(r"\S+@\S+")
        elif part.startswith("'"):
            out.append(r"'[^']*'")
        elif part.startswith("/"):
            out.append(r"/\S+")
        else:
            out.append(r"\d+(?:\.\d+)?")
    return re.compile("".join(out) + r"\Z")


def documented(start: str, path: str = "docs/troubleshooting.md") -> re.Pattern[str]:
    """The pattern of the one documented line of ``path`` (in a fenced block) that begins
    with ``start``, for a test that produces the real message to match it."""
    lines = [line for block in blocks(path) for line in block.lines if line.startswith(start)]
    assert len(lines) == 1, f"{path}: {len(lines)} documented lines start with {start!r}"
    return doc_pattern(lines[0])
