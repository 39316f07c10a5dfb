"""Monkey-patch for ``itask worker --pool gevent`` before anything else is imported.

Imported first thing by the package (``interactive_tasks/__init__.py``): patching after
kombu or redis have imported ``socket`` and ``select`` would leave them blocking.
"""

from __future__ import annotations

import os
import sys


def wants_gevent(argv: list[str]) -> bool:
    """``itask worker -P gevent`` / ``--pool gevent`` / ``--pool=gevent``, or ITASK_POOL."""
    if os.environ.get("ITASK_POOL") == "gevent":
        return True
    if "worker" not in argv:
        return False
    for i, arg in enumerate(argv):
        if arg in ("-P", "--pool") and i + 1 < len(argv) and argv[i + 1] == "gevent":
            return True
        if arg in ("--pool=gevent", "-Pgevent"):
            return True
    return False


def maybe_patch() -> None:
    if "gevent.monkey" in sys.modules or not wants_gevent(sys.argv):
        return
    try:
        from gevent import monkey
    except ImportError:
        return  # the worker explains: "pip install gevent" (see worker.main.make_pool)
    monkey.patch_all()
