"""Store-and-forward: a bounded, persistent queue of MQTT messages that could
not be published while the broker was away.

Why SQLite (stdlib ``sqlite3``, WAL journal) rather than append-only files:
the spool needs atomic "evict the oldest telemetry, then append" and
"remove exactly the acknowledged item" across power cuts. An append-only log
gets appends cheaply but needs its own index, tombstones, compaction and
torn-write recovery for the rest; SQLite gives all of that, tested on far
more devices than we will ever run, in one file. WAL with
``synchronous=NORMAL`` means a commit is one sequential write and survives
a crash of the process (a power cut may lose the last few commits, which
is the right trade for telemetry on an SD card). ``SQLITE_FULL`` covers both
a full file system and the optional page cap, so a full disk is one error.

Policy (the order is CONTRACT-friendly: what the console cannot rebuild
goes last):

* ``max_bytes`` bounds the sum of the items' sizes (payload + topic + a fixed
  overhead per row); the file itself may be somewhat larger (pages,
  indices) and shrinks back as items go.
* Kinds rank ``telemetry`` < ``results`` < ``events`` = ``replies``. To make
  room for a new item the spool evicts the oldest telemetry first, then the
  oldest results, but never an item of a higher rank than the new one (a
  new telemetry sample does not push out results) and never an event or a
  reply. Every evicted or refused telemetry/results item is counted in
  :meth:`Spool.dropped`.
* A telemetry or results item that cannot fit is dropped (counted; ``put``
  returns ``None``). An event or reply that cannot fit raises
  :class:`~edge_agent.errors.SpoolError` ``spool_full``: losing it must be
  logged by the caller, not hidden in a counter.
* Replay is FIFO over all kinds (:meth:`Spool.peek`); an item is deleted only
  by :meth:`Spool.ack` after the caller knows it was published, so a crash
  mid-replay sends it again (at-least-once; the console de-duplicates by
  ``seq``/``id``).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal


from edge_agent.errors import SpoolError

log = logging.getLogger(__name__)

Kind = Literal["telemetry", "results", "events", "replies"]
KINDS: tuple[str, ...] = ("telemetry", "results", "events", "replies")
# What a new item of each kind may evict, in eviction order.
_EVICTABLE: dict[str, tuple[str, ...]] = {
    "telemetry": ("telemetry",),
    "results": ("telemetry", "results"),
    "events": ("telemetry", "results"),
    "replies": ("telemetry", "results"),
}
ROW_OVERHEAD = 64
"""Bytes counted per item on top of payload and topic (row header, index)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    size INTEGER NOT NULL,
    ts REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS items_kind ON items (kind, seq);
CREATE TABLE IF NOT EXISTS dropped (
    kind TEXT PRIMARY KEY,
    count INTEGER NOT NULL
);
"""



def move_db_aside(path: Path) -> Path:
    """An unreadable SQLite file (an SD card that corrupted it) renamed to
    ``<name>.corrupt-<time>``, its WAL and shared-memory files removed, so a
    new one can start; returns the new name. Raises OSError."""
    aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    os.replace(path, aside)
    for suffix in ("-wal", "-shm"):
        try:
            os.unlink(f"{path}{suffix}")
        except FileNotFoundError:
            pass
    return aside


@dataclass(frozen=True)
class SpooledItem:
    """One message waiting to be published; ``seq`` is what :meth:`Spool.ack` takes."""

    seq: int
    kind: str
    topic: str
    payload: bytes
    qos: int
    retain: bool
    ts: float


def _item_size(topic: str, payload: bytes) -> int:
    return len(payload) + len(topic.encode("utf-8")) + ROW_OVERHEAD


class Spool:
    """A persistent FIFO of MQTT messages, bounded in bytes.

    Thread-safety: every method may be called from any thread; one lock
    serialises them (SQLite work here is sub-millisecond per item).
    Ownership: one process opens a spool file at a time.

    Raises :class:`~edge_agent.errors.SpoolError` (``disk_full``,
    ``spool_full``, ``spool_failed``) and never leaves a half-done change:
    each method is one transaction.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        max_bytes: int = 64 * 1024 * 1024,
        max_pages: int | None = None,
        recover: bool = True,
    ) -> None:
        """Open (creating if needed) the spool at ``path``.

        ``max_pages`` caps the SQLite file (``PRAGMA max_page_count``), for
        tests and for operators who want a hard cap on the file itself.
        ``recover``: a file that is not a readable spool (an SD card that
        corrupted it) is moved aside to ``<name>.corrupt-<time>`` and a new
        spool started, so that one bad file does not stop the agent
        publishing; the loss is logged as an error.
        """
        if max_bytes < ROW_OVERHEAD:
            raise ValueError("max_bytes is too small to hold anything")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._lost: dict[str, int] = {}  # not written at all (disk full), per kind; see dropped()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"cannot open the spool {self.path}: {exc.strerror or exc}") from None
        try:
            self._open(max_pages)
        except sqlite3.DatabaseError as exc:
            if not recover or getattr(exc, "sqlite_errorname", "") not in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
                raise self._wrap(exc, f"cannot open the spool {self.path}") from None
            aside = self._move_aside()
            log.error("the spool %s is unreadable (%s): moved to %s, starting an empty one", self.path, exc, aside)
            try:
                self._open(max_pages)
            except sqlite3.Error as exc2:
                raise self._wrap(exc2, f"cannot open the spool {self.path}") from None
        except sqlite3.Error as exc:
            raise self._wrap(exc, f"cannot open the spool {self.path}") from None

    def _open(self, max_pages: int | None) -> None:
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
        try:
            self._db.execute("PRAGMA auto_vacuum = INCREMENTAL")  # only effective on a new file
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.executescript(_SCHEMA)
            if max_pages is not None:
                self._db.execute(f"PRAGMA max_page_count = {int(max_pages)}")
            self._used = self._sum_sizes()
        except BaseException:
            self._db.close()
            raise

    def _move_aside(self) -> Path:
        try:
            return move_db_aside(self.path)
        except OSError as exc:
            raise SpoolError(f"the spool {self.path} is unreadable and cannot be moved aside: {exc.strerror}") from None

    # -- writing --------------------------------------------------------------

    def put(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, kind: Kind) -> int | None:
        """Append one message; returns its ``seq``, or ``None`` when a
        telemetry/results item was dropped for lack of room (counted).

        Raises ``SpoolError``: ``spool_full`` for an event/reply that cannot
        fit, ``disk_full`` when the disk (or the page cap) is full,
        ``spool_failed`` otherwise. ``ValueError`` for a wrong kind or qos
        (a programming error).
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, not {qos!r}")
        payload = bytes(payload)
        size = _item_size(topic, payload)
        with self._lock:
            try:
                with self._transaction(f"cannot spool a {kind} message"):
                    evicted = self._make_room(size, kind)
                    if evicted is None:
                        self._count_dropped(kind, 1)
                    else:
                        cur = self._db.execute(
                            "INSERT INTO items (kind, topic, payload, qos, retain, size, ts) VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (kind, topic, payload, qos, int(retain), size, time.time()),
                        )
            except SpoolError as exc:
                if exc.code != "spool_full":
                    # Nothing could be written (a full disk): counted in
                    # memory, as the disk takes no count either. (spool_full,
                    # an event/reply over the cap, is the caller's to handle.)
                    self._lost[kind] = self._lost.get(kind, 0) + 1
                raise
            if evicted is None:
                log.debug("spool full: dropped a new %s message for %s", kind, topic)
                return None
            self._used += size - evicted
            return int(cur.lastrowid)  # type: ignore[arg-type]

    def _make_room(self, size: int, kind: str) -> int | None:
        """Evict for ``size`` more bytes (in the open transaction); returns the
        bytes evicted, ``None`` when the item cannot fit (nothing evicted) or
        raises ``spool_full`` for an event/reply."""
        need = self._used + size - self.max_bytes
        if need <= 0:
            return 0
        plan: list[tuple[str, list[int], int]] = []
        freed = 0
        for victim_kind in _EVICTABLE[kind]:
            seqs: list[int] = []
            for seq, item_size in self._db.execute(
                "SELECT seq, size FROM items WHERE kind = ? ORDER BY seq", (victim_kind,)
            ):
                if freed >= need:
                    break
                seqs.append(seq)
                freed += item_size
            plan.append((victim_kind, seqs, len(seqs)))
            if freed >= need:
                break
        if freed < need:
            if kind in ("events", "replies"):
                raise SpoolError(
                    f"the spool is full ({self._used} of {self.max_bytes} bytes) with events and replies; "
                    f"a {kind} message of {size} bytes cannot be kept",
                    code="spool_full",
                )
            return None
        for victim_kind, seqs, count in plan:
            if count:
                self._db.executemany("DELETE FROM items WHERE seq = ?", ((s,) for s in seqs))
                self._count_dropped(victim_kind, count)
        log.debug("spool full: evicted %s", {k: n for k, _, n in plan if n})
        return freed

    def _count_dropped(self, kind: str, count: int) -> None:
        self._db.execute(
            "INSERT INTO dropped (kind, count) VALUES (?, ?) "
            "ON CONFLICT (kind) DO UPDATE SET count = count + excluded.count",
            (kind, count),
        )

    # -- replay -----------------------------------------------------------------

    def peek(self, limit: int = 100, *, after: int = 0) -> list[SpooledItem]:
        """The oldest ``limit`` items with ``seq > after``, oldest first.

        Nothing is removed: publish them, then :meth:`ack` each.
        """
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT seq, kind, topic, payload, qos, retain, ts FROM items WHERE seq > ? ORDER BY seq LIMIT ?",
                    (after, limit),
                ).fetchall()
            except sqlite3.Error as exc:
                raise self._wrap(exc, "cannot read the spool") from None
        return [SpooledItem(s, k, t, bytes(p), q, bool(r), ts) for s, k, t, p, q, r, ts in rows]

    def ack(self, seqs: int | Iterable[int]) -> int:
        """Remove items that were published; returns how many were removed.
        Acknowledging an unknown (already removed or evicted) seq is fine."""
        items = [seqs] if isinstance(seqs, int) else list(seqs)
        if not items:
            return 0
        with self._lock:
            with self._transaction("cannot remove published items from the spool"):
                freed = 0
                removed = 0
                for seq in items:
                    # (no DELETE ... RETURNING: Debian bullseye ships SQLite 3.34)
                    row = self._db.execute("SELECT size FROM items WHERE seq = ?", (seq,)).fetchone()
                    if row is not None:
                        self._db.execute("DELETE FROM items WHERE seq = ?", (seq,))
                        freed += row[0]
                        removed += 1
            self._used -= freed
            if removed and not self._used:
                self._vacuum()
            return removed

    def replay(self, publish: Callable[[SpooledItem], bool], *, batch: int = 100) -> int:
        """Hand every item, oldest first, to ``publish`` and acknowledge the
        ones it returns True for; stops at the first False (broker gone
        again) or exception (propagated). Returns the number acknowledged."""
        sent = 0
        after = 0
        while True:
            items = self.peek(batch, after=after)
            if not items:
                return sent
            for item in items:
                if not publish(item):
                    return sent
                self.ack(item.seq)
                sent += 1
                after = item.seq

    # -- reporting ----------------------------------------------------------------

    def dropped(self, *, reset: bool = False) -> dict[str, int]:
        """Items evicted or refused per kind, since the counters were last
        reset (persisted, so a restart does not hide a loss). ``reset=True``
        returns them and starts again from zero, for per-interval reports.

        Messages that could not be written at all (a full disk) are counted
        too, in memory: there was no room to persist the count either.
        """
        if not reset:  # a read: no write transaction on every telemetry tick
            with self._lock:
                counts = dict(self._db.execute("SELECT kind, count FROM dropped").fetchall())
                lost = dict(self._lost)
            return {kind: int(counts.get(kind, 0)) + lost.get(kind, 0) for kind in KINDS}
        with self._lock, self._transaction("cannot read the spool's counters"):
            counts = dict(self._db.execute("SELECT kind, count FROM dropped").fetchall())
            self._db.execute("DELETE FROM dropped")
            lost, self._lost = self._lost, {}
        return {kind: int(counts.get(kind, 0)) + lost.get(kind, 0) for kind in KINDS}

    def counts(self) -> dict[str, int]:
        """Items waiting, per kind."""
        with self._lock:
            rows = dict(self._db.execute("SELECT kind, COUNT(*) FROM items GROUP BY kind").fetchall())
        return {kind: int(rows.get(kind, 0)) for kind in KINDS}

    @property
    def bytes_used(self) -> int:
        with self._lock:
            return self._used

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0])

    def set_max_pages(self, pages: int) -> None:
        """Cap the SQLite file at ``pages`` pages (SQLITE_FULL beyond)."""
        with self._lock:
            self._db.execute(f"PRAGMA max_page_count = {int(pages)}")

    def close(self) -> None:
        with self._lock:
            try:
                self._db.close()
            except sqlite3.Error as exc:  # pragma: no cover - close rarely fails
                log.warning("closing the spool %s: %s", self.path, exc)

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------

    @contextmanager
    def _transaction(self, what: str) -> Iterator[None]:
        """One write transaction (the caller holds the lock): committed when
        the block ends, rolled back when it raises. An SQLite error becomes a
        :class:`SpoolError` (``what`` says what failed), after the byte count
        is read again from the file."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        except sqlite3.Error as exc:
            self._reload_used()
            raise self._wrap(exc, what) from None

    def _rollback(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # no transaction open (SQLite already rolled it back)

    def _sum_sizes(self) -> int:
        return int(self._db.execute("SELECT COALESCE(SUM(size), 0) FROM items").fetchone()[0])

    def _reload_used(self) -> None:
        try:
            self._used = self._sum_sizes()
        except sqlite3.Error:
            pass

    def _vacuum(self) -> None:
        """Give the freed pages back to the file system once the spool is
        empty (cheap then, and a long outage can leave a big file behind)."""
        try:
            self._db.execute("PRAGMA incremental_vacuum")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.debug("spool vacuum: %s", exc)

    def _wrap(self, exc: sqlite3.Error, what: str) -> SpoolError:
        name = getattr(exc, "sqlite_errorname", "")
        if name == "SQLITE_FULL" or "disk is full" in str(exc):
            return SpoolError(f"{what}: the disk holding {self.path} is full", code="disk_full")
        return SpoolError(f"{what}: {exc} ({self.path})", code="spool_failed")
