"""Frame sources: the only code that touches a camera, a stream, a file or a
camera program.

Every source runs its own capture thread that keeps just the newest frame in
a one-slot mailbox. The inference loop takes whatever is newest; a frame that
is replaced before anyone took it is counted as *skipped*, never queued, so a
slow model sees fresh frames rather than an ever-growing backlog. With an fps
cap, frames that will be skipped are not even converted (see
:class:`~edge_agent.sources.base.FrameSource`).

``open_source`` picks the kind from the config:

* ``command = [...]`` -> a program whose stdout carries MJPEG or raw frames
  (restarted with back-off when it exits or stalls) — :mod:`.pipe`
* ``"0"``, ``"/dev/video0"``, ``/dev/v4l/by-id/...`` -> a camera (reopened with
  back-off when it vanishes) — :mod:`.opencv`
* ``rtsp://``, ``rtsps://``, ``http(s)://``, ``udp://`` ... -> a network stream (same)
* an existing directory -> the images in it, in name order — :mod:`.folder`
* anything else -> a video file
"""

from __future__ import annotations

from pathlib import Path

from edge_agent.config import SourceConfig
from edge_agent.errors import SourceError
from edge_agent.sources.base import Frame, FrameSource, redact
from edge_agent.sources.folder import FolderSource
from edge_agent.sources.opencv import STREAM_RE, VideoSource
from edge_agent.sources.pipe import MjpegSplitter, PipeSource

__all__ = [
    "FolderSource",
    "Frame",
    "FrameSource",
    "MjpegSplitter",
    "PipeSource",
    "VideoSource",
    "open_source",
    "redact",
]


def open_source(cfg: SourceConfig) -> FrameSource:
    """Build (not start) the source for a config entry; raises SourceError
    for a file that does not exist."""
    if cfg.command is not None:
        return PipeSource(cfg)
    assert cfg.uri is not None  # the config holds exactly one of uri and command
    uri = cfg.uri.strip()
    if uri.isdigit():
        return VideoSource(cfg, int(uri), live=True)
    if uri.startswith("/dev/"):
        return VideoSource(cfg, uri, live=True)
    if STREAM_RE.match(uri):
        return VideoSource(cfg, uri, live=True)
    path = Path(uri.removeprefix("file://")).expanduser()
    if path.is_dir():
        return FolderSource(cfg, path)
    if not path.is_file():
        raise SourceError(f"source {cfg.name}: {redact(uri)} is not a camera, a stream URL, a file or a folder")
    return VideoSource(cfg, str(path), live=False)
