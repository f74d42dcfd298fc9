"""The per-model state file: which version serves, which is known good, labels.

``<store>/<model>/state.json`` is the only mutable record of the store (the
version directories are immutable). It is small and is replaced atomically on
every change: written to a temporary file in the same directory, fsynced,
renamed over the old one, and the directory fsynced, so that a power cut or a
``kill -9`` leaves either the old state or the new one, never a torn file.

Fields:

* ``active``: the version that serves frames (``None`` until one is chosen);
* ``last_good``: the newest version that survived its probation (or was the
  first one ever served); automatic rollback goes back to it;
* ``labels``: ``{"stable": 3, "canary": 4}``, names a source or request can
  be served by instead of the active version;
* ``probation``: the version on probation and since when, cleared when it
  passes or is rolled back. The same record, in the running agent's memory,
  carries the agent's :class:`Watch` over it (never written: it is this
  process's counters);
* ``failed``: versions that failed verification or probation, with why; the
  version policy never picks them on its own again;
* ``history``: the last :data:`HISTORY_LEN` transitions, newest last.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

STATE_NAME = "state.json"
HISTORY_LEN = 50


@dataclass(frozen=True)
class Watch:
    """What the running agent measures of a probation, from the moment the
    version serves in this process: the supervisor judges the frames and
    errors since then against the version that served before."""

    started: float  # time.monotonic() when the version began to serve here
    baseline_ms: float | None  # the previous version's median inference time; None: latency is not judged
    frames0: int  # the version's frame and error counts at ``started``
    errors0: int


class Probation(BaseModel):
    """The one record of a probation: the persisted fields, and ``watch``.

    ``watch`` lives in memory only (excluded from the file, ``None`` when
    read back): set by the model manager once the version serves (the
    probation supervisor judges only watched records), and cleared to stop
    judging (an automatic rollback that failed; the next start decides).
    The manager changes it, like the rest of the state, inside a
    transaction; it is one immutable object, so the supervisor reading it
    outside one sees a whole watch or none.
    """

    model_config = ConfigDict(extra="forbid")

    version: int
    since: float  # wall clock (time.time()) when it began
    previous: int | None = None
    restarts: int = 0
    clean_stop: bool = False  # the agent stopped cleanly during it: re-arm, do not roll back
    watch: Watch | None = Field(None, exclude=True)


class HistoryEntry(BaseModel):
    model_config = ConfigDict(extra="allow")

    ts: float
    event: str
    version: int | None = None
    reason: str | None = None


class ModelState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    active: int | None = None
    last_good: int | None = None
    labels: dict[str, int] = Field(default_factory=dict)
    probation: Probation | None = None
    failed: dict[int, str] = Field(default_factory=dict)
    history: list[HistoryEntry] = Field(default_factory=list)

    def record(self, event: str, version: int | None = None, reason: str | None = None, **extra: Any) -> None:
        self.history.append(HistoryEntry(ts=time.time(), event=event, version=version, reason=reason, **extra))
        del self.history[:-HISTORY_LEN]


def fsync_dir(path: Path) -> None:
    """fsync through a read-only descriptor: a folder (its entries), or a file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_state(folder: Path) -> tuple[ModelState, str | None]:
    """The state in ``folder``, and a problem description when the file was
    unreadable (then a fresh state is returned and the caller recovers)."""
    path = folder / STATE_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return ModelState(), None
    except OSError as exc:
        return ModelState(), f"{path}: cannot read ({exc.strerror})"
    try:
        return ModelState.model_validate(json.loads(raw)), None
    except (ValueError, ValidationError) as exc:
        return ModelState(), f"{path}: unreadable state ({type(exc).__name__}); rebuilt from the versions on disk"


def write_state(folder: Path, state: ModelState, *, checkpoint: Any = None) -> None:
    """Atomically replace ``folder/state.json`` (temp file, fsync, rename, fsync dir).

    ``checkpoint`` (a callable taking a step name) lets the crash tests stop
    the process between the steps.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{STATE_NAME}.{os.getpid()}.tmp"
    data = state.model_dump_json(indent=1).encode("utf-8")
    with open(tmp, "wb") as fh:
        fh.write(data)
        if checkpoint:
            checkpoint("state_tmp_written")
        fh.flush()
        os.fsync(fh.fileno())
    if checkpoint:
        checkpoint("state_tmp_synced")
    os.replace(tmp, folder / STATE_NAME)
    fsync_dir(folder)
    if checkpoint:
        checkpoint("state_renamed")


def clean_state_leftovers(folder: Path) -> int:
    """Remove temporary state files an interrupted write left behind."""
    n = 0
    for tmp in folder.glob(f".{STATE_NAME}.*.tmp"):
        tmp.unlink(missing_ok=True)
        n += 1
    return n
