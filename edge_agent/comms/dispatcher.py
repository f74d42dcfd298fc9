"""The command dispatcher (CONTRACT §3): one payload in, exactly one reply out.

The MQTT transport does not interpret commands (STYLE: Frigate's
``comms/dispatcher.py``): it hands the raw payload and the topic it came on
to :meth:`Dispatcher.handle` and publishes whatever comes back on
``P/D/reply``. Everything between is here:

* parsing and validating the envelope and the command's arguments
  (:mod:`edge_agent.comms.commands`), turning each problem into an error
  reply with a stable code, never an exception;
* a table of handlers, ``register(name, args_model, handler)``;
* at-most-once execution per command ``id``: the console retries, QoS 1
  redelivers, and a device in a group also receives ``P/all/cmd`` copies, yet
  a deploy must not run twice. Replies are remembered in a bounded LRU; a
  repeat that arrives while the first is still running gets the same reply
  when the first ends (by waiting for it, or, given a ``later`` callback,
  without holding the caller's thread);
* with a :class:`~edge_agent.comms.journal.CommandJournal`, the same across
  restarts for the commands registered ``durable`` and for every signed
  command: each is written down before it runs and its reply before it is
  sent, and :meth:`Dispatcher.recover` answers, once, those an earlier run
  took and never answered (``interrupted``, or their outcome).

Error codes of the reply: ``payload_too_large``, ``bad_json``,
``bad_command``, ``unknown_command``, ``bad_args``, the code of an optional
verifier's refusal (``signature_missing``, ``untrusted_key``,
``signature_invalid``, ``stale_command``: see
:func:`edge_agent.comms.handlers.command_verifier`), the journal's
(``stale_command`` for a signed command older than its horizon,
``replayed_command`` for a signed id whose first reply is no longer kept,
``disk_full``/``store_write_failed`` when a command cannot be written down,
``interrupted`` for a command a restart cut short), the ``code`` of any
:class:`~edge_agent.errors.EdgeAgentError` a handler raises, and
``internal_error`` for anything else (logged with its traceback).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

from pydantic import BaseModel, ValidationError

from edge_agent.comms.commands import TOKEN_RE, Envelope
from edge_agent.errors import CommandError, EdgeAgentError

if TYPE_CHECKING:
    from edge_agent.comms.journal import CommandJournal, Entry

log = logging.getLogger(__name__)

DEFAULT_MAX_PAYLOAD = 256 * 1024
DEFAULT_MEMORY = 1024

Reply = dict[str, Any]
EventSink = Callable[[dict[str, Any]], None]
Verifier = Callable[[Envelope, dict[str, Any]], None]  # (the command, the JSON object it was parsed from)
Resolver = Callable[["Entry"], dict[str, Any]]  # an interrupted command -> its result, or raises its error


@dataclass(frozen=True)
class CommandContext:
    """What a handler knows about the command besides its arguments.

    ``emit_event(event, **fields)`` publishes a progress event
    ``{"ts", "id", "event", **fields}`` (CONTRACT: ``P/D/events``); a failure
    to publish it is logged, never raised into the handler, because a
    deploy must not fail for want of a progress message.
    """

    id: str
    cmd: str
    origin: str
    emit_event: Callable[..., None] = field(repr=False)


class Handler(Protocol):
    def __call__(self, args: Any, ctx: CommandContext) -> dict[str, Any] | BaseModel | None: ...


@dataclass(frozen=True)
class _Route:
    args_model: type[BaseModel]
    handler: Handler
    durable: bool = False


class _Pending:
    """A command being executed; repeats of its id wait on ``done`` or are
    answered by the ``later`` callbacks when it ends."""

    __slots__ = ("done", "reply", "later")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.reply: Reply | None = None
        self.later: list[Callable[[Reply], None]] = []


class _Refused(CommandError):
    """A payload refused before any handler ran; ``cmd_id`` when readable."""

    def __init__(self, message: str, *, code: str, cmd_id: str | None = None) -> None:
        super().__init__(message, code=code)
        self.cmd_id = cmd_id


def ok_reply(cmd_id: str | None, result: dict[str, Any]) -> Reply:
    return {"id": cmd_id, "ok": True, "result": result}


def error_reply(cmd_id: str | None, code: str, message: str) -> Reply:
    return {"id": cmd_id, "ok": False, "error": {"code": code, "message": message}}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def readable_id(raw: bytes, max_payload: int) -> str | None:
    """The ``id`` of a command, when the dispatcher would read one from it:
    within ``max_payload``, UTF-8 JSON (no NaN), an object, a valid token.
    For answering a command that will not be run (``busy``) under its id."""
    if len(raw) > max_payload:
        return None
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    cmd_id = data.get("id") if isinstance(data, dict) else None
    return cmd_id if isinstance(cmd_id, str) and TOKEN_RE.fullmatch(cmd_id) else None


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """Every problem as ``field: message``, joined by ``; `` (for a person)."""
    problems = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        where = f"{prefix}{loc}" if loc else (prefix.rstrip(".") or "(command)")
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        elif message.startswith("Value error, "):
            message = message[len("Value error, "):]
        problems.append(f"{where}: {message}")
    return "; ".join(problems)


class Dispatcher:
    """Maps command names to handlers and turns every payload into one reply.

    Thread-safety: :meth:`handle` may be called from any number of threads at
    once (the caller should not call it on paho's network thread, since a
    deploy takes minutes); handlers for different ids then run concurrently,
    so a handler guards its own shared state. :meth:`register` may be called
    at any time. ``events`` (the sink for :attr:`CommandContext.emit_event`)
    is called from the handler's thread.

    ``memory`` bounds how many completed replies are remembered for
    de-duplication; commands still running are always remembered.
    ``verifier(envelope, data)`` (``data``: the JSON object as received, so a
    signature can be checked over the values the sender signed), when given, runs before anything else
    about a well-formed command and raises an
    :class:`~edge_agent.errors.EdgeAgentError` (e.g. ``bad_signature``) to
    refuse it; a refused command is not remembered, so a correctly signed
    copy can still run. Every command that passes a verifier counts as
    signed: its ``ts`` goes to the journal.

    ``journal`` (a :class:`~edge_agent.comms.journal.CommandJournal`), when
    given, makes the memory of ``durable`` commands and of signed commands
    survive a restart; the dispatcher does not close it (its owner may hand
    it to the next dispatcher, after a reload).
    """

    def __init__(
        self,
        *,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        memory: int = DEFAULT_MEMORY,
        events: EventSink | None = None,
        verifier: Verifier | None = None,
        journal: "CommandJournal | None" = None,
    ) -> None:
        if max_payload < 1 or memory < 1:
            raise ValueError("max_payload and memory must be positive")
        self.max_payload = max_payload
        self.memory = memory
        self._events = events
        self._verifier = verifier
        self._journal = journal
        self._routes: dict[str, _Route] = {}
        self._replies: OrderedDict[str, Reply] = OrderedDict()  # completed, LRU order
        self._running: dict[str, _Pending] = {}
        self._lock = threading.Lock()

    # -- the table --------------------------------------------------------------

    def register(self, name: str, args_model: type[BaseModel], handler: Handler, *, durable: bool = False) -> None:
        """Route command ``name`` to ``handler(args, ctx)`` after validating
        ``args`` with ``args_model``. ``durable``: the command changes the
        device, so with a journal it is written down before it runs and
        answered after a crash (see :meth:`recover`). Registering a name twice
        is a mistake."""
        if not isinstance(name, str) or not name:
            raise ValueError("a command name must be a non-empty string")
        with self._lock:
            if name in self._routes:
                raise ValueError(f"command {name!r} is already registered")
            self._routes[name] = _Route(args_model, handler, durable)

    @property
    def commands(self) -> list[str]:
        with self._lock:
            return sorted(self._routes)

    # -- one payload -> one reply ---------------------------------------------

    def handle(
        self,
        payload: bytes | bytearray | memoryview | str,
        origin: str,
        *,
        later: Callable[[Reply], None] | None = None,
    ) -> Reply | None:
        """Execute the command in ``payload`` (received on topic ``origin``)
        unless its id was seen before, and return the reply to publish.

        A repeat of a command still running waits for it and returns its
        reply; with ``later``, it returns None at once instead and
        ``later(reply)`` is called (on the thread running the first) when the
        first ends, so that a console asking again does not hold a worker
        for the length of a deploy. Without ``later`` the result is never
        None. Never raises: every failure is an error reply.
        """
        raw = payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)
        try:
            envelope, data = self._parse(raw)
        except _Refused as exc:
            log.warning("command %s on %s refused (%s): %s", exc.cmd_id or "(no id)", origin, exc.code, exc.message)
            return error_reply(exc.cmd_id, exc.code, exc.message)

        if self._verifier is not None:
            try:
                self._verifier(envelope, data)
            except EdgeAgentError as exc:
                log.warning("command %s on %s refused (%s): %s", envelope.id, origin, exc.code, exc.message)
                return error_reply(envelope.id, exc.code, exc.message)
            except Exception:
                log.exception("command %s on %s: the signature verifier failed", envelope.id, origin)
                return error_reply(envelope.id, "internal_error", "the signature check failed unexpectedly")
        signed_ts = envelope.ts if self._verifier is not None else None

        journal = self._journal
        with self._lock:
            route = self._routes.get(envelope.cmd)
            known = envelope.id in self._replies or envelope.id in self._running
        # The journal is read without our lock held: its writes wait for the
        # disk, and a repeat answered from memory must not wait for them.
        stored = journal.lookup(envelope.id) if journal is not None and not known else None
        with self._lock:
            earlier = self._replies.get(envelope.id)
            running = self._running.get(envelope.id)
            if earlier is None and running is None and stored is not None:
                if stored.state != "running":
                    earlier = self._remember(envelope.id, _stored_reply(stored))
                elif not stored.here:  # left by an earlier run: recover() answers it
                    earlier = _stored_reply(stored)
            else:
                stored = None  # answered from memory
            if earlier is not None and envelope.id in self._replies:
                self._replies.move_to_end(envelope.id)
            elif earlier is None and running is None and stored is None:
                pending = self._running[envelope.id] = _Pending()
            elif earlier is None and running is not None and later is not None:
                running.later.append(later)
                log.info("command %s on %s is a repeat of one still running: its reply follows", envelope.id, origin)
                return None
        if earlier is not None or running is not None or stored is not None:
            log.info("command %s on %s is a repeat: answering with the first reply", envelope.id, origin)
            if running is not None:
                running.done.wait()
                assert running.reply is not None
                return running.reply
            if earlier is not None:
                return earlier
            assert stored is not None and journal is not None  # running in this process, for another dispatcher
            return self._await_journal(journal, envelope.id, later)

        journaled = journal is not None and (signed_ts is not None or (route is not None and route.durable))
        reply: Reply | None = None
        remember = True
        try:
            if journaled:
                assert journal is not None
                try:
                    journal.begin(envelope.id, envelope.cmd,
                                  envelope.args if route is not None and route.durable else None,
                                  origin=origin, signed_ts=signed_ts)
                except EdgeAgentError as exc:
                    # Not written down, so not run, and not remembered: the
                    # same id may run once the journal can be written again.
                    log.warning("command %s on %s refused (%s): %s", envelope.id, origin, exc.code, exc.message)
                    remember = False
                    reply = error_reply(envelope.id, exc.code, exc.message)
                    return reply
            reply = self._execute(envelope, origin, route, journaled)
            return reply
        finally:
            # Even a BaseException (KeyboardInterrupt) must release the waiters.
            final = reply or error_reply(envelope.id, "internal_error", "the command was interrupted")
            if journaled and remember:
                assert journal is not None
                journal.finish(envelope.id, final)  # on the disk before anyone sends it
            pending.reply = final
            with self._lock:
                del self._running[envelope.id]
                if remember:
                    self._remember(envelope.id, final)
                waiting = list(pending.later)
            pending.done.set()
            for answer in waiting:
                try:
                    answer(final)
                except Exception:
                    log.exception("command %s: answering a repeat failed", envelope.id)

    def _remember(self, cmd_id: str, reply: Reply) -> Reply:
        """Keep ``reply`` in the LRU (the caller holds the lock)."""
        self._replies[cmd_id] = reply
        self._replies.move_to_end(cmd_id)
        while len(self._replies) > self.memory:
            self._replies.popitem(last=False)
        return reply

    def _await_journal(self, journal: "CommandJournal", cmd_id: str,
                       later: Callable[[Reply], None] | None) -> Reply | None:
        """A repeat of a command another dispatcher of this process still runs
        (the MQTT plane was restarted by a reload meanwhile)."""
        if later is not None and journal.wait(cmd_id, later):
            return None
        box: list[Reply] = []
        done = threading.Event()
        if journal.wait(cmd_id, lambda r: (box.append(r), done.set())):
            done.wait()
            return box[0]
        entry = journal.lookup(cmd_id)  # it ended meanwhile
        if entry is not None and entry.state != "running":
            return _stored_reply(entry)
        return error_reply(cmd_id, "internal_error", "the first run of this command ended without a reply")

    def recover(self, resolve: Resolver, send: Callable[[Reply], None]) -> int:
        """Answer, once, every command an earlier run of the agent took (it
        is in the journal) and never answered: ``resolve(entry)`` returns the
        result of one whose outcome is known (it had in fact completed) or
        raises an :class:`~edge_agent.errors.EdgeAgentError` (``interrupted``)
        saying what the device looks like now. Each reply goes into the
        journal, so a repeat of the id gets it too, then to ``send`` (the
        outbox, which keeps it on disk while the broker is away, and calls
        :meth:`delivered`); a crash between the two sends it at the next
        start rather than never. The replies an earlier run wrote down but
        never saw delivered are sent again first. Call it once, before the
        first :meth:`handle`; returns how many were answered or sent again."""
        journal = self._journal
        if journal is None:
            return 0
        answered = 0
        for entry in journal.unsent():
            reply = _stored_reply(entry)
            log.warning("command %s (%s): its reply was written down by an earlier run that stopped before the "
                        "broker acknowledged it: sending it again", entry.id, entry.cmd)
            try:
                send(reply)
            except Exception:
                log.exception("command %s: could not send its reply; a repeat of the id gets it", entry.id)
            with self._lock:
                self._remember(entry.id, reply)
            answered += 1
        for entry in journal.interrupted():
            try:
                reply = ok_reply(entry.id, resolve(entry))
            except EdgeAgentError as exc:
                reply = error_reply(entry.id, exc.code, exc.message)
            except Exception:
                log.exception("command %s (%s): working out what an interrupted command did failed", entry.id,
                              entry.cmd)
                reply = error_reply(entry.id, "interrupted", f"the agent restarted while it ran this {entry.cmd}; "
                                    "what it changed could not be worked out (see the agent's log)")
            log.warning("command %s (%s) was taken by an earlier run of the agent and never answered: replying %s",
                        entry.id, entry.cmd, "ok" if reply["ok"] else reply["error"]["code"])
            journal.finish(entry.id, reply)
            with self._lock:
                self._remember(entry.id, reply)
            try:
                send(reply)
            except Exception:
                log.exception("command %s: could not send its reply; a repeat of the id gets it", entry.id)
            answered += 1
        return answered

    def delivered(self, cmd_id: str | None) -> None:
        """The reply to ``cmd_id`` reached the broker or the spool (the
        outbox says so): a journaled one need not be sent again after a
        crash. Any thread."""
        if self._journal is not None and cmd_id is not None:
            self._journal.delivered(cmd_id)

    def _parse(self, raw: bytes) -> tuple[Envelope, dict[str, Any]]:
        if len(raw) > self.max_payload:
            raise _Refused(
                f"the command is {len(raw)} bytes; the limit is {self.max_payload}", code="payload_too_large"
            )
        try:
            data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except UnicodeDecodeError:
            raise _Refused("the command is not UTF-8 text", code="bad_json") from None
        except (ValueError, RecursionError) as exc:
            raise _Refused(f"the command is not valid JSON: {exc}", code="bad_json") from None
        if not isinstance(data, dict):
            raise _Refused(f"a command is a JSON object, not {type(data).__name__}", code="bad_command")
        cmd_id = data.get("id")
        readable_id = cmd_id if isinstance(cmd_id, str) and TOKEN_RE.fullmatch(cmd_id) else None
        try:
            return Envelope.model_validate(data), data
        except ValidationError as exc:
            raise _Refused(f"bad command: {format_validation_error(exc)}", code="bad_command", cmd_id=readable_id) from None

    def _execute(self, envelope: Envelope, origin: str, route: _Route | None, journaled: bool) -> Reply:
        if route is None:
            known = ", ".join(self.commands) or "none"
            log.warning("command %s on %s: unknown command %r", envelope.id, origin, envelope.cmd)
            return error_reply(envelope.id, "unknown_command", f"unknown command {envelope.cmd!r} (known: {known})")
        try:
            args = route.args_model.model_validate(envelope.args)
        except ValidationError as exc:
            message = f"bad arguments for {envelope.cmd!r}: {format_validation_error(exc, 'args.')}"
            log.warning("command %s on %s: %s", envelope.id, origin, message)
            return error_reply(envelope.id, "bad_args", message)

        ctx = CommandContext(
            id=envelope.id, cmd=envelope.cmd, origin=origin, emit_event=self._emitter(envelope.id, journaled)
        )
        started = time.monotonic()
        log.info("command %s on %s: %s", envelope.id, origin, envelope.cmd)
        try:
            result = route.handler(args, ctx)
            if result is None:
                result = {}
            elif isinstance(result, BaseModel):
                result = result.model_dump(mode="json")
            if not isinstance(result, dict):
                raise TypeError(f"handler for {envelope.cmd!r} returned {type(result).__name__}, not a dict")
            json.dumps(result)  # the reply must be publishable: fail here, not in the publisher
        except EdgeAgentError as exc:
            log.warning("command %s (%s) failed (%s): %s", envelope.id, envelope.cmd, exc.code, exc.message)
            return error_reply(envelope.id, exc.code, exc.message)
        except Exception as exc:
            log.exception("command %s (%s) failed unexpectedly", envelope.id, envelope.cmd)
            return error_reply(envelope.id, "internal_error", f"{envelope.cmd} failed unexpectedly: {type(exc).__name__}")
        log.info("command %s (%s) done in %.3f s", envelope.id, envelope.cmd, time.monotonic() - started)
        return ok_reply(envelope.id, result)

    def _emitter(self, cmd_id: str, journaled: bool = False) -> Callable[..., None]:
        sink = self._events
        journal = self._journal if journaled else None
        noted: list[str] = []

        def emit_event(event: str, **fields: Any) -> None:
            step = fields.get("step")
            if journal is not None and isinstance(step, str) and step not in noted[-1:]:
                noted.append(step)
                journal.note(cmd_id, step)  # said in its answer, should the agent die now
            message = {"ts": time.time(), "id": cmd_id, "event": event, **fields}
            if sink is None:
                log.info("event (no sink): %s", message)
                return
            try:
                sink(message)
            except Exception:
                log.exception("could not publish event %s of command %s", event, cmd_id)

        return emit_event


def _stored_reply(entry: "Entry") -> Reply:
    """The reply a repeat of a journaled command gets: its first reply, or,
    when that is no longer kept (a signed command, beyond ``memory``),
    ``replayed_command``; ``interrupted`` for one an earlier run left
    running and :meth:`Dispatcher.recover` has not answered yet."""
    if entry.reply is not None:
        return entry.reply
    if entry.state == "running":
        return error_reply(entry.id, "interrupted", f"the agent restarted while it ran this {entry.cmd}; its "
                           "outcome is being worked out and will be sent")
    return error_reply(entry.id, "replayed_command",
                       f"command {entry.id} ({entry.cmd}) has already run on this device and a command id runs only "
                       "once; its reply is no longer kept (only the newest commands.memory are)")
