"""What a plain ``pip install interactive_tasks`` brings, and what the metadata promises.

The install itself is tested by tests/smoke_install.py (fresh virtualenvs, run by .ci/run);
these checks are quick and read the metadata of the packages installed here.
"""

from __future__ import annotations

import importlib.metadata
import re

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from . import smoke_install
from .conftest import ROOT

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _closure(requirements: list[Requirement]) -> set[str]:
    """Every distribution a set of requirements pulls in (their extras followed)."""
    seen: set[str] = set()
    todo = list(requirements)
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        key = name + "[" + ",".join(sorted(req.extras)) + "]"
        if key in seen:
            continue
        seen.add(key)
        for text in importlib.metadata.requires(req.name) or ():
            dep = Requirement(text)
            if dep.marker is None or any(dep.marker.evaluate({"extra": extra})
                                         for extra in sorted(req.extras) or [""]):
                todo.append(dep)
    return {key.split("[")[0] for key in seen}


def test_a_plain_install_brings_what_the_redis_transport_imports():
    # kombu's Redis transport imports `packaging`, which only kombu[redis] requires: a
    # plain install without it had clients and workers die on a redis:// broker
    plain = _closure([Requirement(r) for r in PROJECT["dependencies"]])
    needed = [Requirement(r) for r in importlib.metadata.requires("kombu") or ()
              if Requirement(r).marker is not None
              and Requirement(r).marker.evaluate({"extra": "redis"})
              and not Requirement(r).marker.evaluate({"extra": ""})]
    assert needed, "kombu's redis extra requires nothing: this test no longer tests that"
    missing = sorted(canonicalize_name(r.name) for r in needed
                     if canonicalize_name(r.name) not in plain)
    assert not missing, f"a plain install lacks {missing}"


def test_python_versions_say_what_is_tested():
    tested = {i.python for i in smoke_install.INSTALLS}
    classifiers = {m.group(1) for c in PROJECT["classifiers"]
                   if (m := re.fullmatch(r"Programming Language :: Python :: (3\.\d+)", c))}
    assert classifiers == tested, (classifiers, tested)
    minors = sorted(int(v.split(".")[1]) for v in tested)
    assert minors == list(range(minors[0], minors[-1] + 1)), "a version between is untested"
    assert PROJECT["requires-python"] == f">=3.{minors[0]},<3.{minors[-1] + 1}"
    oldest, newest = f"3.{minors[0]}", f"3.{minors[-1]}"
    plain = {i.python for i in smoke_install.INSTALLS if not i.extra}
    assert {oldest, newest} <= plain, "a plain install on the oldest and newest Python"
    extras = set(PROJECT["optional-dependencies"]) - {"dev", "bench"}
    assert extras == {i.extra for i in smoke_install.INSTALLS if i.extra}, \
        "every extra a user can type is smoke-tested"
