"""A folder of images, played in name order."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_agent.config import SourceConfig
from edge_agent.errors import SourceError
from edge_agent.images import IMAGE_SUFFIXES, is_image, read_image
from edge_agent.sources.base import FrameSource, log


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
            self._files = sorted(p for p in self.folder.iterdir() if is_image(p))
        except OSError as exc:
            raise SourceError(f"cannot list {self.folder}: {exc.strerror}") from None
        if not self._files:
            raise SourceError(f"{self.folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self._pos = 0

    def _grab(self) -> np.ndarray | None:
        while self._pos < len(self._files):
            path = self._files[self._pos]
            self._pos += 1
            image = read_image(path)
            if image is not None:
                return image
            self._error(f"unreadable image {path.name}")
            log.warning("source %s: skipping unreadable image %s", self.name, path)
        return None

    def _pace_interval(self) -> float | None:
        return 1.0 / (self.cfg.source_fps or 5.0)
