"""The command journal: what the dispatcher must remember across a restart.

Two promises of the MQTT plane outlive the agent's process, so they live
on disk (``<store.path>/.commands.db``, SQLite):

* **Every command taken is answered once.** A command that changes the
  device (``deploy``, ``activate``, ``rollback``, ``remove``, ``label``) is
  written down, and the write reaches the disk, *before* it runs; its reply
  is written down before it is sent. A command found still "running" at the
  next start was interrupted by a crash or a power cut: the agent answers it
  then, once (:meth:`CommandJournal.interrupted`), with what it can tell of
  its outcome, and a repeat of its id gets that same reply.
* **Every reply reaches the broker.** A journaled reply counts as sent
  only once the broker acknowledged it (PUBACK) or it went into the
  store-and-forward spool (:meth:`CommandJournal.delivered`); one that was
  written down but whose sending a crash cut short is sent again at the next
  start (:meth:`CommandJournal.unsent`). So a reply may arrive twice after a
  crash (MQTT's QoS 1 says "at least once"), never zero times.
* **A signed command runs once, ever.** With ``[commands] trusted_keys`` set,
  the id and ``ts`` of every signed command are written down before it runs
  and kept until the command would be refused as stale anyway; a repeat of
  the id is answered with the first reply (CONTRACT §3) or, once that reply
  is no longer kept, with ``replayed_command``.

Replies are kept for the newest ``keep`` journaled commands (the same
number as the dispatcher keeps in memory, ``commands.memory``). Beyond that,
an unsigned command is forgotten (as it is in memory) and a signed one keeps
only its id and ``ts``.

**Which commands a signed id is kept for, and the clock.** A seen id may be
forgotten only when a command that old would be refused anyway. The journal
keeps a *horizon* ``H`` on disk, which only ever grows: a signed command
with ``ts < H`` is refused (``stale_command``) and only rows with
``ts < H`` are ever deleted, so whatever the wall clock does, a command the
journal forgot cannot run again. ``H`` moves to ``min(wall clock, newest ts
accepted) - max_age_s``: a device clock that jumps ahead (a bad NTP answer,
a wrong RTC) cannot push it past what the console's own, signed, clock has
reached, so once the clock is right again nothing stays refused; a clock
that jumps back never lets a replay through, because nothing is deleted
that a replay could use. With ``max_age_s = 0`` (no age limit), or a clock
far behind, ``H`` moves only to keep at most ``max_signed`` signed ids: the
oldest are forgotten and commands signed before them refused.

Durability: WAL with ``synchronous = FULL``, so a commit is on the disk when
:meth:`begin` or :meth:`finish` returns (one fsync each), and survives a
power cut as well as a crash. Only journaled commands pay it.

A file that is not a readable journal (a corrupted SD card) is moved aside
to ``.commands.db.corrupt-<time>`` and a new journal started whose horizon
is the current time: the lost ids cannot be checked any more, so signed
commands signed before that moment are refused as stale (the console signs
its repeats afresh).

Thread-safety: every method may be called from any thread; one lock
serialises them, except :meth:`CommandJournal.delivered`, which paho's
network thread calls and which takes only a small lock never held across a
disk write. One process opens a journal at a time (the agent holds the
store's lock).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edge_agent.errors import CommandError, EdgeAgentError
from edge_agent.faults import checkpoint

log = logging.getLogger(__name__)

JOURNAL_NAME = ".commands.db"
DEFAULT_MAX_SIGNED = 100_000
_PRUNE_EVERY = 32  # finished commands between two prunings

_SCHEMA = """
CREATE TABLE IF NOT EXISTS commands (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    cmd TEXT NOT NULL,
    args TEXT NOT NULL,
    origin TEXT NOT NULL,
    signed_ts REAL,
    started REAL NOT NULL,
    step TEXT,
    state TEXT NOT NULL,
    reply TEXT,
    finished REAL,
    sent INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS commands_signed ON commands (signed_ts) WHERE signed_ts IS NOT NULL;
CREATE INDEX IF NOT EXISTS commands_state ON commands (state, seq);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value REAL NOT NULL
);
"""

RUNNING, DONE = "running", "done"


@dataclass(frozen=True)
class Entry:
    """One journaled command. ``reply`` is None while it runs, and after the
    reply of a signed command was dropped to keep the journal small."""

    id: str
    cmd: str
    args: dict[str, Any]
    origin: str
    signed_ts: float | None
    started: float
    step: str | None
    state: str
    reply: dict[str, Any] | None
    here: bool
    """Begun by this process (and so, while running, still running)."""


class CommandJournal:
    """The on-disk memory of commands (see the module's documentation).

    ``keep``: replies kept (``commands.memory``); ``max_age_s``: how long a
    signed command may be replayed before it is stale (``commands.max_age_s``,
    0: no limit); ``max_signed``: signed ids kept at most; ``clock``: the wall
    clock (tests move it). Raises :class:`~edge_agent.errors.EdgeAgentError`
    ``store_write_failed`` (or ``disk_full``) when the file cannot be opened
    or created.
    """

    def __init__(self, path: Path | str, *, keep: int = 1024, max_age_s: float = 86400.0,
                 max_signed: int = DEFAULT_MAX_SIGNED, clock: Callable[[], float] = time.time) -> None:
        if keep < 1 or max_signed < 1 or max_age_s < 0:
            raise ValueError("keep and max_signed must be positive, max_age_s not negative")
        self.path = Path(path)
        self.keep = keep
        self.max_age_s = max_age_s
        self.max_signed = max_signed
        self.clock = clock
        self._lock = threading.Lock()
        self._mine: dict[str, list[Callable[[dict[str, Any]], None]]] = {}  # begun here, still running
        self._recovered = False
        self._resent = False
        # The delivery bookkeeping has a lock of its own, never held across a
        # disk write: paho's network thread takes it (delivered()) and must not
        # wait for a commit of ``_lock``'s. Order: ``_lock`` before ``_sent_lock``.
        self._sent_lock = threading.Lock()
        self._awaiting: set[str] = set()  # replies written down here and not yet delivered
        self._delivered: set[str] = set()  # delivered, not yet written down (see delivered())
        self._flush_wanted = threading.Event()
        self._flusher: threading.Thread | None = None
        self._closed = False
        self._finished = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._error(f"cannot create the folder of the command journal {self.path}", exc) from None
        fresh_horizon = None
        try:
            self._open()
        except sqlite3.DatabaseError as exc:
            if getattr(exc, "sqlite_errorname", "") not in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
                raise self._error(f"cannot open the command journal {self.path}", exc) from None
            aside = self._move_aside()
            fresh_horizon = self.clock()
            log.error("the command journal %s is unreadable (%s): moved to %s; starting a new one, which refuses "
                      "signed commands signed before now (their ids are lost)", self.path, exc, aside)
            try:
                self._open()
            except sqlite3.Error as exc2:
                raise self._error(f"cannot open the command journal {self.path}", exc2) from None
        if fresh_horizon is not None:
            with self._lock:
                self._write(lambda: self._set_meta("horizon", fresh_horizon), "cannot start a new command journal")
            self._horizon = fresh_horizon

    # -- opening ----------------------------------------------------------------

    def _open(self) -> None:
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
        try:
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")  # a commit is on the disk when it returns
            self._db.executescript(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(commands)")}
            if "sent" not in columns:  # a journal written before replies were tracked: all count as sent
                self._db.execute("ALTER TABLE commands ADD COLUMN sent INTEGER NOT NULL DEFAULT 1")
            self._db.execute("SELECT COUNT(*) FROM commands").fetchone()  # reads the file: corrupt -> raises here
            self._horizon = self._get_meta("horizon", float("-inf"))
            self._newest = self._get_meta("newest_ts", None)
        except BaseException:
            self._db.close()
            raise

    def _move_aside(self) -> Path:
        from edge_agent.comms.spool import move_db_aside

        try:
            return move_db_aside(self.path)
        except OSError as exc:
            raise self._error(f"the command journal {self.path} is unreadable and cannot be moved aside",
                              exc) from None

    def configure(self, *, keep: int | None = None, max_age_s: float | None = None) -> None:
        """New ``keep``/``max_age_s`` (a reload of the config)."""
        with self._lock:
            if keep is not None:
                self.keep = keep
            if max_age_s is not None:
                self.max_age_s = max_age_s

    # -- reading ----------------------------------------------------------------

    def lookup(self, cmd_id: str) -> Entry | None:
        """The journaled command ``cmd_id``, or None. A journal that cannot be
        read is logged and reads as empty: the command then goes to
        :meth:`begin`, which refuses it when the journal cannot be written
        either."""
        with self._lock:
            try:
                row = self._db.execute(
                    "SELECT id, cmd, args, origin, signed_ts, started, step, state, reply FROM commands WHERE id = ?",
                    (cmd_id,),
                ).fetchone()
            except sqlite3.Error as exc:
                log.error("command journal: cannot look up %s: %s (%s)", cmd_id, exc, self.path)
                return None
            return None if row is None else self._entry(row)

    def _entry(self, row: tuple) -> Entry:
        cmd_id, cmd, args, origin, signed_ts, started, step, state, reply = row
        return Entry(cmd_id, cmd, json.loads(args), origin, signed_ts, started, step, state,
                     None if reply is None else json.loads(reply), cmd_id in self._mine)

    @property
    def horizon(self) -> float:
        """Signed commands with an earlier ``ts`` are refused as stale."""
        with self._lock:
            return self._horizon

    def interrupted(self) -> list[Entry]:
        """The commands an earlier run of the agent began and never answered,
        oldest first. Only the first call returns them (one answer each)."""
        with self._lock:
            if self._recovered:
                return []
            self._recovered = True
            try:
                rows = self._db.execute(
                    "SELECT id, cmd, args, origin, signed_ts, started, step, state, reply FROM commands "
                    "WHERE state = ? ORDER BY seq", (RUNNING,),
                ).fetchall()
            except sqlite3.Error as exc:
                raise self._error("cannot read the commands an earlier run left unanswered", exc) from None
            return [self._entry(row) for row in rows if row[0] not in self._mine]

    def unsent(self) -> list[Entry]:
        """The commands an earlier run answered and wrote down whose reply
        it never saw delivered (the process died between writing the reply
        and the broker's acknowledgement), oldest first: send them again.
        Only the first call returns them; call it before the first command
        of this run finishes."""
        with self._lock:
            if self._resent:
                return []
            self._resent = True
            try:
                rows = self._db.execute(
                    "SELECT id, cmd, args, origin, signed_ts, started, step, state, reply FROM commands "
                    "WHERE state = ? AND sent = 0 AND reply IS NOT NULL ORDER BY seq", (DONE,),
                ).fetchall()
            except sqlite3.Error as exc:
                raise self._error("cannot read the replies an earlier run left unsent", exc) from None
            with self._sent_lock:
                entries = [self._entry(row) for row in rows
                           if row[0] not in self._awaiting and row[0] not in self._delivered]
                self._awaiting.update(e.id for e in entries)  # their delivery is awaited again
            return entries

    def delivered(self, cmd_id: str) -> None:
        """The reply of ``cmd_id`` reached the broker (or the spool). Written
        down moments later by a thread of the journal (those delivered
        meanwhile in one transaction; also with any other write, and at
        :meth:`close`), so paho's network thread, which calls this, never
        waits for the disk; a crash in between sends the reply once more at
        the next start. Ids the journal does not await are ignored."""
        with self._sent_lock:
            if cmd_id not in self._awaiting or self._closed:
                return
            self._awaiting.discard(cmd_id)
            self._delivered.add(cmd_id)
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._flush_loop, name="journal-flush", daemon=True)
                self._flusher.start()
        self._flush_wanted.set()

    _FLUSH_BATCH_S = 0.005  # deliveries gathered into one write

    def _flush_loop(self) -> None:
        while True:
            self._flush_wanted.wait()
            with self._lock:
                if self._closed:
                    return
            time.sleep(self._FLUSH_BATCH_S)
            self._flush_wanted.clear()
            with self._lock:
                if self._closed:
                    return
                with self._sent_lock:
                    pending = bool(self._delivered)
                if not pending:
                    continue
                try:
                    self._write(lambda: None, "cannot record which replies were delivered")
                except EdgeAgentError as exc:
                    log.warning("command journal: %s", exc)  # kept in memory: the next write tries again

    def wait(self, cmd_id: str, callback: Callable[[dict[str, Any]], None]) -> bool:
        """Call ``callback(reply)`` when command ``cmd_id``, still running in
        this process, ends. False (and no call) when it is not running here."""
        with self._lock:
            waiters = self._mine.get(cmd_id)
            if waiters is None:
                return False
            waiters.append(callback)
            return True

    # -- writing ----------------------------------------------------------------

    def begin(self, cmd_id: str, cmd: str, args: dict[str, Any] | None, *, origin: str,
              signed_ts: float | None) -> None:
        """Write down that command ``cmd_id`` runs now; on the disk when this
        returns. ``args`` are kept for answering it after a crash (None: not
        needed). ``signed_ts``: the ``ts`` of a signed command, whose id is
        then kept until the horizon passes it.

        Raises :class:`~edge_agent.errors.CommandError` ``stale_command``
        when ``signed_ts`` is before the horizon, ``replayed_command`` when
        the id is already journaled, and ``disk_full`` or
        ``store_write_failed`` when the journal cannot be written: the
        command must not run then.
        """
        text = json.dumps(args if args is not None else {}, separators=(",", ":"))
        with self._lock:
            if signed_ts is not None and signed_ts < self._horizon:
                raise CommandError(
                    f"the command was signed at {_when(signed_ts)}, before {_when(self._horizon)}: this device no "
                    "longer remembers which commands that old it has run, so it refuses them (sign it again)",
                    code="stale_command")

            def write() -> None:
                self._db.execute(
                    "INSERT INTO commands (id, cmd, args, origin, signed_ts, started, state) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (cmd_id, cmd, text, origin, signed_ts, self.clock(), RUNNING))
                if signed_ts is not None and (self._newest is None or signed_ts > self._newest):
                    self._set_meta("newest_ts", signed_ts)

            try:
                self._write(write, f"cannot record command {cmd_id} in the command journal")
            except sqlite3.IntegrityError:
                raise CommandError(f"command {cmd_id} has already run on this device; a command id runs only once",
                                   code="replayed_command") from None
            if signed_ts is not None and (self._newest is None or signed_ts > self._newest):
                self._newest = signed_ts
            self._mine[cmd_id] = []
        checkpoint("command_recorded")

    def note(self, cmd_id: str, step: str) -> None:
        """The step a running command has reached (said in its answer after a
        crash). Best effort: a failure is logged."""
        with self._lock:
            try:
                self._write(lambda: self._db.execute("UPDATE commands SET step = ? WHERE id = ? AND state = ?",
                                                     (step, cmd_id, RUNNING)), f"cannot note the step of {cmd_id}")
            except EdgeAgentError as exc:
                log.warning("command journal: %s", exc)

    def finish(self, cmd_id: str, reply: dict[str, Any]) -> None:
        """Write down the reply of ``cmd_id`` (before it is sent: call
        :meth:`delivered` once it is); then call whoever :meth:`wait`\\ s for it. A failure to write is logged, not
        raised: the reply still goes out, but a repeat after a restart may
        not find it."""
        text = json.dumps(reply, separators=(",", ":"))
        with self._lock:
            with self._sent_lock:
                self._delivered.discard(cmd_id)  # a reply written anew (after a crash) awaits its delivery again
            try:
                self._write(lambda: self._db.execute(
                    "UPDATE commands SET state = ?, reply = ?, finished = ?, sent = 0 WHERE id = ?",
                    (DONE, text, self.clock(), cmd_id)), f"cannot record the reply of {cmd_id}")
            except EdgeAgentError as exc:
                log.error("command journal: %s", exc)
            else:
                with self._sent_lock:
                    self._awaiting.add(cmd_id)
            waiters = self._mine.pop(cmd_id, [])
            self._finished += 1
            prune = self._finished % _PRUNE_EVERY == 0
        checkpoint("reply_recorded")
        for callback in waiters:
            try:
                callback(reply)
            except Exception:
                log.exception("command %s: answering a repeat failed", cmd_id)
        if prune:
            self.prune()

    def prune(self) -> None:
        """Drop what is no longer needed: replies beyond the newest ``keep``
        (unsigned commands entirely), and signed ids the horizon has passed.
        Best effort: a failure is logged."""
        with self._lock:
            try:
                self._write(self._prune, "cannot prune the command journal")
            except EdgeAgentError as exc:
                log.warning("command journal: %s", exc)
                try:
                    self._horizon = self._get_meta("horizon", float("-inf"))  # what the disk kept
                except sqlite3.Error:
                    pass  # keep the one in memory: it only ever grows

    def _prune(self) -> None:
        row = self._db.execute("SELECT seq FROM commands WHERE state = ? ORDER BY seq DESC LIMIT 1 OFFSET ?",
                               (DONE, self.keep)).fetchone()
        if row is not None:  # rows up to seq row[0] are beyond the newest `keep`
            self._db.execute("DELETE FROM commands WHERE state = ? AND signed_ts IS NULL AND seq <= ?", (DONE, row[0]))
            self._db.execute("UPDATE commands SET reply = NULL, args = '{}' WHERE state = ? AND signed_ts IS NOT NULL "
                             "AND seq <= ? AND reply IS NOT NULL", (DONE, row[0]))
        horizon = self._horizon
        if self.max_age_s > 0 and self._newest is not None:
            horizon = max(horizon, min(self.clock(), self._newest) - self.max_age_s)
        count = self._db.execute("SELECT COUNT(*) FROM commands WHERE signed_ts IS NOT NULL AND state = ?",
                                 (DONE,)).fetchone()[0]
        if count > self.max_signed:
            oldest_kept = self._db.execute(
                "SELECT signed_ts FROM commands WHERE signed_ts IS NOT NULL AND state = ? "
                "ORDER BY signed_ts LIMIT 1 OFFSET ?", (DONE, count - self.max_signed)).fetchone()[0]
            horizon = max(horizon, oldest_kept)
        if horizon > self._horizon:
            self._set_meta("horizon", horizon)
            deleted = self._db.execute("DELETE FROM commands WHERE signed_ts < ? AND state = ?",
                                       (horizon, DONE)).rowcount
            log.debug("command journal: horizon now %s, %d signed id(s) forgotten", _when(horizon), deleted)
            self._horizon = horizon

    def close(self) -> None:
        with self._lock:
            with self._sent_lock:
                self._closed = True
                pending = bool(self._delivered)
            if pending:
                try:
                    self._write(lambda: None, "cannot record which replies were delivered")
                except EdgeAgentError as exc:
                    log.warning("command journal: %s", exc)
            try:
                self._db.close()
            except sqlite3.Error as exc:  # pragma: no cover - close rarely fails
                log.warning("closing the command journal %s: %s", self.path, exc)
        self._flush_wanted.set()  # the flusher sees _closed and ends

    # -- internals ------------------------------------------------------------------

    def _write(self, work: Callable[[], Any], what: str) -> None:
        """``work`` in one transaction (the caller holds the lock). An
        IntegrityError passes through; other SQLite errors become coded
        errors."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                work()
                with self._sent_lock:
                    delivered = list(self._delivered)
                if delivered:  # written down with this transaction (see delivered())
                    self._db.executemany("UPDATE commands SET sent = 1 WHERE id = ?", [(i,) for i in delivered])
                self._db.execute("COMMIT")
                with self._sent_lock:
                    self._delivered.difference_update(delivered)
            except BaseException:
                try:
                    self._db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                raise
        except sqlite3.IntegrityError:
            raise
        except sqlite3.Error as exc:
            raise self._error(what, exc) from None

    def _set_meta(self, key: str, value: float) -> None:
        self._db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = ?",
                         (key, value, value))

    def _get_meta(self, key: str, default: Any) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else float(row[0])

    def _error(self, what: str, exc: BaseException) -> EdgeAgentError:
        full = getattr(exc, "sqlite_errorname", "") == "SQLITE_FULL" or "disk is full" in str(exc) or (
            isinstance(exc, OSError) and exc.errno == 28)
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if full:
            return EdgeAgentError(f"{what}: the disk holding {self.path} is full", code="disk_full")
        return EdgeAgentError(f"{what}: {detail} ({self.path})", code="store_write_failed")


def _when(ts: float) -> str:
    """A Unix time for a person (UTC), or 'the start' for no horizon."""
    if ts == float("-inf"):
        return "the start"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))
    except (OverflowError, OSError, ValueError):
        return f"{ts:.0f}"
