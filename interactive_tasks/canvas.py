"""Workflows (Celery's canvas): ``chain``, ``group`` and ``chord``.

::

    chain(fetch.s(url), parse.s(), store.s()).delay()      # each result feeds the next
    group(resize.s(p) for p in paths).delay().result()    # all at once, results in order
    chord(group(count.s(f) for f in files), total.s()).delay()   # then one callback

The client numbers every step up front (ids and capability tokens), so the handles exist
before anything runs. Workers continue the workflow themselves: when a chain step
succeeds the worker that ran it publishes the next step with the result prepended to its
arguments; when one fails or is cancelled, the rest end ``revoked`` and never run. A chord's
callback is published by the worker that finishes the last member, counted atomically in
the result store (so a chord needs one: Redis or the embedded/file store).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from . import codec
from .errors import ConfigurationError
from .handle import ResultHandle, TaskHandle, deadline_after, remaining
from .protocol import (
    HEADER_CHAIN,
    HEADER_CHORD,
    HEADER_LINK,
    HEADER_LINK_ERROR,
    Event,
    TaskMessage,
    TaskSnapshot,
    TaskState,
)
from .task import Signature, Task

if TYPE_CHECKING:
    from .app import App


def _step(sig: Signature[Any], app: App, extra_args: tuple[Any, ...] = ()) -> dict[str, Any]:
    """A step descriptor as carried in message headers; includes its token (client only)."""
    token = codec.new_token()
    options = dict(sig.options)
    step = {
        "id": options.pop("task_id", None) or str(uuid.uuid4()),
        "task": sig.task.name,
        "args": ([] if sig.immutable else list(extra_args)) + list(sig.args),
        "kwargs": dict(sig.kwargs),
        "queue": options.pop("queue", None) or sig.task.queue or app.route(sig.task.name),
        "watch": "all" if sig.task.interactive else "final",
        "token_digest": codec.token_digest(token),
        "_token": token,
    }
    if sig.immutable:
        step["immutable"] = True  # the worker prepends no parent result
    return step


def _signatures(value: Signature[Any] | list[Signature[Any]] | None,
                what: str) -> list[Signature[Any]]:
    sigs = [] if value is None else list(value) if isinstance(value, (list, tuple)) \
        else [value]
    for sig in sigs:
        if not isinstance(sig, Signature):
            raise TypeError(f"{what} takes task signatures (task.s(...)), not "
                            f"{type(sig).__name__}")
    return sigs


def attach_callbacks(app: App, message: TaskMessage,
                     link: Signature[Any] | list[Signature[Any]] | None,
                     link_error: Signature[Any] | list[Signature[Any]] | None
                     ) -> list[TaskHandle[Any]]:
    """Put ``apply_async(link=, link_error=)`` callbacks in ``message``'s headers; returns
    their handles (links first). The worker that ends the task publishes the ones that
    apply and ends the others ``revoked``. Raises TypeError for a non-signature."""
    links = [_step(sig, app) for sig in _signatures(link, "link")]
    errbacks = [_step(sig, app) for sig in _signatures(link_error, "link_error")]
    if links:
        message.headers[HEADER_LINK] = [_public(s) for s in links]
    if errbacks:
        message.headers[HEADER_LINK_ERROR] = [_public(s) for s in errbacks]
    return _handles(app, links + errbacks)


def _public(step: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in step.items() if not k.startswith("_")}


def _message(step: dict[str, Any], reply_to: str, headers: dict[str, Any]) -> TaskMessage:
    return TaskMessage(
        id=step["id"], task=step["task"], args=list(step["args"]), kwargs=step["kwargs"],
        queue=step["queue"], reply_to=reply_to, token_digest=step["token_digest"],
        created=time.time(), headers=headers, watch=step["watch"],
    )


def _handles(app: App, steps: list[dict[str, Any]]) -> list[TaskHandle[Any]]:
    """Handles that watch ``steps``; made before the first step is published, since the
    inbox drops an event of a task nobody watches yet."""
    return [TaskHandle(app, s["id"], name=s["task"], token=s["_token"], starter=True,
                       streaming=s["watch"] == "all")
            for s in steps]


def _app_of(sigs: list[Signature[Any]]) -> App:
    for sig in sigs:
        if sig.task.app is not None:
            return sig.task.app
    raise ConfigurationError("the workflow's tasks are not registered with an app")


class chain:
    """Run signatures one after another, each result prepended to the next one's args
    (not to an immutable one's, ``task.si()``). ``a.s() | b.s()`` makes one too."""

    tasks: list[Signature[Any]]

    def __init__(self, *tasks: Signature[Any] | chain) -> None:
        if not tasks:
            raise ValueError("chain() needs at least one signature")
        flat: list[Signature[Any]] = []
        for item in tasks:
            if isinstance(item, chain):
                flat.extend(item.tasks)
            elif isinstance(item, Signature):
                flat.append(item)
            else:
                raise TypeError(f"chain() takes task signatures (task.s(...)) or chains, "
                                f"not {type(item).__name__}")
        self.tasks = flat

    def __or__(self, other: Any) -> chain:
        if isinstance(other, (Signature, chain)):
            return chain(self, other)
        return NotImplemented

    def delay(self, *args: Any) -> ChainHandle:
        return self.apply_async(args)

    start = delay

    def apply_async(self, args: tuple[Any, ...] = ()) -> ChainHandle:
        app = _app_of(self.tasks)
        client = app.client
        client.ensure_started()
        steps = self._steps(app, args)
        handles = _handles(app, steps)  # watching before the first step can send an event
        self._send(app, steps, None)
        return ChainHandle(app, handles)

    def _steps(self, app: App, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        return [_step(sig, app, tuple(args) if i == 0 else ()) for i, sig in
                enumerate(self.tasks)]

    @staticmethod
    def _send(app: App, steps: list[dict[str, Any]], chord_info: dict[str, Any] | None
              ) -> None:
        """Publish the first step with the rest in its headers; a chord's ``chord_info``
        rides on the last step, so the chord counts this chain when it ends."""
        client = app.client
        rest = [_public(s) for s in steps[1:]]
        headers: dict[str, Any] = {HEADER_CHAIN: rest} if rest else {}
        if chord_info is not None:
            if rest:
                rest[-1]["chord"] = chord_info
            else:
                headers[HEADER_CHORD] = chord_info
        client.send_task(_message(steps[0], client.inbox.name, headers))

    def __repr__(self) -> str:
        return " | ".join(repr(sig) for sig in self.tasks)


Member = Signature[Any] | chain


class group:
    """Run signatures (or chains) in parallel; gather their results in order."""

    def __init__(self, *tasks: Member | Iterable[Member]) -> None:
        items = list(tasks[0]) if len(tasks) == 1 and \
            not isinstance(tasks[0], (Signature, chain)) else list(tasks)
        for item in items:
            if not isinstance(item, (Signature, chain)):
                raise TypeError(f"group() takes task signatures (task.s(...)) or chains, "
                                f"not {type(item).__name__}; a group in a group is not "
                                "supported")
        self.tasks: list[Member] = items  # type: ignore[assignment]

    def __or__(self, other: Any) -> chord:
        """``group(...) | body.s()`` is ``chord(group(...), body.s())``, as in Celery."""
        if isinstance(other, Signature):
            return chord(self, other)
        return NotImplemented

    def _signatures(self) -> list[Signature[Any]]:
        return [sig for item in self.tasks
                for sig in (item.tasks if isinstance(item, chain) else [item])]

    def delay(self) -> GroupHandle:
        return self.apply_async()

    def apply_async(self) -> GroupHandle:
        app = _app_of(self._signatures())
        app.client.ensure_started()
        return GroupHandle(app, [_send_member(app, item, None) for item in self.tasks])


def _send_member(app: App, item: Member, chord_info: dict[str, Any] | None
                 ) -> TaskHandle[Any] | ChainHandle:
    """Publish one group member (a signature or a chain); returns its handle."""
    steps = item._steps(app) if isinstance(item, chain) else [_step(item, app)]
    handles = _handles(app, steps)  # watching before the first step can send an event
    chain._send(app, steps, chord_info)
    return ChainHandle(app, handles) if isinstance(item, chain) else handles[0]


class chord:
    """A group, then one callback called with the list of the group's results."""

    def __init__(self, header: group | Iterable[Member], body: Signature[Any]) -> None:
        self.header = header if isinstance(header, group) else group(list(header))
        self.body = body

    def delay(self) -> TaskHandle[Any]:
        return self.apply_async()

    def apply_async(self) -> TaskHandle[Any]:
        """Returns the callback's handle; its ``header`` attribute is the group's handle.

        Raises :class:`ConfigurationError` when the app has no shared result store.
        """
        app = _app_of([*self.header._signatures(), self.body])
        if not app.results.durable:
            raise ConfigurationError(
                "chord needs a result store shared by workers: set result_backend "
                "(redis:// or file://) when the broker is RabbitMQ")
        client = app.client
        client.ensure_started()
        members = [item._steps(app) if isinstance(item, chain) else [_step(item, app)]
                   for item in self.header.tasks]
        body = _step(self.body, app)
        chord_id = str(uuid.uuid4())
        body_public = _public(body)
        # a member's value is its last step's (a chain's result)
        info: dict[str, Any] = {"id": chord_id, "size": len(members),
                                "members": [steps[-1]["id"] for steps in members],
                                "body": body_public}
        handles: list[TaskHandle[Any] | ChainHandle] = [
            ChainHandle(app, _handles(app, steps)) if isinstance(item, chain)
            else _handles(app, steps)[0]
            for item, steps in zip(self.header.tasks, members, strict=True)]
        body_handle: TaskHandle[Any] = TaskHandle(app, body["id"], name=body["task"],
                                                  token=body["_token"], starter=True,
                                                  streaming=body["watch"] == "all")
        body_handle.header = GroupHandle(app, handles)  # type: ignore[attr-defined]
        body_message = _message(body, client.inbox.name, {})
        # The body's subscription rides in its own message, published later by a worker;
        # the members carry the body's reply_to so that worker can set it.
        body_public["reply_to"] = body_message.reply_to
        if not members:
            client.send_task(dataclasses.replace(body_message, args=[[], *body_message.args]))
            return body_handle
        for index, steps in enumerate(members):
            chain._send(app, steps, {**info, "index": index})
        return body_handle


# -- map, starmap, chunks ---------------------------------------------------------------------
MAP_TASK = "interactive_tasks.map"
STARMAP_TASK = "interactive_tasks.starmap"


def _map(self: Task[Any, Any], name: str, items: list[Any]) -> list[Any]:
    """Run task ``name`` on each item in this one task, in order (Celery's ``xmap``)."""
    task = self._bound_app().get_task(name)
    return [task(item) for item in items]


def _starmap(self: Task[Any, Any], name: str, items: list[Any]) -> list[Any]:
    """Run task ``name`` with each item as its arguments (Celery's ``xstarmap``)."""
    task = self._bound_app().get_task(name)
    return [task(*item) for item in items]


def builtin_task(app: App, name: str) -> Task[Any, Any] | None:
    """The built-in task ``name`` for ``app`` (map, starmap), or None."""
    fn = {MAP_TASK: _map, STARMAP_TASK: _starmap}.get(name)
    return None if fn is None else Task(fn, app=app, name=name, bind=True)


def mapped(task: Task[Any, Any], items: Iterable[Any], star: bool) -> Signature[list[Any]]:
    """``task.map(items)`` / ``task.starmap(items)``: one task running ``task`` on every
    item, on ``task``'s queue; its result is the list of results."""
    app = task._bound_app()
    builtin = app.get_task(STARMAP_TASK if star else MAP_TASK)
    values = [list(item) for item in items] if star else list(items)
    return Signature(builtin, (task.name, values),
                     queue=task.queue or app.route(task.name))


class chunks:
    """``task.chunks(items, n)``: the argument tuples in ``items`` cut into chunks of
    ``n``, each chunk one task (a ``starmap``), all of them a group; the result is a
    list of lists (Celery's ``chunks``)."""

    def __init__(self, task: Task[Any, Any], items: Iterable[Any], n: int) -> None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"chunks() needs a chunk size of at least 1, not {n!r}")
        self.task = task
        self.items = [list(item) for item in items]
        self.n = n

    def group(self) -> group:
        return group([mapped(self.task, self.items[i:i + self.n], star=True)
                      for i in range(0, len(self.items), self.n)])

    def apply_async(self) -> GroupHandle:
        return self.group().apply_async()

    def delay(self) -> GroupHandle:
        return self.apply_async()


class GroupHandle(ResultHandle[list[Any]]):
    """Handles of a group's tasks, in order, with the result vocabulary of a task handle.

    ``result()`` (also ``get()``, ``join()``) is the list of results; ``state`` is
    ``pending`` until a member starts, ``running`` until every member ended, then
    ``succeeded`` or the final state of the first member that did not succeed.
    """

    def __init__(self, app: App, handles: Sequence[TaskHandle[Any] | ChainHandle]) -> None:
        self.app = app
        #: a member's handle: a TaskHandle, or a ChainHandle for a chain
        self.handles = list(handles)

    def __iter__(self) -> Iterator[TaskHandle[Any] | ChainHandle]:
        return iter(self.handles)

    def __len__(self) -> int:
        return len(self.handles)

    def __getitem__(self, index: int) -> TaskHandle[Any] | ChainHandle:
        return self.handles[index]

    @property
    def state(self) -> TaskState:
        states = [h.state for h in self.handles]
        if not all(s.is_final for s in states):
            return TaskState.PENDING if all(s is TaskState.PENDING for s in states) \
                else TaskState.RUNNING
        return next((s for s in states if s is not TaskState.SUCCEEDED), TaskState.SUCCEEDED)

    def failed(self) -> bool:
        """Whether any member failed (Celery's ``GroupResult.failed()``)."""
        return any(h.state is TaskState.FAILED for h in self.handles)

    def wait(self, timeout: float | None = None) -> TaskState:
        deadline = deadline_after(timeout)
        for handle in self.handles:
            handle.wait(remaining(deadline))
        return self.state

    async def wait_async(self, timeout: float | None = None) -> TaskState:
        deadline = deadline_after(timeout)
        for handle in self.handles:
            await handle.wait_async(remaining(deadline))
        return self.state

    def result(self, timeout: float | None = None) -> list[Any]:
        """Every result in order; raises the first failure (TaskFailed …) or TaskTimeout."""
        deadline = deadline_after(timeout)
        return [handle.result(remaining(deadline)) for handle in self.handles]

    join = result  # Celery's GroupResult.join()
    results = result

    def cancel(self, grace: float = 5.0) -> bool:
        """Cancel every member still running; True when at least one accepted."""
        accepted = [handle.cancel(grace) for handle in self.handles]
        return any(accepted)

    def __repr__(self) -> str:
        return f"<GroupHandle {len(self.handles)} tasks {self.state.value}>"


class ChainHandle(ResultHandle[Any]):
    """One handle over a chain's steps: the current step's state, every step's events."""

    def __init__(self, app: App, steps: list[TaskHandle[Any]]) -> None:
        self.app = app
        self.steps = steps
        self.id = steps[-1].id
        self._cursor = 0
        # Celery's res.parent: each step's handle leads back to the one before it
        for previous, step in itertools.pairwise(steps):
            step.parent = previous

    @property
    def parent(self) -> TaskHandle[Any] | None:
        """The handle of the step before the last (Celery's ``res.parent`` of a chain's
        result), or None for a chain of one step."""
        return self.steps[-1].parent

    @property
    def current(self) -> TaskHandle[Any]:
        """The first step that has not ended (or the last step)."""
        for step in self.steps:
            if not step.ready():
                return step
        return self.steps[-1]

    @property
    def state(self) -> TaskState:
        for step in self.steps:
            if step.state is not TaskState.SUCCEEDED:
                return step.state
        return TaskState.SUCCEEDED

    @property
    def progress(self) -> Event | None:
        return self.current.progress

    def snapshot(self) -> TaskSnapshot:
        return self.current.snapshot()

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Every step's events in order; ends after the last step, or the one that failed."""
        while self._cursor < len(self.steps):
            step = self.steps[self._cursor]
            yield from step.events(timeout)
            if step.state is not TaskState.SUCCEEDED:
                return
            self._cursor += 1

    def wait(self, timeout: float | None = None) -> TaskState:
        """Wait until a step fails or the last one ends; returns the chain's state."""
        deadline = deadline_after(timeout)
        for step in self.steps:
            if step.wait(remaining(deadline)) is not TaskState.SUCCEEDED:
                break
        return self.state

    async def wait_async(self, timeout: float | None = None) -> TaskState:
        deadline = deadline_after(timeout)
        for step in self.steps:
            if await step.wait_async(remaining(deadline)) is not TaskState.SUCCEEDED:
                break
        return self.state

    def result(self, timeout: float | None = None) -> Any:
        """The last step's value; raises the failure of the step that stopped the chain."""
        self.wait(timeout)
        for step in self.steps:
            if step.state is not TaskState.SUCCEEDED:
                return step.result(0)
        return self.steps[-1].result(0)

    def cancel(self, grace: float = 5.0) -> bool:
        """Cancel the running step; the steps after it never start.

        True when something was stopped, False when every step had already ended.
        """
        current = self.current
        rest = [s for s in self.steps[self.steps.index(current) + 1:] if not s.ready()]
        if rest:
            self.app.revoke([s.id for s in rest], tokens={s.id: s.token for s in rest
                                                          if s.token})
        cancelled = current.cancel(grace)
        return cancelled or bool(rest)

    def pause(self, hard: bool = False, *, wait: bool = False, timeout: float = 5.0) -> None:
        self.current.pause(hard, wait=wait, timeout=timeout)

    def resume(self, *, wait: bool = False, timeout: float = 5.0) -> None:
        self.current.resume(wait=wait, timeout=timeout)

    def send(self, data: Any) -> None:
        self.current.send(data)

    def answer(self, value: Any) -> None:
        self.current.answer(value)

    def __repr__(self) -> str:
        return f"<ChainHandle {len(self.steps)} steps {self.state.value}>"
