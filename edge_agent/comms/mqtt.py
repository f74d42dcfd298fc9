"""The MQTT transport (paho-mqtt 2.x). It knows topics and connections, not
commands.

* ``connect_async`` + paho's network thread with reconnect back-off, so a
  broker that is down at boot never blocks start-up;
* a retained last will ``{"state": "offline"}`` on ``P/D/status``;
  ``online`` published (retained) on every (re)connect, ``stopped`` on a clean
  exit;
* :meth:`publish` takes a topic under ``P/D/`` and a JSON-able payload.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
from typing import Any, Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent import __version__
from edge_agent.config import MqttConfig

log = logging.getLogger(__name__)

MAX_QUEUED = 1000


class MqttTransport:
    """One connection to the broker for one device.

    ``status_provider`` returns the ``models`` part of the status message.
    Thread-safety: ``publish`` may be called from any thread (paho queues).
    """

    def __init__(
        self,
        cfg: MqttConfig,
        device_id: str,
        *,
        status_provider: Callable[[], dict[str, Any]] = dict,
    ) -> None:
        self.cfg = cfg
        self.device_id = device_id
        self.base = f"{cfg.topic_prefix}/{device_id}"
        self.status_provider = status_provider
        self.connected = threading.Event()
        protocol = mqtt.MQTTv5 if cfg.protocol == "5" else mqtt.MQTTv311
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"edge-agent-{device_id}", protocol=protocol
        )
        if cfg.username is not None:
            self.client.username_pw_set(cfg.username, cfg.password)
        if cfg.tls is not None:
            self.client.tls_set(
                ca_certs=str(cfg.tls.ca_certs) if cfg.tls.ca_certs else None,
                certfile=str(cfg.tls.certfile) if cfg.tls.certfile else None,
                keyfile=str(cfg.tls.keyfile) if cfg.tls.keyfile else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
            self.client.tls_insecure_set(cfg.tls.insecure)
        self.client.will_set(self.topic("status"), json.dumps({"state": "offline"}, separators=(",", ":")), qos=1, retain=True)
        self.client.reconnect_delay_set(min_delay=1, max_delay=60)
        # Bound what paho buffers while the broker is away (QoS 1 results):
        # beyond this, publishes are refused rather than growing memory.
        self.client.max_queued_messages_set(MAX_QUEUED)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect

    def topic(self, suffix: str) -> str:
        return f"{self.base}/{suffix}"

    def status(self, state: str) -> dict[str, Any]:
        return {"state": state, "ts": time.time(), "agent_version": __version__, "models": self.status_provider()}

    def start(self) -> None:
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s)
        self.client.loop_start()
        log.info("MQTT: connecting to %s:%d as %s", self.cfg.host, self.cfg.port, self.device_id)

    def stop(self, timeout: float = 5.0) -> None:
        """Publish ``stopped`` (when connected) and disconnect cleanly."""
        if self.connected.is_set():
            info = self.publish("status", self.status("stopped"), qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()

    def publish(
        self, suffix: str, payload: dict[str, Any], *, qos: int = 0, retain: bool = False
    ) -> mqtt.MQTTMessageInfo:
        return self.client.publish(
            self.topic(suffix), json.dumps(payload, separators=(",", ":")), qos=qos, retain=retain
        )

    # -- paho callbacks (network thread) -------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.error("MQTT: broker %s:%d refused the connection: %s", self.cfg.host, self.cfg.port, reason)
            return
        self.connected.set()
        log.info("MQTT: connected to %s:%d", self.cfg.host, self.cfg.port)
        self.publish("status", self.status("online"), qos=1, retain=True)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        if was and reason.is_failure:
            log.warning("MQTT: connection lost (%s); reconnecting", reason)


class MqttResultSink:
    """Publishes every result on ``P/D/results/<source>``."""

    def __init__(self, transport: MqttTransport) -> None:
        self.transport = transport

    def emit(self, source: str, result: dict[str, Any]) -> None:
        self.transport.publish(f"results/{source}", result, qos=self.transport.cfg.results_qos)
