"""The ``photos`` asset: real photographs from scikit-image, scikit-learn and
Debian's ``darknet`` package, re-encoded as BGR JPEGs in ``photos/<name>.jpg``
under the cache dir, with ``photos/manifest.json`` (each name's source file
and size).

Which photos there are depends on what is installed on this machine; a
missing optional one is skipped with a warning.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2

from testassets.common import (AssetError, atomic_write_bytes, atomic_write_text, log,
                               package_dir, read_bgr, skimage_data_dir)

#: System data dir of the Debian ``darknet`` package (the only hard-coded
#: absolute path: it is where Debian installs the photos).
DARKNET_DATA_DIR = Path("/usr/share/darknet/data")

#: Real photographs shipped inside ``skimage/data`` (synthetic images such as
#: chessboard, color, logo, horse silhouette and phantom are left out).  Only
#: files actually present are used; the others are downloaded on demand by
#: skimage and fail offline.
SKIMAGE_PHOTOS = (
    "astronaut", "brick", "camera", "cell", "chelsea", "clock_motion",
    "coffee", "coins", "grass", "gravel", "hubble_deep_field", "ihc", "moon",
    "motorcycle_left", "motorcycle_right", "page", "retina", "rocket", "text",
)
SKLEARN_PHOTOS = ("china", "flower")
DARKNET_PHOTOS = ("dog", "eagle", "giraffe", "horses", "kite", "person", "scream")
PHOTO_EXTENSIONS = (".png", ".jpg", ".jpeg")
JPEG_QUALITY = 95


def _sklearn_images_dir() -> Path:
    """``sklearn/datasets/images`` of the installed scikit-learn."""
    return package_dir("sklearn") / "datasets" / "images"


def photo_sources() -> dict[str, Path]:
    """``{name: source file}`` for every real photo available on this machine."""
    sources: dict[str, Path] = {}
    skimage_dir = skimage_data_dir()
    for name in SKIMAGE_PHOTOS:
        for ext in PHOTO_EXTENSIONS:
            if (skimage_dir / f"{name}{ext}").is_file():
                sources[name] = skimage_dir / f"{name}{ext}"
                break
    sklearn_dir = _sklearn_images_dir()
    for name in SKLEARN_PHOTOS:
        if (sklearn_dir / f"{name}.jpg").is_file():
            sources[name] = sklearn_dir / f"{name}.jpg"
    for name in DARKNET_PHOTOS:
        if (DARKNET_DATA_DIR / f"{name}.jpg").is_file():
            sources[name] = DARKNET_DATA_DIR / f"{name}.jpg"
    return dict(sorted(sources.items()))


def _jpeg_complete(path: Path) -> bool:
    """SOI/EOI marker check: the file is a complete JPEG (cheap, no decode)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(2)
            fh.seek(max(size - 2, 0))
            tail = fh.read(2)
    except OSError:
        return False
    return head == b"\xff\xd8" and tail == b"\xff\xd9"


def _photos_valid(folder: Path, expected: set[str]) -> bool:
    manifest = folder / "manifest.json"
    try:
        entries = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (set(entries) == expected
            and all(_jpeg_complete(folder / f"{name}.jpg") for name in expected))


def build_photos(cache_dir: Path, force: bool = False) -> Path:
    """``photos/<name>.jpg``: real photos from skimage, sklearn and darknet, as BGR JPEGs.

    Grey images are expanded to 3 channels; sizes are kept.  ``manifest.json``
    (written last) maps each name to its source file and size.  Returns the
    folder.
    """
    folder = cache_dir / "photos"
    sources = photo_sources()
    if not force and _photos_valid(folder, set(sources)):
        return folder
    for name in SKLEARN_PHOTOS + DARKNET_PHOTOS:
        if name not in sources:
            log(f"warning: photo {name!r} is not installed on this machine; skipped")
    folder.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, dict[str, object]] = {}
    for name, source in sources.items():
        image = read_bgr(source)
        ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise AssetError(f"cannot encode {source} as JPEG")
        atomic_write_bytes(folder / f"{name}.jpg", encoded.tobytes())
        manifest[name] = {"source": str(source), "width": int(image.shape[1]),
                          "height": int(image.shape[0])}
    atomic_write_text(folder / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    log(f"wrote {len(manifest)} photos to {folder}")
    return folder
