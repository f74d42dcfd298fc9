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
  without holding the caller's thread).

Error codes of the reply: ``payload_too_large``, ``bad_json``,
``bad_command``, ``unknown_command``, ``bad_args``, the code of an optional
verifier's refusal (``signature_missing``, ``untrusted_key``,
``signature_invalid``, ``stale_command``: see
:func:`edge_agent.control.command_verifier`), the ``code`` of any
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
from typing import Any, Callable, Protocol

from pydantic import BaseModel, ValidationError

from edge_agent.comms.commands import TOKEN_RE, Envelope
from edge_agent.errors import CommandError, EdgeAgentError

log = logging.getLogger(__name__)

DEFAULT_MAX_PAYLOAD = 256 * 1024
DEFAULT_MEMORY = 1024

Reply = dict[str, Any]
EventSink = Callable[[dict[str, Any]], None]
Verifier = Callable[[Envelope, dict[str, Any]], None]  # (the command, the JSON object it was parsed from)



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
    copy can still run.
    """

    def __init__(
        self,
        *,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        memory: int = DEFAULT_MEMORY,
        events: EventSink | None = None,
        verifier: Verifier | None = None,
    ) -> None:
        if max_payload < 1 or memory < 1:
            raise ValueError("max_payload and memory must be positive")
        self.max_payload = max_payload
        self.memory = memory
        self._events = events
        self._verifier = verifier
        self._routes: dict[str, _Route] = {}
        self._replies: OrderedDict[str, Reply] = OrderedDict()  # completed, LRU order
        self._running: dict[str, _Pending] = {}
        self._lock = threading.Lock()

    # -- the table --------------------------------------------------------------

    def register(self, name: str, args_model: type[BaseModel], handler: Handler) -> None:
        """Route command ``name`` to ``handler(args, ctx)`` after validating
        ``args`` with ``args_model``. Registering a name twice is a mistake."""
        if not isinstance(name, str) or not name:
            raise ValueError("a command name must be a non-empty string")
        with self._lock:
            if name in self._routes:
                raise ValueError(f"command {name!r} is already registered")
            self._routes[name] = _Route(args_model, handler)

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

        with self._lock:
            earlier = self._replies.get(envelope.id)
            running = self._running.get(envelope.id)
            if earlier is not None:
                self._replies.move_to_end(envelope.id)
            elif running is None:
                pending = self._running[envelope.id] = _Pending()
            elif later is not None:
                running.later.append(later)
                log.info("command %s on %s is a repeat of one still running: its reply follows", envelope.id, origin)
                return None
        if earlier is not None or running is not None:
            log.info("command %s on %s is a repeat: answering with the first reply", envelope.id, origin)
            if running is not None:
                running.done.wait()
                assert running.reply is not None
                return running.reply
            assert earlier is not None
            return earlier

        reply: Reply | None = None
        try:
            reply = self._execute(envelope, origin)
            return reply
        finally:
            # Even a BaseException (KeyboardInterrupt) must release the waiters.
            final = reply or error_reply(envelope.id, "internal_error", "the command was interrupted")
            pending.reply = final
            with self._lock:
                self._replies[envelope.id] = final
                del self._running[envelope.id]
                while len(self._replies) > self.memory:
                    self._replies.popitem(last=False)
                waiting = list(pending.later)
            pending.done.set()
            for answer in waiting:
                try:
                    answer(final)
                except Exception:
                    log.exception("command %s: answering a repeat failed", envelope.id)

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

    def _execute(self, envelope: Envelope, origin: str) -> Reply:
        with self._lock:
            route = self._routes.get(envelope.cmd)
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
            id=envelope.id, cmd=envelope.cmd, origin=origin, emit_event=self._emitter(envelope.id)
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

    def _emitter(self, cmd_id: str) -> Callable[..., None]:
        sink = self._events

        def emit_event(event: str, **fields: Any) -> None:
            message = {"ts": time.time(), "id": cmd_id, "event": event, **fields}
            if sink is None:
                log.info("event (no sink): %s", message)
                return
            try:
                sink(message)
            except Exception:
                log.exception("could not publish event %s of command %s", event, cmd_id)

        return emit_event
