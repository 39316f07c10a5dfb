"""``itask multi``: several named workers on one machine, in the background (Celery's ``multi``).

::

    itask multi start w1 w2 -A proj -c 2 -P threads -c:w2 4 --logdir /var/log/itask
    itask multi status w1 w2 -A proj
    itask multi restart w1 w2 -A proj       # one node at a time: TERM, exit, start, ping
    itask multi stopwait w1 w2 -A proj

Commands: ``start``, ``stop`` (TERM, no wait), ``stopwait`` (TERM, wait until gone),
``restart``, ``kill`` (KILL), ``status``, ``show`` (the worker commands), ``names``.

Node names: ``w1`` becomes ``w1@<hostname>``; ``w1@%h`` and ``w1@box`` keep their host
(``%h`` expanded); a single number ``N`` names ``w1`` … ``wN``. Options after the names go
to every worker; ``-c:w1 4`` or ``--concurrency:w1=4`` only to the nodes selected (a name,
a full name, a 1-based position, a range ``1-3`` or a list ``w1,w3``) and replace the common
value. Options of multi itself: ``--piddir``/``--logdir`` (default: the current directory),
``--pidfile`` (default ``%n.pid``), ``--logfile`` (default ``%n%I.log``), ``--timeout``,
``--no-wait``, ``--json``. File names expand ``%n`` (w1), ``%h`` (host), ``%p`` (w1@host),
``%d`` (domain), ``%i`` (0), ``%I`` (empty: pool processes log into the worker's file), ``%%``.

Exit codes: 0 every node did what was asked; 1 a node failed to start, stop or answer;
2 usage error; 3 broker unreachable.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interactive_tasks.errors import ConfigurationError, InteractiveTasksError

COMMANDS = ("start", "stop", "stopwait", "restart", "kill", "status", "show", "names")
WORKER_MODULE = "interactive_tasks.cli.main"
#: short option -> long option, so a per-node value replaces the common one
ALIASES = {"-c": "--concurrency", "-P": "--pool", "-Q": "--queues", "-l": "--loglevel",
           "-A": "--app", "-b": "--broker", "-n": "--hostname", "-E": "--task-events"}
OWN_VALUED = {"--piddir", "--logdir", "--pidfile", "--logfile", "--timeout"}
OWN_FLAGS = {"--no-wait", "--json", "-h", "--help"}
#: worker options that take no value (any other option takes the next token unless it
#: starts with "-")
WORKER_FLAGS = {"-E", "--task-events"}
EXAMPLE = ("itask multi start w1 w2 -A proj -c 2 -c:w2 4 --logdir /var/log/itask\n"
           "  itask multi restart w1 w2 -A proj\n"
           "  itask multi stopwait w1 w2 -A proj")
DEFAULT_START_TIMEOUT = 30.0


class MultiUsageError(ConfigurationError):
    """Bad ``itask multi`` arguments (exit code 2)."""


# -- names and options ----------
def node_format(pattern: str, nodename: str, index: int | None = None) -> str:
    """Expand ``%n %h %p %d %i %I %%`` in a file name for node ``nodename`` (Celery's rules)."""
    name, _, host = nodename.partition("@")
    host = host or socket.gethostname()
    values = {"n": name, "h": host, "p": nodename, "d": host.partition(".")[2],
              "i": "0" if index is None else str(index),
              "I": "" if index is None else f"-{index}", "%": "%"}
    out = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "%" and i + 1 < len(pattern) and pattern[i + 1] in values:
            out.append(values[pattern[i + 1]])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def expand_node_name(name: str, hostname: str | None = None) -> str:
    """``w1`` -> ``w1@host``; ``w1@%h`` -> ``w1@host``; ``w1@box`` unchanged."""
    host = hostname or socket.gethostname()
    if "@" not in name:
        return f"{name}@{host}"
    return name.replace("%h", host)


@dataclass
class Node:
    """One worker of the cluster, with its options, pid file and log file."""

    name: str
    index: int
    options: list[str]
    pidfile: Path
    logfile: Path

    @property
    def short(self) -> str:
        return self.name.partition("@")[0]

    def argv(self) -> list[str]:
        return [sys.executable, "-m", WORKER_MODULE, "worker", "-n", self.name, *self.options]


@dataclass
class MultiArgs:
    command: str
    nodes: list[Node]
    app: str | None = None
    broker: str | None = None
    timeout: float | None = None
    wait: bool = True
    json: bool = False
    help: bool = False
    common: list[str] = field(default_factory=list)


def _canon(key: str) -> str:
    return ALIASES.get(key, key)


def _is_value(token: str) -> bool:
    if not token.startswith("-"):
        return True
    try:
        float(token)
        return True
    except ValueError:
        return False


def _option_tokens(tokens: list[str]) -> Iterator[tuple[str, str | None, str | None]]:
    """(option, value or None, node selector or None) for each option in ``tokens``."""
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if not token.startswith("-") or token in ("-", "--"):
            raise MultiUsageError(f"unexpected {token!r}: node names come before the options "
                                  "(itask multi start w1 w2 -A proj -c 2)")
        value: str | None = None
        key = token
        if token.startswith("--") and "=" in token:
            key, value = token.split("=", 1)
        selector = None
        if ":" in key:
            key, selector = key.split(":", 1)
            if not selector:
                raise MultiUsageError(f"{token!r}: empty node selector after ':'")
        if value is None and key not in OWN_FLAGS and key not in WORKER_FLAGS and \
                i < len(tokens) and _is_value(tokens[i]):
            value = tokens[i]
            i += 1
        yield key, value, selector


def _selects(selector: str, node_short: str, node_full: str, index: int) -> bool:
    for part in selector.split(","):
        if part in (node_short, node_full):
            return True
        first, dash, last = part.partition("-")
        if dash and first.isdigit() and last.isdigit() and int(first) <= index <= int(last):
            return True
        if part.isdigit() and int(part) == index:
            return True
    return False


def parse_args(argv: list[str], hostname: str | None = None,
               cwd: Path | None = None) -> MultiArgs:
    """Parse ``itask multi`` arguments (everything after ``multi``).

    Raises :class:`MultiUsageError` for a missing command, no node names, a selector that
    selects nothing, or ``-n`` (node names are the arguments).
    """
    if not argv or argv[0] in ("-h", "--help", "help"):
        return MultiArgs("help", [], help=True)
    command, rest = argv[0], list(argv[1:])
    if command not in COMMANDS:
        raise MultiUsageError(f"unknown multi command {command!r}; use one of "
                              f"{', '.join(COMMANDS)}")
    names: list[str] = []
    while rest and not rest[0].startswith("-"):
        names.append(rest.pop(0))
    if len(names) == 1 and names[0].isdigit():
        names = [f"w{i}" for i in range(1, int(names[0]) + 1)]
    result = MultiArgs(command, [])
    piddir = logdir = None
    pidfile, logfile = "%n.pid", "%n%I.log"
    common: list[tuple[str, str | None]] = []
    per_node: list[tuple[str, str | None, str, str]] = []  # key, value, selector, token
    for key, value, selector in _option_tokens(rest):
        if key in ("-h", "--help"):
            result.help = True
            continue
        if _canon(key) == "--hostname":
            raise MultiUsageError("give node names as arguments (itask multi start w1 w2), "
                                  "not with -n")
        if key in OWN_VALUED or key in OWN_FLAGS:
            if selector:
                raise MultiUsageError(f"{key} cannot be given per node")
            if key in OWN_VALUED and value is None:
                raise MultiUsageError(f"{key} needs a value")
            if key == "--piddir":
                piddir = value
            elif key == "--logdir":
                logdir = value
            elif key == "--pidfile":
                pidfile = value or pidfile
            elif key == "--logfile":
                logfile = value or logfile
            elif key == "--timeout":
                try:
                    result.timeout = float(value or "")
                except ValueError:
                    raise MultiUsageError(f"--timeout needs seconds, not {value!r}")
            elif key == "--no-wait":
                result.wait = False
            elif key == "--json":
                result.json = True
            continue
        if _canon(key) in ("--app", "--broker"):
            if selector:
                raise MultiUsageError(f"{key} cannot be given per node")
            if value is None:
                raise MultiUsageError(f"{key} needs a value")
            if _canon(key) == "--app":
                result.app = value
            else:
                result.broker = value
        if selector:
            per_node.append((key, value, selector, f"{key}:{selector}"))
        else:
            common.append((key, value))
    if not names and not result.help:
        raise MultiUsageError(f"itask multi {command}: give node names, e.g. "
                              f"itask multi {command} w1 w2 -A proj")
    base = cwd or Path.cwd()
    full_names = [expand_node_name(n, hostname) for n in names]
    if len(set(full_names)) != len(full_names):
        raise MultiUsageError(f"node names repeat: {' '.join(names)}")
    for _key, _value, selector, token in per_node:
        if not any(_selects(selector, n.partition("@")[0], n, i)
                   for i, n in enumerate(full_names, 1)):
            raise MultiUsageError(f"{token} selects no node of {' '.join(full_names)}")
    for index, full in enumerate(full_names, 1):
        short = full.partition("@")[0]
        mine = [(k, v) for k, v, sel, _t in per_node if _selects(sel, short, full, index)]
        replaced = {_canon(k) for k, _v in mine}
        options: list[str] = []
        for key, value in [*[(k, v) for k, v in common if _canon(k) not in replaced], *mine]:
            options.append(key)
            if value is not None:
                options.append(value)
        result.nodes.append(Node(
            name=full, index=index, options=options,
            pidfile=_place(piddir, pidfile, full, base),
            logfile=_place(logdir, logfile, full, base),
        ))
    result.common = [t for k, v in common for t in ((k,) if v is None else (k, v))]
    return result


def _place(directory: str | None, pattern: str, nodename: str, base: Path) -> Path:
    path = Path(node_format(pattern, nodename)).expanduser()
    if path.is_absolute():
        return path
    return (Path(directory).expanduser() if directory else base) / path


# -- processes ----------
def is_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not count)."""
    with contextlib.suppress(ChildProcessError):
        done, _status = os.waitpid(pid, os.WNOHANG)  # reaps it if it is our own child
        if done:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _runs_node(pid: int, node: Node) -> bool:
    """Whether ``pid`` is this node's worker (guards against a pid reused since)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc: trust the pid file
    return node.name.encode() in args and b"worker" in args


def node_pid(node: Node) -> int | None:
    """The node's running pid from its pid file; a stale pid file is removed."""
    try:
        text = node.pidfile.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError:
        return None
    try:
        pid = int(text)
    except ValueError:
        pid = 0
    if pid > 0 and is_alive(pid) and _runs_node(pid, node):
        return pid
    with contextlib.suppress(OSError):
        node.pidfile.unlink()
    return None


def start_process(node: Node, env: dict[str, str] | None = None) -> int:
    """Start the node's worker in its own session, output appended to its log file."""
    node.pidfile.parent.mkdir(parents=True, exist_ok=True)
    node.logfile.parent.mkdir(parents=True, exist_ok=True)
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(node.logfile), os.O_WRONLY | os.O_CREAT | os.O_APPEND,
         0o644),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    pid = os.posix_spawn(sys.executable, node.argv(), dict(env or os.environ),
                         file_actions=actions, setsid=True)
    tmp = node.pidfile.with_name(f".{node.pidfile.name}.{os.getpid()}")
    tmp.write_text(f"{pid}\n")
    os.replace(tmp, node.pidfile)
    return pid


def wait_gone(pids: dict[str, int], deadline: float | None) -> set[str]:
    """Wait until every process is gone or ``deadline`` passes; returns the names left."""
    left = dict(pids)
    while left:
        left = {name: pid for name, pid in left.items() if is_alive(pid)}
        if not left or (deadline is not None and time.monotonic() > deadline):
            break
        time.sleep(0.05)
    return set(left)


def _log_tail(node: Node, lines: int = 15) -> str:
    try:
        text = node.logfile.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join("      " + line for line in text.splitlines()[-lines:])


class Cluster:
    """The nodes of one ``itask multi`` command and the app used to ping them."""

    def __init__(self, args: MultiArgs, get_app: Callable[[], Any] | None = None,
                 out: Any = None) -> None:
        self.args = args
        self.nodes = args.nodes
        self._get_app = get_app
        self._app: Any = None
        self.out = out or sys.stdout

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    @property
    def app(self) -> Any:
        if self._app is None:
            if self._get_app is None:
                raise MultiUsageError("no app to ping the workers with")
            self._app = self._get_app()
        return self._app

    def close(self) -> None:
        if self._app is not None:
            self._app.close()

    def _fanout(self) -> bool:
        url = str(self.app.broker_url)
        return not url.startswith("sqs")

    def ping(self, names: set[str], timeout: float) -> set[str]:
        """Which of ``names`` answer a ping within ``timeout``."""
        if not names:
            return set()
        from interactive_tasks.protocol import ControlMessage, Verb

        def answered(replies: list[dict[str, Any]]) -> set[str]:
            return {str(r.get("worker")) for r in replies} & names

        # every worker on the broker answers; wait for ours, not for any len(names) replies
        replies = self.app.client.request(
            ControlMessage(verb=Verb.PING), None, timeout, many=True,
            until=lambda rs: answered(rs) == names)
        return answered(replies)

    def wait_ready(self, started: dict[str, int], offsets: dict[str, int],
                   timeout: float) -> set[str]:
        """Wait until each started node answers a ping; returns the names that failed."""
        deadline = time.monotonic() + timeout
        by_name = {n.name: n for n in self.nodes}
        pending = set(started)
        failed: set[str] = set()
        fanout = self._fanout()
        while pending:
            for name in sorted(pending):
                if not is_alive(started[name]):
                    pending.discard(name)
                    failed.add(name)
                    self.say(f"  > {name}: FAILED: exited during start; log "
                             f"{by_name[name].logfile}:\n{_log_tail(by_name[name])}")
            if not pending:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                for name in sorted(pending):
                    failed.add(name)
                    self.say(f"  > {name}: FAILED: no answer to ping within {timeout:g}s; "
                             f"log {by_name[name].logfile}:\n{_log_tail(by_name[name])}")
                break
            if fanout:
                answered = self.ping(pending, min(1.0, remaining))
            else:
                # no broadcast (SQS): the worker's own "ready" line is the signal
                answered = {n for n in pending
                            if _log_says_ready(by_name[n], offsets.get(n, 0))}
                if not answered:
                    time.sleep(0.2)
            for name in sorted(answered):
                pending.discard(name)
                self.say(f"  > {name}: OK (pid {started[name]}, answers ping)"
                         if fanout else f"  > {name}: OK (pid {started[name]}, ready)")
        return failed

    # -- commands ----------
    def start(self, nodes: list[Node] | None = None) -> int:
        nodes = nodes if nodes is not None else self.nodes
        if self.args.wait:
            _ = self.app  # a broken app module fails here, before any worker starts
        self.say("> Starting nodes...")
        started: dict[str, int] = {}
        offsets: dict[str, int] = {}
        code = 0
        for node in nodes:
            pid = node_pid(node)
            if pid is not None:
                self.say(f"  > {node.name}: already running (pid {pid})")
                continue
            try:
                offsets[node.name] = node.logfile.stat().st_size
            except OSError:
                offsets[node.name] = 0
            try:
                pid = start_process(node)
            except OSError as exc:
                self.say(f"  > {node.name}: FAILED to start: {exc}")
                code = 1
                continue
            started[node.name] = pid
            self.say(f"  > {node.name}: started (pid {pid}, log {node.logfile})")
        if started and self.args.wait:
            timeout = self.args.timeout or DEFAULT_START_TIMEOUT
            if self.wait_ready(started, offsets, timeout):
                code = 1
        return code

    def _stop_timeout(self) -> float:
        if self.args.timeout is not None:
            return self.args.timeout
        # the worker's own warm-shutdown limit, then some room to exit
        try:
            return float(self.app.conf.shutdown_timeout) + 30.0
        except Exception:
            return 60.0

    def stop(self, wait: bool, sig: int = signal.SIGTERM) -> int:
        verb = signal.Signals(sig).name.replace("SIG", "")
        self.say("> Stopping nodes...")
        pids: dict[str, int] = {}
        for node in self.nodes:
            pid = node_pid(node)
            if pid is None:
                self.say(f"  > {node.name}: not running")
                continue
            try:
                if sig == signal.SIGKILL and os.getpgid(pid) == pid:
                    os.killpg(pid, sig)  # its pool processes too
                else:
                    os.kill(pid, sig)
            except ProcessLookupError:
                self.say(f"  > {node.name}: already gone")
                continue
            pids[node.name] = pid
            self.say(f"  > {node.name}: {verb} -> {pid}")
        if not wait or not pids:
            return 0
        timeout = self._stop_timeout()
        self.say(f"> Waiting for {len(pids)} node(s) to finish their running tasks "
                 f"(up to {timeout:g}s)...")
        left = wait_gone(pids, time.monotonic() + timeout)
        for node in self.nodes:
            if node.name in pids and node.name not in left:
                with contextlib.suppress(OSError):
                    node.pidfile.unlink()
                self.say(f"  > {node.name}: stopped")
            elif node.name in left:
                self.say(f"  > {node.name}: still running after {timeout:g}s (pid "
                         f"{pids[node.name]}); 'itask multi kill' stops it now")
        return 1 if left else 0

    def restart(self) -> int:
        """One node at a time: TERM, wait until it exits, start it, wait until it answers."""
        self.say("> Restarting nodes one by one...")
        for node in self.nodes:
            pid = node_pid(node)
            if pid is not None:
                os.kill(pid, signal.SIGTERM)
                timeout = self._stop_timeout()
                self.say(f"  > {node.name}: TERM -> {pid}, waiting for its running tasks "
                         f"(up to {timeout:g}s)")
                if wait_gone({node.name: pid}, time.monotonic() + timeout):
                    self.say(f"  > {node.name}: still running after {timeout:g}s; "
                             "not restarting the others")
                    return 1
                with contextlib.suppress(OSError):
                    node.pidfile.unlink()
                self.say(f"  > {node.name}: stopped")
            else:
                self.say(f"  > {node.name}: not running")
            if self.start([node]) != 0:
                self.say(f"  > {node.name}: did not come back; not restarting the others")
                return 1
        return 0

    def status(self) -> int:
        pids = {node.name: node_pid(node) for node in self.nodes}
        running = {name for name, pid in pids.items() if pid is not None}
        answered: set[str] = set()
        ping_error = None
        try:
            if self._fanout():
                answered = self.ping({n.name for n in self.nodes},
                                     self.args.timeout or 2.0)
            else:
                ping_error = "no ping on this broker (no broadcast)"
        except InteractiveTasksError as exc:
            ping_error = str(exc)
        rows = []
        for node in self.nodes:
            pid = pids[node.name]
            rows.append({"node": node.name, "pid": pid, "running": pid is not None,
                         "answers_ping": node.name in answered, "pidfile": str(node.pidfile),
                         "logfile": str(node.logfile)})
        if self.args.json:
            print(json.dumps(rows, indent=2), file=self.out, flush=True)
        else:
            for row in rows:
                if row["running"]:
                    ping = ("answers ping" if row["answers_ping"] else
                            f"ping not checked: {ping_error}" if ping_error else
                            "does NOT answer ping")
                    self.say(f"{row['node']}: running (pid {row['pid']}), {ping}")
                elif row["answers_ping"]:
                    self.say(f"{row['node']}: no process from {row['pidfile']}, but a worker "
                             "of that name answers ping")
                else:
                    self.say(f"{row['node']}: stopped")
        healthy = running == set(pids) and (ping_error is not None or answered >= running)
        return 0 if healthy else 1

    def show(self) -> int:
        for node in self.nodes:
            self.say(shlex.join(node.argv()))
        return 0

    def names(self) -> int:
        for node in self.nodes:
            self.say(node.name)
        return 0


def _log_says_ready(node: Node, offset: int) -> bool:
    try:
        with open(node.logfile, "rb") as fh:
            fh.seek(offset)
            return f"worker {node.name} ready".encode() in fh.read()
    except OSError:
        return False


# -- the command ----------
def run(argv: list[str], get_app: Callable[[argparse.Namespace], Any] | None = None,
        out: Any = None) -> int:
    """Run ``itask multi`` with ``argv`` (everything after ``multi``); returns the exit code.

    ``get_app(namespace)`` loads the app from ``namespace.app`` / ``namespace.broker``
    (``cli/main.py``'s ``_get_app``). Raises :class:`MultiUsageError` for bad arguments.
    """
    args = parse_args(argv)
    if args.help:
        print(__doc__, file=out or sys.stdout)
        return 0
    loader = get_app or _default_get_app
    namespace = argparse.Namespace(app=args.app, broker=args.broker)
    cluster = Cluster(args, lambda: loader(namespace), out)
    try:
        if args.command == "start":
            return cluster.start()
        if args.command == "stop":
            return cluster.stop(wait=False)
        if args.command == "stopwait":
            return cluster.stop(wait=True)
        if args.command == "kill":
            return cluster.stop(wait=False, sig=signal.SIGKILL)
        if args.command == "restart":
            return cluster.restart()
        if args.command == "status":
            return cluster.status()
        if args.command == "show":
            return cluster.show()
        return cluster.names()
    finally:
        cluster.close()


def _default_get_app(namespace: argparse.Namespace) -> Any:
    from interactive_tasks.cli.main import _get_app

    return _get_app(namespace)


def cmd_multi(args: argparse.Namespace) -> int:
    argv = list(args.argv or [])
    # -A/-b given before the command (itask multi -A proj start w1) count for every node
    extra: list[str] = []
    if getattr(args, "app", None):
        extra += ["-A", args.app]
    if getattr(args, "broker", None):
        extra += ["-b", args.broker]
    if argv and extra:
        argv = argv + extra
    return run(argv)


def register(subparsers: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    """Add ``itask multi`` to the parser (``add`` is ``build_parser``'s helper)."""
    p = add("multi", cmd_multi, "start, stop, restart several named workers in the background")
    p.epilog = ("commands: " + ", ".join(COMMANDS) + "\n"
                "options after the node names go to every worker; -c:w1 4 to one node;\n"
                "--piddir, --logdir, --pidfile (%n.pid), --logfile (%n%I.log), --timeout,\n"
                "--no-wait, --json are multi's own. 'itask multi help' for more.\n"
                "example:\n  " + EXAMPLE)
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="COMMAND NODE... [OPTION...]",
                   help="start|stop|stopwait|restart|kill|status|show|names, node names, "
                        "worker options")


if __name__ == "__main__":  # python -m interactive_tasks.cli.multi start w1 ...
    try:
        sys.exit(run(sys.argv[1:]))
    except ConfigurationError as exc:
        print(f"itask multi: {exc}", file=sys.stderr)
        sys.exit(2)
