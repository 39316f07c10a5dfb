"""The ``itask`` command.

Exit codes: 0 success; 1 the task failed / was cancelled / control was refused;
2 usage or configuration error (bad -A, unknown task id, no token); 3 broker unreachable;
130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from interactive_tasks import App, load_app
from interactive_tasks.cli.errors import CliError
from interactive_tasks.errors import (
    BROKER_HINT,
    ConfigurationError,
    InteractiveTasksError,
    TransportError,
    UnknownTask,
)

EXAMPLES = {
    "web": "itask web -A proj --port 5555\n"
           "  ITASK_WEB_AUTH=ops:s3cret itask web -A proj --address 0.0.0.0 --read-only",
    "worker": "itask worker -A examples.hello -c 2\n"
              "  itask worker -A proj:app --pool threads -Q default,io -n io@%h",
    "ping": "itask ping -A proj --timeout 2 --json\n"
            "  itask ping -A proj -d w1@host,w2@host",
    "inspect": "itask inspect active -A proj\n"
               "  itask inspect query_task 6f1c... -d w1@host --json",
    "ls": "itask ls -A proj --json",
    "attach": "itask attach 6f1c... -A proj --token T",
    "top": "itask top -A proj",
    "send": "itask send ID '{\"speed\": 2}' -A proj",
    "pause": "itask pause ID --wait -A proj\n"
             "  itask pause ID --hard --token T",
    "resume": "itask resume ID --wait -A proj",
    "cancel": "itask cancel ID -A proj --grace 10",
    "answer": "itask answer ID yes -A proj",
    "revoke": "itask revoke ID1 ID2 -A proj\n"
              "  itask revoke ID --terminate --token T",
    "result": "itask result ID -A proj --json",
    "events": "itask events -A proj --duration 10",
    "demo": "itask demo",
}


def _color_enabled(stream: Any = None) -> bool:
    stream = stream or sys.stdout
    if os.environ.get("NO_COLOR"):
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


def _get_app(args: argparse.Namespace) -> App:
    spec = getattr(args, "app", None) or os.environ.get("ITASK_APP")
    if args.broker:
        os.environ["ITASK_BROKER_URL"] = args.broker
    if spec:
        app = load_app(spec)
        if args.broker:
            app.broker_url = args.broker
        return app
    return App("itask", broker=args.broker)


def _print_json(data: Any) -> None:
    # json where a command prints or reads it: `itask worker` never does, and what the
    # worker imports before its pool forks every pool process carries
    import json

    print(json.dumps(data, indent=2, default=str))


# -- commands ----------
def cmd_worker(args: argparse.Namespace) -> int:
    from interactive_tasks.worker.main import Worker

    logging.basicConfig(
        level=getattr(logging, args.loglevel),
        format="[%(asctime)s %(levelname)s/%(processName)s] %(name)s: %(message)s",
    )
    app = _get_app(args)
    if args.task_events:
        app.configure(worker_send_task_events=True)
    hostname = (args.hostname or f"worker{os.getpid()}@%h").replace("%h", socket.gethostname())
    hostname = hostname.replace("%n", hostname.split("@")[0])
    queues = [q for part in (args.queues or []) for q in part.split(",") if q] or None
    beat = None
    if args.beat:
        from interactive_tasks.cli.beat_cmd import start_embedded

        beat = start_embedded(app)  # forked before the worker holds any connection
    try:
        worker = Worker(app, hostname=hostname, pool=args.pool,
                        concurrency=args.concurrency, queues=queues,
                        max_tasks_per_child=args.max_tasks_per_child,
                        shutdown_timeout=args.shutdown_timeout, time_limit=args.time_limit,
                        soft_time_limit=args.soft_time_limit,
                        max_memory_per_child=args.max_memory_per_child,
                        autoscale=args.autoscale, autoscale_keepalive=args.autoscale_keepalive)
        return worker.run()
    finally:
        if beat is not None:
            from interactive_tasks.cli.beat_cmd import stop_embedded

            stop_embedded(beat)


def ping_workers(app: Any, dest: list[str] | None, timeout: float
                 ) -> tuple[list[dict[str, Any]], list[str]]:
    """Ping every worker, or with ``dest`` only the workers named (the others stay
    silent, and the wait ends once each of them replied): the replies, and the names in
    ``dest`` that did not reply. Raises the client's TransportError."""
    from interactive_tasks.protocol import Verb

    replies = (app.control.broadcast(Verb.PING, destination=dest, timeout=timeout)
               if dest else app.ping(timeout=timeout))
    missing = [d for d in dest or () if d not in {r.get("worker") for r in replies}]
    return replies, missing


def cmd_ping(args: argparse.Namespace) -> int:
    app = _get_app(args)
    started = time.monotonic()
    replies, missing = ping_workers(app, destination(args), args.timeout)
    if args.json:
        _print_json([{"worker": r.get("worker"), "ok": r.get("ok")} for r in replies])
    else:
        for r in replies:
            print(f"{r.get('worker')}: pong")
        if replies:
            print(f"{len(replies)} worker(s) in {time.monotonic() - started:.2f}s")
    if missing:
        print(f"{', '.join(missing)} did not reply within {args.timeout}s on "
              f"{app.broker_url_display} (check the names with itask status, or wait "
              "longer with --timeout)", file=sys.stderr)
    elif not replies:
        print(f"no worker replied within {args.timeout}s on {app.broker_url_display}: "
              "start one with itask worker -A MODULE (on the same broker), or give -A "
              "(the app may use its own namespace), or wait longer with --timeout",
              file=sys.stderr)
    return 0 if replies and not missing else 1


def cmd_inspect(args: argparse.Namespace) -> int:
    if args.ids and args.what != "query_task":
        raise CliError(f"inspect {args.what} takes no task ids (inspect query_task ID... does)")
    if args.what == "query_task" and not args.ids:
        raise CliError("inspect query_task needs task ids: itask inspect query_task ID...")
    app = _get_app(args)
    if args.what == "scheduled":
        return _inspect_scheduled(app, args)
    inspector = app.control.inspect(destination=destination(args),
                                    timeout=args.timeout)
    if args.what == "query_task":
        data = inspector.query_task(args.ids)
    else:
        data = getattr(inspector, args.what)()
    if args.json:
        _print_json(data)
    else:
        for worker, value in data.items():
            print(f"-> {worker}")
            if isinstance(value, list):
                if not value:
                    print("   (none)")
                for item in value:
                    if isinstance(item, dict):
                        print(f"   {item.get('id')} {item.get('name')} {item.get('state')} "
                              f"pid={item.get('pid')}")
                    else:
                        print(f"   {item}")
            elif isinstance(value, dict) and args.what == "query_task":
                if not value:
                    print("   (none of them here)")
                for task_id, item in value.items():
                    print(f"   {task_id} {item.get('name')} {item.get('state')} "
                          f"pid={item.get('pid')}")
            elif isinstance(value, dict):
                for key, v in value.items():
                    print(f"   {key}: {v}")
        if not data:
            print(f"no worker replied within {args.timeout}s", file=sys.stderr)
    return 0 if data else 1


def _inspect_scheduled(app: App, args: argparse.Namespace) -> int:
    """Tasks waiting in the broker for their eta (countdown, eta, retry countdown)."""
    waiting = app.scheduled(limit=args.limit)
    if args.json:
        _print_json([{"id": t.id, "name": t.name, "queue": t.queue, "eta": t.eta}
                     for t in waiting])
        return 0
    if not waiting:
        print("no task waits in the broker for its eta")
    now = time.time()
    for t in waiting:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t.eta))
        print(f"{t.id} {t.name} queue={t.queue} eta={when} (in {t.eta - now:.0f}s)")
    return 0


def _all_tasks(app: App, timeout: float) -> list[dict[str, Any]]:
    tasks: dict[str, dict[str, Any]] = {}
    for reply in app.inspect("tasks", timeout=timeout):
        for item in reply.get("data") or ():
            tasks[item["id"]] = item
    return sorted(tasks.values(), key=lambda t: t.get("received") or 0)


def cmd_ls(args: argparse.Namespace) -> int:
    from interactive_tasks.protocol import Event, TaskSnapshot, TaskState

    app = _get_app(args)
    items = _all_tasks(app, args.timeout)
    if args.json:
        _print_json(items)
        return 0
    from interactive_tasks.cli.render import render_task_table, to_ansi

    snapshots = [
        TaskSnapshot(task_id=t["id"], name=t["name"], state=TaskState(t["state"]),
                     worker=t.get("worker"), pid=t.get("pid"),
                     progress=Event.from_wire(t["progress"]) if t.get("progress") else None,
                     received=t.get("received"), started=t.get("started"),
                     finished=t.get("finished"), question=t.get("question"))
        for t in items
    ]
    width = os.get_terminal_size().columns if sys.stdout.isatty() else 120
    sys.stdout.write(to_ansi(render_task_table(snapshots, now=time.time()), width,
                             color=_color_enabled()))
    return 0


def _handle_for(app: App, args: argparse.Namespace) -> Any:
    token = getattr(args, "token", None) or os.environ.get("ITASK_TOKEN")
    return app.find(args.task_id, token=token, timeout=args.timeout)


def cmd_control(args: argparse.Namespace) -> int:
    app = _get_app(args)
    handle = _handle_for(app, args)
    verb = args.command
    if verb == "send":
        import json  # as in _print_json

        try:
            data: Any = json.loads(args.message)
        except json.JSONDecodeError:
            data = args.message
        handle.send(data)
    elif verb == "pause":
        handle.pause(hard=args.hard, wait=args.wait, timeout=args.timeout)
    elif verb == "resume":
        handle.resume(wait=args.wait, timeout=args.timeout)
    elif verb == "cancel":
        if not handle.cancel(grace=args.grace, timeout=args.timeout):
            raise CliError(f"task {handle.id} had already ended ({handle.state.value}); "
                           "nothing to cancel", code=1)
    elif verb == "answer":
        handle.answer(args.text)
    print(f"{verb}: delivered to task {handle.id} on {handle.worker or 'its worker'}"
          + (f"; it is {handle.state.value} now" if getattr(args, "wait", False) else ""))
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    app = _get_app(args)
    token = args.token or os.environ.get("ITASK_TOKEN")
    tokens = {tid: token for tid in args.task_ids} if token else None
    if tokens is None and app.secret is None:
        raise CliError("revoke needs the task's token (--token) or the operator secret "
                       "(ITASK_SECRET)")
    replies = app.revoke(args.task_ids, terminate=args.terminate, tokens=tokens)
    refused = sorted({i for r in replies for i in (r.get("data") or {}).get("refused", [])})
    if refused:
        print(f"itask: refused (wrong token): {', '.join(refused)}", file=sys.stderr)
        return 1
    print(f"revoked {len(args.task_ids)} task(s); {len(replies)} worker(s) acknowledged")
    return 0


def cmd_result(args: argparse.Namespace) -> int:
    app = _get_app(args)
    handle = _handle_for(app, args)
    if args.wait:
        handle.wait(args.wait)
    snap = handle.snapshot()
    data = {"id": snap.task_id, "name": snap.name, "state": snap.state.value,
            "result": snap.result, "error": snap.error, "worker": snap.worker}
    if args.json:
        _print_json(data)
    else:
        print(f"{snap.task_id} {snap.name} {snap.state.value}")
        if snap.state.value == "succeeded":
            print(f"result: {snap.result!r}")
        elif snap.error:
            print(f"error: {snap.error.get('type')}: {snap.error.get('message')}")
    return 1 if snap.state.value in ("failed", "cancelled", "revoked") else 0


def cmd_attach(args: argparse.Namespace) -> int:
    from .attach import attach

    app = _get_app(args)
    handle = _handle_for(app, args)
    return attach(handle, color=_color_enabled())


def cmd_top(args: argparse.Namespace) -> int:
    from .attach import top

    app = _get_app(args)
    return top(app, color=_color_enabled())


def cmd_events(args: argparse.Namespace) -> int:
    import json  # as in _print_json

    from interactive_tasks.monitor import EventReceiver

    app = _get_app(args)
    deadline = None if args.duration is None else time.monotonic() + args.duration
    with EventReceiver(app) as receiver:
        for event in receiver.events(timeout=0.5 if deadline else None):
            print(json.dumps(event, default=str), flush=True)
            if deadline is not None and time.monotonic() > deadline:
                break
        while deadline is not None and time.monotonic() < deadline:
            for event in receiver.events(timeout=max(0.0, deadline - time.monotonic())):
                print(json.dumps(event, default=str), flush=True)
    return 0


def cmd_web(args: argparse.Namespace) -> int:
    from interactive_tasks.web import HINT, WebUnavailable, serve

    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise CliError(HINT) from None
    app = _get_app(args)
    try:
        serve(app, address=args.address, port=args.port, auth=args.auth,
              read_only=args.read_only)
    except WebUnavailable as exc:
        raise CliError(str(exc)) from None
    except (ValueError, OSError) as exc:
        raise CliError(str(exc)) from None
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(broker=args.broker, color=_color_enabled(), interactive=sys.stdin.isatty())


# -- parser ----------
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _autoscale(text: str) -> tuple[int, int]:
    from interactive_tasks.worker.autoscale import parse_autoscale

    try:
        return parse_autoscale(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


#: Celery's log level names (-l), any case
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "FATAL")
LOGLEVEL_HELP = "debug, info, warning, error, critical (default info)"


def loglevel(text: str) -> str:
    """``-l``'s type: the level's name in capitals (``warn``, the logging module's own
    alias, is WARNING); an unknown name is a usage error."""
    name = text.upper()
    if name == "WARN":
        return "WARNING"
    if name not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"unknown log level {text!r}; use {', '.join(n.lower() for n in LOG_LEVELS)}")
    return name


JSON_HELP = "print JSON instead of text"
TASK_TIMEOUT_HELP = "seconds to wait for the task's worker to reply (default 2)"


def replies_timeout(p: argparse.ArgumentParser, default: float = 1.0) -> None:
    """``--timeout`` of the commands that wait for worker replies."""
    p.add_argument("--timeout", type=float, default=default,
                   help=f"seconds to wait for replies (default {default:g})")


def add_destination(p: argparse.ArgumentParser) -> None:
    p.add_argument("-d", "--destination", action="append",
                   help="only these workers, comma separated (default: every worker)")


def destination(args: argparse.Namespace) -> list[str] | None:
    names = [n for part in (args.destination or []) for n in part.split(",") if n]
    return names or None


def _command_in(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names: its first word that is not an option (the options
    before the command take no value)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``itask`` parser. The commands of ``control_cmd``, ``multi`` and ``beat_cmd``
    are added unless ``command`` is one defined here, so that ``itask worker`` does not
    load their code; without ``command`` (``--help``, an unknown one) every command is."""
    parser = argparse.ArgumentParser(
        prog="itask",
        description="interactive_tasks: run workers, and watch and steer running tasks.",
        epilog="Exit codes: 0 ok, 1 task failed or control refused, 2 usage/config error, "
               "3 broker unreachable. NO_COLOR disables colours.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also after the command)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str,
            app: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_,
                           epilog="example:\n  " + EXAMPLES.get(name, f"itask {name}"),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        # SUPPRESS: absent after the command, the value given before it (or False) stays
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of an error")
        if app:
            p.add_argument("-A", "--app", help="app module, module:attribute (Celery's -A; "
                                                "default: ITASK_APP)")
        p.add_argument("-b", "--broker", help="broker URL (default: ITASK_BROKER_URL or the "
                                              "embedded broker)")
        return p

    p = add("worker", cmd_worker, "run a worker")
    p.add_argument("-P", "--pool", default="prefork",
                   choices=["prefork", "threads", "solo", "gevent", "eventlet"],
                   help="execution pool (gevent, eventlet: I/O-bound tasks, need the extra "
                        "of that name)")
    p.add_argument("-c", "--concurrency", type=_positive_int, default=None,
                   help="pool size (default: number of CPUs)")
    p.add_argument("-Q", "--queues", action="append", help="queues to consume, comma separated")
    p.add_argument("-n", "--hostname", help="node name, e.g. w1@%%h")
    p.add_argument("-l", "--loglevel", type=loglevel, default="INFO", metavar="LEVEL",
                   help=LOGLEVEL_HELP)
    p.add_argument("--autoscale", type=_autoscale, default=None, metavar="MAX,MIN",
                   help="grow the pool up to MAX slots under a backlog, shrink it to MIN "
                        "when idle (-c is then MAX)")
    p.add_argument("--autoscale-keepalive", type=_positive_seconds, default=30.0,
                   metavar="SECONDS",
                   help="--autoscale shrinks only this long after the pool last grew "
                        "(default 30)")
    p.add_argument("--max-tasks-per-child", type=_positive_int, default=None, metavar="N",
                   help="replace a prefork pool process after it ran N tasks")
    p.add_argument("--max-memory-per-child", type=_positive_int, default=None, metavar="KB",
                   help="replace a prefork pool process whose resident memory exceeds KB "
                        "kilobytes, after its task")
    p.add_argument("--shutdown-timeout", type=float, default=None,
                   help="seconds a warm shutdown waits for running tasks (default 30)")
    p.add_argument("-E", "--task-events", action="store_true",
                   help="publish task events for monitoring (itask top, itask events)")
    p.add_argument("-B", "--beat", action="store_true",
                   help="also run the app's beat (periodic tasks) in a process beside the "
                        "worker, for development; in production run itask beat")
    p.add_argument("--time-limit", type=_positive_seconds, default=None,
                   help="time_limit (seconds) of tasks that set none")
    p.add_argument("--soft-time-limit", type=_positive_seconds, default=None,
                   help="soft_time_limit (seconds) of tasks that set none")
    # Celery's -O fair: never reserve a task for a busy pool process. This worker keeps
    # what it reserves in one queue and hands a task only to an idle slot, so it is fair
    # either way; both values are accepted so Celery command lines work unchanged.
    p.add_argument("-O", dest="optimization", choices=["default", "fair"], default="default",
                   help="accepted for Celery's command line: tasks always go to idle pool "
                        "slots only (Celery's fair)")

    p = add("ping", cmd_ping, "ask every worker (or those -d names) to reply")
    add_destination(p)
    replies_timeout(p)
    p.add_argument("--json", action="store_true", help=JSON_HELP)

    p = add("inspect", cmd_inspect, "active / reserved / revoked / registered / stats / "
            "tasks of every worker; query_task ID...: those tasks where they are held; "
            "scheduled: tasks waiting in the broker for their eta")
    p.add_argument("what", choices=["active", "reserved", "revoked", "registered", "stats",
                                     "tasks", "query_task", "scheduled"])
    p.add_argument("ids", nargs="*", metavar="ID", help="query_task: task ids")
    add_destination(p)
    replies_timeout(p)
    p.add_argument("--limit", type=int, default=100,
                   help="scheduled: list at most this many, soonest first (default 100)")
    p.add_argument("--json", action="store_true", help=JSON_HELP)

    p = add("ls", cmd_ls, "running and recent tasks")
    replies_timeout(p)
    p.add_argument("--json", action="store_true", help=JSON_HELP)

    for name, help_ in (("attach", "live view of one task, with an input line to steer it"),
                        ("result", "state and result of a task")):
        p = add(name, cmd_attach if name == "attach" else cmd_result, help_)
        p.add_argument("task_id")
        p.add_argument("--token", help="the task's capability token (or ITASK_TOKEN)")
        p.add_argument("--timeout", type=float, default=2.0, help=TASK_TIMEOUT_HELP)
        if name == "result":
            p.add_argument("--json", action="store_true", help=JSON_HELP)
            p.add_argument("--wait", type=float, default=None,
                           help="wait up to this many seconds for the task to finish")

    add("top", cmd_top, "full-screen dashboard of workers and tasks")

    p = add("events", cmd_events, "print the monitoring stream as JSON lines "
                                  "(task events need workers started with -E)")
    p.add_argument("--duration", type=float, default=None, help="stop after N seconds")

    for name, help_ in (("send", "send a message (JSON or text) to a task"),
                        ("pause", "pause a task"), ("resume", "resume a task"),
                        ("cancel", "cancel a task"), ("answer", "answer a task's question")):
        p = add(name, cmd_control, help_)
        p.add_argument("task_id")
        if name == "send":
            p.add_argument("message")
        if name == "answer":
            p.add_argument("text")
        if name == "pause":
            p.add_argument("--hard", action="store_true", help="SIGSTOP the pool process")
        if name in ("pause", "resume"):
            p.add_argument("--wait", action="store_true",
                           help=f"return once the task is {name}d (up to --timeout)")
        if name == "cancel":
            p.add_argument("--grace", type=float, default=5.0,
                           help="seconds before the cancel is forced (default 5)")
        p.add_argument("--token", help="the task's capability token (or ITASK_TOKEN)")
        p.add_argument("--timeout", type=float, default=2.0, help=TASK_TIMEOUT_HELP)

    p = add("revoke", cmd_revoke, "revoke tasks that have not started (kept across "
                                  "worker restarts)")
    p.add_argument("task_ids", nargs="+")
    p.add_argument("--terminate", action="store_true", help="also cancel running ones")
    p.add_argument("--token", help="the tasks' capability token (or ITASK_TOKEN)")

    p = add("web", cmd_web, "live web dashboard: tasks, workers, and the attach view in "
                            "the browser (needs the web extra)")
    p.add_argument("--address", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=5555)
    p.add_argument("--auth", default=None,
                   help="user:password required to see anything (or ITASK_WEB_AUTH); "
                        "needed when --address is beyond this machine")
    p.add_argument("--read-only", action="store_true",
                   help="show tasks but refuse every control (no buttons)")

    add("demo", cmd_demo, "start a worker, run an interactive task and attach to it, on "
                          "the embedded broker unless -b or ITASK_BROKER_URL name another",
        app=False)
    if command not in sub.choices:
        from interactive_tasks.cli import beat_cmd, control_cmd, multi

        control_cmd.register(sub, add)
        multi.register(sub, add)
        beat_cmd.register(sub, add)
    return parser


def command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of ``command`` (a subcommand of ``parser``, as ``build_parser`` makes it)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    return parser


#: (error class, exit code, what to do), the first matching class wins
_ERRORS: tuple[tuple[type[BaseException], int, str], ...] = (
    (TransportError, 3, BROKER_HINT),
    (CliError, 2, ""),
    (ConfigurationError, 2, ""),
    (UnknownTask, 2, ""),
    (InteractiveTasksError, 1, ""),
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``itask`` command; every error ends in one line on stderr and an exit code
    (see the module docstring), with the traceback only under ``--debug``."""
    parser = build_parser(_command_in(sys.argv[1:] if argv is None else argv))
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # from the command's own parser, so the usage printed is that command's
        command_parser(parser, args.command).error(
            f"unrecognized arguments: {' '.join(unknown)}")
    debug = bool(getattr(args, "debug", False))
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if debug:
            traceback.print_exc()
        for cls, default_code, hint in _ERRORS:
            if isinstance(exc, cls):
                code = exc.code if isinstance(exc, CliError) else default_code
                # a TransportError for an unreachable broker says what to do itself
                said = f" ({hint})" if hint and hint not in str(exc) else ""
                print(f"itask: {exc}{said}", file=sys.stderr)
                return code
        print(f"itask: unexpected {type(exc).__name__}: {exc}"
              + ("" if debug else " (run again with --debug for the traceback)"),
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
