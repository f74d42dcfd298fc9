"""A multi-object tracker for one source (SORT/ByteTrack family), and the
debounce of its events.

Each frame's detections (boxes in source-frame pixels, a label, a score,
the zones they are in) are matched to the live tracks of the same label by
IoU between the track's *predicted* box (a constant-velocity Kalman filter
over centre, width and height, as in SORT and ByteTrack) and the detection,
greedily from the highest IoU down (on a camera's few objects per frame the
greedy match is what the Hungarian one finds, without scipy or lap on the
device). A detection left over starts a new track; a track left over is
missed for this frame.

Events, debounced over processed frames (``min_frames``, ``lost_frames``):

* ``object_appeared``: a track seen on ``min_frames`` frames is confirmed;
  tracks that never get there (a flicker of the detector) say nothing.
* ``object_gone``: a confirmed track not seen for ``lost_frames`` frames
  (and ``object_left`` for each zone it was in, just before).
* ``object_entered`` / ``object_left``: a confirmed track seen in (out of) a
  zone on ``min_frames`` frames in a row after it was out of (in) it.
  A track that appears inside a zone enters it when it is confirmed.

Why not a library: norfair, motpy and bytetracker need scipy (and filterpy,
lap), BoxMOT needs torch; none belongs on a 1 GB Pi next to the runtime.
This module is numpy only.

Thread-safety: a :class:`Tracker` belongs to one source's worker thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

# ByteTrack's noise weights, relative to the box's size.
_STD_POSITION = 1.0 / 20
_STD_VELOCITY = 1.0 / 160


class KalmanBox:
    """Constant velocity over (cx, cy, w, h); the state is those four and
    their velocities per frame."""

    _F = np.eye(8)
    _F[:4, 4:] = np.eye(4)
    _H = np.eye(4, 8)
    _I = np.eye(8)

    def __init__(self, box: np.ndarray) -> None:
        z = _to_cxcywh(box)
        self.x = np.concatenate([z, np.zeros(4)])
        s = max(z[2], z[3], 1.0)
        std = np.array([2 * _STD_POSITION * s] * 4 + [10 * _STD_VELOCITY * s] * 4)
        self.P = np.diag(std**2)

    def predict(self) -> None:
        s = max(self.x[2], self.x[3], 1.0)
        q = np.array([_STD_POSITION * s] * 4 + [_STD_VELOCITY * s] * 4) ** 2
        self.x = self._F @ self.x
        self.P = self._F @ self.P @ self._F.T + np.diag(q)
        self.x[2:4] = np.maximum(self.x[2:4], 1.0)

    def update(self, box: np.ndarray) -> None:
        z = _to_cxcywh(box)
        s = max(z[2], z[3], 1.0)
        r = np.diag(np.full(4, (_STD_POSITION * s) ** 2))
        y = z - self._H @ self.x
        S = self._H @ self.P @ self._H.T + r
        K = self.P @ self._H.T @ np.linalg.inv(S)
        self.x = self.x + K @ y
        self.P = (self._I - K @ self._H) @ self.P

    @property
    def box(self) -> np.ndarray:
        cx, cy, w, h = self.x[:4]
        return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def _to_cxcywh(box: np.ndarray) -> np.ndarray:
    x0, y0, x1, y1 = np.asarray(box, dtype=np.float64)
    return np.array([(x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, 1.0), max(y1 - y0, 1.0)])


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4) x (M, 4) boxes ``[x0, y0, x1, y1]`` -> (N, M) IoU."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)[:, None, :]
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)[None, :, :]
    w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = w * h
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def greedy_match(scores: np.ndarray, minimum: float) -> list[tuple[int, int]]:
    """Pairs (row, column), each row and column used once, taken from the
    highest score down while it is at least ``minimum``."""
    pairs: list[tuple[int, int]] = []
    if scores.size == 0:
        return pairs
    order = np.argsort(-scores, axis=None, kind="stable")
    rows_used: set[int] = set()
    cols_used: set[int] = set()
    for flat in order:
        r, c = divmod(int(flat), scores.shape[1])
        if scores[r, c] < minimum:
            break
        if r in rows_used or c in cols_used:
            continue
        pairs.append((r, c))
        rows_used.add(r)
        cols_used.add(c)
    return pairs


@dataclass
class _ZoneState:
    inside: bool = False  # the debounced state, as last announced
    streak: int = 0  # frames in a row seen on the other side


@dataclass
class Track:
    id: int
    label: str
    kf: KalmanBox
    first_seen: float
    last_seen: float
    score: float  # best so far
    frames: int = 1  # frames it was seen on
    misses: int = 0  # frames in a row it was not
    confirmed: bool = False
    zones: dict[str, _ZoneState] = field(default_factory=dict)

    @property
    def inside(self) -> list[str]:
        return [name for name, z in self.zones.items() if z.inside]


@dataclass(frozen=True)
class TrackEvent:
    """``event`` is object_appeared, object_gone, object_entered or object_left;
    ``zone`` for the last two; ``ts`` the frame's time it was decided on."""

    event: str
    track: Track
    ts: float
    zone: str | None = None


class Tracker:
    """The tracks of one source; :meth:`update` once per processed frame."""

    def __init__(self, *, iou: float = 0.3, min_frames: int = 3, lost_frames: int = 5) -> None:
        self.iou = iou
        self.min_frames = min_frames
        self.lost_frames = lost_frames
        self.tracks: list[Track] = []
        self._next_id = 1

    def update(
        self,
        boxes: np.ndarray,
        labels: Sequence[str],
        scores: Sequence[float],
        zones: Sequence[Sequence[str]] | None,
        ts: float,
    ) -> tuple[list[int], list[TrackEvent]]:
        """Match this frame's detections; returns each detection's track id
        (in order) and the events this frame decided, in order."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        n = len(boxes)
        zones = zones if zones is not None else [[] for _ in range(n)]
        events: list[TrackEvent] = []
        for t in self.tracks:
            t.kf.predict()
        ious = iou_matrix(np.array([t.kf.box for t in self.tracks]).reshape(-1, 4), boxes)
        same = np.array([[t.label == lab for lab in labels] for t in self.tracks], dtype=bool).reshape(ious.shape)
        ious = np.where(same, ious, 0.0)
        ids = [0] * n
        matched: set[int] = set()
        for r, c in greedy_match(ious, self.iou):
            t = self.tracks[r]
            t.kf.update(boxes[c])
            t.last_seen, t.frames, t.misses = ts, t.frames + 1, 0
            t.score = max(t.score, float(scores[c]))
            ids[c] = t.id
            matched.add(r)
            self._seen(t, zones[c], ts, events)
        kept: list[Track] = []
        for r, t in enumerate(self.tracks):
            if r in matched:
                kept.append(t)
                continue
            t.misses += 1
            if t.misses < self.lost_frames:
                kept.append(t)
            elif t.confirmed:
                events += [TrackEvent("object_left", t, ts, name) for name in t.inside]
                events.append(TrackEvent("object_gone", t, ts))
        self.tracks = kept
        for c in range(n):
            if ids[c]:
                continue
            t = Track(self._next_id, labels[c], KalmanBox(boxes[c]), ts, ts, float(scores[c]))
            self._next_id += 1
            self.tracks.append(t)
            ids[c] = t.id
            self._seen(t, zones[c], ts, events)
        return ids, events

    def _seen(self, t: Track, zones: Sequence[str], ts: float, events: list[TrackEvent]) -> None:
        if not t.confirmed and t.frames >= self.min_frames:
            t.confirmed = True
            events.append(TrackEvent("object_appeared", t, ts))
        here = set(zones)
        for name in here - t.zones.keys():
            t.zones[name] = _ZoneState()
        for name, z in t.zones.items():
            z.streak = z.streak + 1 if (name in here) != z.inside else 0
            if t.confirmed and z.streak >= self.min_frames:
                z.inside, z.streak = not z.inside, 0
                events.append(TrackEvent("object_entered" if z.inside else "object_left", t, ts, name))

    def flush(self, ts: float) -> list[TrackEvent]:
        """End every track (the source ended or restarts): gone, and left
        for the zones they were in."""
        events: list[TrackEvent] = []
        for t in self.tracks:
            if t.confirmed:
                events += [TrackEvent("object_left", t, ts, name) for name in t.inside]
                events.append(TrackEvent("object_gone", t, ts))
        self.tracks = []
        return events
