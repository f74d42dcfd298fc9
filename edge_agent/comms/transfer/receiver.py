"""The device side of an MQTT transfer: a file assembled from the chunks
every device receives, asking for what it missed (protocol:
:mod:`.protocol`, ``docs/transfer.md``).

Threading: link callbacks run on the transport's thread (paho's network
thread) and only do cheap work (verify a chunk's sha256, write it at its
offset); the slow parts (hashing the whole file, persisting state, asking
for missing chunks) run on one worker thread per receiver, without holding
the lock the link's thread takes.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

from edge_agent.comms.topics import TransferTopics
from edge_agent.comms.transfer.protocol import (
    MAX_RANGES_PER_NEED,
    Link,
    TransferMeta,
    done_message,
    need_message,
    to_ranges,
)
from edge_agent.errors import TransferError, is_disk_full

log = logging.getLogger(__package__)  # the package's: log lines name edge_agent.comms.transfer, as before the split


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
        self.topics = TransferTopics(prefix, tid)
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
        index = self.topics.chunk_index(topic)
        if index is None:
            return
        with self._lock:
            meta = self.meta
            if meta is None or self._fd is None or self._finished.is_set() or not 0 <= index < meta.chunks:
                return
            self._last_activity = time.monotonic()
            if self._have[index]:
                return  # re-published for another device
            offset, length = meta.chunk_span(index)
            if not meta.chunk_ok(index, payload):
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
        return need_message(self.device_id, ranges)

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
        self._publish(self.topics.done, done_message(self.device_id, ok=ok, **fields))

    def _publish(self, topic: str, payload: bytes) -> None:
        try:
            self.link.publish(topic, payload, qos=1, retain=False)
        except Exception:
            log.exception("transfer %s: cannot publish on %s", self.tid, topic)


def _chunk_ok(fd: int, meta: TransferMeta, index: int) -> bool:
    """Whether chunk ``index`` of the file open at ``fd`` matches its sha256 in ``meta``."""
    offset, length = meta.chunk_span(index)
    return meta.chunk_ok(index, os.pread(fd, length, offset))


def _disk_code(exc: OSError) -> str:
    return "disk_full" if is_disk_full(exc) else "transfer_failed"
