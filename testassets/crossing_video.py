"""The ``crossing_video`` asset: ``videos/crossing.avi`` under the cache dir
(MJPG, 640x480, 30 fps, ~4 s) and ``videos/crossing.json`` (what is where).

A video for the tracker and zone tests, made from the real photos: a
background (sklearn's ``china``, where BlazeFace finds no face) with two
crops of skimage's ``astronaut`` head blended in with a soft elliptical
edge. One stands still at the bottom left for the whole video; the other
walks along the top, left to right across the middle band of the frame
(the zone the tests draw) and back again: two crossings. The JSON gives
the zone, the standing and the moving crops' boxes per frame, and the
frames where the moving crop's centre crosses into the zone.

Builds the ``photos`` asset first.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from testassets.common import AssetError, atomic_path, atomic_write_text, log, read_bgr
from testassets.photos import build_photos

CROSSING_FPS = 30
CROSSING_SIZE = (640, 480)  # width, height
#: The astronaut's head in skimage's 512x512 picture (x0, y0, x1, y1), with some margin.
HEAD_BOX = (130, 20, 330, 240)
CROP_SIZE = (180, 198)  # the head crop as pasted (w, h)
#: The zone the moving crop crosses: the middle band of the frame, full height.
ZONE = [[260, 0], [400, 0], [400, 480], [260, 480]]
STANDING_CENTRE = (100, 370)
MOVING_Y = 120  # the moving crop's centre row
MOVING_X = (170, 500)  # its centre goes from here to there and back
STEP_PX = 6  # per frame
HOLD_FRAMES = 15  # still at the start, at the turn and at the end


def _path() -> list[float]:
    lo, hi = MOVING_X
    there = list(np.arange(lo, hi, STEP_PX, dtype=float))
    back = list(np.arange(hi, lo, -STEP_PX, dtype=float))
    return [lo] * HOLD_FRAMES + there + [hi] * HOLD_FRAMES + back + [lo] * HOLD_FRAMES


def _index() -> dict[str, object]:
    w, h = CROP_SIZE
    xs = _path()

    def box(cx: float, cy: float) -> list[float]:
        return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]

    inside = [ZONE[0][0] <= cx < ZONE[1][0] for cx in xs]
    entries = [i for i in range(1, len(xs)) if inside[i] and not inside[i - 1]]
    return {
        "fps": CROSSING_FPS, "size": list(CROSSING_SIZE), "frames": len(xs), "zone": ZONE,
        "standing": box(*STANDING_CENTRE), "moving": [box(cx, MOVING_Y) for cx in xs],
        "entries": entries, "crossings": len(entries),
    }


def _paste(canvas: np.ndarray, crop: np.ndarray, mask: np.ndarray, cx: float, cy: float) -> None:
    h, w = crop.shape[:2]
    x0, y0 = int(round(cx - w / 2)), int(round(cy - h / 2))
    region = canvas[y0:y0 + h, x0:x0 + w].astype(np.float32)
    canvas[y0:y0 + h, x0:x0 + w] = (region * (1 - mask) + crop.astype(np.float32) * mask).astype(np.uint8)


def _valid(video: Path, index: Path, expected: dict[str, object]) -> bool:
    try:
        if json.loads(index.read_text(encoding="utf-8")) != expected:
            return False
    except (OSError, ValueError):
        return False
    cap = cv2.VideoCapture(str(video))
    try:
        return (cap.isOpened() and int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == expected["frames"]
                and int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) == CROSSING_SIZE[0])
    finally:
        cap.release()


def build_crossing_video(cache_dir: Path, force: bool = False) -> Path:
    """``videos/crossing.avi`` and ``videos/crossing.json`` (see the module docstring)."""
    photos = build_photos(cache_dir)
    video, index = cache_dir / "videos" / "crossing.avi", cache_dir / "videos" / "crossing.json"
    expected = json.loads(json.dumps(_index()))  # as it reads back
    if not force and _valid(video, index, expected):
        return video
    for name in ("china", "astronaut"):
        if not (photos / f"{name}.jpg").is_file():
            raise AssetError(f"the crossing video needs the photo {name!r} (scikit-learn, scikit-image)")
    background = cv2.resize(read_bgr(photos / "china.jpg"), CROSSING_SIZE, interpolation=cv2.INTER_AREA)
    x0, y0, x1, y1 = HEAD_BOX
    head = cv2.resize(read_bgr(photos / "astronaut.jpg")[y0:y1, x0:x1], CROP_SIZE, interpolation=cv2.INTER_AREA)
    w, h = CROP_SIZE
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.sqrt(((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2)
    mask = np.clip((1.0 - r) / 0.15, 0.0, 1.0)[..., None]  # an ellipse, its last 15 % feathered
    standing = cv2.flip(head, 1)  # the same head mirrored: another person, as far as a detector knows
    with atomic_path(video) as tmp:
        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"MJPG"), CROSSING_FPS, CROSSING_SIZE)
        if not writer.isOpened():
            raise AssetError("cv2.VideoWriter cannot open an MJPG .avi writer")
        try:
            for cx in _path():
                frame = background.copy()
                _paste(frame, standing, mask, *STANDING_CENTRE)
                _paste(frame, head, mask, cx, MOVING_Y)
                writer.write(frame)
        finally:
            writer.release()
        cap = cv2.VideoCapture(str(tmp))
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        cap.release()
        if count != expected["frames"]:
            raise AssetError(f"the crossing video has {count} frames, expected {expected['frames']}")
    atomic_write_text(index, json.dumps(expected, indent=2) + "\n")
    log(f"wrote {video} ({expected['frames']} frames, {expected['crossings']} crossings of the zone)")
    return video
