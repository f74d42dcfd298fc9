"""The fleet console: commands out, replies, events and telemetry in
(CONTRACT §1 ``edge-agent fleet``, §3 MQTT). No click here; the command line
is :mod:`edge_agent.cli.fleet`, and a script or a test can drive a fleet with
this module alone.

* :class:`BrokerSettings` says where the broker is (from an agent-style
  TOML's ``[mqtt]`` and/or options).
* :class:`Console` is one connection: it follows every device's retained
  ``P/D/status`` (so it knows who is online and in which groups), the
  ``reply`` and ``events`` topics, and optionally ``telemetry``.
* :func:`deploy` ships a bundle to a device, a group or every device: over
  MQTT (one :class:`~edge_agent.comms.transfer.TransferSender` for all, each
  chunk published once) or by URL (given, or served by the console itself
  with :class:`ArchiveServer`, which answers HTTP ``Range`` requests so a
  device resumes an interrupted download). :func:`run_command` sends any
  other command (``rollback``, ``ping``...) and collects one outcome per
  device.

Targets are resolved from the retained statuses: a device whose status is
``online`` is sent the command; one that is known but not online (its last
status is ``offline`` or ``stopped``), or was asked for by name and never
seen, gets the outcome ``offline`` at once, or, with ``wait_online``, is
given that long to come online and is then sent the command on its own
topic (with the same command id, so a device that had it already answers
with its first reply and does not run it twice).

Threading: paho's network thread runs the message callbacks; they only
record what arrived and notify a condition. The caller's thread waits on it.
Progress callbacks run on the network thread and must be quick.
"""

from __future__ import annotations

import http.server
import json
import logging
import math
import re
import shutil
import socketserver
import ssl
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

from edge_agent.errors import EdgeAgentError, UsageError

log = logging.getLogger(__name__)

TargetKind = Literal["device", "group", "all"]
DELIVERY_SLACK_S = 5.0
"""A command expires (MQTT 5) this long after the console stops waiting for
devices to come online."""
REASK_S = 15.0
"""A device that got a command and has said nothing about it (no event, no
reply) for this long is sent the same command (same id) again on its own
topic, then after twice as long, and so on: the command or its reply may have
been lost (a broker drops messages for a client whose queue is full). A
device never runs an id twice: it answers a repeat from memory, or when the
first run ends."""
"""The deploy steps a device reports in ``deploy_progress`` events, in order."""


class FleetError(EdgeAgentError):
    """The console could not do its part (broker unreachable, bad bundle
    path, nothing to target). Exit code 1; usage mistakes are
    :class:`~edge_agent.errors.UsageError` (exit code 2)."""

    code = "fleet_error"


# -- where the broker is ---------------------------------------------------------------


@dataclass(frozen=True)
class BrokerSettings:
    """The broker's address and credentials, as the agents use them."""

    host: str = "127.0.0.1"
    port: int = 1883
    prefix: str = "edge"
    username: str | None = None
    password: str | None = None
    ca_certs: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    tls: bool = False
    tls_insecure: bool = False
    protocol: Literal["5", "3.1.1"] = "5"
    keepalive_s: int = 30
    sign_key: Path | None = None  # Ed25519 private key: every command is signed with it

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise UsageError(f"broker port {self.port} is not in 1-65535")
        if not self.prefix or any(ch in self.prefix for ch in "+#") or self.prefix.strip("/") != self.prefix:
            raise UsageError(f"topic prefix {self.prefix!r}: must not be empty, contain '+' or '#', or start or end with '/'")
        if (self.certfile is None) != (self.keyfile is None):
            raise UsageError("--certfile and --keyfile must be given together")
        if self.password is not None and self.username is None:
            raise UsageError("a password is given without a user name")

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.ca_certs is not None or self.certfile is not None

    @classmethod
    def from_options(cls, config: Path | str | None = None, **options: Any) -> "BrokerSettings":
        """``[mqtt]`` of an agent config file (when given), then every option
        that is not ``None`` on top. Raises ConfigError/UsageError (exit 2)."""
        base: dict[str, Any] = {}
        if config is not None:
            from edge_agent.config import load_config

            cfg = load_config(config)
            if cfg.mqtt is None:
                raise UsageError(f"{config}: has no [mqtt] section: the console needs the broker's address")
            m = cfg.mqtt
            base = dict(host=m.host, port=m.port, prefix=m.topic_prefix, username=m.username, password=m.password,
                        protocol=m.protocol, keepalive_s=m.keepalive_s)
            if m.tls is not None:
                base.update(tls=True, ca_certs=m.tls.ca_certs, certfile=m.tls.certfile, keyfile=m.tls.keyfile,
                            tls_insecure=m.tls.insecure)
        for key, value in options.items():
            if value is not None:
                base[key] = Path(value) if key in ("ca_certs", "certfile", "keyfile", "sign_key") else value
        return cls(**base)


# -- what the console knows about each device ------------------------------------------


@dataclass
class DeviceInfo:
    """The last retained status of one device, and its last telemetry."""

    device: str
    status: dict[str, Any] = field(default_factory=dict)
    telemetry: dict[str, Any] | None = None

    @property
    def state(self) -> str:
        state = self.status.get("state")
        return state if isinstance(state, str) else "unknown"

    @property
    def online(self) -> bool:
        return self.state == "online"

    @property
    def groups(self) -> list[str] | None:
        """None where the status does not say (a last will carries only the state)."""
        groups = self.status.get("groups")
        return [g for g in groups if isinstance(g, str)] if isinstance(groups, list) else None

    @property
    def models(self) -> dict[str, Any]:
        models = self.status.get("models")
        return models if isinstance(models, dict) else {}

    @property
    def last_seen(self) -> float | None:
        """The newest timestamp the device itself sent (status or telemetry)."""
        stamps = [t for t in (self.status.get("ts"), (self.telemetry or {}).get("ts")) if isinstance(t, (int, float))]
        return max(stamps) if stamps else None


@dataclass(frozen=True)
class Target:
    """Who a command is for: ``device`` (one or more ids), ``group``, ``all``."""

    kind: TargetKind
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind == "all" and self.names:
            raise UsageError("--all takes no name")
        if self.kind != "all" and not self.names:
            raise UsageError(f"a {self.kind} target needs a name")
        if self.kind == "group" and len(self.names) != 1:
            raise UsageError("give one --group")
        from edge_agent.config import _NAME_RE

        for name in self.names:
            if not _NAME_RE.fullmatch(name):
                raise UsageError(f"{name!r} is not a valid {self.kind} name")

    @classmethod
    def of(cls, devices: Iterable[str] = (), group: str | None = None, all_: bool = False) -> "Target":
        devices = tuple(devices)
        given = sum([bool(devices), group is not None, all_])
        if given != 1:
            raise UsageError("choose the targets with exactly one of --device, --group and --all")
        if devices:
            return cls("device", devices)
        if group is not None:
            return cls("group", (group,))
        return cls("all")

    def matches(self, info: DeviceInfo) -> bool:
        if self.kind == "all":
            return True
        if self.kind == "device":
            return info.device in self.names
        return self.names[0] in (info.groups or [])

    def describe(self) -> str:
        if self.kind == "all":
            return "every device"
        if self.kind == "group":
            return f"group {self.names[0]}"
        return ", ".join(self.names)


@dataclass
class Outcome:
    """What became of one command on one device."""

    device: str
    ok: bool
    code: str | None = None
    """None when ok; the reply's error code, ``offline`` or ``timeout``."""
    message: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None
    """From sending the command (to this device) to its reply."""

    @property
    def active(self) -> Any:
        return self.result.get("active", self.result.get("version"))


@dataclass
class DeviceProgress:
    """Where one device's deploy stands, from its events."""

    device: str
    step: str = "waiting"
    received: int | None = None
    total: int | None = None
    done: bool = False
    ok: bool | None = None
    updated: float = 0.0
    """time.monotonic() of the device's last event."""

    @property
    def fraction(self) -> float | None:
        if self.received is None or not self.total:
            return None
        return min(1.0, self.received / self.total)


# -- the connection ------------------------------------------------------------------------


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
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from edge_agent.comms.mqtt import PahoLink

        self.settings = settings
        self.prefix = settings.prefix
        self.telemetry = telemetry
        self._sign_key = None
        if settings.sign_key is not None:
            from edge_agent.bundles.signing import load_private_key

            self._sign_key = load_private_key(settings.sign_key)  # a bad key file: exit 2 before connecting
        self.client_id = client_id or f"edge-fleet-{uuid.uuid4().hex[:12]}"
        protocol = mqtt.MQTTv5 if settings.protocol == "5" else mqtt.MQTTv311
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=protocol)
        self.client.max_inflight_messages_set(32)
        if settings.username is not None:
            self.client.username_pw_set(settings.username, settings.password)
        if settings.uses_tls:
            try:
                self.client.tls_set(
                    ca_certs=str(settings.ca_certs) if settings.ca_certs else None,
                    certfile=str(settings.certfile) if settings.certfile else None,
                    keyfile=str(settings.keyfile) if settings.keyfile else None,
                    cert_reqs=ssl.CERT_REQUIRED,
                )
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise UsageError(f"TLS settings: {exc}") from None
            self.client.tls_insecure_set(settings.tls_insecure)
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
        p = self.prefix
        for suffix, handler in (("status", self._on_status), ("reply", self._on_reply), ("events", self._on_event)):
            self.client.message_callback_add(f"{p}/+/{suffix}", handler)
        if self.telemetry:
            self.client.message_callback_add(f"{p}/+/telemetry", self._on_telemetry)
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
        return f"{self.prefix}/_console/{self.client_id}/sync"

    def _subscriptions(self) -> list[tuple[str, int]]:
        subs = [(f"{self.prefix}/+/{s}", 1) for s in ("status", "reply", "events")]
        if self.telemetry:
            subs.append((f"{self.prefix}/+/telemetry", 0))
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

    def _device_of(self, topic: str) -> str | None:
        parts = topic.split("/")
        prefix_parts = self.prefix.count("/") + 1
        if len(parts) != prefix_parts + 2 or parts[prefix_parts] in ("all", "groups", "transfers", "_console"):
            return None
        return parts[prefix_parts]

    @staticmethod
    def _json(message: Any) -> dict[str, Any] | None:
        try:
            data = json.loads(bytes(message.payload))
        except (ValueError, UnicodeDecodeError):
            log.warning("fleet console: %s is not JSON; ignored", message.topic)
            return None
        return data if isinstance(data, dict) else None

    def _on_status(self, client: Any, userdata: Any, message: Any) -> None:
        device = self._device_of(message.topic)
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
        device = self._device_of(message.topic)
        data = self._json(message)
        if device is None or data is None or not isinstance(data.get("id"), str):
            return
        with self.cond:
            self.replies.setdefault(data["id"], {}).setdefault(device, (data, time.monotonic()))
            self.cond.notify_all()

    def _on_event(self, client: Any, userdata: Any, message: Any) -> None:
        device = self._device_of(message.topic)
        data = self._json(message)
        if device is not None and data is not None:
            self._tell("events", device, data)

    def _on_telemetry(self, client: Any, userdata: Any, message: Any) -> None:
        device = self._device_of(message.topic)
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
            return f"{self.prefix}/{target}/cmd"
        if target.kind == "all":
            return f"{self.prefix}/all/cmd"
        if target.kind == "group":
            return f"{self.prefix}/groups/{target.names[0]}/cmd"
        raise ValueError("a device target is sent to each device's own topic")

    def publish_command(self, topic: str, cmd_id: str, cmd: str, args: dict[str, Any], *,
                        expiry_s: float | None = None, timeout: float = 10.0) -> None:
        """Publish one command (QoS 1). Devices keep a persistent session, so
        the broker queues a command for a member that is away; with MQTT 5,
        ``expiry_s`` makes it drop the command once the console has stopped
        waiting, rather than run it on the device whenever it returns."""
        message: dict[str, Any] = {"id": cmd_id, "cmd": cmd, "args": args, "ts": time.time()}
        if self._sign_key is not None:
            from edge_agent.bundles.signing import sign_command

            message["sig"] = sign_command(self._sign_key, cmd_id, cmd, args, message["ts"])
        payload = json.dumps(message, separators=(",", ":"))
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


def new_command_id(cmd: str) -> str:
    return f"fleet-{cmd}-{uuid.uuid4().hex[:12]}"


def outcome_of(device: str, reply: dict[str, Any], seconds: float | None) -> Outcome:
    """A device's reply to a command as an :class:`Outcome`."""
    if reply.get("ok"):
        result = reply.get("result") if isinstance(reply.get("result"), dict) else {}
        return Outcome(device, True, result=result, seconds=seconds)
    err = reply.get("error") if isinstance(reply.get("error"), dict) else {}
    return Outcome(device, False, code=str(err.get("code") or "error"), message=str(err.get("message") or ""),
                   seconds=seconds)


def _offline_outcome(device: str, info: DeviceInfo | None, waited: float) -> Outcome:
    if info is None:
        message = "never seen on this broker (no status)"
    else:
        when = info.last_seen
        ago = f", last seen {format_age(time.time() - when)} ago" if when else ""
        message = f"not online (status {info.state}{ago})"
    if waited > 0:
        message += f"; did not come online within {waited:.0f} s"
    return Outcome(device, False, code="offline", message=message)


class _Reasker:
    """Which devices to ask again for one command: those silent about it
    (no event carrying its id) for ``every`` seconds since they were last
    asked or last spoke of it; the interval doubles per device, up to 8x."""

    def __init__(self, console: Console, cmd_id: str, every: float | None) -> None:
        self.console = console
        self.cmd_id = cmd_id
        self.every = every
        self.active_at: dict[str, float] = {}
        self.interval: dict[str, float] = {}
        self.asked = 0
        self._remove = console.on_message(self._on_message) if every else (lambda: None)

    def _on_message(self, kind: str, device: str, payload: dict[str, Any]) -> None:
        if kind == "events" and payload.get("id") == self.cmd_id:
            with self.console.cond:
                self.active_at[device] = time.monotonic()

    def sent(self, devices: list[str], at: float) -> None:
        with self.console.cond:
            self.active_at.update({d: at for d in devices})

    def due(self, missing: list[str], now: float) -> list[str]:
        """(condition held)"""
        if not self.every:
            return []
        due = []
        for device in missing:
            every = self.interval.setdefault(device, self.every)
            if now - self.active_at.get(device, now) >= every:
                due.append(device)
                self.active_at[device] = now
                self.interval[device] = min(every * 2, 8 * self.every)
        self.asked += len(due)
        return due

    def close(self) -> None:
        self._remove()


def run_command(
    console: Console,
    target: Target,
    cmd: str,
    args: dict[str, Any],
    *,
    timeout: float = 60.0,
    wait_online: float = 0.0,
    cmd_id: str | None = None,
    on_sent: Callable[[list[str]], None] | None = None,
    before_send: Callable[[list[str], list[str]], None] | None = None,
    after_send: Callable[[list[str]], None] | None = None,
    reask_s: float | None = REASK_S,
) -> list[Outcome]:
    """Send ``cmd`` to ``target`` and wait (at most ``timeout`` s) for one
    reply per device. Returns one outcome per device, sorted by device.

    A device that has not replied and has said nothing about the command for
    ``reask_s`` seconds is asked again (the same id, on its own topic; see
    :data:`REASK_S`); None never asks again.

    A group or ``--all`` command is published once on the group's or the
    fleet's topic; devices named one by one get it on their own topics.
    Devices not online are ``offline`` at once, or, with ``wait_online``,
    get the command on their own topic if they come online within that many
    seconds (a device that is new to the group counts too while the console
    waits). ``before_send(online, offline)`` runs just before the first publish,
    ``after_send(online)`` just after it, ``on_sent([device])`` whenever a
    late device is sent the command.
    """
    console.sync()
    cmd_id = cmd_id or new_command_id(cmd)
    online, offline = console.resolve(target)
    reasker = _Reasker(console, cmd_id, reask_s)
    try:
        return _send_and_wait(console, target, cmd, args, cmd_id, online, offline, reasker, timeout=timeout,
                              wait_online=wait_online, on_sent=on_sent, before_send=before_send,
                              after_send=after_send)
    finally:
        reasker.close()
        if reasker.asked:
            log.warning("fleet: %s %s: asked %d time(s) again for a reply that did not come", cmd, cmd_id, reasker.asked)


def _send_and_wait(console: Console, target: Target, cmd: str, args: dict[str, Any], cmd_id: str,
                   online: list[str], offline: list[str], reasker: _Reasker, *, timeout: float,
                   wait_online: float, on_sent: Callable[[list[str]], None] | None,
                   before_send: Callable[[list[str], list[str]], None] | None,
                   after_send: Callable[[list[str]], None] | None) -> list[Outcome]:
    """The body of :func:`run_command`."""
    sent_at: dict[str, float] = {}
    start = time.monotonic()
    deadline = start + timeout
    online_deadline = start + min(wait_online, timeout)
    # Online devices get the command at once; one that is away receives it from
    # its persistent session only while we still wait for it.
    expiry = min(wait_online, timeout) + DELIVERY_SLACK_S
    if before_send is not None:
        before_send(online, offline)
    if online:
        if target.kind == "device":
            for device in online:
                console.publish_command(console.command_topic(device), cmd_id, cmd, args, expiry_s=expiry)
        else:
            console.publish_command(console.command_topic(target), cmd_id, cmd, args, expiry_s=expiry)
        now = time.monotonic()
        sent_at.update({d: now for d in online})
        reasker.sent(online, now)
    if after_send is not None:
        after_send(online)
    waiting = set(offline) if wait_online > 0 else set()

    def late_comers() -> list[str]:
        """Devices that came online while we wait and should get the command."""
        if time.monotonic() >= online_deadline:
            return []
        with console.cond:
            return sorted(
                d for d, i in console.devices.items()
                if i.online and d not in sent_at and (d in waiting or target.matches(i))
            )

    while True:
        for device in late_comers():
            log.info("fleet: %s came online: sending it %s %s", device, cmd, cmd_id)
            console.publish_command(console.command_topic(device), cmd_id, cmd, args, expiry_s=DELIVERY_SLACK_S)
            sent_at[device] = time.monotonic()
            reasker.sent([device], sent_at[device])
            waiting.discard(device)
            if on_sent is not None:
                on_sent([device])
        with console.cond:
            got = console.replies.get(cmd_id, {})
            missing = [d for d in sent_at if d not in got]
            now = time.monotonic()
            if (not missing and (not waiting or now >= online_deadline)) or now >= deadline:
                break
            again = reasker.due(missing, now)
            if not again:
                wake = deadline if not waiting or now >= online_deadline else min(deadline, online_deadline)
                console.cond.wait(min(0.5, max(0.01, wake - now)))
        for device in again:
            log.info("fleet: %s has said nothing about %s %s for a while: asking again", device, cmd, cmd_id)
            console.publish_command(console.command_topic(device), cmd_id, cmd, args,
                                    expiry_s=max(1.0, deadline - time.monotonic()) + DELIVERY_SLACK_S)

    outcomes: dict[str, Outcome] = {}
    snapshot = console.snapshot()
    for device, at in sent_at.items():
        answer = console.reply(cmd_id, device)
        if answer is not None:
            reply, when = answer
            outcomes[device] = outcome_of(device, reply, round(when - at, 3))
        else:
            info = snapshot.get(device)
            if info is not None and not info.online:
                outcomes[device] = Outcome(device, False, code="offline", message="went offline before it replied")
            else:
                outcomes[device] = Outcome(device, False, code="timeout", message=f"no reply within {timeout:.0f} s")
    for device in set(offline) - set(sent_at):
        outcomes[device] = _offline_outcome(device, snapshot.get(device), wait_online)
    return [outcomes[d] for d in sorted(outcomes)]


# -- bundles --------------------------------------------------------------------------------


@dataclass
class PreparedBundle:
    """A bundle archive ready to ship, with what the deploy command needs."""

    archive: Path
    model: str
    version: int
    sha256: str
    size: int
    temporary: bool = False
    """True when the console made the archive (from a directory) and removes it."""

    def cleanup(self) -> None:
        if self.temporary:
            shutil.rmtree(self.archive.parent, ignore_errors=True)


def prepare_bundle(path: Path | str) -> PreparedBundle:
    """Verify the bundle at ``path`` (directory or archive) as a device will
    and, for a directory, archive it (``.tar.gz``) to a temporary file."""
    from edge_agent.bundles import is_archive, open_bundle, sha256_file
    from edge_agent.bundles.pack import write_bundle
    from edge_agent.errors import BundleError

    path = Path(path).expanduser()
    if not path.exists():
        raise UsageError(f"bundle {path}: not found")
    if not path.is_dir() and not is_archive(path):
        raise UsageError(f"bundle {path}: expected a bundle directory or a .tar/.tar.gz archive")
    try:
        with open_bundle(path) as bundle:
            manifest = bundle.manifest
    except BundleError as exc:
        raise UsageError(f"bundle {path} cannot be deployed: {exc}") from None
    temporary = False
    archive = path
    if path.is_dir():
        folder = Path(tempfile.mkdtemp(prefix="edge-fleet-"))
        archive = folder / f"{manifest.name}-{manifest.version}.tar.gz"
        write_bundle(path, archive)
        temporary = True
    return PreparedBundle(archive, manifest.name, manifest.version, sha256_file(archive), archive.stat().st_size,
                          temporary)


CONSOLE_CHUNK_SIZE = 256 * 1024


def chunk_size_for(size: int) -> int:
    """256 KiB, or larger for a large file so the transfer's meta (one sha256
    per chunk) stays below about 70 kB: at most 1024 chunks, at most 4 MiB.

    Larger than the transfer's own default (64 KiB) because a fleet pays per
    message as much as per byte: every device handles every chunk, and four
    times fewer messages cost the devices and the broker much less (see
    benchmarks/fleet.py); a chunk lost is still only 256 KiB to ask again."""
    from edge_agent.comms.transfer import MAX_CHUNK_SIZE

    wanted = math.ceil(size / 1024 / 1024) * 1024
    return min(MAX_CHUNK_SIZE, max(CONSOLE_CHUNK_SIZE, wanted))


# -- serving an archive over HTTP --------------------------------------------------------------

_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


class _ArchiveHandler(http.server.BaseHTTPRequestHandler):
    server: "_ArchiveHTTPServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("archive server: %s " + fmt, self.address_string(), *args)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, *, body: bool) -> None:
        owner = self.server.owner
        if self.path.split("?", 1)[0] != f"/{owner.path.name}":
            self.send_error(404, "not found")
            return
        size = owner.size
        start, end, status = 0, size - 1, 200
        header = self.headers.get("Range")
        if header:
            match = _RANGE_RE.match(header.strip())
            if not match or (not match.group(1) and not match.group(2)):
                self.send_error(416, "bad range")
                return
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            else:  # the last N bytes
                start = max(0, size - int(match.group(2)))
            if start >= size or start > end:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if not body:
            return
        with open(owner.path, "rb") as fh:
            fh.seek(start)
            left = end - start + 1
            while left > 0:
                block = fh.read(min(256 * 1024, left))
                if not block:
                    break
                try:
                    self.wfile.write(block)
                except (BrokenPipeError, ConnectionResetError):
                    return
                owner.add_sent(len(block))
                left -= len(block)


class _ArchiveHTTPServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: "ArchiveServer"


class ArchiveServer:
    """Serves one file over HTTP at ``/<file name>`` for the duration of a
    deploy, with ``Range`` support (a device resumes a broken download).

    ``host``/``port`` are bound (port 0: any free port); ``url`` uses
    ``advertise`` as the host devices connect to (default: ``host``, or this
    machine's name when ``host`` is a wildcard address).
    """

    def __init__(self, path: Path, host: str, port: int, *, advertise: str | None = None) -> None:
        self.path = Path(path)
        self.size = self.path.stat().st_size
        self.bytes_sent = 0
        self._lock = threading.Lock()
        try:
            self._server = _ArchiveHTTPServer((host, port), _ArchiveHandler)
        except OSError as exc:
            raise FleetError(f"cannot serve on {host}:{port}: {exc.strerror or exc}", code="serve_failed") from None
        self._server.owner = self
        bound_port = self._server.server_address[1]
        shown = advertise or (host if host not in ("", "0.0.0.0", "::") else _this_host())
        if ":" in shown and not shown.startswith("["):
            shown = f"[{shown}]"
        self.url = f"http://{shown}:{bound_port}/{self.path.name}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fleet-http", daemon=True)

    def add_sent(self, n: int) -> None:
        with self._lock:
            self.bytes_sent += n

    def start(self) -> "ArchiveServer":
        self._thread.start()
        log.info("fleet: serving %s at %s", self.path, self.url)
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "ArchiveServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _this_host() -> str:
    import socket

    return socket.getfqdn() or socket.gethostname()


def parse_host_port(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``; ``:PORT`` binds every address)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"{value!r}: expected HOST:PORT, e.g. 0.0.0.0:8600")
    return host.strip("[]") or "0.0.0.0", int(port)


# -- deploy ---------------------------------------------------------------------------------------


@dataclass
class DeployReport:
    """Everything a deploy did, for the table and for benchmarks."""

    bundle: PreparedBundle
    via: str
    url: str | None
    outcomes: list[Outcome]
    seconds: float
    bytes_sent: int
    """Bytes the console itself sent: transfer chunks and meta, or HTTP bodies."""
    chunks_published: int = 0
    needs: int = 0

    @property
    def ok(self) -> bool:
        return bool(self.outcomes) and all(o.ok for o in self.outcomes)


def check_delivery(via: str, url: str | None, serve: Any, advertise: str | None) -> None:
    """The delivery options of a deploy make sense together (UsageError if not)."""
    if via not in ("mqtt", "url"):
        raise UsageError(f"--via {via!r}: use mqtt or url")
    if via == "url" and (url is None) == (serve is None):
        raise UsageError("--via url needs exactly one of --url and --serve")
    if via == "mqtt" and (url is not None or serve is not None):
        raise UsageError("--url and --serve go with --via url")
    if advertise and serve is None:
        raise UsageError("--advertise goes with --serve")


def deploy(
    console: Console,
    bundle: PreparedBundle,
    target: Target,
    *,
    via: Literal["mqtt", "url"] = "mqtt",
    url: str | None = None,
    serve: tuple[str, int] | None = None,
    activate: bool = True,
    label: str | None = None,
    timeout: float = 600.0,
    wait_online: float = 0.0,
    join_wait_s: float = 5.0,
    chunk_size: int | None = None,
    rate_bytes_s: float | None = None,
    window_bytes: int = 2 * 1024 * 1024,
    repeat_after_s: float = 10.0,
    advertise: str | None = None,
    progress: Callable[[DeviceProgress], None] | None = None,
    on_targets: Callable[[list[str], list[str]], None] | None = None,
    reask_s: float | None = REASK_S,
) -> DeployReport:
    """Deploy ``bundle`` to ``target`` and wait for every device's reply.

    ``via="mqtt"``: the deploy command goes out first (devices start
    listening for the transfer), the console waits up to ``join_wait_s`` for
    the targets to report the ``transfer`` step (they listen), then publishes the transfer
    once for all of them and serves ``need`` requests until every device
    replied; the first pass keeps within ``window_bytes`` of the slowest
    device's reported progress, so that a busy fleet is not flooded into
    asking for chunks again; a chunk is re-published for a ``need`` at most
    every ``repeat_after_s`` (each repeat reaches every device, and under
    load a device asks for chunks that are still queued for it).
    ``via="url"``: the command carries ``url``, or the URL of an
    :class:`ArchiveServer` on ``serve`` (host, port) run for the duration,
    reached by the devices at ``advertise`` (default: the bound host).

    ``progress(DeviceProgress)`` is called on paho's thread at every event of
    this deploy; ``on_targets(online, offline)`` once the targets are known.
    """
    from edge_agent.comms.transfer import Topics, TransferSender

    check_delivery(via, url, serve, advertise)
    cmd_id = new_command_id("deploy")
    args: dict[str, Any] = {"model": bundle.model, "version": bundle.version, "sha256": bundle.sha256,
                            "size": bundle.size, "activate": activate}
    if label is not None:
        args["label"] = label
    server: ArchiveServer | None = None
    sender: TransferSender | None = None
    states: dict[str, DeviceProgress] = {}
    started = threading.Condition()
    bytes_before = console.link.bytes

    def on_message(kind: str, device: str, data: dict[str, Any]) -> None:
        if kind != "events" or data.get("id") != cmd_id:
            return
        with started:
            st = states.setdefault(device, DeviceProgress(device))
            st.updated = time.monotonic()
            event = data.get("event")
            if event == "deploy_started":
                st.step = "started" if st.step == "waiting" else st.step
            elif event == "deploy_progress":
                step = data.get("step")
                if isinstance(step, str):
                    if step != st.step:
                        st.received = st.total = None
                    st.step = step
                for key in ("received", "total"):
                    if isinstance(data.get(key), int):
                        setattr(st, key, data[key])
            elif event in ("deploy_done", "deploy_failed"):
                st.done, st.ok = True, event == "deploy_done"
                st.step = "done" if st.ok else f"failed: {data.get('code', 'error')}"
            else:
                return
            started.notify_all()
            snapshot = replace(st)
        if progress is not None:
            progress(snapshot)

    def before_send(online: list[str], offline: list[str]) -> None:
        with started:
            for device in online:
                states.setdefault(device, DeviceProgress(device))
        if on_targets is not None:
            on_targets(online, offline)

    def after_send(online: list[str]) -> None:
        nonlocal sender
        if via != "mqtt" or (not online and wait_online <= 0):
            return
        # Let the devices subscribe to the transfer before its chunks flow, so
        # the first pass reaches them all: a device reports the "transfer"
        # step once it listens. One that is late asks for the rest.
        limit = time.monotonic() + (join_wait_s if online else 0)
        with started:
            while any(states.get(d, DeviceProgress(d)).step in ("waiting", "started") for d in online):
                left = limit - time.monotonic()
                if left <= 0:
                    break
                started.wait(left)
        size = chunk_size or chunk_size_for(bundle.size)
        link = _PacedLink(console.link, Topics(console.prefix, transfer_id).chunk_prefix, size, bundle.size,
                          window_bytes, started, lambda: _slowest(states, online, stall_s=3.0))
        sender = TransferSender(link, console.prefix, bundle.archive, tid=transfer_id, chunk_size=size,
                                rate_bytes_s=rate_bytes_s, repeat_after_s=repeat_after_s)
        sender.start()

    def on_sent(devices: list[str]) -> None:
        with started:
            for device in devices:
                states.setdefault(device, DeviceProgress(device))

    transfer_id = uuid.uuid4().hex
    t0 = time.monotonic()
    remove = console.on_message(on_message)
    try:
        if via == "mqtt":
            args["transfer"] = transfer_id
        else:
            if serve is not None:
                server = ArchiveServer(bundle.archive, serve[0], serve[1], advertise=advertise).start()
                url = server.url
            args["url"] = url
        outcomes = run_command(console, target, "deploy", args, timeout=timeout, wait_online=wait_online,
                               reask_s=reask_s,
                               cmd_id=cmd_id, before_send=before_send, after_send=after_send, on_sent=on_sent)
    finally:
        remove()
        if sender is not None:
            sender.close()
        if server is not None:
            server.close()
    seconds = time.monotonic() - t0
    sent = server.bytes_sent if server is not None else console.link.bytes - bytes_before
    return DeployReport(bundle, via, args.get("url"), outcomes, round(seconds, 3), sent,
                        chunks_published=sender.published if sender else 0,
                        needs=len(sender.needs) if sender else 0)


class _PacedLink:
    """Flow control for a transfer's first pass: a new chunk is published only
    while it ends at most ``window`` bytes beyond what the slowest devices
    reported receiving (``slowest()``; None: nobody to wait for). Devices
    report at most twice a second, so the window allows about twice its size
    per second. A device silent for a while is not waited for (``slowest``
    leaves it out); re-published chunks are never held.

    Flooding a fleet faster than it reads does not make it faster: the broker
    queues, a device busy with its backlog hears nothing new for seconds and
    asks for everything again, and every device receives the repeats.
    """

    def __init__(self, inner: Any, chunk_prefix: str, chunk_size: int, size: int, window: int,
                 cond: threading.Condition, slowest: Callable[[], int | None]) -> None:
        self.inner = inner
        self.chunk_prefix = chunk_prefix
        self.chunk_size = chunk_size
        self.size = size
        self.window = max(window, chunk_size)
        self.cond = cond
        self.slowest = slowest
        self.highest = -1

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> Any:
        if topic.startswith(self.chunk_prefix):
            index = int(topic.rsplit("/", 1)[1])
            if index > self.highest:
                self.highest = index
                end = min((index + 1) * self.chunk_size, self.size)
                with self.cond:
                    while (low := self.slowest()) is not None and end - low > self.window:
                        self.cond.wait(0.25)
        return self.inner.publish(topic, payload, qos=qos, retain=retain)

    def subscribe(self, topic_filter: str, callback: Callable[[str, bytes], None]) -> Callable[[], None]:
        return self.inner.subscribe(topic_filter, callback)


def _slowest(states: dict[str, DeviceProgress], devices: list[str], *, stall_s: float) -> int | None:
    """The bytes received by the slowest of ``devices`` still receiving and
    heard from within ``stall_s`` (condition held)."""
    now = time.monotonic()
    lows = []
    for device in devices:
        st = states.get(device)
        if st is None or st.done or now - st.updated > stall_s:
            continue
        if st.step in ("waiting", "started"):
            lows.append(0)
        elif st.step == "transfer":
            lows.append(st.received or 0)
    return min(lows) if lows else None


# -- rendering helpers (plain text, shared by the CLI and benchmarks) ---------------------------


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f}m"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


def outcome_rows(outcomes: list[Outcome]) -> list[list[str]]:
    rows = []
    for o in outcomes:
        result = "ok" if o.ok else (o.code or "error")
        active = o.active
        rows.append([o.device, result, "-" if active is None else str(active),
                     "-" if o.seconds is None else f"{o.seconds:.1f}", "" if o.ok else o.message])
    return rows


def status_rows(devices: dict[str, DeviceInfo], *, now: float | None = None) -> list[list[str]]:
    """DEVICE STATE LAST-SEEN AGENT MODELS CPU MEM TEMP, one row per device."""
    now = time.time() if now is None else now
    rows = []
    for device, info in sorted(devices.items()):
        models = []
        for name, m in sorted(info.models.items()):
            if not isinstance(m, dict):
                continue
            labels = m.get("labels") if isinstance(m.get("labels"), dict) else {}
            marks = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
            probation = " (probation)" if m.get("probation") else ""
            models.append(f"{name}:v{m.get('active', '-')}{probation}" + (f" [{marks}]" if marks else ""))
        tel = info.telemetry or {}

        def num(key: str, unit: str) -> str:
            value = tel.get(key)
            return f"{value:.0f}{unit}" if isinstance(value, (int, float)) else "-"

        seen = info.last_seen
        rows.append([
            device, info.state, format_age(now - seen) if seen else "-", str(info.status.get("agent_version", "-")),
            " ".join(models) or "-", num("cpu_percent", "%"), num("mem_percent", "%"), num("temp_c", "C"),
        ])
    return rows


STATUS_HEAD = ["DEVICE", "STATE", "SEEN", "AGENT", "MODELS", "CPU", "MEM", "TEMP"]
OUTCOME_HEAD = ["DEVICE", "RESULT", "ACTIVE", "SECONDS", "MESSAGE"]


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


def describe_message(kind: str, device: str, data: dict[str, Any]) -> str:
    """One line for ``fleet watch``."""
    stamp = data.get("ts")
    clock = time.strftime("%H:%M:%S", time.localtime(stamp if isinstance(stamp, (int, float)) else time.time()))
    if kind == "telemetry":
        parts = [f"cpu {data['cpu_percent']:.0f}%" if isinstance(data.get("cpu_percent"), (int, float)) else None,
                 f"mem {data['mem_percent']:.0f}%" if isinstance(data.get("mem_percent"), (int, float)) else None,
                 f"temp {data['temp_c']:.0f}C" if isinstance(data.get("temp_c"), (int, float)) else None]
        for name, s in sorted((data.get("sources") or {}).items()):
            if isinstance(s, dict):
                lat = (s.get("latency_ms") or {}).get("p50") if isinstance(s.get("latency_ms"), dict) else None
                parts.append(f"{name} {s.get('fps', 0):.1f}fps" + (f" p50 {lat:.0f}ms" if isinstance(lat, (int, float)) else ""))
        return f"{clock} {device} telemetry #{data.get('seq', '?')} " + " ".join(p for p in parts if p)
    if kind == "status":
        return f"{clock} {device} status {data.get('state', 'unknown')}"
    extra = {k: v for k, v in data.items() if k not in ("ts", "id", "event")}
    detail = " ".join(f"{k}={v}" for k, v in extra.items() if not isinstance(v, (dict, list)))
    return f"{clock} {device} event {data.get('event', '?')} {detail}".rstrip()
