"""The MQTT transfer protocol (version 1): what travels, not who sends it.

The protocol is described for people in ``docs/transfer.md``; in short,
under ``P/transfers/<tid>/`` (:class:`~edge_agent.comms.topics.TransferTopics`):

* ``meta`` (retained, QoS 1, JSON, :class:`TransferMeta`): size, sha256,
  chunk size and the sha256 of every chunk: a device that joins late still
  finds it;
* ``chunk/<i>`` (QoS 1, raw bytes), each published once for the whole
  fleet: every subscribed device receives the same message;
* ``need`` (QoS 1, JSON ``{"device", "ranges": [[first, last], ...]}``,
  :func:`need_message`, :func:`parse_need`): a device that joined late or
  lost or rejected chunks asks for just those;
* ``done`` (QoS 1, JSON ``{"device", "ok", ...}``, :func:`done_message`,
  :func:`parse_done`): a device reports the outcome.

Here too: the :class:`Link` a sender (:mod:`.sender`, the console side) or a
receiver (:mod:`.receiver`, the device side) speaks to, and the checksums
(:func:`build_meta`, :meth:`TransferMeta.chunk_ok`).

No state: everything here may be used from any thread.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edge_agent.comms.commands import Sha256, Token

PROTOCOL_VERSION = 1
DEFAULT_CHUNK_SIZE = 64 * 1024
MIN_CHUNK_SIZE = 1024
MAX_CHUNK_SIZE = 4 * 1024 * 1024
MAX_RANGES_PER_NEED = 256
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# -- the link: what the protocol needs from a transport ------------------------------


class PublishHandle(Protocol):
    def wait(self, timeout: float) -> bool:
        """True once the broker acknowledged the message (QoS 1)."""
        ...


class Link(Protocol):
    """Publish and subscribe, nothing else. Implementations call subscription
    callbacks as ``callback(topic, payload)`` on their own thread."""

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> PublishHandle: ...

    def subscribe(self, topic_filter: str, callback: Callable[[str, bytes], None]) -> Callable[[], None]:
        """Subscribe (QoS 1); returns a function that unsubscribes."""
        ...


# -- the meta message ---------------------------------------------------------------


class TransferMeta(BaseModel):
    """The retained description of one transfer.

    Unknown fields are ignored (a newer sender may add some); ``v`` changes
    when an older receiver could not work correctly.
    """

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    v: int = Field(PROTOCOL_VERSION, description="Protocol version.")
    tid: Token
    name: str = Field(description="File name of the payload (e.g. classifier-3.tar.gz).")
    size: int = Field(ge=1)
    sha256: Sha256
    chunk_size: int = Field(ge=MIN_CHUNK_SIZE, le=MAX_CHUNK_SIZE)
    chunks: int = Field(ge=1)
    chunk_sha256: list[Sha256]

    @model_validator(mode="after")
    def _consistent(self) -> "TransferMeta":
        if self.v != PROTOCOL_VERSION:
            raise ValueError(f"protocol version {self.v} is not supported (this agent speaks {PROTOCOL_VERSION})")
        if not _NAME_RE.fullmatch(self.name):
            raise ValueError("name must be a plain file name (letters, digits, '.', '_', '-')")
        if self.chunks != math.ceil(self.size / self.chunk_size):
            raise ValueError(f"{self.size} bytes in chunks of {self.chunk_size} are not {self.chunks} chunks")
        if len(self.chunk_sha256) != self.chunks:
            raise ValueError("chunk_sha256 must list one sha256 per chunk")
        return self

    def chunk_span(self, index: int) -> tuple[int, int]:
        """(offset, length) of chunk ``index``."""
        offset = index * self.chunk_size
        return offset, min(self.chunk_size, self.size - offset)

    def chunk_ok(self, index: int, data: bytes) -> bool:
        """Whether ``data`` is chunk ``index``: its length and its sha256."""
        return len(data) == self.chunk_span(index)[1] and hashlib.sha256(data).hexdigest() == self.chunk_sha256[index]

    def to_json(self) -> bytes:
        return json.dumps(self.model_dump(), separators=(",", ":")).encode()


def build_meta(path: Path, *, tid: str, chunk_size: int = DEFAULT_CHUNK_SIZE, name: str | None = None) -> TransferMeta:
    """Hash ``path`` chunk by chunk and describe it."""
    whole = hashlib.sha256()
    hashes = []
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            whole.update(chunk)
            hashes.append(hashlib.sha256(chunk).hexdigest())
            size += len(chunk)
    return TransferMeta(
        tid=tid,
        name=name or path.name,
        size=size,
        sha256=whole.hexdigest(),
        chunk_size=chunk_size,
        chunks=len(hashes),
        chunk_sha256=hashes,
    )


# -- need and done -------------------------------------------------------------------


def to_ranges(indices: list[int]) -> list[list[int]]:
    """[0, 1, 2, 5, 7, 8] -> [[0, 2], [5, 5], [7, 8]] (input sorted)."""
    ranges: list[list[int]] = []
    for i in indices:
        if ranges and ranges[-1][1] == i - 1:
            ranges[-1][1] = i
        else:
            ranges.append([i, i])
    return ranges


def parse_need(payload: bytes, chunks: int) -> tuple[str, set[int]]:
    """Validate a ``need`` message; returns (device, indices within range)."""
    data = json.loads(payload)
    if not isinstance(data, dict) or not isinstance(data.get("device"), str):
        raise ValueError("a need is {'device': str, 'ranges': [[first, last], ...]}")
    ranges = data.get("ranges")
    if not isinstance(ranges, list) or len(ranges) > MAX_RANGES_PER_NEED:
        raise ValueError(f"ranges must be a list of at most {MAX_RANGES_PER_NEED} [first, last] pairs")
    wanted: set[int] = set()
    for pair in ranges:
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair)
            or pair[0] > pair[1]
        ):
            raise ValueError(f"bad range {pair!r}")
        wanted.update(range(max(pair[0], 0), min(pair[1], chunks - 1) + 1))
    return data["device"], wanted


def need_message(device: str, ranges: list[list[int]]) -> bytes:
    """A ``need``: ``device`` asks for the chunks in ``ranges``."""
    return json.dumps({"device": device, "ranges": ranges}, separators=(",", ":")).encode()


def done_message(device: str, *, ok: bool, **fields: Any) -> bytes:
    """A ``done``: ``device`` reports its outcome (``sha256`` or ``error``)."""
    return json.dumps({"device": device, "ok": ok, **fields}).encode()


def parse_done(payload: bytes) -> dict[str, Any]:
    """Validate a ``done`` message; returns it. Raises ``ValueError``,
    ``KeyError`` or ``TypeError`` for a malformed one."""
    data = json.loads(payload)
    device = data["device"]
    if not isinstance(device, str):
        raise TypeError("device is not a string")
    return data
