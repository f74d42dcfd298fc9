"""Every asset by name, in build order, and :func:`build`, which builds (or
reuses from the cache) the ones asked for and logs a timing line for each.

Builders are idempotent: when an asset's output already exists and passes a
cheap validity check nothing is rebuilt, so a warm cache takes a second or
two.  One build at a time per cache dir.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from testassets.blazeface import build_blazeface
from testassets.common import log
from testassets.crossing_video import build_crossing_video
from testassets.demo_video import build_demo_video
from testassets.fashion_mnist import build_fashion_mnist
from testassets.imagenet_labels import build_imagenet_labels
from testassets.mobilenet import build_mobilenet_v2
from testassets.palm_detection import build_palm_detection
from testassets.photos import build_photos
from testassets.ssd_mobilenet import build_ssd_mobilenet
from testassets.yolov5s import build_yolov5s

#: Asset name -> builder(cache_dir, force) -> path.  Order is build order.
BUILDERS: dict[str, Callable[[Path, bool], Path]] = {
    "imagenet_labels": build_imagenet_labels,
    "mobilenet_v2": build_mobilenet_v2,
    "blazeface": build_blazeface,
    "photos": build_photos,
    "demo_video": build_demo_video,
    "crossing_video": build_crossing_video,
    "fashion_mnist": build_fashion_mnist,
    "yolov5s": build_yolov5s,
    "ssd_mobilenet_v2": build_ssd_mobilenet,
    "palm_detection": build_palm_detection,
}


def build(cache_dir: Path, only: set[str] | None = None, force: bool = False) -> dict[str, Path]:
    """Build (or reuse from ``cache_dir``) the selected assets; return ``{name: absolute path}``.

    ``only`` limits the work to those asset names (default: all of
    :data:`BUILDERS`); ``force`` rebuilds them even when cached.  Raises
    :class:`AssetError` when an asset cannot be built, :class:`ValueError`
    for an unknown name.
    """
    cache_dir = Path(cache_dir).expanduser().resolve()
    names = list(BUILDERS) if only is None else [n for n in BUILDERS if n in only]
    unknown = set(only or ()) - set(BUILDERS)
    if unknown:
        raise ValueError(f"unknown asset(s) {sorted(unknown)}; known: {list(BUILDERS)}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Path] = {}
    for name in names:
        start = time.perf_counter()
        results[name] = BUILDERS[name](cache_dir, force).resolve()
        log(f"{name}: {results[name]} ({time.perf_counter() - start:.2f} s)")
    return results

