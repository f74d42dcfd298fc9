"""The MQTT transport (paho-mqtt 2.x). It knows the connection and the
device's topics (:mod:`edge_agent.comms.topics`), not commands.

* a client made by :func:`~edge_agent.comms.client.make_client` with a
  persistent session (stable client id ``edge-agent-<device>``);
* ``connect_async`` + paho's network thread with reconnect back-off, so a
  broker that is down at boot never blocks start-up;
* a retained last will ``{"state": "offline"}`` on ``P/D/status``;
  ``online`` published (retained) on every (re)connect, ``stopped`` on a clean
  exit;
* :meth:`publish` takes a topic under ``P/D/`` and a JSON-able payload,
  :meth:`publish_bytes` any topic and the bytes as they are (the outbox's
  messages, encoded once and perhaps kept in the spool meanwhile); the
  device's topics are :attr:`topics`
  (:class:`~edge_agent.comms.topics.DeviceTopics`);
* one :class:`PahoLink` (``transport.link``) holds every subscription, the
  command topics' and the MQTT transfers', and subscribes them again after
  each reconnect.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from typing import Any, Callable, Sequence

import paho.mqtt.client as mqtt

from edge_agent.comms.client import TlsFiles, connect_options, make_client
from edge_agent.comms.commands import status_object
from edge_agent.comms.topics import DeviceTopics
from edge_agent.config import MqttConfig

log = logging.getLogger(__name__)

MAX_QUEUED = 1000
_RECENT_ACKS = 4096  # acknowledgements kept for a waiter that registers late (mids recur only every 65,535)


class PahoHandle:
    """A paho ``MQTTMessageInfo`` as a :class:`~edge_agent.comms.transfer.protocol.PublishHandle`."""

    def __init__(self, info: Any) -> None:
        self._info = info

    def wait(self, timeout: float) -> bool:
        try:
            self._info.wait_for_publish(timeout)
        except (RuntimeError, ValueError):
            return False  # not queued (client disconnected or queue full)
        return bool(self._info.is_published())


class PahoLink:
    """A :class:`~edge_agent.comms.transfer.protocol.Link` over a paho-mqtt 2.x client
    that its owner connects.

    Subscriptions are remembered; call :meth:`resubscribe` from the owner's
    ``on_connect`` (a clean session forgets them on reconnect). A callback
    that raises is logged, never allowed to kill paho's network thread.
    Thread-safety: all methods may be called from any thread.
    """

    def __init__(self, client: Any) -> None:
        self.client = client
        self._filters: set[str] = set()
        self._lock = threading.Lock()

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> PahoHandle:
        return PahoHandle(self.client.publish(topic, payload, qos=qos, retain=retain))

    def subscribe(self, topic_filter: str, callback: Callable[[str, bytes], None]) -> Callable[[], None]:
        """Deliver messages matching ``topic_filter`` to ``callback(topic,
        payload)`` (QoS 1, on paho's thread); returns a function that
        unsubscribes."""

        def on_message(client: Any, userdata: Any, message: Any) -> None:
            try:
                callback(message.topic, bytes(message.payload))
            except Exception:  # never let a bug kill paho's network thread
                log.exception("MQTT: handling a message on %s failed", message.topic)

        self.client.message_callback_add(topic_filter, on_message)
        with self._lock:
            self._filters.add(topic_filter)
        self.client.subscribe(topic_filter, qos=1)

        def unsubscribe() -> None:
            with self._lock:
                self._filters.discard(topic_filter)
            self.client.unsubscribe(topic_filter)
            self.client.message_callback_remove(topic_filter)

        return unsubscribe

    def resubscribe(self) -> None:
        with self._lock:
            filters = sorted(self._filters)
        for topic_filter in filters:
            self.client.subscribe(topic_filter, qos=1)


class MqttTransport:
    """One connection to the broker for one device.

    ``status_provider`` returns the ``models`` part of the status message.
    Thread-safety: ``publish`` and ``publish_bytes`` may be called from any
    thread (paho queues).
    """

    def __init__(
        self,
        cfg: MqttConfig,
        device_id: str,
        *,
        status_provider: Callable[[], dict[str, Any]] = dict,
        client_id: str | None = None,
        groups: Sequence[str] = (),
    ) -> None:
        self.cfg = cfg
        self.device_id = device_id
        self.topics = DeviceTopics(cfg.topic_prefix, device_id)
        self.status_provider = status_provider
        self.groups = list(groups)
        self.connected = threading.Event()
        # Orders the retained status messages without holding a lock across a
        # paho call (paho takes its own callback lock inside publish, and our
        # on_connect runs under it: holding ours there could deadlock).
        self._status_cond = threading.Condition()
        self._status_in_flight = 0
        self._stopping = False
        self.on_connected: list[Callable[[], None]] = []  # run on paho's thread after each (re)connect
        # A stable client id and a persistent session: QoS 1 commands sent
        # while the device was away are delivered when it comes back.
        tls = None
        if cfg.tls is not None:
            tls = TlsFiles(cfg.tls.ca_certs, cfg.tls.certfile, cfg.tls.keyfile, cfg.tls.insecure)
        self.client = make_client(client_id or f"edge-agent-{device_id}", protocol=cfg.protocol, persistent=True,
                                  username=cfg.username, password=cfg.password, tls=tls)
        self.client.will_set(self.topics.status, json.dumps({"state": "offline"}, separators=(",", ":")), qos=1, retain=True)
        self.client.reconnect_delay_set(min_delay=1, max_delay=60)
        # Bound what paho buffers while the broker is away (QoS 1 results):
        # beyond this, publishes are refused rather than growing memory.
        self.client.max_queued_messages_set(MAX_QUEUED)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self._acks_lock = threading.Lock()
        self._ack_waiters: dict[int, Callable[[], None]] = {}
        self._acked: OrderedDict[int, None] = OrderedDict()
        self.link = PahoLink(self.client)
        """Every subscription on this connection (commands, MQTT transfers)."""

    def topic(self, suffix: str) -> str:
        """``P/D/<suffix>``."""
        return self.topics.topic(suffix)

    def status(self, state: str) -> dict[str, Any]:
        return status_object(state, self.device_id, self.groups, self.status_provider())

    def subscribe(self, topic_filter: str, callback: Callable[[str, bytes], None]) -> Callable[[], None]:
        """Deliver messages matching ``topic_filter`` to ``callback(topic,
        payload)`` (on paho's thread: hand long work to another thread).
        Subscribed again on every reconnect; returns a function that
        unsubscribes."""
        return self.link.subscribe(topic_filter, callback)

    def start(self) -> None:
        session = connect_options(self.cfg.protocol, session_expiry_s=self.cfg.session_expiry_s)
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s, **session)
        self.client.loop_start()
        log.info("MQTT: connecting to %s:%d as %s", self.cfg.host, self.cfg.port, self.device_id)

    def stop(self, timeout: float = 5.0) -> None:
        """Publish ``stopped`` (when connected) and disconnect cleanly.

        It waits for an ``online`` being published at that moment (a connect or
        a model change), so the retained state left behind is ``stopped``,
        never a late ``online``."""
        with self._status_cond:
            self._stopping = True
            self._status_cond.wait_for(lambda: self._status_in_flight == 0, timeout=timeout)
        info = None
        if self.connected.is_set():
            info = self.publish("status", self.status("stopped"), qos=1, retain=True)
        if info is not None:
            PahoHandle(info).wait(timeout)
        self.client.disconnect()
        try:
            self.client.loop_stop()
        except AttributeError:  # paho's network thread already gone (seen under heavy load)
            pass

    def publish(
        self, suffix: str, payload: dict[str, Any], *, qos: int = 0, retain: bool = False
    ) -> mqtt.MQTTMessageInfo:
        return self.client.publish(
            self.topic(suffix), json.dumps(payload, separators=(",", ":")), qos=qos, retain=retain
        )

    def publish_bytes(
        self, topic: str, payload: bytes, *, qos: int, retain: bool = False
    ) -> mqtt.MQTTMessageInfo:
        """Hand ``payload`` to paho for ``topic`` as it is. The returned
        info's ``rc`` says whether paho took it (``MQTT_ERR_NO_CONN``:
        without a connection; a QoS 1 message is then sent after the
        reconnect), its ``mid`` is what :meth:`when_acknowledged` follows."""
        return self.client.publish(topic, payload, qos=qos, retain=retain)

    def when_acknowledged(self, info: mqtt.MQTTMessageInfo, callback: Callable[[], None]) -> None:
        """Call ``callback()`` once the broker acknowledged the QoS 1
        message ``info`` (on paho's network thread; it must be quick), even
        when the acknowledgement came before this call. A broker that
        refuses it (an MQTT 5 PUBACK with an error code) calls nothing, nor
        does a message paho drops."""
        with self._acks_lock:
            if self._acked.pop(info.mid, "no") is None:
                early = True
            else:
                early = False
                self._ack_waiters[info.mid] = callback
        if early:
            callback()

    def publish_status(self) -> None:
        """``online`` again (after a model change), when connected."""
        if self.connected.is_set():
            self._publish_online()

    def _publish_online(self) -> None:
        with self._status_cond:
            if self._stopping:
                return
            self._status_in_flight += 1
        try:
            self.publish("status", self.status("online"), qos=1, retain=True)
        finally:
            with self._status_cond:
                self._status_in_flight -= 1
                self._status_cond.notify_all()

    # -- paho callbacks (network thread) -------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.error("MQTT: broker %s:%d refused the connection: %s", self.cfg.host, self.cfg.port, reason)
            return
        if self._stopping:
            return
        # Subscribe before saying "online" (and before anyone sees the
        # connection): the broker handles a client's packets in order, so a
        # console that waits for "online" and then sends a command reaches a
        # subscribed device.
        self.link.resubscribe()
        self.connected.set()
        log.info("MQTT: connected to %s:%d", self.cfg.host, self.cfg.port)
        self._publish_online()
        for hook in self.on_connected:
            try:
                hook()
            except Exception:
                log.exception("MQTT: a connect hook failed")

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        # paho calls this before it marks the message published, so a waiter
        # that registers in between finds the mid among the recent ones.
        if reason is not None and getattr(reason, "is_failure", False):
            with self._acks_lock:
                self._ack_waiters.pop(mid, None)
            log.warning("MQTT: the broker refused a message (mid %d): %s", mid, reason)
            return
        with self._acks_lock:
            callback = self._ack_waiters.pop(mid, None)
            if callback is None:
                self._acked[mid] = None
                self._acked.move_to_end(mid)
                if len(self._acked) > _RECENT_ACKS:
                    self._acked.popitem(last=False)
        if callback is not None:
            try:
                callback()
            except Exception:  # never let it kill paho's network thread
                log.exception("MQTT: an acknowledgement callback failed")

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        if not (was and reason.is_failure):
            return
        where = f"{self.cfg.host}:{self.cfg.port}"
        name = reason.getName()
        if getattr(flags, "is_disconnect_packet_from_server", False):
            # MQTT 5: the broker said why (0x8B server shutting down, 0x8E session taken over, ...).
            said = getattr(props, "ReasonString", None)
            hint = ""
            if reason.value == 0x8E:
                hint = f" (another client connected with this one's client id: two agents with device_id " \
                       f"{self.device_id}?)"
            log.warning("MQTT: the broker %s closed the connection: %s (MQTT reason code 0x%02X)%s%s; reconnecting",
                        where, name, reason.value, f": {said}" if said else "", hint)
        elif name == "Keep alive timeout":
            log.warning("MQTT: no answer from the broker %s within the keep-alive (%d s); reconnecting",
                        where, self.cfg.keepalive_s)
        elif name == "Unspecified error":
            # paho's name for a socket that closed without a DISCONNECT packet: how
            # mosquitto 2.0 shuts down, and how every MQTT 3.1.1 broker ends a connection.
            log.warning("MQTT: the broker %s closed the connection without giving a reason (it stopped or "
                        "restarted, or the network dropped the connection); reconnecting", where)
        else:
            log.warning("MQTT: connection to the broker %s lost: %s (MQTT reason code 0x%02X); reconnecting",
                        where, name, reason.value)

