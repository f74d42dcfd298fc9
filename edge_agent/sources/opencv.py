"""Cameras, network streams and video files, through ``cv2.VideoCapture``."""

from __future__ import annotations

import re
import time

import cv2
import numpy as np

from edge_agent.config import SourceConfig
from edge_agent.errors import SourceError
from edge_agent.sources.base import FrameSource, log

STREAM_RE = re.compile(r"^(rtsp|rtsps|rtmp|http|https|udp|tcp|srt)://", re.IGNORECASE)


class VideoSource(FrameSource):
    """Anything ``cv2.VideoCapture`` opens: a camera, a stream, a video file.

    Frames are taken with ``grab()``; ``retrieve()`` (the conversion to a BGR
    picture, and for most cameras the decoding) runs only for a frame the
    consumer will take. A network stream is opened through FFmpeg with its
    open and read time-outs set to ``stall_timeout_s``, so a dead stream's
    read returns and the stream is reopened instead of blocking for ever.
    """

    def __init__(self, cfg: SourceConfig, target: int | str, *, live: bool) -> None:
        super().__init__(cfg)
        self.target = target
        self.live = live
        self._cap: cv2.VideoCapture | None = None
        self._fps = 0.0

    @property
    def is_stream(self) -> bool:
        return isinstance(self.target, str) and bool(STREAM_RE.match(self.target))

    def _open(self) -> None:
        if self.is_stream:
            ms = max(1, int(self.cfg.stall_timeout_s * 1000))
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
            cap = cv2.VideoCapture(self.target, cv2.CAP_FFMPEG, params)
        else:
            cap = cv2.VideoCapture(self.target)
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot open {self.display_uri}")
        self._fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self._cap = cap

    def _grab(self) -> bool | None:
        assert self._cap is not None
        started = time.monotonic()
        if self._cap.grab():
            return True
        waited = time.monotonic() - started
        if self.live and waited >= 0.9 * self.cfg.stall_timeout_s:
            # the stream's read time-out fired: say so, rather than "ended"
            raise SourceError(f"no frame for {waited:.1f}s from {self.display_uri}")
        return None

    def _retrieve(self, grabbed: bool) -> np.ndarray | None:
        assert self._cap is not None
        ok, image = self._cap.retrieve()
        if ok and image is not None:
            return image
        self._error("a grabbed frame could not be converted")
        if self.errors <= 5 or self.errors % 100 == 0:
            log.warning("source %s: a grabbed frame could not be converted (%d errors so far)", self.name, self.errors)
        return None

    def _close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def _pace_interval(self) -> float | None:
        fps = self.cfg.source_fps or (self._fps if 0 < self._fps < 1000 else 30.0)
        return 1.0 / fps
