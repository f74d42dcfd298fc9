"""Test helpers for the control plane: a mosquitto we can stop and restart
on the same port (optionally with TLS and persistence), a collecting MQTT
client, agents as subprocesses, and TLS certificates made in code."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.testing import Mosquitto, free_port  # noqa: F401  (the tests take them from here)
from waiting import wait_until


def connected(host: str, port: int, *, name: str = "test", on_message: Any = None,
              max_inflight: int | None = None) -> mqtt.Client:
    """A bare MQTT 5 paho client, connected, its network loop running."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{name}-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)
    if max_inflight is not None:
        client.max_inflight_messages_set(max_inflight)
    ready = threading.Event()
    client.on_connect = lambda *args: ready.set()
    if on_message is not None:
        client.on_message = on_message
    client.connect(host, port)
    client.loop_start()
    assert ready.wait(5), "could not connect to the test broker"
    return client


class Client:
    """A paho client that keeps every message it receives."""

    def __init__(self, host: str, port: int, topics: list[str], *, client_id: str | None = None,
                 persistent: bool = False, tls: dict[str, Path] | None = None,
                 auth: tuple[str, str] | None = None) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"test-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv311, clean_session=not persistent)
        if tls:
            self.client.tls_set(ca_certs=str(tls["ca"]), certfile=str(tls["cert"]), keyfile=str(tls["key"]))
        if auth:
            self.client.username_pw_set(*auth)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_connect = lambda c, *a: [c.subscribe(t, qos=1) for t in topics]
        self.client.reconnect_delay_set(0.2, 1)
        self.client.connect(host, port)
        self.client.loop_start()
        assert subscribed.wait(10), "subscription not acknowledged"

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self.lock:
            self.messages.append((msg.topic, msg.payload, bool(msg.retain)))

    def json(self, suffix: str) -> list[dict]:
        with self.lock:
            return [json.loads(p) for t, p, _ in self.messages if t.endswith(suffix) and p]

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 20.0) -> Any:
        return wait_until(predicate, timeout, lambda: f"the condition; messages: {self.topics()[-20:]}")

    def topics(self) -> list[str]:
        with self.lock:
            return [t for t, _, _ in self.messages]

    def reply(self, cmd_id: str | None, timeout: float = 30.0, index: int = 0) -> dict:
        return self.wait_for(lambda: ([r for r in self.json("/reply") if r.get("id") == cmd_id][index:] or [None])[0],
                             timeout)

    def command(self, topic: str, cmd: str, args: dict | None = None, cmd_id: str | None = None) -> str:
        """Publish a command (QoS 1) and wait until the broker has it (PUBACK)."""
        cmd_id = cmd_id or f"c-{uuid.uuid4().hex[:10]}"
        self.client.publish(topic, json.dumps({"id": cmd_id, "cmd": cmd, "args": args or {}}), qos=1).wait_for_publish(10)
        return cmd_id

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def agent_config(root: Path, host: str, port: int, *, prefix: str, device: str, bundle: Path | None,
                 frames: Path | None, groups: list[str] = (), extra: str = "", mqtt_extra: str = "") -> Path:
    src = "" if frames is None else f"""
[[sources]]
name = "cam"
uri = "{frames}"
model = "clf"
loop = true
source_fps = 20
log_results = true
"""
    text = f"""device_id = "{device}"
groups = {json.dumps(list(groups))}
log_level = "info"
[mqtt]
host = "{host}"
port = {port}
topic_prefix = "{prefix}"
telemetry_interval_s = 0.5
keepalive_s = 5
{mqtt_extra}
[store]
path = "{root}/store-{device}"
[[models]]
name = "clf"
threads = 1
probation_s = 1.0
{'bundle = "%s"' % bundle if bundle else ''}
{src}
{extra}
"""
    path = root / f"{device}.toml"
    path.write_text(text)
    return path


class AgentProcess:
    def __init__(self, config: Path, *, env: dict | None = None) -> None:
        self.config = config
        self.log = open(config.with_suffix(".log"), "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
                                     stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait(10)
        return self.proc.returncode

    def output(self) -> str:
        return self.config.with_suffix(".log").read_text(errors="replace")


def make_certs(folder: Path) -> dict[str, dict[str, Path]]:
    """A CA, a broker certificate for 127.0.0.1/localhost and a client one."""
    from edge_agent.testing import make_certs as certs

    made = certs(folder, ["device-1"])
    return {"broker": made["broker"], "client": made["device-1"]}
