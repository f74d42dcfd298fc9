"""The console's MQTT session: :class:`Console`, one connection to the
broker that follows every device's retained ``P/D/status`` (who is online,
in which groups), the ``reply`` and ``events`` topics and optionally
``telemetry``, publishes commands and keeps the replies; and
:func:`collect_status`, the fleet's statuses with fresh telemetry.

Threading: paho's network thread runs the message callbacks; they only
record what arrived and notify :attr:`Console.cond`. The caller's thread
waits on it. Listeners run on the network thread and must be quick.
"""

from __future__ import annotations

import json
import logging
import math
import ssl
import threading
import time
import uuid
from dataclasses import replace
from typing import Any, Callable

from edge_agent.errors import UsageError
from edge_agent.fleet.commands import command_payload
from edge_agent.fleet.errors import FleetError
from edge_agent.fleet.settings import BrokerSettings
from edge_agent.fleet.targets import DeviceInfo, Target

log = logging.getLogger(__name__)


class _CountingLink:
    """A transfer Link that counts the bytes published through it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.bytes = 0
        self._lock = threading.Lock()

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> Any:
        with self._lock:
            self.bytes += len(payload)
        return self.inner.publish(topic, payload, qos=qos, retain=retain)

    def subscribe(self, topic_filter: str, callback: Callable[[str, bytes], None]) -> Callable[[], None]:
        return self.inner.subscribe(topic_filter, callback)


class Console:
    """One console connection to the broker.

    ``connect()`` subscribes to ``P/+/status``, ``P/+/reply``, ``P/+/events``
    (and ``P/+/telemetry`` with ``telemetry=True``); :meth:`sync` waits until
    the broker has delivered the retained statuses. Listeners added with
    :meth:`on_message` see every event, telemetry and status message.

    The client id is ``edge-fleet-<random>``: unique per run, so two consoles
    never take each other's session.

    Thread-safety: every public method may be called from any thread;
    listeners are called on paho's network thread.
    """

    def __init__(self, settings: BrokerSettings, *, telemetry: bool = False, client_id: str | None = None) -> None:
        from edge_agent.comms.client import TlsFiles, make_client
        from edge_agent.comms.mqtt import PahoLink
        from edge_agent.comms.topics import Topics

        self.settings = settings
        self.prefix = settings.prefix
        self.topics = Topics(settings.prefix)
        self.telemetry = telemetry
        self._sign_key = None
        if settings.sign_key is not None:
            from edge_agent.bundles.signing import load_private_key

            self._sign_key = load_private_key(settings.sign_key)  # a bad key file: exit 2 before connecting
        self.client_id = client_id or f"edge-fleet-{uuid.uuid4().hex[:12]}"
        tls = None
        if settings.uses_tls:
            tls = TlsFiles(settings.ca_certs, settings.certfile, settings.keyfile, settings.tls_insecure)
        try:
            # a clean session: the console follows retained messages, it needs nothing kept while away
            self.client = make_client(self.client_id, protocol=settings.protocol, persistent=False,
                                      username=settings.username, password=settings.password, tls=tls)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise UsageError(f"TLS settings: {exc}") from None
        self.client.max_inflight_messages_set(32)
        self.link = _CountingLink(PahoLink(self.client))
        self.devices: dict[str, DeviceInfo] = {}
        self.replies: dict[str, dict[str, tuple[dict[str, Any], float]]] = {}
        """command id -> device -> (reply, time.monotonic() it arrived)."""
        self.cond = threading.Condition()
        self._listeners: list[Callable[[str, str, dict[str, Any]], None]] = []
        self._connected = threading.Event()
        self._refused: str | None = None
        self._sync_token: str | None = None
        self._synced = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect

    # -- connection ----------------------------------------------------------------

    def connect(self, timeout: float = 10.0) -> "Console":
        s = self.settings
        t = self.topics
        for suffix, handler in (("status", self._on_status), ("reply", self._on_reply), ("events", self._on_event)):
            self.client.message_callback_add(t.every_device(suffix), handler)
        if self.telemetry:
            self.client.message_callback_add(t.every_device("telemetry"), self._on_telemetry)
        self.client.message_callback_add(self._sync_topic, self._on_sync)
        try:
            self.client.connect(s.host, s.port, keepalive=s.keepalive_s)
        except (OSError, ssl.SSLError) as exc:
            raise FleetError(f"cannot reach the broker at {s.host}:{s.port}: {exc}", code="broker_unreachable") from None
        self.client.loop_start()
        if not self._connected.wait(timeout) or self._refused:
            self.client.loop_stop()
            why = self._refused or f"no answer within {timeout:.0f} s"
            raise FleetError(f"the broker at {s.host}:{s.port} did not accept the console: {why}",
                             code="broker_refused")
        return self

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    def __enter__(self) -> "Console":
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def _sync_topic(self) -> str:
        return self.topics.console_sync(self.client_id)

    def _subscriptions(self) -> list[tuple[str, int]]:
        subs = [(self.topics.every_device(s), 1) for s in ("status", "reply", "events")]
        if self.telemetry:
            subs.append((self.topics.every_device("telemetry"), 0))
        return subs + [(self._sync_topic, 1)]

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._refused = str(reason)
            self._connected.set()
            return
        client.subscribe(self._subscriptions())
        self.link.inner.resubscribe()
        self._connected.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.warning("fleet console: connection to the broker lost (%s); reconnecting", reason)

    def sync(self, timeout: float = 5.0) -> None:
        """Wait until the retained statuses have arrived: a message published
        to our own topic after subscribing comes back after them (the broker
        delivers a client's messages in order)."""
        self._synced.clear()
        self._sync_token = uuid.uuid4().hex
        self.client.publish(self._sync_topic, self._sync_token, qos=1)
        if not self._synced.wait(timeout):
            log.warning("fleet console: the broker did not echo the sync message within %.0f s", timeout)

    def _on_sync(self, client: Any, userdata: Any, message: Any) -> None:
        if bytes(message.payload).decode(errors="replace") == self._sync_token:
            self._synced.set()

    # -- listeners ---------------------------------------------------------------------

    def on_message(self, listener: Callable[[str, str, dict[str, Any]], None]) -> Callable[[], None]:
        """``listener(kind, device, payload)`` for kind status|events|telemetry;
        returns a function that removes it."""
        with self.cond:
            self._listeners.append(listener)

        def remove() -> None:
            with self.cond:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return remove

    def _tell(self, kind: str, device: str, payload: dict[str, Any]) -> None:
        with self.cond:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(kind, device, payload)
            except Exception:
                log.exception("fleet console: a %s listener failed", kind)

    @staticmethod
    def _json(message: Any) -> dict[str, Any] | None:
        try:
            data = json.loads(bytes(message.payload))
        except (ValueError, UnicodeDecodeError):
            log.warning("fleet console: %s is not JSON; ignored", message.topic)
            return None
        return data if isinstance(data, dict) else None

    def _on_status(self, client: Any, userdata: Any, message: Any) -> None:
        device = self.topics.device_of(message.topic)
        if device is None:
            return
        data = self._json(message) if message.payload else {}
        if data is None:
            return
        with self.cond:
            info = self.devices.setdefault(device, DeviceInfo(device))
            if not data:  # the retained status was deleted
                info.status = {"state": "unknown"}
            elif data.get("state") in ("offline", "stopped") and "groups" not in data and info.groups is not None:
                # a last will carries only the state: keep what we knew
                info.status = {**info.status, **data}
            else:
                info.status = data
            self.cond.notify_all()
        self._tell("status", device, data)

    def _on_reply(self, client: Any, userdata: Any, message: Any) -> None:
        device = self.topics.device_of(message.topic)
        data = self._json(message)
        if device is None or data is None or not isinstance(data.get("id"), str):
            return
        with self.cond:
            self.replies.setdefault(data["id"], {}).setdefault(device, (data, time.monotonic()))
            self.cond.notify_all()

    def _on_event(self, client: Any, userdata: Any, message: Any) -> None:
        device = self.topics.device_of(message.topic)
        data = self._json(message)
        if device is not None and data is not None:
            self._tell("events", device, data)

    def _on_telemetry(self, client: Any, userdata: Any, message: Any) -> None:
        device = self.topics.device_of(message.topic)
        data = self._json(message)
        if device is None or data is None:
            return
        with self.cond:
            info = self.devices.setdefault(device, DeviceInfo(device, {"state": "unknown"}))
            info.telemetry = data
            self.cond.notify_all()  # collect_status waits for telemetry
        self._tell("telemetry", device, data)

    # -- devices and commands ------------------------------------------------------------

    def snapshot(self) -> dict[str, DeviceInfo]:
        with self.cond:
            return {d: replace(i, status=dict(i.status)) for d, i in sorted(self.devices.items())}

    def resolve(self, target: Target) -> tuple[list[str], list[str]]:
        """(online devices the target covers, covered devices not online).
        A device named with ``--device`` and never seen counts as not online."""
        with self.cond:
            infos = list(self.devices.values())
        online = sorted(i.device for i in infos if i.online and target.matches(i))
        offline = sorted(i.device for i in infos if not i.online and target.matches(i))
        if target.kind == "device":
            offline = sorted(set(offline) | (set(target.names) - set(online)))
        return online, offline

    def command_topic(self, target: Target | str) -> str:
        if isinstance(target, str):
            return self.topics.device(target).cmd
        if target.kind == "all":
            return self.topics.all_cmd
        if target.kind == "group":
            return self.topics.group_cmd(target.names[0])
        raise ValueError("a device target is sent to each device's own topic")

    def publish_command(self, topic: str, cmd_id: str, cmd: str, args: dict[str, Any], *,
                        expiry_s: float | None = None, timeout: float = 10.0) -> None:
        """Publish one command (QoS 1). Devices keep a persistent session, so
        the broker queues a command for a member that is away; with MQTT 5,
        ``expiry_s`` makes it drop the command once the console has stopped
        waiting, rather than run it on the device whenever it returns."""
        payload = command_payload(cmd_id, cmd, args, sign_key=self._sign_key)
        properties = None
        if expiry_s is not None and self.settings.protocol == "5":
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            properties = Properties(PacketTypes.PUBLISH)
            properties.MessageExpiryInterval = max(1, math.ceil(expiry_s))
        info = self.client.publish(topic, payload, qos=1, properties=properties)
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as exc:
            raise FleetError(f"could not publish the command on {topic}: {exc}", code="publish_failed") from None

    def reply(self, cmd_id: str, device: str) -> tuple[dict[str, Any], float] | None:
        with self.cond:
            return self.replies.get(cmd_id, {}).get(device)


def collect_status(console: Console, *, group: str | None = None, telemetry_wait_s: float = 2.0) -> dict[str, DeviceInfo]:
    """The retained statuses (of ``group``), with telemetry that arrives
    within ``telemetry_wait_s`` (the console must subscribe to telemetry)."""
    console.sync()
    if telemetry_wait_s > 0:
        deadline = time.monotonic() + telemetry_wait_s
        with console.cond:
            while (left := deadline - time.monotonic()) > 0:
                online = [i for i in console.devices.values() if i.online and (group is None or group in (i.groups or []))]
                if online and all(i.telemetry is not None for i in online):
                    break
                console.cond.wait(left)
    devices = console.snapshot()
    if group is not None:
        devices = {d: i for d, i in devices.items() if group in (i.groups or [])}
    return devices
