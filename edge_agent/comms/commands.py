"""Schemas of the command plane (CONTRACT §3): the envelope and each command's
arguments, as strict pydantic models.

Strict because a fleet console is a program: ``"version": "3"`` or
``"activate": "false"`` is a bug in that program to report (``bad_args``),
not something to guess at; ``extra="forbid"`` because a misspelt argument
(``"treshold"``) silently ignored is the worst kind of fleet-wide mistake.

Only the schemas live here; :mod:`edge_agent.comms.dispatcher` decides what a
validation failure becomes on the wire and handlers decide what a valid
command does. :data:`COMMAND_ARGS` maps each command name of the contract to
its arguments model, for whoever registers the handlers.

Models are immutable, so a validated command can be handed to another thread
without copying. :func:`status_object` builds the other message both the
transport and the ``status`` command send: the device's status.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from edge_agent.config import Name

URL_SCHEMES = ("file", "http", "https")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# Transfer ids and command ids end up in topics and file names.
TOKEN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


def _check_sha256(value: str) -> str:
    value = value.lower()
    if not SHA256_RE.fullmatch(value):
        raise ValueError("must be 64 hexadecimal digits (a sha256)")
    return value


def _check_url(value: str) -> str:
    scheme = urlsplit(value).scheme.lower()
    if scheme not in URL_SCHEMES:
        raise ValueError(f"scheme {scheme or '(none)'!r} is not supported: use file://, http:// or https://")
    if scheme != "file" and not urlsplit(value).hostname:
        raise ValueError("the URL has no host")
    return value


def _check_token(value: str) -> str:
    if not TOKEN_RE.fullmatch(value):
        raise ValueError(
            "use 1-128 letters, digits, '_', '.', ':' or '-', starting with a letter or digit"
        )
    return value


Sha256 = Annotated[str, AfterValidator(_check_sha256)]
Url = Annotated[str, Field(max_length=4096), AfterValidator(_check_url)]
Token = Annotated[str, AfterValidator(_check_token)]
Version = Annotated[int, Field(ge=1, description="A model version, 1 and up.")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Envelope(_Strict):
    """``{"id", "cmd", "args", "ts"?, "sig"?}``.

    ``args`` may be left out for commands without arguments (``ping``).
    ``ts`` and ``sig`` are carried for a signature verifier; the dispatcher
    itself does not interpret them.
    """

    id: Token = Field(description="Unique per command; a repeated id is answered, not executed again.")
    cmd: str = Field(min_length=1, max_length=64, description="The command name.")
    args: dict[str, Any] = Field(default_factory=dict, description="The command's arguments.")
    ts: float | None = Field(None, description="When the console sent it (Unix seconds), for signing.")
    sig: str | None = Field(None, max_length=4096, description="Signature over the command, where enforced.")


class NoArgs(_Strict):
    """``ping`` and ``status`` take no arguments."""


class DeployArgs(_Strict):
    """Install one bundle version, from a URL or an MQTT transfer.

    ``sha256`` and ``size`` are those of the archive file (CONTRACT §4); the
    agent refuses a download or transfer that does not match them.
    """

    model: Name
    version: Version
    url: Url | None = Field(None, description="file://, http:// or https:// URL of the bundle archive.")
    transfer: Token | None = Field(None, description="Id of an MQTT transfer (docs/transfer.md) carrying the archive.")
    sha256: Sha256
    size: int = Field(ge=1, description="Size of the archive in bytes.")
    activate: bool = Field(True, description="Serve the new version once it is installed.")
    label: Name | None = Field(None, description="A version label to point at this version (e.g. 'stable').")

    @model_validator(mode="after")
    def _one_source(self) -> "DeployArgs":
        if (self.url is None) == (self.transfer is None):
            raise ValueError("give exactly one of 'url' and 'transfer'")
        return self


class ActivateArgs(_Strict):
    model: Name
    version: Version


class RollbackArgs(_Strict):
    """Back to the previous good version of ``model``."""

    model: Name


class RemoveArgs(_Strict):
    model: Name
    version: Version


class ResultsSettings(_Strict):
    """How results are published: all, one in ``every``, or none."""

    enabled: bool | None = Field(None, description="false: infer (and count) but publish no results.")
    every: int | None = Field(None, ge=1, le=100_000, description="Publish one result in every N.")

    @model_validator(mode="after")
    def _something(self) -> "ResultsSettings":
        if self.enabled is None and self.every is None:
            raise ValueError("give 'enabled' and/or 'every'")
        return self


class SetArgs(_Strict):
    """Run-time settings of one source, or of every source a model serves.

    Fields left out keep their current value.
    """

    source: Name | None = Field(None, description="The source to change.")
    model: Name | None = Field(None, description="Change every source this model serves.")
    fps: float | None = Field(None, gt=0, le=1000, description="Inference rate cap.")
    threshold: float | None = Field(None, ge=0, le=1, description="Minimum score reported.")
    top_k: int | None = Field(None, ge=1, le=1000, description="Classes or detections reported per result.")
    results: ResultsSettings | None = Field(None, description="Result publishing throttle.")

    @model_validator(mode="after")
    def _target_and_change(self) -> "SetArgs":
        if (self.source is None) == (self.model is None):
            raise ValueError("give exactly one of 'source' and 'model'")
        if self.settings() == {}:
            raise ValueError("nothing to set: give at least one of fps, threshold, top_k, results")
        return self

    def settings(self) -> dict[str, Any]:
        """The settings given (without the target), as plain data."""
        return self.model_dump(exclude={"source", "model"}, exclude_none=True)


class LabelArgs(_Strict):
    """``label``: point ``label`` at ``version`` (null removes the label)."""

    model: Name
    label: Name
    version: Version | None = Field(None, description="null removes the label")


class AddArgs(_Strict):
    """``add`` (local socket only): a bundle path on this device."""

    path: str = Field(min_length=1)
    activate: bool = False
    label: Name | None = None


COMMAND_ARGS: dict[str, type[BaseModel]] = {
    "ping": NoArgs,
    "status": NoArgs,
    "deploy": DeployArgs,
    "activate": ActivateArgs,
    "rollback": RollbackArgs,
    "remove": RemoveArgs,
    "set": SetArgs,
}
"""The commands of CONTRACT §3 and their arguments models."""


def status_object(state: str, device_id: str, groups: Any, models: dict[str, Any]) -> dict[str, Any]:
    """The object of ``P/D/status`` (CONTRACT §3), also the ``status`` reply."""
    from edge_agent import __version__

    return {"state": state, "ts": time.time(), "agent_version": __version__, "device_id": device_id,
            "groups": list(groups), "models": models}
