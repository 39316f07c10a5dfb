"""Monkey-patch for ``itask worker --pool eventlet`` before anything else is imported.

Imported first thing by the package (``interactive_tasks/__init__.py``), as
:mod:`._gevent` is: patching after kombu or redis have imported ``socket``, ``select``
and ``threading`` would leave them blocking the one OS thread every green thread shares.
"""

from __future__ import annotations

import os
import sys
import warnings
from types import ModuleType


def wants_eventlet(argv: list[str]) -> bool:
    """``itask worker -P eventlet`` / ``--pool eventlet`` / ``--pool=eventlet``, or
    ITASK_POOL=eventlet."""
    if os.environ.get("ITASK_POOL") == "eventlet":
        return True
    if "worker" not in argv:
        return False
    for i, arg in enumerate(argv):
        if arg in ("-P", "--pool") and i + 1 < len(argv) and argv[i + 1] == "eventlet":
            return True
        if arg in ("--pool=eventlet", "-Peventlet"):
            return True
    return False


def maybe_patch() -> None:
    if not wants_eventlet(sys.argv):
        return
    try:
        eventlet = import_eventlet()
    except ImportError:
        return  # the worker explains: "pip install eventlet" (see worker.main.make_pool)
    eventlet.monkey_patch()


def import_eventlet() -> ModuleType:
    """``import eventlet`` without the multi-line deprecation warning eventlet gives at
    import (the worker logs one line instead); every other warning is left as it is.
    Raises ImportError when eventlet is not installed."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
        import eventlet
    return eventlet
