"""The fleet console: commands out, replies, events and telemetry in
(CONTRACT §1 ``edge-agent fleet``, §3 MQTT). No click here; the command line
is :mod:`edge_agent.cli.fleet`, and a script or a test can drive a fleet with
this package alone. Each module owns one part:

* :mod:`~edge_agent.fleet.settings`: :class:`BrokerSettings`, where the
  broker is (from an agent-style TOML's ``[mqtt]`` and/or options);
* :mod:`~edge_agent.fleet.console`: :class:`Console`, one connection that
  follows every device's retained ``P/D/status``, the ``reply`` and
  ``events`` topics and optionally ``telemetry``; :func:`collect_status`;
* :mod:`~edge_agent.fleet.targets`: :class:`Target` (devices, a group, all),
  :class:`DeviceInfo`, :class:`Outcome` (who answered what);
* :mod:`~edge_agent.fleet.commands`: command ids and signed messages;
* :mod:`~edge_agent.fleet.replies`: :func:`run_command` sends any command
  (``rollback``, ``ping``...) and collects one outcome per device;
* :mod:`~edge_agent.fleet.deployment`: :func:`deploy` ships a bundle over
  MQTT (one transfer for all) or by URL (given, or served by the console
  with :class:`ArchiveServer` from :mod:`~edge_agent.fleet.archive_server`);
  :mod:`~edge_agent.fleet.bundles` prepares the bundle;
* :mod:`~edge_agent.fleet.rendering`: tables and lines for the terminal;
* :mod:`~edge_agent.fleet.errors`: :class:`FleetError`.

The MQTT client itself is made by :func:`edge_agent.comms.client.make_client`,
as the agent's is. Modules of this package import each other, never this
``__init__``.
"""

from __future__ import annotations

from edge_agent.fleet.archive_server import ArchiveServer, parse_host_port
from edge_agent.fleet.bundles import CONSOLE_CHUNK_SIZE, PreparedBundle, chunk_size_for, prepare_bundle
from edge_agent.fleet.commands import command_payload, new_command_id
from edge_agent.fleet.console import Console, collect_status
from edge_agent.fleet.deployment import DeployReport, DeviceProgress, check_delivery, deploy
from edge_agent.fleet.errors import FleetError
from edge_agent.fleet.rendering import (
    OUTCOME_HEAD,
    STATUS_HEAD,
    describe_message,
    format_age,
    outcome_rows,
    status_rows,
)
from edge_agent.fleet.replies import DELIVERY_SLACK_S, REASK_S, run_command
from edge_agent.fleet.settings import BrokerSettings
from edge_agent.fleet.targets import DeviceInfo, Outcome, Target, TargetKind, outcome_of

__all__ = [
    "CONSOLE_CHUNK_SIZE", "DELIVERY_SLACK_S", "OUTCOME_HEAD", "REASK_S", "STATUS_HEAD",
    "ArchiveServer", "BrokerSettings", "Console", "DeployReport", "DeviceInfo", "DeviceProgress", "FleetError",
    "Outcome", "PreparedBundle", "Target", "TargetKind",
    "check_delivery", "chunk_size_for", "collect_status", "command_payload", "deploy", "describe_message",
    "format_age", "new_command_id", "outcome_of", "outcome_rows", "parse_host_port", "prepare_bundle",
    "run_command", "status_rows",
]
