"""Client-side handles on tasks: state that follows the event stream, and control.

A :class:`TaskHandle` is returned by ``delay()``, ``apply_async()``, ``start()`` and
``app.attach()``. The client's inbox thread feeds it events; its attributes (``state``,
``progress``, ``question`` …) follow the stream even when nobody iterates
:meth:`TaskHandle.events`. Blocking waits (``wait``, ``result``, ``events``) are for
scripts; ``await handle`` and ``aevents()`` are their asyncio forms.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .errors import (
    ControlError,
    HardPauseUnsupported,
    NotAuthorized,
    SendTimeout,
    TaskCancelled,
    TaskFailed,
    TaskFinished,
    TaskRevoked,
    TaskTimeout,
    UnknownTask,
)
from .protocol import (
    STATE_AFTER,
    Event,
    EventKind,
    TaskSnapshot,
    TaskState,
    Verb,
)

if TYPE_CHECKING:
    import asyncio

    from .app import App

R = TypeVar("R")

logger = logging.getLogger("interactive_tasks.handle")

#: Events kept for a handle whose ``events()`` nobody iterates (progress coalesces first).
MAX_BUFFERED_EVENTS = 100_000
#: After a gap in the stream, live events are held this long for the worker's snapshot.
RESYNC_WAIT = 3.0
#: A broadcast task verb no worker answered is sent again after this long, then after
#: twice as long each time, until ``timeout`` (``Client.request``).
BROADCAST_RESEND = 0.5

_ERRORS_BY_TYPE: dict[str, type[ControlError]] = {
    "NotAuthorized": NotAuthorized,
    "TaskFinished": TaskFinished,
    "HardPauseUnsupported": HardPauseUnsupported,
    "UnknownTask": ControlError,
}


def remaining(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (a ``time.monotonic()`` value), never below 0."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def deadline_after(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


class ResultHandle(Generic[R]):
    """The result vocabulary every handle shares: task, chain, group and chord.

    ``result(timeout=)`` (Celery's ``get``), ``wait(timeout=)``, ``ready()``, ``state``,
    ``successful()``, ``failed()`` and ``await handle``. A subclass provides ``state``,
    ``wait``, ``wait_async`` and ``result``.
    """

    @property
    def state(self) -> TaskState:
        raise NotImplementedError

    def wait(self, timeout: float | None = None) -> TaskState:
        """Block until the final state; returns it. Raises :class:`TaskTimeout`."""
        raise NotImplementedError

    async def wait_async(self, timeout: float | None = None) -> TaskState:
        """``await``-able :meth:`wait`; does not block the event loop."""
        raise NotImplementedError

    def result(self, timeout: float | None = None) -> R:
        """Wait and return the value; raises the failure, or :class:`TaskTimeout`."""
        raise NotImplementedError

    def ready(self) -> bool:
        """Whether the final state is reached (nothing more will run)."""
        return self.state.is_final

    def successful(self) -> bool:
        """Whether it ended ``succeeded`` (Celery's ``successful()``)."""
        return self.state is TaskState.SUCCEEDED

    def failed(self) -> bool:
        """Whether it ended ``failed`` (Celery's ``failed()``; cancelled and revoked are not)."""
        return self.state is TaskState.FAILED

    def get(self, timeout: float | None = None) -> R:
        """Celery's name for :meth:`result`."""
        return self.result(timeout)

    async def result_async(self, timeout: float | None = None) -> R:
        """``await``-able :meth:`result`."""
        await self.wait_async(timeout)
        return self.result(0)

    def __await__(self) -> Generator[Any, None, R]:
        return self.result_async().__await__()


class TaskHandle(ResultHandle[R]):
    """A live view of one task, and the way to steer it.

    Attributes follow the task: ``state`` (:class:`TaskState`), ``progress`` (latest
    progress :class:`Event` or None), ``question`` (pending question dict or None),
    ``worker`` and ``pid`` (where it runs), ``worker_lost`` (its worker went silent).
    """

    def __init__(
        self,
        app: App,
        task_id: str,
        *,
        name: str = "",
        token: str | None = None,
        watch: bool = True,
        starter: bool = False,
        streaming: bool = True,
    ) -> None:
        self.app = app
        self.id = task_id
        self.task_id = task_id
        self.name = name
        self._token = token
        self._cond = threading.Condition()
        self._state = TaskState.PENDING
        self._run = 0
        self._seq = 0
        self._progress: Event | None = None
        self._question: dict[str, Any] | None = None
        self._result: Any = None
        self._error: dict[str, Any] | None = None
        self._worker: str | None = None
        self._pid: int | None = None
        self._started: float | None = None
        self._finished: float | None = None
        self._recent: collections.deque[Event] = collections.deque(maxlen=200)
        self._buffer: collections.deque[Event] = collections.deque()
        self._final_event: Event | None = None
        self.worker_lost = False
        self._listeners: list[Callable[[TaskHandle[Any]], None]] = []
        # Back-pressure on send(wait=False), under _cond: messages sent, messages the task
        # is known to have taken (from receipts), and cseq -> the sent count at each
        # message that asked for a receipt.
        self._stream_sent = 0
        self._stream_taken = 0
        self._receipt_marks: dict[int, int] = {}
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._watching = watch
        self._starter = starter
        self._early_events: list[Event] | None = None
        #: every event is sent to us (not only the final one), so a skipped seq is a loss
        self._streaming = streaming
        #: a streaming handle on the same task, for waits that need every event
        self._follow: TaskHandle[R] | None = None
        self._resync_deadline: float | None = None
        #: when ``wait`` next asks the result store, and how far apart (it backs off)
        self._next_store_poll: float | None = None
        self._store_poll_every = 0.5
        #: handles of the callbacks given as ``apply_async(link=, link_error=)``
        self.children: list[TaskHandle[Any]] = []
        #: Celery's ``res.parent``: in a chain started here, the previous step's handle
        self.parent: TaskHandle[Any] | None = None
        if "ipykernel" in sys.modules:  # a list of handles displays as live rows
            from .widgets import install_display_hooks

            install_display_hooks()
        if watch:
            app.client.watch(self)

    # -- public state ----------
    @property
    def token(self) -> str | None:
        """The capability token that authorises control of this task."""
        return self._token

    @property
    def state(self) -> TaskState:
        return self._state

    @property
    def progress(self) -> Event | None:
        return self._progress

    @property
    def question(self) -> dict[str, Any] | None:
        return self._question

    @property
    def worker(self) -> str | None:
        return self._worker

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def seq(self) -> int:
        return self._seq

    def snapshot(self) -> TaskSnapshot:
        """The task as this handle knows it now."""
        with self._cond:
            return TaskSnapshot(
                task_id=self.id, name=self.name, state=self._state, seq=self._seq,
                run=max(self._run, 1), worker=self._worker, pid=self._pid,
                progress=self._progress, events=tuple(self._recent),
                question=self._question, result=self._result, error=self._error,
                started=self._started, finished=self._finished,
            )

    def add_listener(self, callback: Callable[[TaskHandle[Any]], None]) -> None:
        """Call ``callback(handle)`` from the inbox thread after every change."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[TaskHandle[Any]], None]) -> None:
        """Stop calling ``callback``; no error if it was not registered."""
        try:
            self._listeners.remove(callback)
        except ValueError:
            pass

    # -- feeding (inbox thread) ------------------------------------------------------------
    def _watch_info(self) -> tuple[str | None, int, int, bool, bool]:
        return self._worker, self._run, self._seq, self._state.is_final, self._starter

    def _expect_snapshot(self) -> None:
        """Hold live events until the attach snapshot arrives (see :meth:`_end_snapshot_wait`).

        Another handle in this process may already be subscribed to the task, so live
        events can reach this one before its snapshot; applied first, they would hide the
        older events the snapshot carries.
        """
        with self._cond:
            self._early_events = []

    def _end_snapshot_wait(self) -> None:
        """Apply the live events that came before the snapshot (or instead of one)."""
        with self._cond:
            early, self._early_events = self._early_events, None
            self._resync_deadline = None
            for event in early or ():
                if self._accept(event):
                    self._apply(event)
                    self._push(event)
            self._cond.notify_all()
        self._changed()

    def _on_event(self, event: Event) -> None:
        with self._cond:
            if self._early_events is not None:
                self._early_events.append(event)
                return
            if not self._accept(event):
                return
            if self._streaming and event.covers_from > self._seq + 1:
                # Events were lost on the way (a broker connection dropped with them in
                # flight, a worker's resend buffer overflowed): hold this one and the
                # next until the worker's snapshot fills the gap.
                self._early_events = [event]
                self._resync_deadline = time.monotonic() + RESYNC_WAIT
                resync = True
            else:
                self._apply(event)
                self._push(event)
                self._cond.notify_all()
                resync = False
        if resync:
            logger.info("task %s: events %d-%d missed; asking for a snapshot", self.id,
                        self._seq + 1, event.covers_from - 1)
            self.app.client.resync(self.id, self._worker, self._token)
        else:
            self._changed()

    def _check_resync(self, now: float) -> None:
        """Give up waiting for a resync snapshot after ``RESYNC_WAIT``: apply what came."""
        deadline = self._resync_deadline
        if deadline is not None and now >= deadline:
            logger.warning("task %s: no snapshot came to fill a gap in its events", self.id)
            self._end_snapshot_wait()

    def _accept(self, event: Event) -> bool:
        if self._state.is_final and event.kind != EventKind.REVOKED:
            return False
        if event.run < self._run:
            return False
        if event.run > self._run:
            self._run = event.run
            self._seq = 0
        return event.seq > self._seq

    def _apply(self, event: Event) -> None:
        self._seq = event.seq
        self.worker_lost = False
        kind = event.kind
        new_state = STATE_AFTER.get(kind)
        if new_state is not None:
            self._state = new_state
        if kind == EventKind.PROGRESS:
            self._progress = event
        elif kind == EventKind.RETRY:
            # The next attempt may run on another worker: find it again.
            self._worker = None
            if not self._starter:
                self.app.client.locate_soon(self.id, self._token)
        elif kind == EventKind.STARTED:
            self._worker = event.worker or self._worker
            self._pid = event.pid
            self._started = event.ts
        elif kind == EventKind.QUESTION:
            self._question = dict(event.fields)
        elif kind == EventKind.ANSWERED:
            self._question = None
        elif event.is_final:
            self._question = None
            self._result = event.result
            self._error = event.error
            self._finished = event.ts
            self._final_event = event
        if kind != EventKind.PROGRESS:
            self._recent.append(event)

    def _push(self, event: Event) -> None:
        buf = self._buffer
        if (
            event.kind == EventKind.PROGRESS
            and buf
            and buf[-1].kind == EventKind.PROGRESS
        ):
            buf[-1] = event  # latest wins, never reordered
        else:
            buf.append(event)
            if len(buf) > MAX_BUFFERED_EVENTS:
                buf.popleft()

    def _on_snapshot(self, snapshot: TaskSnapshot) -> None:
        with self._cond:
            if self._state.is_final:
                return
            if snapshot.run < self._run or (
                snapshot.run == self._run and snapshot.seq < self._seq
            ):
                return
            if snapshot.run > self._run:
                self._run = snapshot.run
                self._seq = 0
            missed = [event for event in snapshot.events if event.seq > self._seq]
            progress = snapshot.progress
            if progress is not None and progress.seq > self._seq:
                # The snapshot keeps its latest progress apart from its events: it goes
                # into the stream where its seq puts it, so a final event the snapshot
                # also carries still comes after it (events() ends at the final one).
                missed.append(progress)
                missed.sort(key=lambda event: event.seq)
            for event in missed:
                self._apply(event)
                self._push(event)
            self._seq = max(self._seq, snapshot.seq)
            self._state = snapshot.state
            self.name = self.name or snapshot.name
            self._worker = snapshot.worker or self._worker
            self._pid = snapshot.pid or self._pid
            self._question = snapshot.question
            self._started = snapshot.started or self._started
            if snapshot.state.is_final:
                self._result = snapshot.result
                self._error = snapshot.error
                self._finished = snapshot.finished
                if self._final_event is None:
                    kind = snapshot.state.value
                    fields: dict[str, Any] = {"result": snapshot.result}
                    if snapshot.error:
                        fields["error"] = snapshot.error
                    final = Event(self.id, snapshot.seq + 1, kind,
                                  snapshot.finished or time.time(), fields, snapshot.run)
                    self._final_event = final
                    self._push(final)
            self.worker_lost = False
            self._cond.notify_all()
        if self._early_events is not None:
            self._end_snapshot_wait()
        else:
            self._changed()

    def _on_worker_lost(self, worker: str) -> None:
        with self._cond:
            if self.worker_lost or self._state.is_final or worker != self._worker:
                return
            self.worker_lost = True
            event = Event(self.id, self._seq, EventKind.WORKER_LOST, time.time(),
                          {"worker": worker}, self._run)
            self._recent.append(event)
            self._buffer.append(event)
            # Forget the worker so renewals go out as broadcasts and find the task
            # again when it is delivered to another worker.
            self._worker = None
            self._cond.notify_all()
        self._changed()

    def _changed(self) -> None:
        for callback in list(self._listeners):
            try:
                callback(self)
            except Exception:  # a broken listener must not stop the stream
                import logging

                logging.getLogger("interactive_tasks.handle").exception("listener failed")
        if self._async_waiters:
            for loop, fut in list(self._async_waiters):
                loop.call_soon_threadsafe(_wake, fut)

    # -- waiting ----------
    def _poll_result_store(self) -> bool:
        """Fetch the final record from the result store; True when this handle is final
        now (a stored end of an earlier run than the one it follows does not count)."""
        record = self.app.results.get(self.id)
        if record is None:
            return False
        try:
            snapshot = TaskSnapshot.from_wire(record)
        except Exception:
            return False
        self._on_snapshot(snapshot)
        return self._state.is_final

    def _postpone_store_poll(self) -> None:
        """The next result-store poll of :meth:`wait` and :meth:`events`, backing off 1.5×
        per poll up to every 5 s."""
        self._store_poll_every = min(self._store_poll_every * 1.5, 5.0)
        self._next_store_poll = time.monotonic() + self._store_poll_every

    def wait(self, timeout: float | None = None) -> TaskState:
        """Block until the task reaches a final state; returns that state.

        Raises :class:`TaskTimeout` after ``timeout`` seconds. In Jupyter this blocks the
        kernel, so the widget's buttons stop responding until it returns: use
        ``await handle`` there.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        # The result store is the fallback when the final event cannot reach us (attach
        # from another process after a lost inbox, a client that restarted ...). Its
        # schedule lives on the handle, so a loop of short waits still gets there.
        if self._next_store_poll is None:
            self._next_store_poll = time.monotonic() + (0.5 if self._watching else 0.0)
        durable = self.app.results.durable
        with self._cond:
            while not self._state.is_final:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise TaskTimeout(f"task {self.id} did not finish within {timeout}s "
                                      f"(state {self._state.value})")
                next_poll = self._next_store_poll
                if durable and now >= next_poll:
                    self._cond.release()
                    try:
                        done = self._poll_result_store()
                    finally:
                        self._cond.acquire()
                    if done:
                        break
                    self._postpone_store_poll()
                    continue
                limits = [next_poll - now] if durable else [1.0]
                if deadline is not None:
                    limits.append(deadline - now)
                self._cond.wait(max(0.0, min(limits)))
            return self._state

    def result(self, timeout: float | None = None) -> R:
        """Wait and return the task's value.

        Raises :class:`TaskFailed` (remote type, message, traceback),
        :class:`TaskCancelled`, :class:`TaskRevoked` or :class:`TaskTimeout`.
        """
        state = self.wait(timeout)
        if state is TaskState.SUCCEEDED:
            return self._result
        if state is TaskState.FAILED:
            raise TaskFailed.from_error(self.id, self._error)
        if state is TaskState.CANCELLED:
            raise TaskCancelled(f"task {self.id} was cancelled")
        reason = (self._error or {}).get("message", "revoked")
        raise TaskRevoked(f"task {self.id} was revoked: {reason}")

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Iterate the task's events in order, ending after the final one.

        Continues where this handle's previous iteration stopped. Raises
        :class:`TaskTimeout` (a ``TimeoutError``) when ``timeout`` seconds pass with no
        new event.

        While no event comes it asks the result store, as :meth:`wait` does and on the
        same schedule for a watched handle: a final event lost on its way (a dropped
        inbox connection) ends the iteration from the stored record instead of in
        ``TaskTimeout``.
        """
        durable = self.app.results.durable
        if durable and self._watching and self._next_store_poll is None:
            self._next_store_poll = time.monotonic() + 0.5
        while True:
            with self._cond:
                deadline = None if timeout is None else time.monotonic() + timeout
                while not self._buffer:
                    if self._state.is_final and self._final_event is not None:
                        return
                    now = time.monotonic()
                    remaining = None if deadline is None else deadline - now
                    if remaining is not None and remaining <= 0:
                        raise TaskTimeout(f"no event from task {self.id} in {timeout}s")
                    limits = [1.0] if remaining is None else [remaining, 1.0]
                    if durable and self._watching and self._next_store_poll is not None:
                        limits.append(max(0.0, self._next_store_poll - now))
                    self._cond.wait(min(limits))
                    if self._buffer or not durable:
                        continue
                    if self._watching:
                        due = self._next_store_poll
                        if due is None or time.monotonic() < due:
                            continue
                        self._postpone_store_poll()
                    self._cond.release()
                    try:
                        self._poll_result_store()
                    finally:
                        self._cond.acquire()
                event = self._buffer.popleft()
            yield event
            if event.is_final:
                return

    def events_nowait(self) -> list[Event]:
        """Every buffered event not yet iterated, without blocking."""
        with self._cond:
            out = list(self._buffer)
            self._buffer.clear()
            return out

    # -- asyncio ----------
    # asyncio is imported in the coroutines, where a loop already runs (so it is loaded):
    # with asyncio (and the ssl it imports) at the top every process importing the
    # package, a worker's pool processes too, would carry some 9 MB for it.
    async def _wait_change(self, timeout: float | None) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        entry = (loop, fut)
        self._async_waiters.append(entry)
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            self._async_waiters.remove(entry)

    async def wait_async(self, timeout: float | None = None) -> TaskState:
        """``await``-able :meth:`wait`; does not block the event loop."""
        import asyncio

        deadline = None if timeout is None else time.monotonic() + timeout
        polls = 0
        while not self._state.is_final:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TaskTimeout(f"task {self.id} did not finish within {timeout}s")
            try:
                await self._wait_change(1.0 if remaining is None else min(remaining, 1.0))
            except asyncio.TimeoutError:
                polls += 1
                if self.app.results.durable and polls % 2 == 0:
                    loop = asyncio.get_running_loop()
                    await loop.run_in_executor(None, self._poll_result_store)
        return self._state

    async def aevents(self, timeout: float | None = None) -> AsyncIterator[Event]:
        """Async form of :meth:`events`."""
        import asyncio

        while True:
            with self._cond:
                event = self._buffer.popleft() if self._buffer else None
                done = self._state.is_final and self._final_event is not None
            if event is not None:
                yield event
                if event.is_final:
                    return
                continue
            if done:
                return
            try:
                await self._wait_change(timeout)
            except asyncio.TimeoutError:
                raise TaskTimeout(f"no event from task {self.id} in {timeout}s") from None

    # -- control ----------
    def send(self, data: Any, *, timeout: float = 5.0, wait: bool = True) -> None:
        """Send a control verb (``"pause"``, ``"resume"``, ``"cancel"``) or any message.

        Anything that is not a verb arrives at the task's ``self.receive()``. By default
        this returns once the worker acknowledged it; ``wait=False`` returns as soon as
        it is published to the task's worker (for streams of messages: order is kept,
        but a refusal, such as a wrong token, is only logged by the worker). Before the
        task started, its worker is not known and it waits anyway: the message is held
        by every worker, and the next one must not overtake it.

        Back-pressure: with ``wait=False`` at most ``send_window`` (app setting, 2048)
        messages are outstanding, sent but not yet taken by the task; the next call
        waits until the task catches up (:attr:`outstanding`), at most ``timeout``.

        Raises :class:`NotAuthorized` without a token (or operator secret),
        :class:`TaskFinished` when the task already ended, :class:`ControlError` when no
        worker acknowledged in ``timeout``, :class:`SendTimeout` when a ``wait=False``
        message waited ``timeout`` for room in the window.
        """
        if isinstance(data, str) and data in (Verb.PAUSE, Verb.RESUME, Verb.CANCEL):
            self._control(data, None, timeout=timeout, wait=wait)
        else:
            self._control(Verb.MESSAGE, data, timeout=timeout, wait=wait)

    def pause(self, hard: bool = False, *, wait: bool = False, timeout: float = 5.0) -> None:
        """Pause at the next checkpoint, or freeze the child at once with ``hard=True``.

        Returns once the worker acknowledged it; with ``wait=True``, only once the task
        is paused (its ``paused`` event reached this handle), ``timeout`` bounding the
        whole call. Raises :class:`HardPauseUnsupported` for ``hard=True`` outside the
        prefork pool, :class:`TaskFinished` when the task already ended (with ``wait``:
        or ended before it paused), :class:`TaskTimeout` when ``wait`` ran out of time
        (a soft pause waits for the task's next checkpoint).
        """
        deadline = time.monotonic() + timeout
        self._control(Verb.PAUSE, {"hard": True} if hard else None, timeout=timeout)
        if wait:
            self._wait_for_state(lambda state: state is TaskState.PAUSED, "pause",
                                 timeout, deadline)

    def resume(self, *, wait: bool = False, timeout: float = 5.0) -> None:
        """Continue a paused task.

        With ``wait=True`` returns only once the task is no longer paused (its
        ``resumed`` event reached this handle, or it ended). Raises :class:`TaskFinished`
        when the task already ended, :class:`TaskTimeout` when ``wait`` ran out of time.
        """
        deadline = time.monotonic() + timeout
        self._control(Verb.RESUME, None, timeout=timeout)
        if wait:
            self._wait_for_state(lambda state: state is not TaskState.PAUSED, "resume",
                                 timeout, deadline)

    def cancel(self, grace: float = 5.0, *, timeout: float = 5.0) -> bool:
        """Cancel: ``Cancelled`` at the next checkpoint, forced after ``grace`` seconds.

        Returns True when the cancel was accepted, False when the task had already ended
        (as ``concurrent.futures.Future.cancel()`` does), so a Cancel button or a clean-up
        loop that races the end of a task needs no ``try``. Raises :class:`NotAuthorized`
        without a token (or operator secret), :class:`ControlError` when no worker
        acknowledged in ``timeout``.
        """
        if self._state.is_final:
            return False
        try:
            self._control(Verb.CANCEL, {"grace": float(grace)}, timeout=timeout)
        except TaskFinished:
            return False
        return True

    def _wait_for_state(self, reached: Callable[[TaskState], bool], verb: str,
                        timeout: float, deadline: float) -> None:
        """Block until ``reached(state)``; for ``pause(wait=True)`` and ``resume(wait=True)``.

        A handle that receives only the final event (a plain task's ``delay()``) follows
        the task through an attached handle, which gets every event.
        """
        watcher = self if self._streaming else self._follower()
        with watcher._cond:
            while not reached(watcher._state):
                state = watcher._state
                if state.is_final:
                    raise TaskFinished(f"task {self.id} ended ({state.value}) before it "
                                       f"could {verb}")
                left = deadline - time.monotonic()
                if left <= 0:
                    hint = (": a soft pause waits for the task's next checkpoint"
                            if verb == "pause" else "")
                    raise TaskTimeout(f"task {self.id} did not {verb} within {timeout}s "
                                      f"(state {state.value}){hint}")
                watcher._cond.wait(left)

    def _follower(self) -> TaskHandle[R]:
        """A handle on this task that receives every event (made once, on first need)."""
        if self._follow is None:
            self._follow = self.app.attach(self.id, self._token)
        return self._follow

    def answer(self, value: Any, *, timeout: float = 5.0) -> None:
        """Answer the pending question. Raises :class:`ControlError` when none is pending."""
        qid = (self._question or {}).get("qid")
        self._control(Verb.ANSWER, {"value": value, "qid": qid}, timeout=timeout)

    def revoke(self, terminate: bool = False) -> None:
        """Revoke the task if it has not started (Celery's ``revoke``).

        With ``terminate=True`` a running task is cancelled at once. Raises
        :class:`NotAuthorized` without a token or operator secret.
        """
        if self._token is None and self.app.secret is None:
            raise NotAuthorized(f"no token to revoke task {self.id}")
        tokens = {self.id: self._token} if self._token else None
        self.app.revoke([self.id], terminate=terminate, tokens=tokens)

    def forget(self) -> None:
        """Drop the task's record from the result store (Celery's ``res.forget()``); this
        handle keeps what it knows. Meant for a task that ended: one still running is
        stored again when it ends, and the worker that ran it still answers
        ``app.attach`` for it while it is among its 50 most recent tasks. Raises
        :class:`NotAuthorized` without a token or operator secret, and
        :class:`TransportError` when the store is unreachable.
        """
        if self._token is None and self.app.secret is None:
            raise NotAuthorized(f"no token to forget task {self.id}")
        self.app.results.forget(self.id)

    @property
    def outstanding(self) -> int:
        """Messages this handle sent with ``send(wait=False)`` that the task is not yet
        known to have taken with ``self.receive()`` (known from receipts, which come every
        quarter of ``send_window`` messages, so this over-counts by up to that many). A
        ``send(wait=False)`` that would take it past ``send_window`` waits first."""
        with self._cond:
            return self._stream_sent - self._stream_taken

    def _admit_stream_message(self, timeout: float | None) -> int:
        """Count one more ``send(wait=False)`` message, first waiting while ``send_window``
        are outstanding; returns the count when this one is to ask for a receipt, else 0.

        Raises :class:`TaskFinished` when the task ends meanwhile and
        :class:`SendTimeout` after ``timeout`` seconds (None: no limit).
        """
        window = self.app.conf.send_window
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._stream_sent - self._stream_taken >= window:
                if self._state.is_final:
                    raise TaskFinished(f"task {self.id} already ended ({self._state.value})")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise SendTimeout(
                        f"task {self.id} has not taken {window} messages sent with "
                        f"wait=False (send_window) in {timeout}s: it reads slower than "
                        "they are sent, is paused, or its worker went away")
                self._cond.wait(1.0 if left is None else min(left, 1.0))
            self._stream_sent += 1
            sent = self._stream_sent
            return sent if sent % max(1, window // 4) == 0 else 0

    def _unadmit_stream_message(self) -> None:
        """The message just admitted was not sent (its publish raised). A receipt it
        asked for never comes; the next one that does clears it."""
        with self._cond:
            self._stream_sent -= 1

    def _expect_receipt(self, cseq: int, count: int) -> None:
        """Message ``cseq`` (this handle's ``count``-th streamed) asks for a receipt."""
        with self._cond:
            self._receipt_marks[cseq] = count

    def _on_receipt(self, cseq: int) -> None:
        """From the client's inbox thread: the task took message ``cseq``, and with it
        every message this handle sent before it (one pool-process inbox, in order)."""
        with self._cond:
            taken = self._receipt_marks.pop(cseq, None)
            if taken is not None and taken > self._stream_taken:
                self._stream_taken = taken
                for earlier in [c for c in self._receipt_marks if c < cseq]:
                    del self._receipt_marks[earlier]
                self._cond.notify_all()

    def _control(self, verb: str, data: Any, *, timeout: float, wait: bool = True) -> None:
        """Deliver one task verb and (with ``wait``) wait for the worker's acknowledgement.

        When the worker is not known yet (the task is queued) the verb is broadcast;
        every worker holds it and applies it if and when the task reaches it, in the
        order this client sent it (``cseq``), which is why it always waits then. Without
        ``wait`` (and a known worker) the message carries no request id, so the worker
        sends no reply.
        """
        if self._state.is_final:
            raise TaskFinished(f"task {self.id} already ended ({self._state.value})")
        if self._token is None and self.app.secret is None:
            raise NotAuthorized(
                f"no token to control task {self.id}: pass token= to app.attach() "
                "(or --token), or set the app's operator secret (ITASK_SECRET)"
            )
        client = self.app.client
        stream = verb == Verb.MESSAGE and not wait
        receipt = self._admit_stream_message(timeout) if stream else 0
        worker = self._worker
        if not wait and worker is not None:
            try:
                client.send_task_verb_nowait(self.id, verb, data, self._token, worker,
                                             (self, receipt) if receipt else None)
            except BaseException:
                if stream:
                    self._unadmit_stream_message()
                raise
            return
        try:
            wire = client.task_verb_wire(self.id, verb, data, self._token,
                                         (self, receipt) if receipt else None, reply=True)
            # a broadcast no worker heard (one starting or reconnecting) goes out again; a
            # worker that hears both copies applies the verb once (cseq)
            replies = client.request(wire, worker, timeout, many=worker is None,
                                     until=_has_owner, settle=0.3,
                                     resend=BROADCAST_RESEND if worker is None else None)
        except BaseException:
            if stream:
                self._unadmit_stream_message()
            raise
        owner = [r for r in replies if r.get("ok") is not None and not r.get("pending")]
        if not replies:
            if worker is not None:
                raise ControlError(f"worker {worker} did not acknowledge {verb!r} in {timeout}s")
            raise ControlError(f"no worker acknowledged {verb!r} for task {self.id}")
        chosen = owner[0] if owner else replies[0]
        if not chosen.get("ok"):
            error = chosen.get("error") or {}
            exc_type = _ERRORS_BY_TYPE.get(str(error.get("type")), ControlError)
            raise exc_type(str(error.get("message", f"{verb!r} refused")))

    def __repr__(self) -> str:
        return f"<TaskHandle {self.name or '?'} {self.id} {self._state.value}>"

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        from .widgets import handle_mimebundle

        return handle_mimebundle(self, **kwargs)

    def __del__(self) -> None:
        try:
            if self._watching:
                self.app.client.unwatch(self)
        except Exception:
            pass


def _has_owner(replies: list[dict[str, Any]]) -> bool:
    """A broadcast control is settled when the worker that has the task answered."""
    return any(not r.get("pending") for r in replies)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def unknown_task(task_id: str) -> UnknownTask:
    return UnknownTask(
        f"no task {task_id} is known: no worker runs it and no result is stored (it may "
        "still be queued, or its result expired); check the id, and that -A / -b name the "
        "app and broker it was sent with"
    )
