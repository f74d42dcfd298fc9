"""Building a paho-mqtt 2.x client: the one place that turns broker
settings (protocol version, client id, user name and password, TLS, a
persistent or a clean session) into a configured ``paho.mqtt.client.Client``.
The agent's :class:`~edge_agent.comms.mqtt.MqttTransport` and the fleet
console (:class:`edge_agent.fleet.console.Console`) both make theirs here;
what each adds on top (a last will, reconnect delays, queue bounds,
callbacks) stays with it.

paho asks for a persistent session in two places: MQTT 3.1.1 when the client
is made (``clean_session=False``, done by :func:`make_client`), MQTT 5 when it
connects (``clean_start=False`` and a session expiry interval, the arguments
:func:`connect_options` returns).

No state of its own; the client's thread-safety is paho's.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

MqttVersion = Literal["5", "3.1.1"]


@dataclass(frozen=True)
class TlsFiles:
    """TLS for a connection: the CA bundle of the broker's certificate (None:
    the system's), a client certificate and its key for mutual TLS, and
    ``insecure`` to skip the broker host-name check (testing only)."""

    ca_certs: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    insecure: bool = False


def make_client(
    client_id: str,
    *,
    protocol: MqttVersion,
    persistent: bool,
    username: str | None = None,
    password: str | None = None,
    tls: TlsFiles | None = None,
) -> mqtt.Client:
    """A paho client (callback API version 2), not connected.

    ``persistent``: the broker keeps the session (subscriptions, QoS 1
    messages queued while the client is away) across connections; connect
    with :func:`connect_options` for MQTT 5. Otherwise each connection starts
    a clean session (paho's default). The certificate is always verified
    (``CERT_REQUIRED``). Raises ``OSError``, ``ssl.SSLError`` or
    ``ValueError`` for TLS files that cannot be read or used.
    """
    v5 = protocol == "5"
    kwargs: dict[str, Any] = {"clean_session": False} if persistent and not v5 else {}
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311, **kwargs)
    if username is not None:
        client.username_pw_set(username, password)
    if tls is not None:
        client.tls_set(
            ca_certs=str(tls.ca_certs) if tls.ca_certs else None,
            certfile=str(tls.certfile) if tls.certfile else None,
            keyfile=str(tls.keyfile) if tls.keyfile else None,
            cert_reqs=ssl.CERT_REQUIRED,
        )
        client.tls_insecure_set(tls.insecure)
    return client


def connect_options(protocol: MqttVersion, *, session_expiry_s: int | None) -> dict[str, Any]:
    """Keyword arguments for ``connect``/``connect_async`` of a client made
    by :func:`make_client`: with MQTT 5 and a ``session_expiry_s`` (a
    persistent session), ``clean_start=False`` and that session expiry
    interval; otherwise none (MQTT 3.1.1 chose at :func:`make_client`)."""
    if protocol != "5" or session_expiry_s is None:
        return {}
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = session_expiry_s
    return {"clean_start": False, "properties": props}
