"""Who a command is for and who answered: :class:`DeviceInfo` (what the
console knows of one device from its retained status and telemetry),
:class:`Target` (a device selection: device ids, a group, or every device),
:class:`Outcome` (what became of one command on one device) and
:func:`outcome_of` (a device's reply as an outcome). Plain data, no MQTT;
not locked: the console guards the ones it keeps with its condition.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

from edge_agent.errors import UsageError

TargetKind = Literal["device", "group", "all"]


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
        from edge_agent.config import NAME_RE

        for name in self.names:
            if not NAME_RE.fullmatch(name):
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


def outcome_of(device: str, reply: dict[str, Any], seconds: float | None) -> Outcome:
    """A device's reply to a command as an :class:`Outcome`."""
    if reply.get("ok"):
        result = reply.get("result") if isinstance(reply.get("result"), dict) else {}
        return Outcome(device, True, result=result, seconds=seconds)
    err = reply.get("error") if isinstance(reply.get("error"), dict) else {}
    return Outcome(device, False, code=str(err.get("code") or "error"), message=str(err.get("message") or ""),
                   seconds=seconds)
