"""Bundle delivery over MQTT, for devices that can reach the broker and
nothing else. The protocol is described for people in ``docs/transfer.md``;
in short, under ``P/transfers/<tid>/``:

* ``meta`` (retained, QoS 1, JSON): size, sha256, chunk size and the sha256
  of every chunk: a device that joins late still finds it;
* ``chunk/<i>`` (QoS 1, raw bytes), each published once for the whole
  fleet: every subscribed device receives the same message;
* ``need`` (QoS 1, JSON ``{"device", "ranges": [[first, last], ...]}``):
  a device that joined late or lost or rejected chunks asks for just those;
  the sender gathers the requests of a short window and re-publishes the
  union once;
* ``done`` (QoS 1, JSON ``{"device", "ok", ...}``): a device reports the
  outcome, so the console knows when it may stop serving.

The code is transport-agnostic: it speaks to a :class:`Link` (publish bytes,
subscribe a filter with a callback). :class:`~edge_agent.comms.mqtt.PahoLink`
adapts a paho client (importable from here too); another transport supplies
its own.

Threading: link callbacks run on the transport's thread (paho's network
thread) and only do cheap work (verify a chunk's sha256, write it at its
offset); the slow parts (hashing the whole file, persisting state, asking
for missing chunks, publishing chunks) run on one worker thread per sender
or receiver, without holding the lock the link's thread takes.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Callable, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edge_agent.comms.commands import TOKEN_RE, Sha256, Token
from edge_agent.errors import TransferError, is_disk_full

log = logging.getLogger(__name__)

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


class Topics:
    """The topics of transfer ``tid`` under prefix ``P``."""

    def __init__(self, prefix: str, tid: str) -> None:
        if not TOKEN_RE.fullmatch(tid):
            raise ValueError(f"transfer id {tid!r} is not a valid token")
        self.base = f"{prefix}/transfers/{tid}"
        self.meta = f"{self.base}/meta"
        self.chunk_prefix = f"{self.base}/chunk/"
        self.chunk_filter = f"{self.chunk_prefix}+"
        self.need = f"{self.base}/need"
        self.done = f"{self.base}/done"

    def chunk(self, index: int) -> str:
        return f"{self.chunk_prefix}{index}"


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


# -- the console side ------------------------------------------------------------------


class TransferSender:
    """Publishes one file to every device listening for transfer ``tid``.

    ``start()`` publishes the retained meta, then (on a worker thread) every
    chunk once, at most ``max_inflight`` unacknowledged and at most
    ``rate_bytes_s`` bytes a second; afterwards it re-publishes what devices
    ask for in ``need`` messages, gathered for ``need_delay_s`` so that ten
    devices missing the same chunk cost one publish. ``close()`` stops
    serving and clears the retained meta.

    Two rules keep a busy fleet from asking for the file over and over (a
    device that is slow to read its socket sees silence and asks for
    everything it has not processed yet, though it is on its way): a need
    for a chunk the first pass has not reached yet is ignored (it is coming),
    and a chunk is not re-published within ``repeat_after_s`` of its last
    publish (a device that really lost it asks again after its back-off).

    Thread-safety: the public methods may be called from any thread.
    """

    def __init__(
        self,
        link: Link,
        prefix: str,
        path: Path | str,
        *,
        tid: str | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        max_inflight: int = 16,
        rate_bytes_s: float | None = None,
        need_delay_s: float = 0.2,
        publish_timeout_s: float = 30.0,
        repeat_after_s: float = 3.0,
        meta: TransferMeta | None = None,
    ) -> None:
        self.link = link
        self.path = Path(path)
        self.tid = tid or uuid.uuid4().hex
        self.topics = Topics(prefix, self.tid)
        # ``meta``: the description of this same file made once for several
        # transfers of it (only the id differs), so the file is hashed once.
        self.meta = (meta.model_copy(update={"tid": self.tid}) if meta is not None
                     else build_meta(self.path, tid=self.tid, chunk_size=chunk_size))
        self.max_inflight = max(1, max_inflight)
        self.rate_bytes_s = rate_bytes_s
        self.need_delay_s = need_delay_s
        self.publish_timeout_s = publish_timeout_s
        self.repeat_after_s = repeat_after_s
        self.done: dict[str, dict[str, Any]] = {}
        """Outcome reported by each device (``done`` messages), by device id."""
        self.needs: list[tuple[str, list[list[int]]]] = []
        """Every ``need`` received: (device, ranges), for logs and tests."""
        self.published = 0
        """Chunk publishes, first pass and re-publishes together."""
        self.held_back = 0
        """Requested chunks not re-published (first pass not there yet, or published moments ago)."""
        self._sent_at = [0.0] * self.meta.chunks  # monotonic time of each chunk's last publish; 0: never
        self._cursor = 0  # the first pass has published every chunk below this index
        self._pending: set[int] = set()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._first_pass = threading.Event()
        self._inflight: deque[PublishHandle] = deque()
        self._unsubscribe: list[Callable[[], None]] = []
        self._thread: threading.Thread | None = None
        self._fh = open(self.path, "rb")
        self._next_send_at = 0.0

    def start(self) -> "TransferSender":
        self._unsubscribe.append(self.link.subscribe(self.topics.need, self._on_need))
        self._unsubscribe.append(self.link.subscribe(self.topics.done, self._on_done))
        self.link.publish(self.topics.meta, self.meta.to_json(), qos=1, retain=True).wait(self.publish_timeout_s)
        self._thread = threading.Thread(target=self._run, name=f"transfer-send-{self.tid[:8]}", daemon=True)
        self._thread.start()
        log.info(
            "transfer %s: sending %s (%d bytes, %d chunks)", self.tid, self.path, self.meta.size, self.meta.chunks
        )
        return self

    def wait_sent(self, timeout: float | None = None) -> bool:
        """True once every chunk was published once (and acknowledged)."""
        return self._first_pass.wait(timeout)

    def wait_done(self, devices: set[str] | list[str], timeout: float) -> bool:
        """True once every device in ``devices`` reported success."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not all(self.done.get(d, {}).get("ok") for d in devices):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def close(self, *, clear_meta: bool = True) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(self.publish_timeout_s)
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
        if clear_meta:
            # An empty retained message deletes the retained meta.
            self.link.publish(self.topics.meta, b"", qos=1, retain=True).wait(self.publish_timeout_s)
        self._fh.close()

    def __enter__(self) -> "TransferSender":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- worker ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            for index in range(self.meta.chunks):
                if self._stop.is_set():
                    return
                self._publish_chunk(index)
            self._drain()
            self._first_pass.set()
            log.info("transfer %s: every chunk published once", self.tid)
            while not self._stop.is_set():
                with self._cond:
                    while not self._pending and not self._stop.is_set():
                        self._cond.wait()
                if self._stop.wait(self.need_delay_s):  # gather the requests of several devices
                    return
                with self._cond:
                    now = time.monotonic()
                    batch = [i for i in sorted(self._pending) if now - self._sent_at[i] >= self.repeat_after_s]
                    self.held_back += len(self._pending) - len(batch)
                    self._pending.clear()
                if not batch:
                    continue
                log.info("transfer %s: re-publishing %d chunk(s)", self.tid, len(batch))
                for index in batch:
                    if self._stop.is_set():
                        return
                    self._publish_chunk(index)
        except Exception:
            log.exception("transfer %s: the sender failed", self.tid)

    def _publish_chunk(self, index: int) -> None:
        offset, length = self.meta.chunk_span(index)
        data = os.pread(self._fh.fileno(), length, offset)
        if self.rate_bytes_s:
            # Pace, without saving up credit while idle (no burst after a pause).
            now = time.monotonic()
            if self._next_send_at > now and self._stop.wait(self._next_send_at - now):
                return
            self._next_send_at = max(now, self._next_send_at) + length / self.rate_bytes_s
        while len(self._inflight) >= self.max_inflight:
            self._settle(self._inflight.popleft())
            if self._stop.is_set():
                return
        self._inflight.append(self.link.publish(self.topics.chunk(index), data, qos=1, retain=False))
        with self._cond:
            self.published += 1
            self._sent_at[index] = time.monotonic()
            self._cursor = max(self._cursor, index + 1)

    def _drain(self) -> None:
        while self._inflight and not self._stop.is_set():
            self._settle(self._inflight.popleft())

    def _settle(self, handle: PublishHandle) -> None:
        """Wait for one acknowledgement. A chunk the broker did not take is
        not retried here: the devices that miss it will ask for it."""
        if not handle.wait(self.publish_timeout_s):
            log.warning("transfer %s: a chunk was not acknowledged (broker away?)", self.tid)
            self._stop.wait(1.0)  # do not spin while the link is down

    # -- link callbacks ----------------------------------------------------------

    def _on_need(self, topic: str, payload: bytes) -> None:
        try:
            device, wanted = parse_need(payload, self.meta.chunks)
        except (ValueError, TypeError) as exc:
            log.warning("transfer %s: ignoring a malformed need: %s", self.tid, exc)
            return
        log.info("transfer %s: %s needs %d chunk(s)", self.tid, device, len(wanted))
        with self._cond:
            self.needs.append((device, to_ranges(sorted(wanted))))
            coming = {i for i in wanted if i >= self._cursor}
            self.held_back += len(coming)
            self._pending.update(wanted - coming)
            self._cond.notify_all()

    def _on_done(self, topic: str, payload: bytes) -> None:
        try:
            data = json.loads(payload)
            device = data["device"]
            if not isinstance(device, str):
                raise TypeError("device is not a string")
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("transfer %s: ignoring a malformed done: %s", self.tid, exc)
            return
        log.info("transfer %s: %s reports %s", self.tid, device, "success" if data.get("ok") else data.get("error"))
        with self._cond:
            self.done[device] = data
            self._cond.notify_all()


# -- the device side -----------------------------------------------------------------


class TransferReceiver:
    """Assembles transfer ``tid`` in ``staging_dir/<tid>/`` from the chunks
    every device receives, asking for what it missed.

    State (``state.json``: the meta and a bitmap of the chunks on disk) is
    persisted at most every ``persist_every_s`` and on close, after the data
    is synced, so a restarted agent continues; chunks are re-verified on
    resume, so a crash costs at most a re-request.

    ``expected_sha256``/``expected_size`` come from the deploy command: a
    meta that does not match them is refused, so a stray or forged meta
    cannot substitute another file. ``progress(received_bytes, total)`` is
    called on the link's thread and must be quick.

    When no chunk arrived for ``idle_s``, a ``need`` for the missing chunks
    is published; the next after twice as long, up to ``max_idle_s``.
    ``deadline_s`` bounds the whole transfer.

    Thread-safety: the public methods may be called from any thread.
    """

    def __init__(
        self,
        link: Link,
        prefix: str,
        tid: str,
        device_id: str,
        staging_dir: Path | str,
        *,
        max_bytes: int,
        expected_sha256: str | None = None,
        expected_size: int | None = None,
        progress: Callable[[int, int], None] | None = None,
        idle_s: float = 2.0,
        max_idle_s: float = 30.0,
        deadline_s: float | None = 3600.0,
        persist_every_s: float = 1.0,
    ) -> None:
        self.link = link
        self.topics = Topics(prefix, tid)
        self.tid = tid
        self.device_id = device_id
        self.dir = Path(staging_dir) / tid
        self.max_bytes = max_bytes
        self.expected_sha256 = expected_sha256.lower() if expected_sha256 else None
        self.expected_size = expected_size
        self.progress = progress
        self.idle_s = idle_s
        self.max_idle_s = max_idle_s
        self.deadline_s = deadline_s
        self.persist_every_s = persist_every_s
        self.meta: TransferMeta | None = None
        self.rejected = 0
        """Chunks refused because their sha256 or length was wrong."""
        self.needs_sent: list[list[list[int]]] = []
        """The ranges of every ``need`` published, for logs and tests."""
        self.result: Path | None = None
        self._have = bytearray()
        self._received = 0
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        # Serialises writing state.json (and finishing, which removes it);
        # taken before ``_lock``, never while holding it.
        self._persist_lock = threading.Lock()
        self._finished = threading.Event()
        self._error: TransferError | None = None
        self._stop = False
        self._dirty = False
        self._complete = False
        self._last_activity = 0.0
        self._idle = idle_s
        self._started = 0.0
        self._unsubscribe: list[Callable[[], None]] = []
        self._thread: threading.Thread | None = None

    @property
    def data_path(self) -> Path:
        return self.dir / "data.part"

    @property
    def state_path(self) -> Path:
        return self.dir / "state.json"

    def received_chunks(self) -> int:
        with self._lock:
            return sum(self._have)

    def start(self) -> "TransferReceiver":
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TransferError(f"cannot create {self.dir}: {exc.strerror}", code=_disk_code(exc)) from None
        with self._lock:
            try:
                self._resume()
            except OSError as exc:
                raise TransferError(
                    f"transfer {self.tid}: cannot use {self.data_path}: {exc.strerror}", code=_disk_code(exc)
                ) from None
            self._last_activity = time.monotonic()
            self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"transfer-recv-{self.tid[:8]}", daemon=True)
        self._thread.start()
        # Meta first: the broker sends the retained meta on subscribe, so it
        # normally arrives before any chunk.
        self._unsubscribe.append(self.link.subscribe(self.topics.meta, self._on_meta))
        self._unsubscribe.append(self.link.subscribe(self.topics.chunk_filter, self._on_chunk))
        return self

    def wait(self, timeout: float | None = None, *, cancel: threading.Event | None = None) -> Path:
        """The assembled, verified file; raises :class:`TransferError` if the
        transfer failed, ``transfer_timeout`` if ``timeout`` passed first,
        ``cancelled`` as soon as ``cancel`` is set (the agent is stopping)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._finished.is_set():
            if cancel is not None and cancel.is_set():
                raise TransferError(f"transfer {self.tid} cancelled: the agent is stopping", code="cancelled")
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TransferError(
                    f"transfer {self.tid} not complete after {timeout} s "
                    f"({self.received_chunks()} of {self.meta.chunks if self.meta else '?'} chunks)",
                    code="transfer_timeout",
                )
            self._finished.wait(left if cancel is None else min(0.5, left if left is not None else 0.5))
        if self._error is not None:
            raise self._error
        assert self.result is not None
        return self.result

    def close(self) -> None:
        """Stop listening; keep what was received for a later resume (a
        folder with nothing in it, as a transfer refused for its meta
        leaves, is removed)."""
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
        with self._lock:
            self._stop = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(10)
        with self._lock:
            dirty = self._dirty
        if dirty:
            self._persist()
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        with contextlib.suppress(OSError):
            self.dir.rmdir()  # only when empty

    def __enter__(self) -> "TransferReceiver":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- state (lock held, unless said otherwise) ----------------------------------

    def _resume(self) -> None:
        try:
            state = json.loads(self.state_path.read_text())
            meta = TransferMeta.model_validate(state["meta"])
            have = bytearray(base64.b64decode(state["have"]))
        except FileNotFoundError:
            return
        except (ValueError, KeyError, TypeError, OSError) as exc:
            log.warning("transfer %s: ignoring unreadable state (%s); starting over", self.tid, exc)
            return
        if len(have) != meta.chunks or self._mismatch(meta) is not None:
            log.warning("transfer %s: the saved state is for another file; starting over", self.tid)
            return
        self._open(meta)
        assert self._fd is not None
        for index in range(meta.chunks):
            if have[index] and _chunk_ok(self._fd, meta, index):
                self._have[index] = 1
                self._received += meta.chunk_span(index)[1]
        log.info("transfer %s: resuming with %d of %d chunks", self.tid, sum(self._have), meta.chunks)
        self._check_complete()

    def _mismatch(self, meta: TransferMeta) -> tuple[str, str] | None:
        """Why ``meta`` is not the file the deploy asked for, as (message,
        error code); ``None`` when it is."""
        if meta.tid != self.tid:
            problem = f"the meta is for transfer {meta.tid!r}"
        elif self.expected_sha256 and meta.sha256 != self.expected_sha256:
            problem = f"the meta announces sha256 {meta.sha256}, the deploy expects {self.expected_sha256}"
        elif self.expected_size is not None and meta.size != self.expected_size:
            problem = f"the meta announces {meta.size} bytes, the deploy expects {self.expected_size}"
        elif meta.size > self.max_bytes:
            return f"transfer {self.tid} is {meta.size} bytes; the limit is {self.max_bytes}", "too_large"
        else:
            return None
        return f"transfer {self.tid}: {problem}", "bad_transfer"


    def _open(self, meta: TransferMeta) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self.meta = meta
        self._have = bytearray(meta.chunks)
        self._received = 0
        self._complete = False
        self._fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(self._fd, meta.size)  # sparse: blocks are used as chunks arrive

    def _persist(self) -> None:
        """Sync the data, then save the state (lock NOT held: the state is
        copied under it, the disk work done outside, so the link's thread
        does not wait for an fsync). A chunk written after the copy is simply
        not recorded yet; one recorded is on disk before the state says so."""
        with self._persist_lock:
            with self._lock:
                meta = self.meta
                if meta is None or self._fd is None:
                    return
                have = bytes(self._have)
                self._dirty = False
                try:
                    fd = os.dup(self._fd)  # ours: ``_open``/``close`` may close ``_fd`` meanwhile
                except OSError as exc:
                    self._dirty = True
                    log.warning("transfer %s: cannot save progress: %s", self.tid, exc)
                    return
            try:
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                tmp = self.state_path.with_suffix(".tmp")
                state = {"meta": meta.model_dump(), "have": base64.b64encode(have).decode()}
                tmp.write_text(json.dumps(state))
                os.replace(tmp, self.state_path)
            except OSError as exc:
                log.warning("transfer %s: cannot save progress: %s", self.tid, exc)
                with self._lock:
                    self._dirty = True

    def _fail(self, message: str, code: str) -> None:
        if self._finished.is_set():
            return
        log.error("%s", message)
        self._error = TransferError(message, code=code)
        self._finished.set()
        self._wake.notify_all()

    def _check_complete(self) -> None:
        if self.meta is not None and all(self._have):
            self._complete = True
            self._wake.notify_all()

    # -- link callbacks (the link's thread) -----------------------------------------

    def _on_meta(self, topic: str, payload: bytes) -> None:
        if not payload:
            return  # the sender cleared the retained meta
        try:
            meta = TransferMeta.model_validate_json(payload)
        except ValidationError as exc:
            with self._lock:
                self._fail(f"transfer {self.tid}: malformed meta: {exc.errors()[0]['msg']}", "bad_transfer")
            return
        with self._lock:
            if self._finished.is_set() or (self.meta is not None and meta == self.meta):
                return
            mismatch = self._mismatch(meta)  # not the file the deploy asked for: the transfer fails
            if mismatch is not None:
                self._fail(*mismatch)
                return
            if self.meta is not None:
                log.warning("transfer %s: the sender announced a different file; starting over", self.tid)
            try:
                free = shutil.disk_usage(self.dir).free
                if free < meta.size:
                    self._fail(f"transfer {self.tid} needs {meta.size} bytes, {free} are free", "disk_full")
                    return
                self._open(meta)
            except OSError as exc:
                self._fail(f"transfer {self.tid}: cannot create {self.data_path}: {exc.strerror}", _disk_code(exc))
                return
            self._dirty = True
            self._last_activity = time.monotonic()
            log.info("transfer %s: receiving %s (%d bytes, %d chunks)", self.tid, meta.name, meta.size, meta.chunks)
            self._wake.notify_all()

    def _on_chunk(self, topic: str, payload: bytes) -> None:
        try:
            index = int(topic.rsplit("/", 1)[1])
        except ValueError:
            return
        with self._lock:
            meta = self.meta
            if meta is None or self._fd is None or self._finished.is_set() or not 0 <= index < meta.chunks:
                return
            self._last_activity = time.monotonic()
            if self._have[index]:
                return  # re-published for another device
            offset, length = meta.chunk_span(index)
            if len(payload) != length or hashlib.sha256(payload).hexdigest() != meta.chunk_sha256[index]:
                self.rejected += 1
                log.warning("transfer %s: chunk %d is corrupt (%d bytes); it will be requested again", self.tid, index, len(payload))
                return
            try:
                os.pwrite(self._fd, payload, offset)
            except OSError as exc:
                self._fail(f"transfer {self.tid}: cannot write chunk {index}: {exc.strerror}", _disk_code(exc))
                return
            self._have[index] = 1
            self._received += length
            self._dirty = True
            self._idle = self.idle_s
            received, total = self._received, meta.size
            self._check_complete()
        if self.progress is not None:
            try:
                self.progress(received, total)
            except Exception:
                log.exception("transfer %s: the progress callback failed", self.tid)

    # -- worker -----------------------------------------------------------------------

    def _run(self) -> None:
        last_persist = time.monotonic()
        while True:
            need: bytes | None = None
            finish = persist = False
            with self._lock:
                if self._stop or self._finished.is_set():
                    break
                now = time.monotonic()
                if self._complete:
                    finish = True
                elif self.deadline_s is not None and now - self._started > self.deadline_s:
                    got = f"{sum(self._have)} of {self.meta.chunks}" if self.meta else "no meta, 0"
                    self._fail(
                        f"transfer {self.tid} timed out after {self.deadline_s:.0f} s ({got} chunks)", "transfer_timeout"
                    )
                    break
                elif self._dirty and now - last_persist >= self.persist_every_s:
                    persist = True
                    last_persist = now
                elif self.meta is not None and now - self._last_activity >= self._idle:
                    need = self._need_message()
                    self._last_activity = now
                    self._idle = min(self._idle * 2, self.max_idle_s)
                else:
                    wait = self.persist_every_s
                    if self.meta is not None:
                        wait = min(wait, self._last_activity + self._idle - now)
                    self._wake.wait(max(0.01, wait))
            # The disk work is done without the lock: the link's thread takes it for every chunk.
            if finish:
                try:
                    self._finish()
                except OSError as exc:
                    with self._lock:
                        self._fail(f"transfer {self.tid}: cannot finish {self.data_path}: {exc.strerror}", _disk_code(exc))
            elif persist:
                self._persist()
            if need is not None:
                # Outside the lock: the link's thread may be waiting for it.
                self._publish(self.topics.need, need)
        if self._finished.is_set():
            if self._error is not None:
                self._report(ok=False, error={"code": self._error.code, "message": self._error.message})
            else:
                self._report(ok=True, sha256=self.meta.sha256 if self.meta else None)

    def _need_message(self) -> bytes:
        """The ``need`` for every missing chunk (lock held)."""
        assert self.meta is not None
        missing = [i for i in range(self.meta.chunks) if not self._have[i]]
        ranges = to_ranges(missing)[:MAX_RANGES_PER_NEED]
        self.needs_sent.append(ranges)
        log.info("transfer %s: asking for %d missing chunk(s) in %d range(s)", self.tid, len(missing), len(ranges))
        return json.dumps({"device": self.device_id, "ranges": ranges}, separators=(",", ":")).encode()

    def _finish(self) -> None:
        """Every chunk is on disk and verified: check the whole.

        Called without the lock: hashing a big file takes a while and the
        link's thread must not wait for it. Nothing writes the file
        meanwhile (``_on_chunk`` ignores chunks it has, and it has them all);
        a different meta (``_open``) or a failure is noticed afterwards, and
        the result thrown away.
        """
        from edge_agent.bundles import sha256_file

        with self._lock:
            meta = self.meta
            if not self._complete or meta is None or self._fd is None:
                return
            fd = os.dup(self._fd)  # ours: ``_open``/``close`` may close ``_fd`` meanwhile
        try:
            os.fsync(fd)
            digest = sha256_file(self.data_path)
            bad: list[int] = []
            if digest != meta.sha256:
                # Every chunk matched its own sha256 when written: either the disk
                # changed it since (re-verify and ask again) or the meta is wrong.
                bad = [index for index in range(meta.chunks) if not _chunk_ok(fd, meta, index)]
        finally:
            os.close(fd)
        with self._persist_lock, self._lock:
            if self.meta is not meta or self._fd is None or self._finished.is_set():
                return  # another file announced, the receiver closed, or failed meanwhile
            if digest != meta.sha256:
                for index in bad:
                    self._have[index] = 0
                    self._received -= meta.chunk_span(index)[1]
                self._complete = False
                if not bad:
                    self._fail(
                        f"transfer {self.tid}: the chunks match their sha256 but the file is {digest}, "
                        f"not {meta.sha256} (the sender's meta is inconsistent)",
                        "checksum_mismatch",
                    )
                return
            final = self.dir / meta.name
            os.close(self._fd)
            self._fd = None
            os.replace(self.data_path, final)
            try:
                self.state_path.unlink()
            except FileNotFoundError:
                pass
            self.result = final
            log.info("transfer %s: complete, %s verified", self.tid, final)
            self._finished.set()

    def _report(self, *, ok: bool, **fields: Any) -> None:
        """Publish ``done`` so the console knows it may stop serving this device."""
        self._publish(self.topics.done, json.dumps({"device": self.device_id, "ok": ok, **fields}).encode())

    def _publish(self, topic: str, payload: bytes) -> None:
        try:
            self.link.publish(topic, payload, qos=1, retain=False)
        except Exception:
            log.exception("transfer %s: cannot publish on %s", self.tid, topic)


def _chunk_ok(fd: int, meta: TransferMeta, index: int) -> bool:
    """Whether chunk ``index`` of the file open at ``fd`` matches its sha256 in ``meta``."""
    offset, length = meta.chunk_span(index)
    return hashlib.sha256(os.pread(fd, length, offset)).hexdigest() == meta.chunk_sha256[index]


def _disk_code(exc: OSError) -> str:
    return "disk_full" if is_disk_full(exc) else "transfer_failed"
