"""``itask control``, ``itask status``, ``itask call`` and ``itask purge``: Celery's
commands of the same names."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from interactive_tasks import App
from interactive_tasks.app import unknown_task_name
from interactive_tasks.cli.errors import CliError
from interactive_tasks.cli.main import (
    JSON_HELP,
    add_destination,
    destination,
    ping_workers,
    replies_timeout,
)

#: verb -> (its arguments, what it does)
CONTROL_VERBS: dict[str, tuple[str, str]] = {
    "rate_limit": ("TASK RATE", "set a task's rate limit ('10/m'; '0' for none)"),
    "time_limit": ("TASK SOFT [HARD]", "set a task's soft and hard time limits (seconds; "
                                       "'none': the worker's default)"),
    "add_consumer": ("QUEUE", "take tasks from QUEUE too"),
    "cancel_consumer": ("QUEUE", "stop taking tasks from QUEUE"),
    "shutdown": ("", "warm shutdown, as SIGTERM"),
    "pool_grow": ("[N]", "start N more pool slots (default 1)"),
    "pool_shrink": ("[N]", "stop up to N idle pool slots (default 1)"),
    "autoscale": ("MAX [MIN]", "change the --autoscale range"),
}

CONTROL_EXAMPLE = ("itask control rate_limit proj.add 10/m -A proj\n"
                   "  itask control time_limit proj.crawl 60 120 -d w1@host\n"
                   "  itask control add_consumer io --json\n"
                   "  itask control shutdown -d w1@host\n"
                   "  itask control pool_grow 2 -d w1@host")


def register(subparsers: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    """Add the commands to the parser (``add`` is ``build_parser``'s helper)."""
    verbs = "; ".join(f"{v} {a}".strip() + f": {h}" for v, (a, h) in CONTROL_VERBS.items())
    p = add("control", cmd_control, "change workers at run time (needs the operator secret: "
                                    "ITASK_SECRET, or on the embedded broker its own): "
            + verbs)
    p.epilog = "example:\n  " + CONTROL_EXAMPLE
    p.add_argument("verb", metavar="VERB", help=", ".join(CONTROL_VERBS))
    p.add_argument("arguments", nargs="*", metavar="ARG")
    add_destination(p)
    replies_timeout(p)
    p.add_argument("--json", action="store_true", help=JSON_HELP)

    p = add("status", cmd_status, "the workers online (or those -d names), as celery status")
    p.epilog = "example:\n  itask status -A proj --json\n  itask status -d w1@host,w2@host"
    add_destination(p)
    replies_timeout(p)
    p.add_argument("--json", action="store_true", help=JSON_HELP)

    p = add("call", cmd_call, "send a task by name and print its id, as celery call")
    p.epilog = ("example:\n  itask call proj.add --args '[2, 2]' -A proj\n"
                "  itask call proj.report --kwargs '{\"day\": \"mon\"}' --countdown 60 "
                "--queue io --json")
    p.add_argument("name", help="the task's registered name")
    p.add_argument("-a", "--args", default="[]", help="positional arguments, a JSON list")
    p.add_argument("-k", "--kwargs", default="{}", help="keyword arguments, a JSON object")
    p.add_argument("--countdown", type=float, default=None, help="seconds before it runs")
    p.add_argument("--eta", default=None,
                   help="when it runs: an ISO 8601 time (2026-01-01T09:00:00+00:00)")
    p.add_argument("--expires", type=float, default=None,
                   help="seconds from now after which it is revoked unstarted")
    p.add_argument("-Q", "--queue", default=None, help="queue (default: the task's route)")
    p.add_argument("--priority", type=int, default=None, choices=range(10), metavar="0-9",
                   help="0-9; on RabbitMQ higher runs first, on Redis lower")
    p.add_argument("--json", action="store_true",
                   help="print {\"id\", \"token\"}; the token controls the task")

    p = add("purge", cmd_purge, "delete every task waiting in the task queues, as "
                                "celery purge (asks first unless -f)")
    p.epilog = "example:\n  itask purge -A proj -Q default,io -f"
    p.add_argument("-Q", "--queues", action="append",
                   help="queues to purge, comma separated (default: the default queue and "
                        "every queue the app's tasks and routes name)")
    p.add_argument("-f", "--force", action="store_true", help="do not ask")
    p.add_argument("--json", action="store_true", help=JSON_HELP)


def _cli_error(message: str, code: int = 2) -> Exception:
    return CliError(message, code)


def _app(args: argparse.Namespace) -> App:
    from interactive_tasks.cli.main import _get_app

    return _get_app(args)


def _seconds(text: str, label: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise _cli_error(f"control time_limit: the {label} limit must be a positive number "
                         f"of seconds or 'none', not {text!r}")
    return value


def _whole(text: str, verb: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _cli_error(f"control {verb}: {text!r} is not a whole number") from None


# -- control ----------
def cmd_control(args: argparse.Namespace) -> int:
    verb, rest = args.verb, list(args.arguments)
    if verb not in CONTROL_VERBS:
        raise _cli_error(f"unknown control command {verb!r}; use "
                         f"{', '.join(CONTROL_VERBS)} (itask inspect for reads, itask "
                         "revoke / cancel for tasks)")
    spec = CONTROL_VERBS[verb][0].split()
    required = [a for a in spec if not a.startswith("[")]
    if not len(required) <= len(rest) <= len(spec):
        usage = f"itask control {verb} {CONTROL_VERBS[verb][0]}".strip()
        raise _cli_error(f"control {verb} takes {len(required)}"
                         + (f" to {len(spec)}" if len(spec) != len(required) else "")
                         + f" argument(s), not {len(rest)}: {usage}")
    app = _app(args)
    control = app.control
    dest = destination(args)
    options: dict[str, Any] = {"destination": dest, "timeout": args.timeout}
    try:
        if verb == "rate_limit":
            replies = control.rate_limit(rest[0], rest[1], **options)
        elif verb == "time_limit":
            soft = _seconds(rest[1], "soft")
            hard = _seconds(rest[2], "hard") if len(rest) > 2 else None
            replies = control.time_limit(rest[0], soft, hard, **options)
        elif verb == "add_consumer":
            replies = control.add_consumer(rest[0], **options)
        elif verb == "cancel_consumer":
            replies = control.cancel_consumer(rest[0], **options)
        elif verb in ("pool_grow", "pool_shrink"):
            n = _whole(rest[0], verb) if rest else 1
            resize = control.pool_grow if verb == "pool_grow" else control.pool_shrink
            replies = resize(n, **options)
        elif verb == "autoscale":
            replies = control.autoscale(_whole(rest[0], verb),
                                        _whole(rest[1], verb) if len(rest) > 1 else None,
                                        **options)
        else:
            replies = control.shutdown(**options)
    except ValueError as exc:
        raise _cli_error(f"control {verb}: {exc}") from None
    return _print_replies(replies, args, dest)


def _print_replies(replies: list[dict[str, Any]], args: argparse.Namespace,
                   dest: list[str] | None) -> int:
    merged = {worker: answer for reply in replies for worker, answer in reply.items()}
    if args.json:
        print(json.dumps(merged, indent=2))
    else:
        for worker, answer in merged.items():
            if "ok" in answer:
                print(f"-> {worker}: OK {answer['ok']}")
            else:
                print(f"-> {worker}: ERROR {answer.get('type')}: {answer.get('error')}")
    missing = [d for d in dest or () if d not in merged]
    if not merged or missing:
        who = ", ".join(missing) if missing else "no worker"
        print(f"itask: {who} replied within {args.timeout}s (check the names with "
              "itask status, or wait longer with --timeout)", file=sys.stderr)
        return 1
    return 1 if any("ok" not in answer for answer in merged.values()) else 0


# -- status ----------
def cmd_status(args: argparse.Namespace) -> int:
    app = _app(args)
    replies, missing = ping_workers(app, destination(args), args.timeout)
    names = sorted(str(r.get("worker")) for r in replies)
    if args.json:
        print(json.dumps({"workers": names, "online": len(names)}, indent=2))
    else:
        for name in names:
            print(f"-> {name}: OK")
        print(f"\n{len(names)} node{'s' if len(names) != 1 else ''} online.")
    if missing or not names:
        what = f"{', '.join(missing)} did not reply" if missing else "no worker replied"
        print(f"itask: {what} within {args.timeout}s on {app.broker_url_display}",
              file=sys.stderr)
        return 1
    return 0


# -- call ----------
def _json_arg(text: str, what: str, kind: type) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _cli_error(f"call: --{what} is not JSON ({exc.msg} at character {exc.pos}): "
                         f"{text!r}") from None
    if not isinstance(value, kind):
        shape = "a JSON list, e.g. '[2, 2]'" if kind is list else \
            "a JSON object, e.g. '{\"x\": 1}'"
        raise _cli_error(f"call: --{what} must be {shape}, not {text!r}")
    return value


def cmd_call(args: argparse.Namespace) -> int:
    from datetime import datetime

    call_args = _json_arg(args.args, "args", list)
    call_kwargs = _json_arg(args.kwargs, "kwargs", dict)
    if args.countdown is not None and args.eta is not None:
        raise _cli_error("call: give --countdown or --eta, not both")
    eta = None
    if args.eta is not None:
        try:
            eta = datetime.fromisoformat(args.eta)
        except ValueError:
            raise _cli_error(f"call: --eta is not an ISO 8601 time: {args.eta!r}") from None
        if eta.tzinfo is None:
            raise _cli_error(f"call: --eta needs a time zone (e.g. {args.eta}+00:00)")
    app = _app(args)
    if (getattr(args, "app", None) and args.name not in app.tasks):
        app.finalize()
        if args.name not in app.tasks:
            raise _cli_error(unknown_task_name(args.name, app.main, list(app.tasks)))
    options: dict[str, Any] = {}
    if args.countdown is not None:
        options["countdown"] = args.countdown
    if eta is not None:
        options["eta"] = eta
    if args.expires is not None:
        options["expires"] = time.time() + args.expires
    task = app.tasks.get(args.name)
    queue = args.queue or (getattr(task, "queue", None) if task is not None else None)
    handle = app.send_task(args.name, call_args, call_kwargs, queue=queue,
                           priority=args.priority, **options)
    if args.json:
        print(json.dumps({"id": handle.id, "token": handle.token}, indent=2))
    else:
        print(handle.id)
        print(f"token: {handle.token} (to control it: itask cancel {handle.id} --token "
              f"{handle.token})", file=sys.stderr)
    return 0


# -- purge ----------
def purge_queues(app: App, requested: list[str] | None) -> list[str]:
    """The queues ``itask purge`` empties: those asked for, else the default queue and
    every queue the app's tasks and routes name."""
    if requested:
        return requested
    app.finalize()
    names = {app.conf.task_default_queue}
    for name, task in app.tasks.items():
        names.add(getattr(task, "queue", None) or app.route(name))
    names.update(q for q in app.conf.task_routes.values() if isinstance(q, str))
    return sorted(names)


def cmd_purge(args: argparse.Namespace) -> int:
    requested = [q for part in (args.queues or []) for q in part.split(",") if q]
    app = _app(args)
    queues = purge_queues(app, requested or None)
    if not args.force:
        if not sys.stdin.isatty():
            raise _cli_error(f"purge would delete every task waiting in {', '.join(queues)} "
                             "and stdin is not a terminal to ask: pass -f to purge")
        answer = input(f"Delete every task waiting in {', '.join(queues)} on "
                       f"{app.broker_url_display}? This cannot be undone. [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing purged")
            return 1
    counts: dict[str, int] = {}
    with app.connection() as conn:
        channel = conn.channel()
        for queue in queues:
            bound = app.names.task_queue(queue).bind(channel)
            bound.declare()  # RabbitMQ closes the channel on a purge of a missing queue
            counts[queue] = int(bound.purge() or 0)
    total = sum(counts.values())
    if args.json:
        print(json.dumps({"purged": total, "queues": counts}, indent=2))
    else:
        print(f"purged {total} message{'s' if total != 1 else ''} from "
              f"{len(queues)} queue{'s' if len(queues) != 1 else ''} "
              f"({', '.join(f'{q}: {n}' for q, n in counts.items())})")
    return 0
