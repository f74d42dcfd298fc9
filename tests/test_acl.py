"""The shipped broker configuration (configs/mosquitto/): the real mosquitto
started from ``mosquitto.conf`` and ``acl`` as shipped (only the paths, the
port and the per-device group block filled in, as the files tell an operator
to), TLS with passwords. A device cannot read another device's commands nor
publish under another device's topics nor send commands; the real agent
works under it: it connects, answers a ping on its own, its group's and the
fleet's topic, publishes results, and takes a deploy over an MQTT transfer
from ``edge-agent fleet``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from lifecycle_helpers import frames, make_bundle
from edge_agent.testing import Mosquitto, password_file
from mqtt_helpers import AgentProcess, make_certs
from waiting import wait_until

pytestmark = pytest.mark.integration

SHIPPED = Path(__file__).resolve().parents[1] / "configs" / "mosquitto"
PASSWORDS = {"cam-01": "pw-cam-01", "cam-02": "pw-cam-02", "console": "pw-console"}
# What configs/mosquitto/acl says to add for a device in group "lobby".
GROUP_BLOCK = "\nuser cam-01\ntopic read edge/groups/lobby/cmd\n"


class ShippedBroker(Mosquitto):
    """mosquitto run from the shipped mosquitto.conf and acl."""

    def __init__(self, folder: Path) -> None:
        if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
            pytest.skip("mosquitto is not installed (scripts/test.sh installs it with apt)")
        folder.mkdir(parents=True, exist_ok=True)
        self.certs = make_certs(folder / "certs")
        passwd = password_file(folder / "edge-agent.passwd", PASSWORDS)
        acl = folder / "edge-agent.acl"
        acl.write_text((SHIPPED / "acl").read_text() + GROUP_BLOCK)

        def config(host: str, port: int) -> str:
            text = (SHIPPED / "mosquitto.conf").read_text()
            server = self.certs["broker"]
            for shipped, here in {
                "listener 8883": f"listener {port} {host}",
                "/etc/mosquitto/certs/ca.crt": server["ca"], "/etc/mosquitto/certs/broker.crt": server["cert"],
                "/etc/mosquitto/certs/broker.key": server["key"],
                "/etc/mosquitto/edge-agent.passwd": passwd, "/etc/mosquitto/edge-agent.acl": acl,
            }.items():
                assert shipped in text, f"the shipped mosquitto.conf no longer has {shipped!r}"
                text = text.replace(shipped, str(here))
            settings = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
            assert not [line for line in settings if "/etc/" in line], "a path of the shipped config was not replaced"
            return text + "\nlog_dest stderr\npersistence false\n" + ("user root\n" if os.geteuid() == 0 else "")

        super().__init__(folder, config=config)

    @property
    def ca(self) -> Path:
        return self.certs["broker"]["ca"]


class Peer:
    """An MQTT 5 client of the shipped broker, over TLS, as ``user``; keeps
    what it receives and the reason codes the broker gave its packets."""

    def __init__(self, broker: ShippedBroker, user: str | None, password: str | None = None) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{user}-{uuid.uuid4().hex[:6]}",
                                  protocol=mqtt.MQTTv5)
        self.client.tls_set(ca_certs=str(broker.ca))
        if user is not None:
            self.client.username_pw_set(user, password if password is not None else PASSWORDS[user])
        self.messages: list[tuple[str, bytes]] = []
        self.acks: dict[int, Any] = {}  # mid -> reason code (PUBACK) or reason codes (SUBACK)
        self.connack: Any = None
        self.lock = threading.Lock()
        connected = threading.Event()

        def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            self.connack = reason
            connected.set()

        def on_message(client: Any, userdata: Any, msg: Any) -> None:
            with self.lock:
                self.messages.append((msg.topic, bytes(msg.payload)))

        def on_ack(client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
            with self.lock:
                self.acks[mid] = reason

        self.client.on_connect = on_connect
        self.client.on_message = on_message
        self.client.on_publish = on_ack
        self.client.on_subscribe = on_ack
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert connected.wait(10), "no CONNACK"

    def ack(self, mid: int, timeout: float = 10.0) -> Any:
        def acked() -> list[Any] | None:  # in a list: a reason code of 0 is an answer too
            with self.lock:
                return [self.acks[mid]] if mid in self.acks else None

        return wait_until(acked, timeout, f"an acknowledgement for message {mid}", interval=0.01)[0]

    def subscribe(self, topic: str) -> Any:
        """The broker's reason code for this subscription."""
        _, mid = self.client.subscribe(topic, qos=1)
        return self.ack(mid)[0]

    def publish(self, topic: str, payload: bytes = b"x") -> Any:
        """The broker's PUBACK reason code for this QoS 1 message."""
        return self.ack(self.client.publish(topic, payload, qos=1).mid)

    def topics(self) -> list[str]:
        with self.lock:
            return [t for t, _ in self.messages]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[ShippedBroker]:
    made = ShippedBroker(tmp_path / "broker")
    yield made
    made.stop()


def settle(until: Any, timeout: float = 10.0) -> None:
    """Wait until the last message expected has arrived: a broker delivers one
    client's messages in order, so anything before it has arrived too."""
    wait_until(until, timeout, "the broker delivered it", interval=0.01)


def test_a_device_reads_only_its_own_commands_its_groups_and_the_fleets(broker: ShippedBroker) -> None:
    console, cam1, cam2 = Peer(broker, "console"), Peer(broker, "cam-01"), Peer(broker, "cam-02")
    try:
        for topic in ("edge/cam-01/cmd", "edge/groups/lobby/cmd", "edge/all/cmd"):
            assert not cam1.subscribe(topic).is_failure, topic
        assert not cam2.subscribe("edge/cam-02/cmd").is_failure
        # cam-02 tries to listen to cam-01's commands, to its group, to everyone's
        for topic in ("edge/cam-01/cmd", "edge/groups/lobby/cmd", "edge/+/cmd", "edge/#"):
            cam2.subscribe(topic)  # mosquitto 2.0 grants these, then checks each message it would deliver
        for topic in ("edge/cam-01/cmd", "edge/cam-02/cmd", "edge/groups/lobby/cmd", "edge/all/cmd"):
            assert not console.publish(topic, b'{"id": "x", "cmd": "ping"}').is_failure
        # edge/all/cmd went last: once each has it, the broker has delivered (in order) all it would
        settle(lambda: "edge/all/cmd" in cam1.topics() and "edge/all/cmd" in cam2.topics())
        assert sorted(set(cam1.topics())) == ["edge/all/cmd", "edge/cam-01/cmd", "edge/groups/lobby/cmd"]
        assert sorted(set(cam2.topics())) == ["edge/all/cmd", "edge/cam-02/cmd"], cam2.topics()
    finally:
        for peer in (console, cam1, cam2):
            peer.close()


def test_a_device_cannot_publish_under_another_device_nor_send_commands(broker: ShippedBroker) -> None:
    console, cam2 = Peer(broker, "console"), Peer(broker, "cam-02")
    try:
        assert not console.subscribe("edge/#").is_failure
        forbidden = ["edge/cam-01/results/cam", "edge/cam-01/status", "edge/cam-01/reply", "edge/cam-01/events",
                     "edge/cam-01/telemetry", "edge/cam-01/cmd", "edge/cam-02/cmd", "edge/all/cmd",
                     "edge/groups/lobby/cmd", "edge/transfers/t1/meta", "edge/transfers/t1/chunk/0", "other/topic"]
        for topic in forbidden:
            reason = cam2.publish(topic)
            assert reason.is_failure and reason.getName() == "Not authorized", (topic, reason)
        allowed = ["edge/cam-02/results/cam", "edge/cam-02/status", "edge/cam-02/reply", "edge/cam-02/events",
                   "edge/cam-02/telemetry", "edge/transfers/t1/need", "edge/transfers/t1/done"]
        for topic in allowed:
            assert not cam2.publish(topic).is_failure, topic
        settle(lambda: allowed[-1] in console.topics())
        assert sorted(console.topics()) == sorted(allowed), console.topics()
    finally:
        console.close()
        cam2.close()


def test_no_anonymous_client_and_no_wrong_password(broker: ShippedBroker) -> None:
    for user, password in ((None, None), ("cam-01", "wrong")):
        peer = Peer(broker, user, password)
        try:
            assert peer.connack.is_failure, (user, peer.connack)
        finally:
            peer.close()


def test_the_real_agent_works_under_the_shipped_acl(broker: ShippedBroker, tmp_path: Path) -> None:
    """The agent connects with its password over TLS, answers pings on its
    own, its group's and the fleet's command topic, publishes results and
    telemetry, and takes a deploy by MQTT transfer from the console."""
    v1 = make_bundle(tmp_path / "b", 1)
    v2 = make_bundle(tmp_path / "b", 2, archive=True)
    cfg = tmp_path / "cam-01.toml"
    cfg.write_text(f"""device_id = "cam-01"
groups = ["lobby"]
[mqtt]
host = "{broker.host}"
port = {broker.port}
username = "cam-01"
password = "{PASSWORDS['cam-01']}"
telemetry_interval_s = 0.5
[mqtt.tls]
ca_certs = "{broker.ca}"
[store]
path = "{tmp_path}/store"
[[models]]
name = "clf"
bundle = "{v1}"
threads = 1
probation_s = 0.5
[[sources]]
name = "cam"
uri = "{frames(tmp_path / 'frames')}"
model = "clf"
loop = true
source_fps = 20
""")
    console = Peer(broker, "console")
    console.subscribe("edge/#")
    agent = AgentProcess(cfg)

    def seen(topic: str) -> list[dict]:
        with console.lock:
            return [json.loads(p) for t, p in console.messages if t == topic and p]

    def wait_for(predicate: Any, timeout: float = 60.0) -> Any:
        def alive_and(got: Any) -> Any:
            if not got:
                assert agent.proc.poll() is None, agent.output()[-3000:]
            return got

        return wait_until(lambda: alive_and(predicate()), timeout, lambda: agent.output()[-3000:], interval=0.05)

    try:
        wait_for(lambda: any(s.get("state") == "online" for s in seen("edge/cam-01/status")))
        for topic, cmd_id in (("edge/cam-01/cmd", "own"), ("edge/groups/lobby/cmd", "group"), ("edge/all/cmd", "all")):
            console.publish(topic, json.dumps({"id": cmd_id, "cmd": "ping"}).encode())
            reply = wait_for(lambda: [r for r in seen("edge/cam-01/reply") if r["id"] == cmd_id])
            assert reply[0]["result"] == {"pong": True}
        wait_for(lambda: len(seen("edge/cam-01/results/cam")) >= 3 and seen("edge/cam-01/telemetry"))
        assert "Not authorized" not in agent.output() and "refused" not in agent.output()
        deployed = subprocess.run(
            [sys.executable, "-m", "edge_agent", "fleet", "deploy", str(v2), "--group", "lobby", "--json", "-q",
             "--host", broker.host, "--port", str(broker.port), "--username", "console",
             "--ca-certs", str(broker.ca), "--timeout", "60"],
            env={**os.environ, "EDGE_FLEET_PASSWORD": PASSWORDS["console"]}, capture_output=True, text=True,
            timeout=120)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr + agent.output()[-3000:]
        wait_for(lambda: any(s.get("models", {}).get("clf", {}).get("active") == 2
                             for s in seen("edge/cam-01/status")))
    finally:
        agent.stop()
        console.close()
