"""A flood of commands must never stop the agent's output.

Found while testing as a user would: 1,500 payloads of invalid JSON sent to
``P/D/cmd`` at QoS 1 as fast as paho sends them, against a real mosquitto
and a real agent classifying a looping video, left the agent connected and
inferring but publishing nothing ever again: paho's outgoing queue filled
with the error replies, the outbox switched to the spool, and the spool was
only replayed after a reconnect, which never came. These tests send such
floods to a real `edge-agent run` and require that the output goes on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from conftest import Broker
from waiting import let_time_pass, poll_until

pytestmark = pytest.mark.integration

PREFIX = "flood"


class Console:
    """A plain paho client: publishes commands, collects what the device says."""

    def __init__(self, broker: Broker, device: str) -> None:
        self.device = device
        self.messages: list[tuple[float, str, dict]] = []
        self.cond = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"flood-console-{uuid.uuid4().hex[:8]}")
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        # Not '#': the console's own commands echoed back would compete with
        # the replies for its queue at the broker.
        topics = [(f"{PREFIX}/{device}/{t}", 1) for t in ("reply", "results/#", "telemetry", "events", "status")]
        self.client.on_connect = lambda c, *a: c.subscribe(topics)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert subscribed.wait(10), "subscription not acknowledged"

    def _on_message(self, client, userdata, msg) -> None:
        try:
            payload = json.loads(msg.payload)
        except ValueError:
            return
        with self.cond:
            self.messages.append((time.monotonic(), msg.topic, payload))
            self.cond.notify_all()

    def on(self, suffix: str, since: float = 0.0) -> list[dict]:
        with self.cond:
            return [p for t, topic, p in self.messages if topic.endswith(suffix) and t >= since]

    def wait_for(self, predicate, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def burst(self, payloads: list[bytes]) -> None:
        """Publish every payload at QoS 1 as fast as paho sends them."""
        infos = [self.client.publish(f"{PREFIX}/{self.device}/cmd", p, qos=1) for p in payloads]
        for info in infos:
            info.wait_for_publish(60)

    def wait_online(self, timeout: float = 30.0) -> None:
        """Until the device says ``online`` (retained): it publishes that only
        once its command subscriptions are sent, so a command sent after
        this reaches it."""
        assert self.wait_for(lambda: any(r.get("state") == "online" for r in self.on("/status")), timeout), \
            "the device never said online"

    def ping_answered(self, timeout: float) -> float | None:
        """Seconds until a fresh ping is answered, None when it is not."""
        cmd_id = f"ping-{uuid.uuid4().hex[:8]}"
        start = time.monotonic()
        self.client.publish(f"{PREFIX}/{self.device}/cmd", json.dumps({"id": cmd_id, "cmd": "ping", "args": {}}), qos=1)
        if self.wait_for(lambda: any(r.get("id") == cmd_id for _, t, r in self.messages if t.endswith("/reply")),
                         timeout):
            return time.monotonic() - start
        return None

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def flood_broker(tmp_path: Path):
    """A mosquitto of its own that queues as much as the console falls
    behind: by default the broker drops what a slow subscriber has not
    taken beyond 1,000 messages, which would count against the agent."""
    from edge_agent.testing import Mosquitto

    made = Mosquitto(tmp_path / "broker", extra=["max_queued_messages 100000"])
    yield made
    made.stop()


@pytest.fixture
def flooded_agent(tmp_path: Path, flood_broker: Broker, mobilenet_bundle: Path, assets):
    """A real agent on the looping demo video at 10 fps, and a console."""
    broker = flood_broker
    device = f"flood-{uuid.uuid4().hex[:6]}"
    config = tmp_path / "agent.toml"
    config.write_text(f"""
device_id = "{device}"
log_level = "warning"

[mqtt]
host = "{broker.host}"
port = {broker.port}
topic_prefix = "{PREFIX}"
telemetry_interval_s = 1

[store]
path = "store"

[[models]]
name = "mobilenet_v2"
bundle = "{mobilenet_bundle}"
threads = 1

[[sources]]
name = "cam"
uri = "{assets['demo_video']}"
model = "mobilenet_v2"
fps = 10
loop = true
""")
    console = Console(broker, device)
    log = tmp_path / "agent.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=err)
    proc.log = log  # type: ignore[attr-defined]
    try:
        assert console.wait_for(lambda: len(console.on("/results/cam")) >= 5, 60), "no results before the flood"
        yield console, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        console.close()


def _output_goes_on(console: Console, after: float, proc) -> None:
    answered = console.ping_answered(timeout=10)
    tail = proc.log.read_text(errors="replace")[-3000:]
    assert answered is not None, f"a ping after the burst was never answered: the output path is stuck\n{tail}"
    assert console.wait_for(lambda: len(console.on("/results/cam", since=after)) >= 5, 15), "results stopped"
    assert console.wait_for(lambda: len(console.on("/telemetry", since=after)) >= 1, 10), "telemetry stopped"


def test_a_burst_of_invalid_json_does_not_stop_the_output(flooded_agent) -> None:
    console, proc = flooded_agent
    console.burst([b"not json"] * 1500)
    done = time.monotonic()
    _output_goes_on(console, done, proc)
    replies = console.on("/reply")
    bad = [r for r in replies if r.get("id") is None]
    assert all(r["error"]["code"] in ("bad_json", "busy") for r in bad)
    assert proc.poll() is None


def test_a_burst_of_valid_commands_is_answered_or_refused_as_busy_never_silence(flooded_agent) -> None:
    """Far more commands than the agent can take at once: every one is
    answered exactly once, by its result or by a clear ``busy``."""
    console, proc = flooded_agent
    ids = [f"p{i}" for i in range(3000)]
    console.burst([json.dumps({"id": i, "cmd": "ping", "args": {}}).encode() for i in ids])
    done = time.monotonic()
    assert console.wait_for(lambda: {r.get("id") for r in console.on("/reply")} >= set(ids), 60), \
        f"{len(set(ids) - {r.get('id') for r in console.on('/reply')})} command(s) never answered"
    replies = [r for r in console.on("/reply") if r.get("id") in set(ids)]
    assert len(replies) == len(ids), "a command was answered twice"
    busy = [r for r in replies if not r["ok"]]
    assert {r["error"]["code"] for r in busy} <= {"busy"}
    _output_goes_on(console, done, proc)
    if busy:  # the refusals are counted in telemetry too
        assert console.wait_for(lambda: any(t.get("commands_shed", {}).get("busy", 0) >= len(busy)
                                            for t in console.on("/telemetry", since=done)), 10)


def test_huge_nested_and_binary_payloads_do_not_stop_the_output(flooded_agent) -> None:
    console, proc = flooded_agent
    junk = [os.urandom(200) for _ in range(300)]
    junk += [b"[" * 100_000] * 20  # deeper than any JSON parser's recursion
    junk += [json.dumps({"id": "big", "cmd": "ping", "args": {"x": "a" * 300_000}}).encode()] * 20
    junk += [json.dumps({"id": 5, "cmd": ["x"], "args": 3}).encode()] * 300
    console.burst(junk)
    done = time.monotonic()
    _output_goes_on(console, done, proc)
    assert proc.poll() is None


def test_commands_beyond_the_waiting_room_are_answered_busy_and_counted(flood_broker: Broker) -> None:
    """With every worker busy and the waiting room full, a command gets a
    ``busy`` reply at once (it was not run, so sending it again is safe);
    one whose id cannot be read is shed and counted. Nothing is silent."""
    from edge_agent.comms.commands import NoArgs
    from edge_agent.comms.dispatcher import Dispatcher
    from edge_agent.comms.mqtt import MqttTransport
    from edge_agent.comms.plane import MqttPlane
    from edge_agent.config import MqttConfig

    device = f"busy-{uuid.uuid4().hex[:6]}"
    entered, release = threading.Event(), threading.Event()

    def hold(args, ctx):
        entered.set()
        release.wait(30)
        return {"held": True}

    def factory(events):
        dispatcher = Dispatcher(events=events)
        dispatcher.register("hold", NoArgs, hold)
        dispatcher.register("ping", NoArgs, lambda args, ctx: {"pong": True})
        return dispatcher

    broker = flood_broker
    transport = MqttTransport(MqttConfig(host=broker.host, port=broker.port, topic_prefix=PREFIX), device)
    plane = MqttPlane(transport=transport, dispatcher_factory=factory, groups=[], workers=1, telemetry=None,
                      interval_s=60, spool=None, max_waiting=2)
    plane.start()
    transport.start()
    console = Console(broker, device)
    try:
        assert transport.connected.wait(10)
        # "connected" is our side; the broker has the device's subscription
        # once it relayed the "online" the device sent after subscribing.
        console.wait_online()
        assert console.ping_answered(10) is not None
        console.messages.clear()
        send = lambda payload: console.client.publish(f"{PREFIX}/{device}/cmd", payload, qos=1).wait_for_publish(5)
        send(json.dumps({"id": "h0", "cmd": "hold"}))
        assert entered.wait(10)  # the only worker is busy with h0
        for i in range(1, 6):
            send(json.dumps({"id": f"h{i}", "cmd": "hold"}))
        send(b"\xff not even text")
        assert console.wait_for(lambda: len(console.on("/reply")) >= 3, 10)
        busy = console.on("/reply")
        assert [(r["id"], r["error"]["code"]) for r in busy] == [("h3", "busy"), ("h4", "busy"), ("h5", "busy")]
        assert "send it again later" in busy[0]["error"]["message"]
        poll_until(lambda: plane.shed["unreadable"] >= 1, 10, interval=0.01)
        release.set()
        assert console.wait_for(lambda: len(console.on("/reply")) >= 6, 10)
        done = [r for r in console.on("/reply") if r["ok"]]
        assert [r["id"] for r in done] == ["h0", "h1", "h2"]
        assert plane.shed == {"busy": 3, "unreadable": 1}
    finally:
        release.set()
        console.close()
        transport.stop()
        plane.stop()


def test_a_spool_that_keeps_failing_is_retried_with_back_off_not_in_a_hot_loop(flood_broker: Broker,
                                                                                tmp_path: Path, caplog) -> None:
    """An SD card that fails under the spool while the broker is up: the
    drain logs the failure and tries again later, instead of spinning (and
    re-sending the oldest message) thousands of times a second."""
    import logging

    from edge_agent.comms.mqtt import MqttTransport
    from edge_agent.comms.plane import Outbox
    from edge_agent.comms.spool import Spool
    from edge_agent.config import MqttConfig

    broker = flood_broker
    transport = MqttTransport(MqttConfig(host=broker.host, port=broker.port, topic_prefix=PREFIX), "sd")
    spool = Spool(tmp_path / "s.db")
    spool.put(f"{PREFIX}/sd/reply", b'{"id":"x"}', kind="replies")
    outbox = Outbox(transport, spool)
    transport.start()
    try:
        assert transport.connected.wait(10)
        spool._db.close()  # the card is gone: every read and write fails from now on
        with caplog.at_level(logging.ERROR, logger="edge_agent.comms.plane"):
            outbox.drain()
            let_time_pass(2.0, "the outbox retries at its back-off's pace meanwhile")
        failures = [r for r in caplog.records if "replay failed" in r.message]
        assert 1 <= len(failures) <= 4, len(failures)  # after 0.5 s, 1 s, 2 s: not a hot loop
    finally:
        outbox.stop()
        transport.stop()
