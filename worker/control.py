"""Control in: requests from clients to tasks and to the worker itself.

:class:`ControlRouter` takes every message from the worker's control queue and from the
broadcast exchange: task verbs (pause, resume, cancel, message, answer) after checking the
capability token or signature, reads (locate, subscribe, unsubscribe) that add watchers,
and worker requests (ping, inspect, revoke, and the worker-wide changes of
:mod:`.remote`; only on the workers a ``destination`` names, when it names any). Task
verbs for a task this worker does not hold yet are kept (``held``) and applied in the order
each client sent them if it arrives. What each verb decides from the control's data and
the task's state is in :mod:`.verbs`, which the Celery bridge's relay calls too.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from interactive_tasks import codec
from interactive_tasks.errors import ProtocolError
from interactive_tasks.protocol import (
    HEADER_CHAIN,
    HEADER_CHORD,
    READ_VERBS,
    TASK_VERBS,
    WORKER_CONTROL_VERBS,
    WORKER_VERBS,
    ControlMessage,
    EventKind,
    TaskMessage,
    Verb,
    control_fields,
)
from interactive_tasks.transport.frames import control_frame, kombu_body

from . import verbs
from .canvas import after_finish
from .inbound import decode_body, signed_by
from .outcomes import error_fields
from .records import HeldControl, Subscriber, TaskRecord
from .remote import ControlRefused, WorkerControl

if TYPE_CHECKING:
    from interactive_tasks.transport.upkeep import BrokerUpkeep

    from .canvas import Workflows
    from .outcomes import Outcomes
    from .pools.base import PoolSlot
    from .relay import Relay
    from .state import WorkerState

logger = logging.getLogger("interactive_tasks.worker")


class ControlRouter:
    """Applies control messages to the worker's tasks; one per worker.

    ``send_ctl(record, verb, data, receipt=None)`` writes a control frame to the pool slot
    running ``record`` (``Worker.send_ctl``); ``drain_slot(slot)`` acts on every frame the slot
    has written so far (``Worker.drain_slot``).
    """

    def __init__(self, state: WorkerState, *, relay: Relay, outcomes: Outcomes,
                 workflows: Workflows, upkeep: BrokerUpkeep,
                 send_ctl: Callable[..., None],
                 drain_slot: Callable[[PoolSlot], None]) -> None:
        self.state = state
        self.relay = relay
        self.outcomes = outcomes
        self.workflows = workflows
        self.upkeep = upkeep
        self.send_ctl = send_ctl
        self.drain_slot = drain_slot
        #: the worker-wide requests (:mod:`.remote`), set by the worker once its intake
        #: exists (the intake delivers to this router, and they change the intake)
        self.remote: WorkerControl | None = None

    def _remote(self) -> WorkerControl:
        assert self.remote is not None, "the worker sets ControlRouter.remote"
        return self.remote

    def on_message(self, message: Any) -> None:
        """A control message from kombu (broadcasts; the control queue off Redis)."""
        app = self.state.app
        signed = app.secret is not None and signed_by(app, message)
        self._on_control(message.body, signed, lambda: decode_body(app, message))

    def on_frames(self, frames: list[bytes]) -> None:
        """Raw frames from the control list on Redis (``frames.encode_frame``)."""
        w = self.state
        secret = w.app.secret
        limit = w.app.conf.max_message_size
        for raw in frames:
            try:
                body, signed = control_frame(raw, secret)
            except ProtocolError as exc:
                logger.warning("refused control message: %s", exc.reason)
                continue
            self._on_control(body, signed, functools.partial(codec.loads, body, limit))

    def _on_control(self, body: bytes, signed: bool, decode: Callable[[], Any]) -> None:
        w = self.state
        try:
            if w.app.secret is not None and not signed:
                raise ProtocolError("control message is unsigned or its signature is wrong")
            fields = control_fields(decode())
        except ProtocolError as exc:
            logger.warning("refused control message: %s", exc.reason)
            sender = None
            try:
                raw = codec.loads(body)
                sender = raw.get("sender") if isinstance(raw, dict) else None
                rid = raw.get("rid") if isinstance(raw, dict) else None
            except Exception:
                rid = None
            if isinstance(sender, str) and (w.app.secret is None or signed):
                self.reply(sender, rid if isinstance(rid, str) else None, False,
                           error=("ProtocolError", exc.reason))
            return
        verb = fields[0]
        try:
            if verb in TASK_VERBS:
                # The common case, a message to a task: no ControlMessage is built.
                self.task_control(fields[1] or "", verbs.held_fields(fields, signed))
            else:
                self.handle(ControlMessage(*fields), signed)
        except Exception as exc:  # a bug here must not take the worker down
            logger.exception("error handling control %s", verb)
            sender, rid = fields[3], fields[4]
            if sender:
                self.reply(sender, rid, False, error=("ControlError", str(exc)))

    def reply(self, inbox: str, rid: str | None, ok: bool, *, data: Any = None,
               error: tuple[str, str] | None = None, pending: bool = False) -> None:
        self.relay.publish_inbox(inbox, verbs.reply_message(
            self.state.hostname, rid, ok, data=data, error=error, pending=pending))

    def handle(self, ctl: ControlMessage, signed: bool) -> None:
        w = self.state
        verb = ctl.verb
        if verb in WORKER_VERBS and not addressed_to(ctl.data, w.hostname):
            return  # a broadcast with a destination that does not name this worker
        if verb in WORKER_CONTROL_VERBS:
            try:
                done = self._remote().apply(verb, ctl.data, signed)
            except ControlRefused as exc:
                logger.warning("refused %s from %s: %s", verb, ctl.sender, exc)
                if ctl.sender:
                    self.reply(ctl.sender, ctl.rid, False, error=(exc.kind, str(exc)))
                return
            if ctl.sender:
                self.reply(ctl.sender, ctl.rid, True, data={"ok": done})
            return
        if verb == Verb.PING:
            if ctl.sender:
                self.reply(ctl.sender, ctl.rid, True, data={"pong": True})
            return
        if verb == Verb.REVOKE:
            self.revoke(ctl, signed)
            return
        if verb == Verb.INSPECT:
            if ctl.sender:
                what = (ctl.data or {}).get("what") if isinstance(ctl.data, dict) else None
                if what == "query_task":
                    found = self._remote().query_task((ctl.data or {}).get("ids"))
                    self.reply(ctl.sender, ctl.rid, True, data=found)
                    return
                self.reply(ctl.sender, ctl.rid, True, data=self.inspect(str(what)))
            return
        assert ctl.task_id is not None or verb == Verb.LOCATE
        task_id = ctl.task_id or ""
        if verb in TASK_VERBS:
            self.task_control(task_id, verbs.held_control(ctl, signed))
        elif verb in READ_VERBS:
            self.handle_read(ctl, w.records.get(task_id) or w.finished.get(task_id), signed)

    def task_control(self, task_id: str, held: HeldControl) -> None:
        """A task verb: applied to the task when it is here, else held for it."""
        w = self.state
        record = w.records.get(task_id) or w.finished.get(task_id)
        if record is not None:
            self.apply_task_control(record, held)
        elif inbox := verbs.hold(w.held, task_id, held):  # in case the task comes here
            self.reply(inbox, held.rid, True, pending=True)

    def authorized(self, record: TaskRecord, held: HeldControl) -> bool:
        if held.signed:
            return True
        # hmac here, not at the top: it loads libcrypto, which every prefork pool process
        # would otherwise map (tests/test_imports.py)
        import hmac

        token = held.token
        if token is not None and record.proven_token is not None and \
                hmac.compare_digest(token.encode(), record.proven_token.encode()):
            return True
        if codec.token_matches(token, record.message.token_digest):
            record.proven_token = token
            return True
        return False

    def apply_task_control(self, record: TaskRecord, held: HeldControl) -> None:
        ok, error = verbs.outcome(
            held, record.id, record.last_cseq, authorized=self.authorized(record, held),
            apply=functools.partial(self._apply, record, held), log=logger,
            token_help=" (use the token of the handle that started it, handle.token, or "
                       "the operator secret ITASK_SECRET)")
        if held.sender and held.rid:  # no request id: the sender asked for no reply
            self.reply(held.sender, held.rid, ok, error=error)

    def _apply(self, record: TaskRecord, held: HeldControl) -> None:
        """Apply one task verb; :class:`~.verbs.Refused` when the task cannot take it."""
        w = self.state
        if record.is_final:
            raise verbs.ended(record.id, record.state)
        verb, data = held.verb, held.data
        started = record.slot is not None
        if verb == Verb.MESSAGE:  # the common case first
            receipt = verbs.receipt_of(held)
            if started:
                self.send_ctl(record, Verb.MESSAGE, data, receipt)
            else:
                record.early_messages.append((Verb.MESSAGE, data, receipt))
        elif verb == Verb.PAUSE:
            hard = verbs.is_hard(data)
            if hard and not w.pool.supports_hard_pause:
                raise verbs.Refused("HardPauseUnsupported",
                                    f"hard pause needs the prefork pool (this worker runs "
                                    f"--pool {w.pool.name}); a soft pause works everywhere")
            if not started:
                record.start_paused = True
            elif hard:
                if not record.slot.hard_paused:
                    slot = record.slot
                    w.pool.hard_pause(slot)
                    # What it wrote before it stopped comes before "paused": no progress
                    # of a frozen task reaches a watcher after the pause.
                    self.drain_slot(slot)
                    if record.is_final:  # it ended in what was drained
                        w.pool.hard_resume(slot)
                        raise verbs.ended(record.id, record.state)
                    # Progress it made before it stopped but had not written (held
                    # back while the worker was behind) must not follow "paused".
                    slot.stale_progress_before = time.time()
                    self.relay.emit(record, EventKind.PAUSED, {"hard": True})
            else:
                self.send_ctl(record, Verb.PAUSE, None)
        elif verb == Verb.RESUME:
            if not started:
                record.start_paused = False
            elif record.slot.hard_paused:
                frozen = time.monotonic() - record.slot.hard_paused_at
                w.pool.hard_resume(record.slot)
                self.relay.emit(record, EventKind.RESUMED, {"hard": True})
                # the child could not see the freeze: tell it, for its soft time limit
                self.send_ctl(record, Verb.RESUME, {"frozen": frozen})
            else:
                self.send_ctl(record, Verb.RESUME, None)
        elif verb == Verb.CANCEL:
            self.cancel(record, data)
        elif verb == Verb.ANSWER:
            self.send_ctl(record, Verb.ANSWER, verbs.answer(record.id, record.question, data))

    def cancel(self, record: TaskRecord, data: Any) -> None:
        w = self.state
        grace = verbs.cancel_grace(data)
        record.cancel_requested = True
        if record.slot is None:
            try:
                w.ready.remove(record)
            except ValueError:
                pass
            self.outcomes.finish(record, EventKind.CANCELLED, {"before_start": True})
            return
        if record.slot.hard_paused:
            w.pool.hard_resume(record.slot)
        self.send_ctl(record, Verb.CANCEL, None)
        assert w.hub is not None
        if grace <= 0:
            self.force(record, 1)
        else:
            record.timers.append(w.hub.call_later(grace, self.force, record, 1))

    def force(self, record: TaskRecord, stage: int) -> None:
        w = self.state
        slot = record.slot
        # Check the task↔slot map first so a signal never hits the next task.
        if record.is_final or slot is None or slot.task_id != record.id:
            return
        what = w.pool.force_stop(slot, stage)
        logger.info("forcing task %s to stop: %s", record.id, what)
        if stage == 1 and w.hub is not None:
            record.timers.append(w.hub.call_later(1.0, self.force, record, 2))

    def handle_read(self, ctl: ControlMessage, record: TaskRecord | None,
                     signed: bool) -> None:
        w = self.state
        sender = ctl.sender
        read_only = w.app.conf.read_only_attach
        try:
            if verbs.read_settled(
                    ctl, record.subscribers if record is not None else None,
                    record.message.token_digest if record is not None else None,
                    signed=signed, read_only_attach=read_only):
                return
            assert sender is not None  # read_settled settles a read without one
            ttl = w.app.conf.subscription_ttl
            renew = verbs.renewals(ctl)
            if renew is not None:
                expires = time.monotonic() + ttl
                for task_id in renew:
                    held = w.records.get(task_id)
                    if held is None or verbs.extend(held.subscribers, sender, expires) or \
                            not read_only:
                        continue
                    # Dropped while the client was away: take it back, with a snapshot so
                    # the client learns what it missed (its handle skips what it has).
                    held.subscribers[sender] = Subscriber(sender, expires, True)
                    self.relay.flush()
                    self.relay.publish_inbox(sender, verbs.snapshot_message(
                        w.hostname, None, held.snapshot().to_wire()))
                return
            if record is None:
                verbs.watch_unknown(ctl, w.held_subscribers, time.monotonic() + ttl,
                                    w.hostname)
                return
        except verbs.Refused as exc:
            if sender:
                self.reply(sender, ctl.rid, False, error=exc.error)
            return
        sub = record.subscribers.get(sender)
        if sub is not None and ctl.verb == Verb.SUBSCRIBE and ctl.rid is None:
            sub.expires = time.monotonic() + ttl  # a renewal
            sub.everything = True
            return
        record.subscribers[sender] = Subscriber(sender, time.monotonic() + ttl, True)
        # Snapshot and live tail are ordered on one queue: pending batched events are
        # flushed first so the snapshot never precedes an event it does not include.
        self.relay.flush()
        self.relay.publish_inbox(sender, verbs.snapshot_message(
            w.hostname, ctl.rid, record.snapshot().to_wire()))

    def revoke(self, ctl: ControlMessage, signed: bool) -> None:
        """Refuse the ids from now on (until they expire); stop the queued ones here."""
        w = self.state
        data = ctl.data if isinstance(ctl.data, dict) else {}
        ids = [i for i in data.get("ids") or () if isinstance(i, str)]
        raw_tokens = data.get("tokens")
        tokens: dict[str, Any] = raw_tokens if isinstance(raw_tokens, dict) else {}
        expires = data.get("expires")
        if not isinstance(expires, (int, float)):
            expires = time.time() + w.app.conf.result_expires
        terminate = bool(data.get("terminate"))
        handled: list[str] = []
        refused: list[str] = []
        for task_id in ids:
            entry = [float(expires), tokens.get(task_id), signed]
            w.revoked[task_id] = entry
            record = w.records.get(task_id)
            if record is None:
                outcome = self._revoke_scheduled(task_id, entry)
                if outcome is not None:
                    (handled if outcome else refused).append(task_id)
                continue
            if record.is_final:
                continue
            if not self.revoke_applies(entry, record):
                refused.append(task_id)
                continue
            handled.append(task_id)
            if record.slot is None:
                try:
                    w.ready.remove(record)
                except ValueError:
                    pass
                self.outcomes.finish(record, EventKind.REVOKED,
                                  {"error": error_fields("TaskRevoked", "revoked")})
            elif terminate:
                self.cancel(record, {"grace": 0})
        if refused:
            logger.warning("refused to revoke %s: wrong or missing token", ", ".join(refused))
        if ctl.sender:
            self.reply(ctl.sender, ctl.rid, True, data={"revoked": handled,
                                                        "refused": refused})

    def _revoke_scheduled(self, task_id: str, entry: list[Any]) -> bool | None:
        """A task waiting in the broker for its eta: take it out and end it now, instead
        of refusing it when it comes due. True: ended here; False: the revoke lacks
        authority; None: it does not wait in the broker (or another worker took it out)."""
        w = self.state
        envelope = self.upkeep.find(task_id)
        if envelope is None:
            return None
        try:
            body, _ = kombu_body(envelope)
            msg = TaskMessage.from_wire(codec.loads(body, w.app.conf.max_message_size))
        except Exception:
            return None  # not ours to judge: the worker that fetches it dead-letters it
        if entry[0] < time.time() or not (
                entry[2] or codec.token_matches(entry[1], msg.token_digest)):
            return False
        if self.upkeep.unschedule(task_id) is None:
            return None  # due meanwhile: the revoked ids refuse it when it arrives
        fields = {"error": error_fields("TaskRevoked", "revoked")}  # as for one held here
        self.relay.send_final_direct(msg.id, msg.task, msg.reply_to, EventKind.REVOKED, fields,
                                  store=True)
        if HEADER_CHAIN in msg.headers or HEADER_CHORD in msg.headers:
            after_finish(self.workflows, msg, EventKind.REVOKED, fields)
        return True

    def revoke_applies(self, entry: list[Any], record: TaskRecord) -> bool:
        """A revoke counts when it was signed or carried the task's token."""
        if entry[0] < time.time():
            return False
        return bool(entry[2]) or codec.token_matches(entry[1], record.message.token_digest)

    # -- introspection ----------
    def inspect(self, what: str) -> Any:
        w = self.state
        if what == "registered":
            return sorted(w.app.tasks)
        if what == "reserved":
            return self._remote().reserved()
        if what == "revoked":
            return self._remote().revoked()
        if what == "active":
            return [r.summary() for r in w.records.values() if r.slot is not None]
        if what == "tasks":
            running = [r.summary() for r in w.records.values()]
            recent = [r.summary() for r in list(w.finished.values())[-50:]]
            return running + recent
        return w.stats()


def addressed_to(data: Any, hostname: str) -> bool:
    """False when a worker request names a ``destination`` list without ``hostname``
    (Celery's ``destination=``: the others stay silent)."""
    destination = data.get("destination") if isinstance(data, dict) else None
    return not isinstance(destination, list) or hostname in destination

