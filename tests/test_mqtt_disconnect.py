"""What the agent logs when it loses the broker: a broker that shuts down
cleanly is not an "Unspecified error", and an MQTT 5 broker that says why it
disconnects (DISCONNECT with a reason code) is quoted, code included."""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path

import pytest

from edge_agent.comms.mqtt import MqttTransport
from edge_agent.config import MqttConfig
from mqtt_helpers import Mosquitto
from waiting import let_time_pass, wait_until


@pytest.mark.integration
def test_a_broker_that_shuts_down_is_logged_as_closing_the_connection(tmp_path: Path, caplog) -> None:
    """mosquitto (2.0) closes the socket on SIGTERM without a DISCONNECT:
    paho calls that reason code 128, "Unspecified error", which misleads an
    operator reading the log at 3 am."""
    broker = Mosquitto(tmp_path / "broker")
    transport = MqttTransport(MqttConfig(host=broker.host, port=broker.port), "dev1")
    try:
        transport.start()
        assert transport.connected.wait(10)
        with caplog.at_level(logging.INFO, logger="edge_agent.comms.mqtt"):
            broker.stop()
            wait_until(lambda: not transport.connected.is_set())
            wait_until(lambda: "reconnecting" in caplog.text)
        assert "Unspecified error" not in caplog.text, caplog.text
        assert f"the broker {broker.host}:{broker.port} closed the connection" in caplog.text, caplog.text
    finally:
        transport.stop()
        broker.stop()


class _Mqtt5ServerThatDisconnects:
    """An MQTT 5 server that accepts one client, then sends DISCONNECT with
    reason code 0x8B (server shutting down) and a reason string: what a broker
    such as EMQX or HiveMQ sends on shutdown (mosquitto 2.0 sends nothing)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.recv(65536)  # CONNECT
            conn.sendall(bytes([0x20, 3, 0x00, 0x00, 0x00]))  # CONNACK: no session, success, no properties
            let_time_pass(0.3, "the client is connected a moment before the broker says goodbye")
            reason = b"maintenance at 03:00"
            props = bytes([0x1F]) + len(reason).to_bytes(2, "big") + reason  # Reason String
            body = bytes([0x8B, len(props)]) + props
            conn.sendall(bytes([0xE0, len(body)]) + body)
            let_time_pass(1.0, "the client reads the DISCONNECT before the socket closes")
        self.sock.close()


def test_an_mqtt5_disconnect_from_the_broker_is_quoted_with_its_reason_code(caplog) -> None:
    server = _Mqtt5ServerThatDisconnects()
    transport = MqttTransport(MqttConfig(host="127.0.0.1", port=server.port), "dev1")
    try:
        with caplog.at_level(logging.INFO, logger="edge_agent.comms.mqtt"):
            transport.start()
            assert transport.connected.wait(10)
            wait_until(lambda: "reconnecting" in caplog.text)
        assert "Server shutting down" in caplog.text and "0x8B" in caplog.text, caplog.text
        assert "maintenance at 03:00" in caplog.text
    finally:
        transport.stop()


@pytest.mark.integration
def test_a_reply_counts_as_delivered_only_once_the_broker_or_the_spool_has_it(tmp_path: Path) -> None:
    """The outbox's ``delivered`` callback (what lets the command journal
    send a reply again after a crash) runs once mosquitto acknowledged the
    message, or once the spool on disk kept it while the broker was away;
    never for a message that is only in paho's memory."""
    from edge_agent.comms.plane import Outbox
    from edge_agent.comms.spool import Spool

    broker = Mosquitto(tmp_path / "broker")
    transport = MqttTransport(MqttConfig(host=broker.host, port=broker.port), "dev1")
    acked: list[str] = []
    spool = Spool(tmp_path / "spool.db")
    try:
        transport.start()
        assert transport.connected.wait(10)
        bare = Outbox(transport, None)  # no spool: only the broker's PUBACK counts
        bare.send("replies", "reply", {"id": "a"}, delivered=lambda: acked.append("a"))
        wait_until(lambda: acked == ["a"])
        broker.stop()
        wait_until(lambda: not transport.connected.is_set())
        bare.send("replies", "reply", {"id": "b"}, delivered=lambda: acked.append("b"))  # kept by paho only
        spooled = Outbox(transport, spool)
        spooled.send("replies", "reply", {"id": "c"}, delivered=lambda: acked.append("c"))  # on disk
        assert acked == ["a", "c"] and len(spool) == 1
        broker.start()
        assert transport.connected.wait(20)
        wait_until(lambda: "b" in acked)  # paho sent it after the reconnect, and the broker acknowledged it
        assert sorted(acked) == ["a", "b", "c"]
    finally:
        transport.stop()
        spool.close()
        broker.stop()


def test_an_acknowledgement_that_comes_before_anyone_waits_for_it_is_not_missed() -> None:
    """paho may call ``on_publish`` (on its network thread) before
    ``publish`` has returned to the thread that registers the callback."""
    transport = MqttTransport(MqttConfig(host="127.0.0.1", port=1), "dev1")

    class Info:
        mid = 7

    calls: list[int] = []
    transport._on_publish(transport.client, None, 7, None, None)
    transport.when_acknowledged(Info(), lambda: calls.append(1))
    assert calls == [1]
    transport.when_acknowledged(Info(), lambda: calls.append(2))  # the mid comes round again: waits for its ack
    assert calls == [1]
    transport._on_publish(transport.client, None, 7, None, None)
    assert calls == [1, 2]
