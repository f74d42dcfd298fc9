"""The capture thread every source shares: a one-slot mailbox, reopening
with back-off, stall detection, decoding only the frames that are inferred,
and the signs of life a watchdog reads."""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_agent.backoff import Backoff
from edge_agent.config import SourceConfig
from edge_agent.errors import SourceError

log = logging.getLogger("edge_agent.sources")

_CREDENTIALS_RE = re.compile(r"(?<=://)[^/@\s]+@")

# The states a watchdog reads from ``FrameSource.state``.
STARTING, OPEN, RETRYING, ENDED, FAILED, STOPPED = "starting", "open", "retrying", "ended", "failed", "stopped"


def redact(uri: str) -> str:
    """``rtsp://user:secret@cam/stream`` -> ``rtsp://***@cam/stream`` for logs."""
    return _CREDENTIALS_RE.sub("***@", uri)


@dataclass(frozen=True)
class Frame:
    """One captured picture. ``index`` counts frames the source produced
    (from 0, frames passed over included); ``ts`` is the capture time (Unix seconds).
    ``prepared``: the model input made from it in the capture thread (a
    :class:`~edge_agent.pipeline.preprocess.Prepared`, tagged with the
    preprocessing it was made for), or None."""

    image: np.ndarray
    index: int
    ts: float
    prepared: Any = None


class FrameSource:
    """Base class: a capture thread feeding a one-slot mailbox.

    Subclasses implement ``_open`` (raise SourceError when the input cannot
    be opened), ``_grab`` (the next frame, not yet converted to a picture;
    None at the end of the input; SourceError when a live input failed, the
    message saying why), ``_retrieve`` (a grabbed frame -> a BGR picture, or
    None after counting the error with ``_error``) and ``_close``. ``live``
    sources (cameras, streams, programs) are reopened with exponential
    back-off when they fail, end, or deliver no frame for
    ``cfg.stall_timeout_s``; file sources end, or replay when ``loop`` is set.

    **Decode only what is inferred.** The consumer says when it will want
    its next frame (``want_after``); a live or realtime source converts only
    frames grabbed from about one frame interval before that moment on. The
    others are counted as captured and skipped without being converted. The
    mailbox holds either nothing or the newest frame, so what the consumer
    takes is the newest frame at the time it takes it. Without ``want_after``
    (no fps cap), and for files with ``realtime = false``, every frame is
    converted, as before.

    **What a watchdog reads** (from any thread, without locks: each is one
    attribute written by the capture thread):

    * ``last_progress`` (float): ``time.monotonic()`` of the capture thread's
      last sign of life. Refreshed whenever a call into the camera or program
      returns (a frame, an error, an open attempt) and at least every second
      while the thread waits (back-off, pacing, a consumer that has not taken
      the last frame, a pipe with no data yet). It stops moving only while
      the thread is inside one call that does not return. A stream read
      returns within ``stall_timeout_s`` (OpenCV's read/open time-outs are
      set from it), so allow that much before calling a source stuck.
    * ``blocked_in`` (str or None): the call the capture thread is inside
      right now, ``"open"`` or ``"read"``; None between calls.
    * ``state`` (str): ``"starting"`` (the first open attempt has not
      finished), ``"open"``, ``"retrying"`` (failed, ended or stalled; waiting
      to reopen), ``"ended"`` (a file or folder finished), ``"failed"`` (a
      file or folder that cannot be opened, or the capture thread crashed),
      ``"stopped"`` (``stop()`` ended it).
    * ``capture_alive`` (bool): the capture thread is running (False before
      ``start()`` and once it has ended).
    * ``opens`` (int): successful opens so far (a restart adds one).

    Thread-safety: ``next_frame`` is for one consumer; counters are read
    under the same lock they are written with.
    """

    live = False
    reconnect_initial_s = 0.5
    reconnect_max_s = 30.0
    progress_step_s = 1.0  # longest wait between two refreshes of last_progress
    reopen_verb = "reopening"

    def __init__(self, cfg: SourceConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.uri = cfg.uri
        self.display_uri = redact(cfg.uri) if cfg.uri is not None else ""
        self._cond = threading.Condition()
        self._latest: Frame | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._backoff = Backoff(self.reconnect_initial_s, self.reconnect_max_s)
        self.finished = False
        self.failed = False  # a file/folder that could not be opened
        self.captured = 0
        self.skipped = 0
        self.errors = 0
        self.last_error: str | None = None
        # watchdog interface (see the class docstring)
        self.last_progress = time.monotonic()
        self.blocked_in: str | None = None
        self.state = STARTING
        self.opens = 0
        # decode only what is inferred
        self._want_at: float | None = None
        self._interval = 0.0  # moving average of the time between two grabbed frames
        self._last_grab: float | None = None
        self._last_frame_at = time.monotonic()  # last frame grabbed (or the open), for stall detection
        # preprocessing in the capture thread (see prepare_with)
        self._prepare: Any = None
        self._prepare_failed = 0

    # -- subclass interface ------------------------------------------------

    def _open(self) -> None:
        raise NotImplementedError

    def _grab(self) -> Any:
        raise NotImplementedError

    def _retrieve(self, grabbed: Any) -> np.ndarray | None:
        return grabbed

    def _close(self) -> None:
        pass

    def _pace_interval(self) -> float | None:
        """Seconds between frames when replaying a file in real time."""
        return None

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"source-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def capture_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def want_after(self, monotonic_t: float | None) -> None:
        """The consumer will next want a frame at ``monotonic_t`` (its fps
        slot); frames grabbed well before then are passed over unconverted.
        None: it wants every frame (no fps cap). Called from the consumer's
        thread; one float written, so no lock."""
        self._want_at = monotonic_t

    def prepare_with(self, prepare: Any) -> None:
        """Preprocess every converted frame in the capture thread with
        ``prepare`` (``image -> Prepared``, the serving model's
        ``Preprocessor.prepare``), so the inference thread only infers; the
        frame carries it as ``Frame.prepared``. None: frames go as pictures
        only. Called by the consumer with the model that served its last
        frame; one reference written, so no lock. The consumer checks the
        tag: a frame prepared for another preprocessing is redone."""
        self._prepare = prepare

    def next_frame(self, timeout: float | None = None) -> Frame | None:
        """The newest frame not yet taken, waiting up to ``timeout`` seconds.
        Returns None on time-out, or once the source has finished and its
        last frame was taken."""
        with self._cond:
            if self._latest is None and not self.finished:
                self._cond.wait_for(lambda: self._latest is not None or self.finished or self._stop.is_set(), timeout)
            frame, self._latest = self._latest, None
            self._cond.notify_all()
            return frame

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"captured": self.captured, "skipped": self.skipped, "errors": self.errors}

    # -- capture thread ----------------------------------------------------

    def _touch(self) -> None:
        self.last_progress = time.monotonic()

    def _call(self, what: str, fn: Any) -> Any:
        """Run one call into the camera or program, marked for the watchdog."""
        self.blocked_in = what
        try:
            return fn()
        finally:
            self.blocked_in = None
            self._touch()

    def _wait(self, seconds: float) -> bool:
        """Wait up to ``seconds`` in steps that keep ``last_progress`` fresh;
        True when stop was requested."""
        deadline = time.monotonic() + seconds
        while True:
            self._touch()
            left = deadline - time.monotonic()
            if left <= 0:
                return self._stop.is_set()
            if self._stop.wait(min(left, self.progress_step_s)):
                return True

    def _prepared(self, image: np.ndarray) -> Any:
        prepare = self._prepare
        if prepare is None:
            return None
        try:
            return prepare(image)
        except Exception as exc:  # the inference thread preprocesses it again and reports the error there
            self._prepare_failed += 1
            if self._prepare_failed <= 3:
                log.warning("source %s: preprocessing in the capture thread failed: %s", self.name, exc)
            return None

    def _publish(self, image: np.ndarray) -> None:
        ts = time.time()
        prepared = self._prepared(image)  # outside the lock: the consumer may take the previous frame meanwhile
        with self._cond:
            if not self.cfg.realtime and not self.live:
                # Hand every frame over: wait until the consumer took the last one.
                while self._latest is not None and not self._stop.is_set():
                    self._cond.wait(self.progress_step_s)
                    self._touch()
            if self._latest is not None:
                self.skipped += 1
            self._latest = Frame(image, self.captured, ts, prepared)
            self.captured += 1
            self._cond.notify_all()

    def _pass_over(self) -> None:
        """A frame grabbed but not converted: the consumer will not want it.
        A converted frame still waiting is older than it, so it goes too."""
        with self._cond:
            if self._latest is not None:
                self._latest = None
                self.skipped += 1
            self.captured += 1
            self.skipped += 1

    def _wanted(self, now: float) -> bool:
        """Convert the frame grabbed at ``now``? Yes unless the consumer's
        next slot is more than about one frame interval away."""
        if not self.live and not self.cfg.realtime:
            return True  # batch mode: every frame is handed over
        want_at = self._want_at
        if want_at is None:
            return True
        return now >= want_at - 1.5 * self._interval

    def _grabbed(self, now: float) -> None:
        if self._last_grab is not None:
            gap = min(now - self._last_grab, 1.0)
            self._interval = gap if self._interval == 0 else 0.8 * self._interval + 0.2 * gap
        self._last_grab = now
        self._last_frame_at = now

    def _error(self, message: str) -> None:
        with self._cond:
            self.errors += 1
            self.last_error = message

    def _finish(self) -> None:
        with self._cond:
            self.finished = True
            self._cond.notify_all()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._call("open", self._open)
                except SourceError as exc:
                    self._error(str(exc))
                    if not self.live and not (self.opens and self.cfg.loop):
                        # A file or folder that cannot be read at start is a
                        # bad config; one that a looping source read before
                        # and that went away (an unmounted USB stick, a NAS, an
                        # rsync replacing it) is waited for, like a camera.
                        log.error("source %s: %s", self.name, exc)
                        self.failed = True
                        self.state = FAILED
                        return
                    self.state = RETRYING
                    delay = self._backoff.next()
                    log.warning("source %s: %s; retrying in %.1fs", self.name, exc, delay)
                    self._wait(delay)
                    continue
                self.opens += 1
                self.state = OPEN
                before = self.captured
                reason = None
                try:
                    ended = self._capture_until_end()
                except SourceError as exc:
                    ended, reason = True, str(exc)
                if self.captured > before:
                    # Only a source that delivered frames counts as recovered:
                    # a camera that opens but stays silent keeps backing off.
                    self._backoff.reset()
                self._close()
                if self._stop.is_set():
                    return
                if not self.live:
                    if reason is not None:
                        self._error(reason)
                        log.error("source %s: %s", self.name, reason)
                    elif ended and self.cfg.loop and self.captured:
                        continue
                    log.info("source %s: end of input after %d frames", self.name, self.captured)
                    self.state = ENDED
                    return
                self.state = RETRYING
                if reason is None:
                    self._error("stream ended or camera vanished")
                    reason = f"no frame from {self.display_uri}"
                else:
                    self._error(reason)
                delay = self._backoff.next()
                log.warning("source %s: %s; %s in %.1fs", self.name, reason, self.reopen_verb, delay)
                self._wait(delay)
        except Exception as exc:  # never let a capture thread die silently
            self._error(f"capture failed: {exc}")
            self.state = FAILED
            self.failed = True  # the agent's exit status says so, and the watchdog sees a live one
            log.exception("source %s: capture failed", self.name)
        finally:
            self._close()
            if self.state not in (ENDED, FAILED):
                self.state = STOPPED
            self._finish()

    def _capture_until_end(self) -> bool:
        """Read frames until the input ends (True) or stop is requested.
        ``_grab`` raises SourceError when a live source stalls or fails."""
        interval = self._pace_interval() if (self.cfg.realtime and not self.live) else None
        next_due = time.monotonic()
        self._last_grab, self._interval = None, 0.0
        self._last_frame_at = time.monotonic()
        while not self._stop.is_set():
            if interval is not None:
                delay = next_due - time.monotonic()
                if delay > 0 and self._wait(delay):
                    return False
                next_due = max(next_due + interval, time.monotonic() - interval)
            grabbed = self._call("read", self._grab)
            if grabbed is None:
                return True
            now = time.monotonic()
            self._grabbed(now)
            if not self._wanted(now):
                self._pass_over()
                continue
            image = self._retrieve(grabbed)
            if image is not None:
                self._publish(image)
        return False
