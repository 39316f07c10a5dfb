"""``itask beat``: send periodic tasks on their schedule (see ``docs/beat.md``).

Registered by :func:`register` from ``cli/main.py``'s parser; the scheduling itself lives
in :mod:`interactive_tasks.worker.beat`.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from typing import Any

EXAMPLE = ("itask beat -A proj\n"
           "  itask beat -A proj --catch-up          # send once what was missed while down\n"
           "  itask beat -A proj --list              # print the entries and next runs")


def register(subparsers: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    """Add ``itask beat`` to the parser (``add`` is ``build_parser``'s helper)."""
    p = add("beat", cmd_beat, "send periodic tasks on their schedule (one beat per schedule)")
    p.epilog = "example:\n  " + EXAMPLE
    from interactive_tasks.cli.main import LOGLEVEL_HELP, loglevel

    p.add_argument("-l", "--loglevel", type=loglevel, default="INFO", metavar="LEVEL",
                   help=LOGLEVEL_HELP)
    p.add_argument("--name", help="schedule name; one beat per name sends, others stand by "
                                  "(default: the app's name)")
    p.add_argument("--catch-up", action="store_true",
                   help="an entry that missed runs while no beat ran is sent once at start "
                        "(default: missed runs are skipped, no burst)")
    p.add_argument("--lock-timeout", type=float, default=30.0,
                   help="seconds before a crashed beat's lock expires and a standby takes "
                        "over (Redis; default 30)")
    p.add_argument("--max-interval", type=float, default=5.0,
                   help="longest sleep between schedule checks (default 5)")
    p.add_argument("--state", help="JSON file for last-run times instead of the default "
                                    "store ('memory' keeps none)")
    p.add_argument("--no-lock", action="store_true",
                   help="no schedule lock: only when you guarantee a single beat")
    p.add_argument("--list", action="store_true",
                   help="print the entries and when each runs next, then exit")


def cmd_beat(args: argparse.Namespace) -> int:
    from interactive_tasks.cli.main import _get_app
    from interactive_tasks.worker.beat import Beat, stores_for

    logging.basicConfig(
        level=getattr(logging, args.loglevel),
        format="[%(asctime)s %(levelname)s/beat] %(name)s: %(message)s",
    )
    app = _get_app(args)
    name = args.name or app.main
    lock, state = stores_for(app, name, lock_timeout=args.lock_timeout,
                             state_path=args.state, no_lock=args.no_lock or args.list)
    beat = Beat(app, name=name, lock=lock, state=state, catch_up=args.catch_up,
                lock_timeout=args.lock_timeout, max_interval=args.max_interval)
    if args.list:
        return _print_entries(beat)
    try:
        return beat.run()
    finally:
        app.close()


def start_embedded(app: Any) -> Any:
    """``itask worker -B``: the app's beat in a process of its own beside the worker.

    A forked process (not a thread): the worker forks its prefork pool processes later,
    and a fork while a beat thread holds a lock (logging's, a socket's) could leave a
    pool process stuck on it. The beat takes the schedule lock as ``itask beat`` does, so
    several workers started with ``-B`` still send each run once. It dies with the worker
    (SIGKILL included); :func:`stop_embedded` stops it cleanly. Returns the process.
    """
    import billiard

    process = billiard.Process(target=_embedded_main, args=(app,), name="itask-beat",
                               daemon=False)
    process.start()
    return process


def _embedded_main(app: Any) -> None:
    import os

    from interactive_tasks.worker.beat import Beat
    from interactive_tasks.worker.pools.prefork import _die_with_parent

    _die_with_parent()
    try:
        code = Beat(app).run()  # SIGTERM (from the worker) and SIGINT stop it cleanly
    except Exception:
        logging.getLogger("interactive_tasks.beat").exception("the embedded beat failed")
        code = 1
    finally:
        app.close()
    os._exit(code)


def stop_embedded(process: Any, timeout: float = 10.0) -> None:
    """Stop the beat of :func:`start_embedded` (SIGTERM, then SIGKILL after ``timeout``)."""
    if process.is_alive():
        process.terminate()
        process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join(2.0)


def _print_entries(beat: Any) -> int:
    now = time.time()
    try:
        last_runs = beat.state.load()
    except Exception as exc:
        print(f"(last runs unavailable from {beat.state.where}: {exc})")
        last_runs = {}
    if not beat.entries:
        print("no periodic entries: set app.beat_schedule or use @app.periodic")
        return 0
    rows = []
    for name, entry in beat.entries.items():
        last = last_runs.get(name)
        base = last if last is not None and last <= now else now
        nxt = entry.schedule.next_after(base)
        if nxt <= now:
            nxt = entry.schedule.missed(base, now)[1]
        rows.append((name, entry.schedule.describe(), entry.task,
                     _fmt(last) if last is not None else "never", _fmt(nxt)))
    header = ("entry", "schedule", "task", "last run", "next run")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _fmt(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
