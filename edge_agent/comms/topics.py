"""The topic tree (CONTRACT §3), built and parsed in one place.

Under a prefix ``P`` (``mqtt.topic_prefix``):

* a device ``D`` owns ``P/D/<suffix>``: ``cmd`` (commands to it), ``reply``,
  ``events``, ``telemetry``, ``status`` (retained) and ``results/<source>``;
* ``P/groups/<g>/cmd`` and ``P/all/cmd`` carry commands for a group and for
  the whole fleet;
* ``P/transfers/<tid>/`` carries one MQTT transfer (``meta``, ``chunk/<i>``,
  ``need``, ``done``; see ``docs/transfer.md``);
* ``P/_console/<client id>/sync`` is a fleet console's own topic.

Every value here is a frozen dataclass that only computes strings: no state,
safe to share between threads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from edge_agent.comms.commands import TOKEN_RE

NOT_DEVICES = frozenset({"all", "groups", "transfers", "_console"})
"""Second levels under ``P`` that are not a device id."""


def results_suffix(source: str) -> str:
    """``results/<source>``: the results topic of a source, under ``P/D/``."""
    return f"results/{source}"


@dataclass(frozen=True)
class Topics:
    """The topics under prefix ``P``."""

    prefix: str

    def device(self, device_id: str) -> "DeviceTopics":
        return DeviceTopics(self.prefix, device_id)

    def group_cmd(self, group: str) -> str:
        """``P/groups/<group>/cmd``."""
        return f"{self.prefix}/groups/{group}/cmd"

    @property
    def all_cmd(self) -> str:
        """``P/all/cmd``: commands for every device."""
        return f"{self.prefix}/all/cmd"

    def every_device(self, suffix: str) -> str:
        """The filter ``P/+/<suffix>``: that topic of every device."""
        return f"{self.prefix}/+/{suffix}"

    def device_of(self, topic: str) -> str | None:
        """``D`` of a topic ``P/D/<one level>`` (a device's ``status``,
        ``reply``, ``events``, ``telemetry``...); None for any other topic."""
        parts = topic.split("/")
        at = self.prefix.count("/") + 1
        if len(parts) != at + 2 or parts[at] in NOT_DEVICES:
            return None
        return parts[at]

    def transfer(self, tid: str) -> "TransferTopics":
        return TransferTopics(self.prefix, tid)

    def console_sync(self, client_id: str) -> str:
        """``P/_console/<client_id>/sync``: a console's topic to itself."""
        return f"{self.prefix}/_console/{client_id}/sync"


@dataclass(frozen=True)
class DeviceTopics:
    """The topics of device ``device_id`` under prefix ``P``: ``P/D/...``."""

    prefix: str
    device_id: str

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.device_id}"

    def topic(self, suffix: str) -> str:
        """``P/D/<suffix>``."""
        return f"{self.base}/{suffix}"

    @property
    def cmd(self) -> str:
        return self.topic("cmd")

    @property
    def reply(self) -> str:
        return self.topic("reply")

    @property
    def events(self) -> str:
        return self.topic("events")

    @property
    def telemetry(self) -> str:
        return self.topic("telemetry")

    @property
    def status(self) -> str:
        return self.topic("status")

    def results(self, source: str) -> str:
        """``P/D/results/<source>``."""
        return self.topic(results_suffix(source))

    def command_topics(self, groups: Sequence[str] = ()) -> list[str]:
        """Every topic a command for this device can come on: its own, its
        groups' and the fleet's."""
        tree = Topics(self.prefix)
        return [self.cmd, *(tree.group_cmd(g) for g in groups), tree.all_cmd]


@dataclass(frozen=True)
class TransferTopics:
    """The topics of MQTT transfer ``tid`` under prefix ``P``:
    ``P/transfers/<tid>/...``. A ``tid`` that is not a token (it ends up in
    topics and file names) raises ``ValueError``."""

    prefix: str
    tid: str

    def __post_init__(self) -> None:
        if not TOKEN_RE.fullmatch(self.tid):
            raise ValueError(f"transfer id {self.tid!r} is not a valid token")

    @property
    def base(self) -> str:
        return f"{self.prefix}/transfers/{self.tid}"

    @property
    def meta(self) -> str:
        return f"{self.base}/meta"

    @property
    def chunk_prefix(self) -> str:
        return f"{self.base}/chunk/"

    @property
    def chunk_filter(self) -> str:
        return f"{self.chunk_prefix}+"

    @property
    def need(self) -> str:
        return f"{self.base}/need"

    @property
    def done(self) -> str:
        return f"{self.base}/done"

    def chunk(self, index: int) -> str:
        return f"{self.chunk_prefix}{index}"

    def chunk_index(self, topic: str) -> int | None:
        """``i`` of a topic ``.../chunk/<i>``; None when the last level is not
        a number."""
        try:
            return int(topic.rsplit("/", 1)[1])
        except (ValueError, IndexError):
            return None
