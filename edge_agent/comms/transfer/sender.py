"""The console side of an MQTT transfer: one file published to every
device listening (protocol: :mod:`.protocol`, ``docs/transfer.md``).

Threading: link callbacks (``need``, ``done``) run on the transport's thread
and only record what was asked; publishing chunks runs on one worker thread
per sender, without holding the lock the link's thread takes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Callable

from edge_agent.comms.topics import TransferTopics
from edge_agent.comms.transfer.protocol import (
    DEFAULT_CHUNK_SIZE,
    Link,
    PublishHandle,
    TransferMeta,
    build_meta,
    parse_done,
    parse_need,
    to_ranges,
)

log = logging.getLogger(__package__)  # the package's: log lines name edge_agent.comms.transfer, as before the split


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
        self.topics = TransferTopics(prefix, self.tid)
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
            data = parse_done(payload)
            device = data["device"]
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("transfer %s: ignoring a malformed done: %s", self.tid, exc)
            return
        log.info("transfer %s: %s reports %s", self.tid, device, "success" if data.get("ok") else data.get("error"))
        with self._cond:
            self.done[device] = data
            self._cond.notify_all()
