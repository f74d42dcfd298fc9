"""The ``demo_video`` asset: ``videos/demo.avi`` under the cache dir (MJPG,
640x480, 30 fps, ~10 s of a slow Ken Burns zoom/pan over the photos, chelsea
first) and ``videos/demo.json`` (which photo is on which frames).

Builds the ``photos`` asset first.  :func:`ken_burns_frames` and
:func:`demo_sequence` are public for ``benchmarks/decode.py``, which films
the same shots at a camera's rate.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from testassets.common import AssetError, atomic_path, atomic_write_text, log, read_bgr
from testassets.photos import build_photos

#: Photos shown in the demo video, in order (chelsea must stay first).
DEMO_SEQUENCE = ("chelsea", "coffee", "dog", "eagle", "astronaut", "rocket",
                 "motorcycle_left", "horses", "china", "giraffe")
DEMO_FPS = 30
DEMO_SIZE = (640, 480)  # width, height
DEMO_FRAMES_PER_PHOTO = 30  # 1 s each
DEMO_MAX_ZOOM = 1.10  # Ken Burns: 10 % zoom over one photo


def ken_burns_frames(image: np.ndarray, count: int, size: tuple[int, int],
                     variant: int) -> Iterator[np.ndarray]:
    """``count`` frames of ``size`` (w, h) slowly zooming/panning over ``image``.

    The largest window of the output aspect ratio is cropped from the photo
    (no letterbox bars), then shrunk by up to ``DEMO_MAX_ZOOM`` while its
    centre drifts; even variants zoom in, odd ones zoom out, and the pan
    direction alternates so consecutive shots differ.
    """
    out_w, out_h = size
    h, w = image.shape[:2]
    base_w = min(w, h * out_w / out_h)
    # Pre-shrink big photos so the warp never decimates by more than ~1x.
    shrink = out_w * DEMO_MAX_ZOOM / base_w
    if shrink < 1.0:
        image = cv2.resize(image, (round(w * shrink), round(h * shrink)),
                           interpolation=cv2.INTER_AREA)
        h, w = image.shape[:2]
        base_w = min(w, h * out_w / out_h)
    base_h = base_w * out_h / out_w
    zoom_in = variant % 2 == 0
    direction = (1.0, 0.5) if variant % 4 < 2 else (-1.0, -0.5)
    for i in range(count):
        t = i / max(count - 1, 1)
        t = 0.5 - 0.5 * math.cos(math.pi * t)  # ease in/out
        zoom = 1.0 + (DEMO_MAX_ZOOM - 1.0) * (t if zoom_in else 1.0 - t)
        crop_w, crop_h = base_w / zoom, base_h / zoom
        # centre drifts across the room the zoom leaves, from one side to the other
        slack_x, slack_y = (w - crop_w) / 2, (h - crop_h) / 2
        drift = 2 * t - 1  # -1 .. 1
        cx = w / 2 + direction[0] * drift * slack_x * 0.8
        cy = h / 2 + direction[1] * drift * slack_y * 0.8
        scale = out_w / crop_w
        x0, y0 = cx - crop_w / 2, cy - crop_h / 2
        matrix = np.array([[scale, 0.0, -scale * x0], [0.0, scale, -scale * y0]])
        yield cv2.warpAffine(image, matrix, (out_w, out_h), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REFLECT)


def demo_sequence(photos: Path) -> list[str]:
    """The names of :data:`DEMO_SEQUENCE` that ``photos`` holds, in that order."""
    return [name for name in DEMO_SEQUENCE if (photos / f"{name}.jpg").is_file()]


def _demo_segments(sequence: list[str]) -> list[dict[str, object]]:
    return [{"photo": name, "first_frame": i * DEMO_FRAMES_PER_PHOTO,
             "last_frame": (i + 1) * DEMO_FRAMES_PER_PHOTO - 1}
            for i, name in enumerate(sequence)]


def _demo_valid(video: Path, index: Path, segments: list[dict[str, object]]) -> bool:
    """demo.json matches the expected segments and the AVI header has the frame count."""
    try:
        if json.loads(index.read_text(encoding="utf-8")) != segments:
            return False
    except (OSError, ValueError):
        return False
    if not video.is_file():
        return False
    cap = cv2.VideoCapture(str(video))
    try:
        return (cap.isOpened()
                and int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == len(segments) * DEMO_FRAMES_PER_PHOTO
                and int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) == DEMO_SIZE[0]
                and int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)) == DEMO_SIZE[1])
    finally:
        cap.release()


def build_demo_video(cache_dir: Path, force: bool = False) -> Path:
    """``videos/demo.avi``: ~10 s MJPG, 640x480 @ 30 fps, one photo per second.

    Photos follow :data:`DEMO_SEQUENCE` (chelsea first), each cropped to 4:3
    with a slow Ken Burns zoom/pan so it looks like a camera feed.
    ``videos/demo.json`` lists ``{"photo", "first_frame", "last_frame"}`` per
    photo.  Verified by decoding every frame back with ``cv2.VideoCapture``.
    Builds the ``photos`` asset first if needed.
    """
    photos = build_photos(cache_dir)
    video = cache_dir / "videos" / "demo.avi"
    index = cache_dir / "videos" / "demo.json"
    sequence = demo_sequence(photos)
    if not sequence or sequence[0] != "chelsea":
        raise AssetError(f"the demo video needs chelsea first; available: {sequence}")
    segments = _demo_segments(sequence)
    if not force and _demo_valid(video, index, segments):
        return video

    total = len(segments) * DEMO_FRAMES_PER_PHOTO
    first_frame: np.ndarray | None = None
    with atomic_path(video) as tmp:
        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"MJPG"), DEMO_FPS, DEMO_SIZE)
        if not writer.isOpened():
            raise AssetError("cv2.VideoWriter cannot open an MJPG .avi writer")
        try:
            for variant, name in enumerate(sequence):
                image = read_bgr(photos / f"{name}.jpg")
                for frame in ken_burns_frames(image, DEMO_FRAMES_PER_PHOTO, DEMO_SIZE, variant):
                    if first_frame is None:
                        first_frame = frame
                    writer.write(frame)
        finally:
            writer.release()
        # Read everything back: frame count, size, and the first frame's content.
        cap = cv2.VideoCapture(str(tmp))
        decoded, first_decoded = 0, None
        try:
            while True:
                ok, frame = cap.read()
                if not ok:
                    break
                if frame.shape[:2] != (DEMO_SIZE[1], DEMO_SIZE[0]):
                    raise AssetError(f"decoded frame has shape {frame.shape}")
                if first_decoded is None:
                    first_decoded = frame
                decoded += 1
        finally:
            cap.release()
        if decoded != total:
            raise AssetError(f"demo video decodes to {decoded} frames, expected {total}")
        error = float(np.abs(first_decoded.astype(np.float32) - first_frame).mean())
        if error > 8.0:
            raise AssetError("decoded first frame differs from what was written "
                             f"(mean |diff| {error:.1f})")
    atomic_write_text(index, json.dumps(segments, indent=2) + "\n")
    log(f"wrote {video} ({total} frames, {total / DEMO_FPS:.1f} s, {len(sequence)} photos)")
    return video
