"""Zones: named polygons in a source frame's pixels, and which detections
lie in them. Pure geometry on numpy arrays, no state.

A detection is in a zone when its *anchor point* lies inside the polygon:
the bottom centre of the box by default (where a person or a car touches
the ground, as Frigate does), or its centre. A point exactly on an edge
counts as inside for the left and top edges and outside for the right and
bottom ones (the even-odd rule of ray casting), so two zones that share an
edge never both hold one point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

Anchor = Literal["bottom_center", "center"]


@dataclass(frozen=True, eq=False)
class Zone:
    name: str
    polygon: np.ndarray  # (K, 2) float64, K >= 3
    anchor: Anchor = "bottom_center"

    # By value, the polygon included (a dataclass's own __eq__ would compare
    # the arrays with ``==`` and fail): a reload builds equal zones anew.
    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Zone) and (self.name, self.anchor) == (other.name, other.anchor)
                and np.array_equal(self.polygon, other.polygon))

    def __hash__(self) -> int:
        return hash((self.name, self.anchor, self.polygon.tobytes()))

    @classmethod
    def of(cls, name: str, points: Sequence[Sequence[float]], anchor: Anchor = "bottom_center") -> "Zone":
        poly = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        if len(poly) < 3:
            raise ValueError(f"zone {name!r}: a polygon needs at least 3 points, got {len(poly)}")
        return cls(name, poly, anchor)


def anchor_points(boxes: np.ndarray, anchor: Anchor) -> np.ndarray:
    """(N, 4) boxes ``[x0, y0, x1, y1]`` -> (N, 2) points."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x = (boxes[:, 0] + boxes[:, 2]) / 2
    y = boxes[:, 3] if anchor == "bottom_center" else (boxes[:, 1] + boxes[:, 3]) / 2
    return np.stack([x, y], axis=1)


def points_in_polygon(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """(N,) bool: which of the (N, 2) points lie inside the (K, 2) polygon
    (even-odd ray casting; convex or not, the last corner joined to the first)."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    px, py = points[:, 0:1], points[:, 1:2]  # (N, 1) against (1, K) edges
    x0, y0 = polygon[:, 0][None, :], polygon[:, 1][None, :]
    x1, y1 = np.roll(polygon[:, 0], -1)[None, :], np.roll(polygon[:, 1], -1)[None, :]
    crosses = (y0 > py) != (y1 > py)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_at = x0 + (py - y0) * (x1 - x0) / (y1 - y0)
    hits = crosses & (px < x_at)
    return (np.count_nonzero(hits, axis=1) % 2) == 1


def zones_of(boxes: np.ndarray, zones: Sequence[Zone]) -> list[list[str]]:
    """Per box, the names of the zones it is in (in the zones' order)."""
    n = len(np.asarray(boxes).reshape(-1, 4))
    out: list[list[str]] = [[] for _ in range(n)]
    if not n:
        return out
    points = {anchor: anchor_points(boxes, anchor) for anchor in {z.anchor for z in zones}}  # once per kind
    for zone in zones:
        inside = points_in_polygon(points[zone.anchor], zone.polygon)
        for i in np.flatnonzero(inside):
            out[i].append(zone.name)
    return out


def frame_coverage(polygon: np.ndarray, width: int, height: int) -> Literal["inside", "partly", "outside"]:
    """Where a polygon lies against a ``width`` x ``height`` frame: every
    corner in the frame, some of it, or none of it (no point of the frame
    in the polygon and no corner in the frame: no detection can ever be in it)."""
    x, y = polygon[:, 0], polygon[:, 1]
    corner_in = (x >= 0) & (x <= width) & (y >= 0) & (y <= height)
    if corner_in.all():
        return "inside"
    if corner_in.any():
        return "partly"
    # No corner inside: the polygon may still cover the frame (a zone larger
    # than the frame), or cross it with an edge. Probe the frame's corners,
    # centre and a grid; a sliver crossing between probes counts as outside.
    gx, gy = np.meshgrid(np.linspace(0, width, 9), np.linspace(0, height, 9))
    probes = np.stack([gx.ravel(), gy.ravel()], axis=1)
    return "partly" if points_in_polygon(probes, polygon).any() else "outside"
