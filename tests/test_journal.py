"""The command journal: a command the agent took is answered exactly once,
even when the agent dies while running it, and a signed command runs once,
ever, even across restarts and beyond the ids kept in memory.

The first tests run the real agent (``edge-agent run`` as a subprocess)
against a real mosquitto and kill it with SIGKILL at a chosen step of a
command (``EDGE_AGENT_CRASH_AT``, as a power cut would); the others test the
journal and the dispatcher on a real SQLite file, with a real process killed
in the middle of a command, and with the wall clock moved by hand.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from edge_agent.bundles import sha256_file
from lifecycle_helpers import frames, make_bundle
from mqtt_helpers import AgentProcess, Client, Mosquitto, agent_config
from waiting import let_time_pass


def deploy_args(archive: Path, version: int, *, activate: bool = True) -> dict[str, Any]:
    return {"model": "clf", "version": version, "url": archive.resolve().as_uri(), "sha256": sha256_file(archive),
            "size": archive.stat().st_size, "activate": activate}


def run_agent(tmp: Path, broker: Mosquitto, prefix: str, v1: Path, cam: Path, client: Client, *,
              env: dict | None = None, extra: str = "", wait: bool = True) -> AgentProcess:
    """Start the agent ``dev1``; with ``wait``, return once it said ``online``
    (again: the statuses seen before do not count)."""
    cfg = agent_config(tmp, broker.host, broker.port, prefix=prefix, device="dev1", bundle=v1, frames=cam,
                       extra=extra)
    onlines = len([s for s in client.json("dev1/status") if s.get("state") == "online"])
    agent = AgentProcess(cfg, env=env)
    if wait:
        try:
            client.wait_for(lambda: len([s for s in client.json("dev1/status") if s.get("state") == "online"])
                            > onlines, 60)
        except AssertionError:
            agent.stop()
            raise AssertionError(agent.output()[-3000:])
    return agent


def replies(client: Client, cmd_id: str) -> list[dict]:
    return [r for r in client.json("dev1/reply") if r.get("id") == cmd_id]


def events(client: Client, cmd_id: str, name: str) -> list[dict]:
    return [e for e in client.json("dev1/events") if e.get("id") == cmd_id and e.get("event") == name]


@pytest.mark.integration
def test_a_deploy_interrupted_by_a_crash_is_answered_once_after_the_restart(tmp_path: Path) -> None:
    """The agent dies (SIGKILL) just after it activated the new version, before
    it replied. The broker is down when it comes back, so its answer must go
    through the spool. The console gets exactly one reply, ``interrupted``,
    saying what the store holds now; asking again gets the same reply and
    does not deploy again."""
    broker = Mosquitto(tmp_path / "broker", persistence=True)
    prefix = f"j{uuid.uuid4().hex[:6]}"
    v1 = make_bundle(tmp_path / "b", 1)
    v2 = make_bundle(tmp_path / "b", 2, archive=True)
    cam = frames(tmp_path / "frames")
    client = Client(broker.host, broker.port, [f"{prefix}/#"], client_id=f"{prefix}-console", persistent=True)
    agent = run_agent(tmp_path, broker, prefix, v1, cam, client, env={"EDGE_AGENT_CRASH_AT": "activate_after_state"})
    try:
        cid = client.command(f"{prefix}/dev1/cmd", "deploy", deploy_args(v2, 2))
        assert agent.proc.wait(60) == -signal.SIGKILL, agent.output()[-3000:]
        assert not replies(client, cid)
        broker.stop()
        agent = run_agent(tmp_path, broker, prefix, v1, cam, client, wait=False)
        # answered at once, into the spool, while the broker is away
        client.wait_for(lambda: f"command {cid} (deploy) was taken by an earlier run" in agent.output(), 60)
        broker.start()
        reply = client.reply(cid, timeout=60)
        assert reply["ok"] is False and reply["error"]["code"] == "interrupted", reply
        message = reply["error"]["message"]
        assert "restarted" in message and "activating" in message, message
        # v2 was on probation when the agent died, so the start went back to v1
        assert "serves version 1" in message and "version 2" in message, message
        let_time_pass(2.0, "a second reply would have arrived by now")
        assert len(replies(client, cid)) == 1, "answered once"
        # The console asks again: the same reply, and nothing runs again.
        client.command(f"{prefix}/dev1/cmd", "deploy", deploy_args(v2, 2), cmd_id=cid)
        assert client.reply(cid, index=1) == reply
        ping = client.command(f"{prefix}/dev1/cmd", "ping")
        client.reply(ping)
        assert len(replies(client, cid)) == 2
        assert agent.output().count(f"command {cid} on {prefix}/dev1/cmd: deploy") == 1, "the deploy ran again"
    finally:
        client.close()
        agent.stop()
        broker.stop()


@pytest.mark.integration
def test_a_reply_cut_short_by_a_crash_is_sent_at_the_restart_and_a_delivered_one_is_not(tmp_path: Path,
                                                                                          broker: Mosquitto) -> None:
    """The agent dies (SIGKILL) after it wrote a deploy's reply down and
    before the broker had it: the console gets that reply after the restart
    (before this, never). A reply the broker acknowledged is not sent
    again by the next restart."""
    prefix = f"j{uuid.uuid4().hex[:6]}"
    v1 = make_bundle(tmp_path / "b", 1)
    v2 = make_bundle(tmp_path / "b", 2, archive=True)
    v3 = make_bundle(tmp_path / "b", 3, archive=True)
    cam = frames(tmp_path / "frames")
    client = Client(broker.host, broker.port, [f"{prefix}/#"])
    agent = run_agent(tmp_path, broker, prefix, v1, cam, client, env={"EDGE_AGENT_CRASH_AT": "reply_recorded"})
    try:
        dep = client.command(f"{prefix}/dev1/cmd", "deploy", deploy_args(v2, 2, activate=False))
        assert agent.proc.wait(60) == -signal.SIGKILL, agent.output()[-3000:]
        assert not replies(client, dep)
        agent = run_agent(tmp_path, broker, prefix, v1, cam, client,
                          env={"EDGE_AGENT_CRASH_AT": "command_recorded@2"})
        reply = client.reply(dep, timeout=60)
        assert reply["ok"] is True and reply["result"]["version"] == 2, reply
        assert "its reply was written down by an earlier run" in agent.output()
        # This one is delivered; then the agent dies as the next command begins.
        dep3 = client.command(f"{prefix}/dev1/cmd", "deploy", deploy_args(v3, 3, activate=False))
        assert client.reply(dep3, timeout=60)["ok"] is True
        rm = client.command(f"{prefix}/dev1/cmd", "remove", {"model": "clf", "version": 3})
        assert agent.proc.wait(60) == -signal.SIGKILL, agent.output()[-3000:]
        agent = run_agent(tmp_path, broker, prefix, v1, cam, client)
        client.reply(rm, timeout=60)
        ping = client.command(f"{prefix}/dev1/cmd", "ping")
        client.reply(ping)
        assert len(replies(client, dep)) == 1 and len(replies(client, dep3)) == 1, agent.output()[-3000:]
        # (the log file holds the three runs)
        assert agent.output().count("its reply was written down by an earlier run") == 1, agent.output()[-3000:]
    finally:
        client.close()
        agent.stop()


@pytest.mark.integration
def test_a_command_that_completed_before_the_crash_is_answered_with_its_outcome(tmp_path: Path,
                                                                                broker: Mosquitto) -> None:
    """``remove`` had renamed the version away when the agent died: after the
    restart the version is gone, so the command did what it was asked and
    the reply says so (ok, marked ``recovered``)."""
    prefix = f"j{uuid.uuid4().hex[:6]}"
    v1 = make_bundle(tmp_path / "b", 1)
    v2 = make_bundle(tmp_path / "b", 2, archive=True)
    cam = frames(tmp_path / "frames")
    client = Client(broker.host, broker.port, [f"{prefix}/#"])
    agent = run_agent(tmp_path, broker, prefix, v1, cam, client, env={"EDGE_AGENT_CRASH_AT": "remove_renamed"})
    try:
        dep = client.command(f"{prefix}/dev1/cmd", "deploy", deploy_args(v2, 2, activate=False))
        assert client.reply(dep)["ok"] is True
        rm = client.command(f"{prefix}/dev1/cmd", "remove", {"model": "clf", "version": 2})
        assert agent.proc.wait(60) == -signal.SIGKILL, agent.output()[-3000:]
        agent = run_agent(tmp_path, broker, prefix, v1, cam, client)
        reply = client.reply(rm, timeout=60)
        assert reply["ok"] is True, reply
        assert reply["result"]["removed"] is True and reply["result"]["recovered"] is True
        let_time_pass(1.0, "a second reply would have arrived by now")
        assert len(replies(client, rm)) == 1
    finally:
        client.close()
        agent.stop()


@pytest.mark.integration
def test_a_signed_command_runs_once_ever_beyond_memory_and_across_restarts(tmp_path: Path, broker: Mosquitto) -> None:
    """A captured signed deploy, replayed after more commands than the
    agent keeps in memory (``commands.memory = 4``) and again after a
    restart, is answered with the first reply and never deploys again."""
    from edge_agent.bundles.signing import generate_keypair, load_private_key, sign_command

    prefix = f"j{uuid.uuid4().hex[:6]}"
    generate_keypair(tmp_path / "console.key", tmp_path / "console.pub")
    key = load_private_key(tmp_path / "console.key")
    v1 = make_bundle(tmp_path / "b", 1)
    v2 = make_bundle(tmp_path / "b", 2, archive=True)
    cam = frames(tmp_path / "frames")
    extra = f'[commands]\ntrusted_keys = ["{tmp_path / "console.pub"}"]\nmemory = 4\n'
    client = Client(broker.host, broker.port, [f"{prefix}/#"])
    topic = f"{prefix}/dev1/cmd"

    def signed(cmd_id: str, cmd: str, args: dict) -> bytes:
        ts = time.time()
        return json.dumps({"id": cmd_id, "cmd": cmd, "args": args, "ts": ts,
                           "sig": sign_command(key, cmd_id, cmd, args, ts)}).encode()

    def send(raw: bytes) -> None:
        client.client.publish(topic, raw, qos=1).wait_for_publish(10)

    agent = run_agent(tmp_path, broker, prefix, v1, cam, client, extra=extra)
    try:
        captured = signed("deploy-once", "deploy", deploy_args(v2, 2, activate=False))
        send(captured)
        first = client.reply("deploy-once")
        assert first["ok"] is True, first
        for i in range(6):  # more than the agent keeps in memory
            send(signed(f"p{i}", "ping", {}))
            assert client.reply(f"p{i}")["ok"] is True
        send(captured)  # a replay
        assert client.reply("deploy-once", index=1) == first
        assert agent.stop() == 0
        agent = run_agent(tmp_path, broker, prefix, v1, cam, client, extra=extra)
        send(captured)  # a replay after a restart
        assert client.reply("deploy-once", index=2) == first
        assert len(events(client, "deploy-once", "deploy_started")) == 1, "the deploy ran again"
    finally:
        client.close()
        agent.stop()


# ----------------------------------------------------------------- the journal itself


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def open_journal(path: Path, **kw: Any):
    from edge_agent.comms.journal import CommandJournal

    return CommandJournal(path, **kw)


def dispatcher_with(journal: Any, ran: list[str], **kw: Any):
    """A dispatcher whose ``activate`` is durable (it reports two steps) and
    whose ``ping`` is not; ``ran`` records what really ran."""
    from edge_agent.comms.commands import ActivateArgs, NoArgs
    from edge_agent.comms.dispatcher import Dispatcher

    d = Dispatcher(journal=journal, **kw)

    def activate(args: Any, ctx: Any) -> dict:
        ran.append(ctx.id)
        ctx.emit_event("deploy_progress", step="loading")
        ctx.emit_event("deploy_progress", step="activating")
        return {"version": args.version}

    d.register("activate", ActivateArgs, activate, durable=True)
    d.register("ping", NoArgs, lambda args, ctx: ran.append(ctx.id) or {"pong": True})
    return d


def cmd(cmd_id: str, name: str = "activate", **extra: Any) -> bytes:
    args = {"model": "clf", "version": 2} if name == "activate" else {}
    return json.dumps({"id": cmd_id, "cmd": name, "args": args, **extra}).encode()


def test_a_durable_reply_outlives_the_process_and_a_repeat_does_not_run_again(tmp_path: Path) -> None:
    """The console asks again after the agent restarted (its retry, or a
    session redelivery): it gets the first reply, and the command does not
    run twice; a read-only ``ping`` is not written down at all."""
    ran: list[str] = []
    j = open_journal(tmp_path / "j.db")
    first = dispatcher_with(j, ran).handle(cmd("a1"), "t")
    assert first == {"id": "a1", "ok": True, "result": {"version": 2}}
    dispatcher_with(j, ran).handle(cmd("p1", "ping"), "t")
    j.close()
    j = open_journal(tmp_path / "j.db")
    d = dispatcher_with(j, ran)
    assert d.handle(cmd("a1"), "t") == first
    assert ran == ["a1", "p1"]
    assert j.lookup("p1") is None and j.lookup("a1").step == "activating"
    j.close()


def test_a_process_killed_in_a_command_gets_it_answered_once_at_the_next_start(tmp_path: Path) -> None:
    """A real process dies (SIGKILL) right after it wrote the command down:
    the next start answers it once, with what the resolver makes of it, and
    a repeat gets that reply without running it."""
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_journal import dispatcher_with, open_journal, cmd
        from pathlib import Path
        d = dispatcher_with(open_journal(Path({str(tmp_path / "j.db")!r})), [])
        d.handle(cmd("dying"), "edge/dev1/cmd")
        print("not killed")
    """)
    proc = subprocess.run([sys.executable, "-c", script], env={**__import__("os").environ,
                          "EDGE_AGENT_CRASH_AT": "command_recorded"}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    from edge_agent.errors import EdgeAgentError

    seen: list[Any] = []
    sent: list[dict] = []

    def resolve(entry: Any) -> dict:
        seen.append(entry)
        raise EdgeAgentError("the agent restarted", code="interrupted")

    ran: list[str] = []
    j = open_journal(tmp_path / "j.db")
    d = dispatcher_with(j, ran)

    def send(reply: dict) -> None:  # as the outbox does once the broker acknowledged it
        sent.append(reply)
        d.delivered(reply["id"])

    assert d.recover(resolve, send) == 1
    assert [(e.id, e.cmd, e.args, e.origin) for e in seen] == [("dying", "activate", {"model": "clf", "version": 2},
                                                                  "edge/dev1/cmd")]
    assert sent == [{"id": "dying", "ok": False, "error": {"code": "interrupted", "message": "the agent restarted"}}]
    assert d.recover(resolve, send) == 0, "answered once"
    assert d.handle(cmd("dying"), "t") == sent[0] and ran == []
    j.close()
    j = open_journal(tmp_path / "j.db")  # and after another restart
    assert dispatcher_with(j, ran).recover(resolve, sent.append) == 0
    assert dispatcher_with(j, ran).handle(cmd("dying"), "t") == sent[0] and ran == []
    j.close()


def test_a_reply_written_down_but_never_delivered_is_sent_again_at_the_next_start(tmp_path: Path) -> None:
    """The process dies after it wrote a reply down and before the broker
    acknowledged it (seen once in 150 kills of the fault suite's R2): the
    next start sends that reply again; one that was delivered is not sent
    again, and a re-sent one is sent once more only if it was not delivered
    either."""
    ran: list[str] = []
    j = open_journal(tmp_path / "j.db")
    d = dispatcher_with(j, ran)
    lost = d.handle(cmd("lost"), "t")  # written down; the process "dies" before delivering it
    kept = d.handle(cmd("kept"), "t")
    d.delivered("kept")
    d.delivered("nobody")  # an id the journal does not await (a ping's): ignored
    j.close()
    j = open_journal(tmp_path / "j.db")
    d = dispatcher_with(j, ran)
    sent: list[dict] = []
    assert d.recover(lambda e: {}, sent.append) == 1
    assert sent == [lost]
    assert d.recover(lambda e: {}, sent.append) == 0, "once per start"
    assert d.handle(cmd("lost"), "t") == lost and d.handle(cmd("kept"), "t") == kept and ran == ["lost", "kept"]
    j.close()  # not delivered this time either: sent again at the next start
    j = open_journal(tmp_path / "j.db")
    d = dispatcher_with(j, ran)
    sent.clear()

    def send(reply: dict) -> None:
        sent.append(reply)
        d.delivered(reply["id"])

    assert d.recover(lambda e: {}, send) == 1 and sent == [lost]
    j.close()  # delivered: written down at close
    j = open_journal(tmp_path / "j.db")
    assert dispatcher_with(j, ran).recover(lambda e: {}, sent.append) == 0
    j.close()


def test_marking_a_reply_delivered_never_waits_for_a_commit(tmp_path: Path) -> None:
    """paho's network thread calls delivered(): it must not wait while the
    journal writes (here: the journal's lock held, as during an fsync)."""
    import threading

    j = open_journal(tmp_path / "j.db")
    dispatcher_with(j, []).handle(cmd("a1"), "t")
    with j._lock:  # a commit in progress
        marker = threading.Thread(target=j.delivered, args=("a1",))
        marker.start()
        marker.join(2.0)
        assert not marker.is_alive(), "delivered() waited for the journal's write"
    j.close()
    j = open_journal(tmp_path / "j.db")
    assert dispatcher_with(j, []).recover(lambda e: {}, lambda r: pytest.fail(f"sent again: {r}")) == 0
    j.close()


def test_a_journal_written_before_replies_were_tracked_sends_nothing_again(tmp_path: Path) -> None:
    """A journal from an older agent (no ``sent`` column) is upgraded in
    place, and its replies count as delivered."""
    import sqlite3

    ran: list[str] = []
    j = open_journal(tmp_path / "j.db")
    first = dispatcher_with(j, ran).handle(cmd("old"), "t")
    j.close()
    db = sqlite3.connect(tmp_path / "j.db")
    db.execute("ALTER TABLE commands DROP COLUMN sent")
    db.commit()
    db.close()
    j = open_journal(tmp_path / "j.db")
    d = dispatcher_with(j, ran)
    assert d.recover(lambda e: {}, lambda r: pytest.fail(f"sent again: {r}")) == 0
    assert d.handle(cmd("old"), "t") == first and ran == ["old"]
    j.close()


def test_a_repeat_while_another_dispatcher_of_the_process_runs_it_is_answered_when_it_ends(tmp_path: Path) -> None:
    """A reload replaces the control plane while a deploy runs: the new
    dispatcher must not run the console's repeat, nor hold a worker for it."""
    import threading

    from edge_agent.comms.commands import ActivateArgs
    from edge_agent.comms.dispatcher import Dispatcher

    j = open_journal(tmp_path / "j.db")
    started, release = threading.Event(), threading.Event()
    old = Dispatcher(journal=j)
    old.register("activate", ActivateArgs, lambda a, c: (started.set(), release.wait(10), {"v": 2})[2], durable=True)
    new = dispatcher_with(j, ran := [])
    first: list[Any] = []
    thread = threading.Thread(target=lambda: first.append(old.handle(cmd("slow"), "t")))
    thread.start()
    assert started.wait(10)
    later: list[dict] = []
    assert new.handle(cmd("slow"), "t", later=later.append) is None
    release.set()
    thread.join(10)
    assert later == first == [{"id": "slow", "ok": True, "result": {"v": 2}}] and ran == []
    j.close()


def test_a_signed_replay_whose_reply_is_no_longer_kept_is_refused_as_replayed(tmp_path: Path) -> None:
    """Replies are kept for the newest ``keep`` commands; a signed id stays
    longer (until it is stale): its repeat is then refused, not run."""
    j = open_journal(tmp_path / "j.db", keep=2)
    for i in range(4):
        j.begin(f"s{i}", "ping", None, origin="t", signed_ts=1000.0 + i)
        j.finish(f"s{i}", {"id": f"s{i}", "ok": True, "result": {"pong": True}})
        j.begin(f"u{i}", "activate", {"version": 2}, origin="t", signed_ts=None)
        j.finish(f"u{i}", {"id": f"u{i}", "ok": True, "result": {}})
    j.prune()
    assert j.lookup("s0").reply is None and j.lookup("s0").state == "done"
    assert j.lookup("u0") is None, "an unsigned command beyond keep is forgotten, as in memory"
    assert j.lookup("u3").reply is not None
    from edge_agent.comms.dispatcher import Dispatcher

    reply = Dispatcher(journal=j).handle(cmd("s0", "ping"), "t")
    assert reply["ok"] is False and reply["error"]["code"] == "replayed_command", reply
    assert "already run" in reply["error"]["message"]
    j.close()


def signed_run(j: Any, cmd_id: str, ts: float) -> None:
    j.begin(cmd_id, "ping", None, origin="t", signed_ts=ts)
    j.finish(cmd_id, {"id": cmd_id, "ok": True, "result": {"pong": True}})


def test_a_device_clock_jumping_ahead_forgets_nothing_and_refuses_nothing_once_it_is_right(tmp_path: Path) -> None:
    """The device's clock jumps a year ahead (a bad NTP answer) while the
    console's stays right: pruning is bounded by the newest command the
    console signed, so no seen id is forgotten (a replay is still caught
    when the clock comes back) and the console's next commands are not
    refused by the journal."""
    clock = Clock(1_000_000.0)
    j = open_journal(tmp_path / "j.db", max_age_s=100.0, clock=clock)
    signed_run(j, "before", 1_000_000.0)
    clock.now += 365 * 86400
    j.prune()
    assert j.horizon <= 1_000_000.0 - 100.0
    assert j.lookup("before") is not None, "a replay of it must still be caught"
    clock.now = 1_000_010.0  # NTP puts it right
    signed_run(j, "after", 1_000_010.0)
    j.close()
    j = open_journal(tmp_path / "j.db", max_age_s=100.0, clock=clock)
    assert j.lookup("before") is not None and j.lookup("after") is not None
    j.close()


def test_a_device_clock_jumping_back_lets_no_replay_through(tmp_path: Path) -> None:
    """Ids are forgotten only below the horizon, which never moves back and
    refuses what is below it: with the clock a day behind, an old command
    looks fresh to the age check but is refused by the journal, and a
    recent one is still remembered."""
    from edge_agent.errors import CommandError

    clock = Clock(1_000_000.0)
    j = open_journal(tmp_path / "j.db", max_age_s=100.0, clock=clock)
    signed_run(j, "old", 999_850.0)
    signed_run(j, "recent", 999_990.0)
    j.prune()
    assert j.horizon == 999_890.0  # min(device clock, newest ts signed) - max_age_s
    assert j.lookup("old") is None and j.lookup("recent") is not None
    clock.now -= 86400
    with pytest.raises(CommandError) as info:
        j.begin("old", "ping", None, origin="t", signed_ts=999_850.0)
    assert info.value.code == "stale_command" and "no longer remembers" in info.value.message
    j.close()
    j = open_journal(tmp_path / "j.db", max_age_s=100.0, clock=clock)  # the horizon is on the disk
    assert j.horizon == 999_890.0 and j.lookup("recent") is not None
    j.close()


def test_without_an_age_limit_the_signed_ids_kept_are_bounded(tmp_path: Path) -> None:
    """``max_age_s = 0`` (no limit) or a clock far behind: at most
    ``max_signed`` ids are kept; commands signed before the oldest kept one
    are refused, so a forgotten one still cannot run again."""
    from edge_agent.errors import CommandError

    j = open_journal(tmp_path / "j.db", max_age_s=0, max_signed=3, clock=Clock(10.0))
    for i in range(5):
        signed_run(j, f"c{i}", 1000.0 + i)
    j.prune()
    assert j.horizon == 1002.0
    assert [j.lookup(f"c{i}") is not None for i in range(5)] == [False, False, True, True, True]
    with pytest.raises(CommandError) as info:
        j.begin("c0", "ping", None, origin="t", signed_ts=1000.0)
    assert info.value.code == "stale_command"
    signed_run(j, "c5", 1005.0)
    j.close()


def test_an_unreadable_journal_is_moved_aside_and_what_it_knew_is_refused(tmp_path: Path, caplog) -> None:
    """An SD card corrupted the file: the agent keeps running with a new
    journal, says so, and refuses signed commands signed before that moment,
    since it can no longer tell which of them ran."""
    from edge_agent.errors import CommandError

    path = tmp_path / ".commands.db"
    path.write_bytes(b"this is not a database" * 100)
    with caplog.at_level("ERROR"):
        j = open_journal(path, clock=Clock(5000.0))
    assert "unreadable" in caplog.text and list(tmp_path.glob(".commands.db.corrupt-*"))
    with pytest.raises(CommandError) as info:
        j.begin("x", "ping", None, origin="t", signed_ts=4999.0)
    assert info.value.code == "stale_command"
    signed_run(j, "y", 5001.0)
    j.close()


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A real 1 MiB file system (tmpfs): a full disk is the kernel's ENOSPC."""
    import os

    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_command_that_cannot_be_written_down_does_not_run(tiny_disk: Path) -> None:
    """With the disk full, a deploy that could not be answered after a crash
    is refused (``disk_full``) and not remembered; once there is room, the
    console's repeat of the same id runs."""
    ran: list[str] = []
    j = open_journal(tiny_disk / ".commands.db")
    d = dispatcher_with(j, ran)
    import os

    filler = tiny_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    reply = d.handle(cmd("full"), "t")
    assert reply["ok"] is False and reply["error"]["code"] == "disk_full", reply
    assert ran == []
    filler.unlink()
    assert d.handle(cmd("full"), "t")["ok"] is True and ran == ["full"]
    j.close()
