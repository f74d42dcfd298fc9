"""The ``palm_detection`` asset: MediaPipe's palm detector (lite), a raw SSD
with MediaPipe anchors: ``models/palm_detection_lite.tflite`` under the
cache dir.

Taken out of the PyPI wheel ``mediapipe==0.10.14`` (member
``mediapipe/modules/palm_detection/palm_detection_lite.tflite``,
sha256-checked; the wheel is platform-specific, the member is the same
file). Input float32 [1, 192, 192, 3] in [0, 1], letterboxed; outputs
[1, 2016, 18] (box + 7 keypoints) and [1, 2016, 1] (logits). Apache-2.0
(MediaPipe).
"""

from __future__ import annotations

from pathlib import Path

from testassets.common import atomic_write_bytes, check_sha256, log, pip_download, read_wheel_member

PALM_WHEEL = "mediapipe==0.10.14"
PALM_MEMBER = "mediapipe/modules/palm_detection/palm_detection_lite.tflite"
PALM_SHA256 = "e9a4aaddf90dda56a87235303cf00e4c2d3fb28725f68fd88772997dac905c18"
PALM_SIZE = 1_985_440


def build_palm_detection(cache_dir: Path, force: bool = False) -> Path:
    """``palm_detection_lite.tflite``."""
    out = cache_dir / "models" / "palm_detection_lite.tflite"
    if not force and out.is_file() and out.stat().st_size == PALM_SIZE:
        return out
    blob = read_wheel_member(pip_download(PALM_WHEEL, cache_dir / "downloads"), PALM_MEMBER)
    check_sha256(blob, PALM_SHA256, f"{PALM_MEMBER} in {PALM_WHEEL}")
    atomic_write_bytes(out, blob)
    log(f"palm detection (lite) from {PALM_WHEEL} verified (sha256 {PALM_SHA256[:12]}...)")
    return out
