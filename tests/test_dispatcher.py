"""The command dispatcher: every payload, however broken, gets exactly one
reply with a stable error code, and no command id is ever executed twice."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from edge_agent.comms.commands import COMMAND_ARGS, DeployArgs, NoArgs, SetArgs
from edge_agent.comms.dispatcher import CommandContext, Dispatcher
from edge_agent.errors import EdgeAgentError, ModelNotAvailable
from waiting import let_time_pass

SHA = "ab" * 32
ORIGIN = "edge/cam-01/cmd"


def cmd(cmd_id: Any, name: str, args: Any = None, **extra: Any) -> bytes:
    message: dict[str, Any] = {"id": cmd_id, "cmd": name, **extra}
    if args is not None:
        message["args"] = args
    return json.dumps(message).encode()


class Recorder:
    """A handler that counts its calls and records what it was given."""

    def __init__(self, result: Any = None) -> None:
        self.calls: list[tuple[Any, CommandContext]] = []
        self.result = result
        self.lock = threading.Lock()

    def __call__(self, args: Any, ctx: CommandContext) -> Any:
        with self.lock:
            self.calls.append((args, ctx))
        return self.result


@pytest.fixture
def events() -> list[dict[str, Any]]:
    return []


@pytest.fixture
def dispatcher(events: list[dict[str, Any]]) -> Dispatcher:
    d = Dispatcher(max_payload=4096, memory=8, events=events.append)
    d.register("ping", NoArgs, lambda args, ctx: {"pong": True})
    return d


def test_ping_replies_pong(dispatcher: Dispatcher) -> None:
    assert dispatcher.handle(cmd("c1", "ping", {}), ORIGIN) == {"id": "c1", "ok": True, "result": {"pong": True}}


def test_args_may_be_left_out_for_a_command_without_arguments(dispatcher: Dispatcher) -> None:
    assert dispatcher.handle(cmd("c1", "ping"), ORIGIN)["ok"] is True


@pytest.mark.parametrize(
    "payload, code",
    [
        (b"{not json", "bad_json"),
        (b"\xff\xfe", "bad_json"),
        (b'{"id": "x", "cmd": "ping", "args": {"a": NaN}}', "bad_json"),
        (b"[1, 2]", "bad_command"),
        (b'"ping"', "bad_command"),
        (b"{}", "bad_command"),
    ],
)
def test_unreadable_payloads_get_an_error_with_a_null_id(dispatcher: Dispatcher, payload: bytes, code: str) -> None:
    """The console must be able to tell 'your message was garbage' apart
    from a command's failure; the agent keeps running either way."""
    reply = dispatcher.handle(payload, ORIGIN)
    assert reply["ok"] is False and reply["id"] is None
    assert reply["error"]["code"] == code
    assert reply["error"]["message"]


@pytest.mark.parametrize(
    "message, field",
    [
        ({"id": "c1", "args": {}}, "cmd"),
        ({"id": "c1", "cmd": "ping", "args": []}, "args"),
        ({"id": "c1", "cmd": "ping", "colour": "red"}, "colour"),
        ({"id": "c1", "cmd": 5}, "cmd"),
    ],
)
def test_a_readable_id_is_echoed_in_a_bad_command_reply(dispatcher: Dispatcher, message: dict, field: str) -> None:
    reply = dispatcher.handle(json.dumps(message).encode(), ORIGIN)
    assert reply["id"] == "c1"
    assert reply["error"]["code"] == "bad_command"
    assert field in reply["error"]["message"]


@pytest.mark.parametrize("bad_id", [5, None, "", "has space", "a/b", "x" * 200])
def test_an_unusable_id_is_a_bad_command_with_null_id(dispatcher: Dispatcher, bad_id: Any) -> None:
    reply = dispatcher.handle(cmd(bad_id, "ping"), ORIGIN)
    assert reply == {"id": None, "ok": False, "error": reply["error"]}
    assert reply["error"]["code"] == "bad_command"
    assert "id" in reply["error"]["message"]


def test_payload_too_large_is_refused_before_parsing(dispatcher: Dispatcher) -> None:
    payload = cmd("big", "ping", {"pad": "x" * 5000})
    reply = dispatcher.handle(payload, ORIGIN)
    assert reply["error"]["code"] == "payload_too_large"
    assert reply["id"] is None
    assert "4096" in reply["error"]["message"]


def test_unknown_command_names_the_known_ones(dispatcher: Dispatcher) -> None:
    reply = dispatcher.handle(cmd("c1", "reboot"), ORIGIN)
    assert reply["id"] == "c1"
    assert reply["error"]["code"] == "unknown_command"
    assert "'reboot'" in reply["error"]["message"] and "ping" in reply["error"]["message"]


def test_bad_args_lists_every_problem() -> None:
    """One round trip tells the operator everything that is wrong."""
    d = Dispatcher()
    handler = Recorder()
    d.register("deploy", DeployArgs, handler)
    reply = d.handle(
        cmd("d1", "deploy", {"model": "m", "version": "3", "sha256": "nope", "size": 10, "treshold": 1}), ORIGIN
    )
    assert reply["error"]["code"] == "bad_args"
    message = reply["error"]["message"]
    for problem in ("args.version", "args.sha256", "args.treshold: unknown field"):
        assert problem in message, message
    assert handler.calls == []


def test_handler_gets_validated_args_and_context(events: list[dict[str, Any]]) -> None:
    d = Dispatcher(events=events.append)

    def deploy(args: DeployArgs, ctx: CommandContext) -> dict[str, Any]:
        ctx.emit_event("downloading", model=args.model, version=args.version, done=0)
        return {"model": args.model, "version": args.version, "activate": args.activate}

    d.register("deploy", DeployArgs, deploy)
    reply = d.handle(
        cmd("d1", "deploy", {"model": "m", "version": 3, "url": "https://x.example/m.tar", "sha256": SHA.upper(), "size": 10}),
        "edge/groups/lobby/cmd",
    )
    assert reply == {"id": "d1", "ok": True, "result": {"model": "m", "version": 3, "activate": True}}
    assert len(events) == 1
    event = events[0]
    assert event["id"] == "d1" and event["event"] == "downloading" and event["model"] == "m"
    assert isinstance(event["ts"], float)


def test_context_carries_id_and_origin() -> None:
    d = Dispatcher()
    handler = Recorder()
    d.register("status", NoArgs, handler)
    d.handle(cmd("s1", "status"), "edge/all/cmd")
    (args, ctx), = handler.calls
    assert isinstance(args, NoArgs)
    assert (ctx.id, ctx.cmd, ctx.origin) == ("s1", "status", "edge/all/cmd")


def test_edge_agent_error_from_a_handler_keeps_its_code() -> None:
    d = Dispatcher()

    def activate(args: Any, ctx: CommandContext) -> None:
        raise ModelNotAvailable("no version 9 of m")

    d.register("activate", COMMAND_ARGS["activate"], activate)
    reply = d.handle(cmd("a1", "activate", {"model": "m", "version": 9}), ORIGIN)
    assert reply == {"id": "a1", "ok": False, "error": {"code": "model_not_available", "message": "no version 9 of m"}}


def test_unexpected_exception_is_internal_error_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    d = Dispatcher()
    d.register("ping", NoArgs, lambda args, ctx: 1 / 0)
    reply = d.handle(cmd("p1", "ping"), ORIGIN)
    assert reply["error"]["code"] == "internal_error"
    assert "ZeroDivisionError" in caplog.text and "Traceback" in caplog.text
    # ...and the dispatcher still works.
    d.register("status", NoArgs, lambda args, ctx: {"state": "online"})
    assert d.handle(cmd("s1", "status"), ORIGIN)["ok"] is True


@pytest.mark.parametrize("result", ["a string", {"when": object()}])
def test_a_handler_result_that_cannot_be_published_is_internal_error(result: Any) -> None:
    d = Dispatcher()
    d.register("ping", NoArgs, lambda args, ctx: result)
    assert d.handle(cmd("p1", "ping"), ORIGIN)["error"]["code"] == "internal_error"


def test_a_failing_event_sink_does_not_fail_the_command(caplog: pytest.LogCaptureFixture) -> None:
    def sink(message: dict[str, Any]) -> None:
        raise ConnectionError("broker away")

    d = Dispatcher(events=sink)

    def handler(args: Any, ctx: CommandContext) -> dict[str, Any]:
        ctx.emit_event("started")
        return {"done": True}

    d.register("ping", NoArgs, handler)
    assert d.handle(cmd("p1", "ping"), ORIGIN)["ok"] is True
    assert "could not publish event started" in caplog.text


def test_a_repeated_id_is_answered_not_executed() -> None:
    """QoS 1 redelivery, a console retry or the same command on P/all/cmd and
    P/groups/g/cmd must not deploy twice."""
    d = Dispatcher()
    handler = Recorder({"n": 1})
    d.register("ping", NoArgs, handler)
    first = d.handle(cmd("same", "ping"), "edge/all/cmd")
    second = d.handle(cmd("same", "ping"), "edge/groups/lobby/cmd")
    assert first == second == {"id": "same", "ok": True, "result": {"n": 1}}
    assert len(handler.calls) == 1


def test_a_failed_command_is_not_retried_under_the_same_id() -> None:
    d = Dispatcher()
    calls = []

    def flaky(args: Any, ctx: CommandContext) -> None:
        calls.append(1)
        raise EdgeAgentError("busy", code="busy")

    d.register("ping", NoArgs, flaky)
    assert d.handle(cmd("f1", "ping"), ORIGIN) == d.handle(cmd("f1", "ping"), ORIGIN)
    assert len(calls) == 1


def _slow_ping() -> tuple[Dispatcher, threading.Event, threading.Event, list[int]]:
    """A dispatcher whose ``ping`` runs until ``release`` is set (``started``
    once it runs; ``calls`` counts executions)."""
    d = Dispatcher()
    started, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def slow(args: Any, ctx: CommandContext) -> dict[str, Any]:
        calls.append(1)
        started.set()
        release.wait(5)
        return {"finished": True}

    d.register("ping", NoArgs, slow)
    return d, started, release, calls


def test_a_repeat_during_execution_waits_for_the_first_reply() -> None:
    d, started, release, calls = _slow_ping()
    replies: list[dict[str, Any]] = []
    first = threading.Thread(target=lambda: replies.append(d.handle(cmd("slow", "ping"), ORIGIN)))
    first.start()
    assert started.wait(5)
    second = threading.Thread(target=lambda: replies.append(d.handle(cmd("slow", "ping"), ORIGIN)))
    second.start()
    let_time_pass(0.1, "the repeat would have been answered by now, had it not waited")
    assert second.is_alive(), "the repeat must wait for the first execution"
    release.set()
    first.join(5)
    second.join(5)
    assert len(calls) == 1
    assert replies == [{"id": "slow", "ok": True, "result": {"finished": True}}] * 2


def test_a_repeat_during_execution_can_be_answered_later_without_waiting() -> None:
    """The agent's command workers pass ``later``: a console asking again
    for a deploy still running must not hold a worker (other commands would
    queue behind it) yet still gets its one reply, when the deploy ends."""
    d, started, release, calls = _slow_ping()
    replies: list[dict[str, Any] | None] = []
    later: list[tuple[dict[str, Any], str]] = []
    first = threading.Thread(target=lambda: replies.append(d.handle(cmd("slow", "ping"), ORIGIN)))
    first.start()
    assert started.wait(5)
    assert d.handle(cmd("slow", "ping"), ORIGIN, later=lambda r: later.append((r, threading.current_thread().name))) is None
    assert later == []
    release.set()
    first.join(5)
    assert len(calls) == 1
    expected = {"id": "slow", "ok": True, "result": {"finished": True}}
    assert replies == [expected]
    assert later == [(expected, first.name)]
    # Once finished, a repeat with ``later`` is answered at once, from memory.
    assert d.handle(cmd("slow", "ping"), ORIGIN, later=lambda r: later.append((r, "unused"))) == expected
    assert len(later) == 1


def test_memory_is_bounded_least_recently_used_first() -> None:
    d = Dispatcher(memory=3)
    handler = Recorder()
    d.register("ping", NoArgs, handler)
    for i in range(3):
        d.handle(cmd(f"c{i}", "ping"), ORIGIN)
    d.handle(cmd("c0", "ping"), ORIGIN)  # c0 becomes the most recent
    d.handle(cmd("c3", "ping"), ORIGIN)  # evicts c1
    assert len(handler.calls) == 4
    d.handle(cmd("c0", "ping"), ORIGIN)
    assert len(handler.calls) == 4, "c0 is still remembered"
    d.handle(cmd("c1", "ping"), ORIGIN)
    assert len(handler.calls) == 5, "c1 was forgotten, so it runs again"


def test_invalid_commands_with_an_id_are_remembered_too(dispatcher: Dispatcher) -> None:
    first = dispatcher.handle(cmd("u1", "reboot"), ORIGIN)
    dispatcher.register("reboot", NoArgs, lambda args, ctx: {"rebooting": True})
    assert dispatcher.handle(cmd("u1", "reboot"), ORIGIN) == first


def test_verifier_refusal_is_not_remembered() -> None:
    """A forged copy must not burn the id of the genuine command."""

    def verify(envelope: Any, data: dict) -> None:
        if envelope.sig != "good":
            raise EdgeAgentError("bad signature", code="bad_signature")

    d = Dispatcher(verifier=verify)
    handler = Recorder()
    d.register("ping", NoArgs, handler)
    assert d.handle(cmd("v1", "ping", sig="forged", ts=1.0), ORIGIN)["error"]["code"] == "bad_signature"
    assert d.handle(cmd("v1", "ping", sig="good", ts=1.0), ORIGIN)["ok"] is True
    assert len(handler.calls) == 1


def test_registering_twice_is_an_error(dispatcher: Dispatcher) -> None:
    with pytest.raises(ValueError, match="already registered"):
        dispatcher.register("ping", NoArgs, lambda args, ctx: None)


def test_reply_is_json_serialisable(dispatcher: Dispatcher) -> None:
    for payload in (cmd("c1", "ping"), b"junk", cmd("c2", "nope")):
        json.dumps(dispatcher.handle(payload, ORIGIN))


# -- the argument schemas ------------------------------------------------------


def _deploy(**over: Any) -> dict[str, Any]:
    base = {"model": "m", "version": 2, "url": "http://h/m.tar.gz", "sha256": SHA, "size": 100}
    base.update(over)
    return {k: v for k, v in base.items() if v is not ...}


@pytest.mark.parametrize(
    "args, problem",
    [
        (_deploy(url=..., transfer=...), "exactly one of 'url' and 'transfer'"),
        (_deploy(transfer="t1"), "exactly one of 'url' and 'transfer'"),
        (_deploy(url="ftp://h/m.tar"), "scheme 'ftp'"),
        (_deploy(url="http:///m.tar"), "no host"),
        (_deploy(version=0), "version"),
        (_deploy(version=2.0), "version"),
        (_deploy(version=True), "version"),
        (_deploy(size="100"), "size"),
        (_deploy(activate="false"), "activate"),
        (_deploy(model="../etc"), "model"),
    ],
)
def test_deploy_args_refuse(args: dict[str, Any], problem: str) -> None:
    d = Dispatcher()
    d.register("deploy", DeployArgs, Recorder())
    reply = d.handle(cmd("d", "deploy", args), ORIGIN)
    assert reply["error"]["code"] == "bad_args"
    assert problem in reply["error"]["message"], reply["error"]["message"]


def test_deploy_by_transfer_and_defaults() -> None:
    args = DeployArgs.model_validate(_deploy(url=..., transfer="tx-1", label="canary"))
    assert args.transfer == "tx-1" and args.url is None and args.activate is True and args.label == "canary"
    assert DeployArgs.model_validate(_deploy(url="file:///opt/m.tar")).url == "file:///opt/m.tar"


def test_set_args() -> None:
    args = SetArgs.model_validate({"source": "front", "fps": 2, "results": {"every": 5}})
    assert args.settings() == {"fps": 2.0, "results": {"every": 5}}
    for bad in (
        {"fps": 2},
        {"source": "a", "model": "b", "fps": 2},
        {"source": "a"},
        {"source": "a", "threshold": 1.5},
        {"source": "a", "results": {}},
        {"source": "a", "top_k": 0},
    ):
        with pytest.raises(ValueError):
            SetArgs.model_validate(bad)


def test_every_contract_command_has_a_schema() -> None:
    assert set(COMMAND_ARGS) == {"ping", "status", "deploy", "activate", "rollback", "remove", "set"}


def test_over_a_real_broker_one_reply_per_command(broker: Any) -> None:
    """The device subscribes to its own, its group's and the fleet's command
    topics; a console sends one deploy-like command to the group and to
    everyone: it runs once, and each delivery gets the same reply."""
    import queue
    import uuid

    from mqtt_helpers import connected

    prefix = f"edge-{uuid.uuid4().hex[:6]}"
    runs: list[str] = []
    d = Dispatcher()
    d.register("ping", NoArgs, lambda args, ctx: runs.append(ctx.origin) or {"pong": True})

    device, console = connected(broker.host, broker.port), connected(broker.host, broker.port)
    work: queue.Queue = queue.Queue()
    device.on_message = lambda c, u, m: work.put((m.topic, m.payload))  # never dispatch on paho's thread

    def worker() -> None:
        while (item := work.get()) is not None:
            reply = d.handle(item[1], item[0])
            device.publish(f"{prefix}/cam-01/reply", json.dumps(reply), qos=1)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    replies: list[dict[str, Any]] = []
    got_all = threading.Event()

    def on_reply(c: Any, u: Any, m: Any) -> None:
        replies.append(json.loads(m.payload))
        if len(replies) == 3:
            got_all.set()

    console.on_message = on_reply
    subscribed = threading.Event()
    console.on_subscribe = lambda *a: subscribed.set()
    console.subscribe(f"{prefix}/cam-01/reply", qos=1)
    assert subscribed.wait(5)
    subscribed.clear()
    device.on_subscribe = lambda *a: subscribed.set()
    device.subscribe([(f"{prefix}/cam-01/cmd", 1), (f"{prefix}/groups/lobby/cmd", 1), (f"{prefix}/all/cmd", 1)])
    assert subscribed.wait(5)
    try:
        console.publish(f"{prefix}/groups/lobby/cmd", cmd("deploy-7", "ping"), qos=1)
        console.publish(f"{prefix}/all/cmd", cmd("deploy-7", "ping"), qos=1)
        console.publish(f"{prefix}/cam-01/cmd", b"not json", qos=1)
        assert got_all.wait(5)
        assert len(runs) == 1
        assert replies[:2] == [{"id": "deploy-7", "ok": True, "result": {"pong": True}}] * 2
        assert replies[2]["error"]["code"] == "bad_json"
    finally:
        work.put(None)
        thread.join(5)
        for c in (device, console):
            c.disconnect()
            c.loop_stop()
