"""Frame sources: the only code that touches a camera, a stream or a file.

Every source runs its own capture thread that keeps just the newest frame in
a one-slot mailbox. The inference loop takes whatever is newest; a frame that
is replaced before anyone took it is counted as *skipped*, never queued, so a
slow model sees fresh frames rather than an ever-growing backlog.

``open_source`` picks the kind from the URI:

* ``"0"``, ``"/dev/video0"``, ``/dev/v4l/by-id/...`` -> a camera (reopened with
  back-off when it vanishes)
* ``rtsp://``, ``rtsps://``, ``http(s)://``, ``udp://`` ... -> a network stream (same)
* an existing directory -> the images in it, in name order
* anything else -> a video file
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from edge_agent.config import SourceConfig
from edge_agent.errors import SourceError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
_STREAM_RE = re.compile(r"^(rtsp|rtsps|rtmp|http|https|udp|tcp|srt)://", re.IGNORECASE)
_CREDENTIALS_RE = re.compile(r"(?<=://)[^/@\s]+@")


def redact(uri: str) -> str:
    """``rtsp://user:secret@cam/stream`` -> ``rtsp://***@cam/stream`` for logs."""
    return _CREDENTIALS_RE.sub("***@", uri)


@dataclass(frozen=True)
class Frame:
    """One captured picture. ``index`` counts frames the source produced
    (from 0); ``ts`` is the capture time (Unix seconds)."""

    image: np.ndarray
    index: int
    ts: float


class FrameSource:
    """Base class: a capture thread feeding a one-slot mailbox.

    Subclasses implement ``_open``, ``_read`` (an image, or None at the end /
    on failure) and ``_close``. ``live`` sources (cameras, streams) are reopened
    with exponential back-off on failure; file sources end, or replay when
    ``loop`` is set.

    Thread-safety: ``next_frame`` is for one consumer; counters are read
    under the same lock they are written with.
    """

    live = False
    reconnect_initial_s = 0.5
    reconnect_max_s = 30.0

    def __init__(self, cfg: SourceConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.uri = cfg.uri
        self.display_uri = redact(cfg.uri)
        self._cond = threading.Condition()
        self._latest: Frame | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.finished = False
        self.failed = False  # a file/folder that could not be opened
        self.captured = 0
        self.skipped = 0
        self.errors = 0
        self.last_error: str | None = None

    # -- subclass interface ------------------------------------------------

    def _open(self) -> None:
        raise NotImplementedError

    def _read(self) -> np.ndarray | None:
        raise NotImplementedError

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

    def _publish(self, image: np.ndarray) -> None:
        with self._cond:
            if not self.cfg.realtime and not self.live:
                # Hand every frame over: wait until the consumer took the last one.
                self._cond.wait_for(lambda: self._latest is None or self._stop.is_set())
            if self._latest is not None:
                self.skipped += 1
            self._latest = Frame(image, self.captured, time.time())
            self.captured += 1
            self._cond.notify_all()

    def _error(self, message: str) -> None:
        with self._cond:
            self.errors += 1
            self.last_error = message

    def _finish(self) -> None:
        with self._cond:
            self.finished = True
            self._cond.notify_all()

    def _run(self) -> None:
        backoff = self.reconnect_initial_s
        try:
            while not self._stop.is_set():
                try:
                    self._open()
                except SourceError as exc:
                    self._error(str(exc))
                    if not self.live:
                        log.error("source %s: %s", self.name, exc)
                        self.failed = True
                        return
                    log.warning("source %s: %s; retrying in %.1fs", self.name, exc, backoff)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, self.reconnect_max_s)
                    continue
                before = self.captured
                ended = self._capture_until_end()
                if self.captured > before:
                    # Only a source that delivered frames counts as recovered:
                    # a camera that opens but stays silent keeps backing off.
                    backoff = self.reconnect_initial_s
                self._close()
                if self._stop.is_set():
                    return
                if not self.live:
                    if ended and self.cfg.loop and self.captured:
                        continue
                    log.info("source %s: end of input after %d frames", self.name, self.captured)
                    return
                self._error("stream ended or camera vanished")
                log.warning("source %s: no frame from %s; reopening in %.1fs", self.name, self.display_uri, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.reconnect_max_s)
        except Exception as exc:  # never let a capture thread die silently
            self._error(f"capture failed: {exc}")
            log.exception("source %s: capture failed", self.name)
        finally:
            self._close()
            self._finish()

    def _capture_until_end(self) -> bool:
        """Read frames until the input ends (True) or stop is requested."""
        interval = self._pace_interval() if (self.cfg.realtime and not self.live) else None
        next_due = time.monotonic()
        while not self._stop.is_set():
            if interval is not None:
                delay = next_due - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    return False
                next_due = max(next_due + interval, time.monotonic() - interval)
            image = self._read()
            if image is None:
                return True
            self._publish(image)
        return False


class VideoSource(FrameSource):
    """Anything ``cv2.VideoCapture`` opens: a camera, a stream, a video file."""

    def __init__(self, cfg: SourceConfig, target: int | str, *, live: bool) -> None:
        super().__init__(cfg)
        self.target = target
        self.live = live
        self._cap: cv2.VideoCapture | None = None
        self._fps = 0.0

    def _open(self) -> None:
        cap = cv2.VideoCapture(self.target)
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot open {self.display_uri}")
        self._fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self._cap = cap

    def _read(self) -> np.ndarray | None:
        assert self._cap is not None
        ok, image = self._cap.read()
        return image if ok and image is not None else None

    def _close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def _pace_interval(self) -> float | None:
        fps = self.cfg.source_fps or (self._fps if 0 < self._fps < 1000 else 30.0)
        return 1.0 / fps


class FolderSource(FrameSource):
    """The images of a directory, in name order. An unreadable image is
    counted as an error and skipped, with a warning."""

    def __init__(self, cfg: SourceConfig, folder: Path) -> None:
        super().__init__(cfg)
        self.folder = folder
        self._files: list[Path] = []
        self._pos = 0

    def _open(self) -> None:
        try:
            self._files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        except OSError as exc:
            raise SourceError(f"cannot list {self.folder}: {exc.strerror}") from None
        if not self._files:
            raise SourceError(f"{self.folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self._pos = 0

    def _read(self) -> np.ndarray | None:
        while self._pos < len(self._files):
            path = self._files[self._pos]
            self._pos += 1
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is not None:
                return image
            self._error(f"unreadable image {path.name}")
            log.warning("source %s: skipping unreadable image %s", self.name, path)
        return None

    def _pace_interval(self) -> float | None:
        return 1.0 / (self.cfg.source_fps or 5.0)


def open_source(cfg: SourceConfig) -> FrameSource:
    """Build (not start) the source for a config entry; raises SourceError
    for a file that does not exist."""
    uri = cfg.uri.strip()
    if uri.isdigit():
        return VideoSource(cfg, int(uri), live=True)
    if uri.startswith("/dev/"):
        return VideoSource(cfg, uri, live=True)
    if _STREAM_RE.match(uri):
        return VideoSource(cfg, uri, live=True)
    path = Path(uri.removeprefix("file://")).expanduser()
    if path.is_dir():
        return FolderSource(cfg, path)
    if not path.is_file():
        raise SourceError(f"source {cfg.name}: {redact(uri)} is not a camera, a stream URL, a file or a folder")
    return VideoSource(cfg, str(path), live=False)
