"""Still pictures on disk: which files are pictures, and reading one.

The folder frame source and the quantizer's calibration data both read
folders of pictures; this is where they agree on which files those are and
how one is decoded. No camera code here: the quantizer imports it.

Pure functions and a constant; safe from any thread.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

#: File name suffixes (lower case) of the pictures a folder is read for.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def is_image(path: Path) -> bool:
    """Whether ``path`` is named like a picture (by its suffix, any case)."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def read_image(path: Path) -> np.ndarray | None:
    """The picture at ``path`` as BGR ``uint8`` (H, W, 3), as OpenCV decodes
    it; None when it cannot be read or decoded."""
    return cv2.imread(str(path), cv2.IMREAD_COLOR)
