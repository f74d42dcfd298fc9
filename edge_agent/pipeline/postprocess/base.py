"""What every postprocessor is, and the helpers the decoder families share.

Family modules (:mod:`.classifier`, :mod:`.blazeface`, ...) import this
module, never the package's ``__init__`` (which imports them), so the seam
has one direction.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np

from edge_agent.bundles.manifest import TensorSpec
from edge_agent.pipeline.preprocess import Transform


class Postprocessor(Protocol):
    """Model outputs -> the task-specific part of a result message (``top``
    or ``detections``).

    ``outputs`` are the runtime's float32 arrays in the manifest's output
    order; ``transform`` maps model-input pixels back to the frame's.
    ``top_k``/``threshold`` override the manifest's per call (a source's
    settings). ``labels`` are the bundle's class names, or None.
    Thread-safety: no mutable state after construction; called from any
    number of frame threads at once.
    """

    labels: Sequence[str] | None

    def __call__(
        self,
        outputs: Sequence[np.ndarray],
        transform: Transform,
        *,
        top_k: int | None = None,
        threshold: float | None = None,
    ) -> dict[str, Any]: ...


def label_for(labels: Sequence[str] | None, index: int) -> str:
    """The class name of ``index``, or the index as text when there is none."""
    if labels is not None and 0 <= index < len(labels) and labels[index]:
        return labels[index]
    return str(index)


def output_index(outputs: Sequence[TensorSpec], name: str | None, default: int) -> int:
    """The position of the output the manifest names, or ``default`` when it names none."""
    if name is None:
        return default
    for i, spec in enumerate(outputs):
        if spec.name == name:
            return i
    raise ValueError(f"the manifest names output {name!r}, which the model does not have")


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, limit: int | None = None) -> np.ndarray:
    """Greedy non-maximum suppression: indices of the boxes kept, best score
    first. ``boxes`` are [N, 4] (x0, y0, x1, y1); of two boxes overlapping by
    more than ``iou_threshold`` (intersection over union) the weaker goes.
    Stops after ``limit`` boxes."""
    order = np.argsort(-scores, kind="stable")
    x0, y0, x1, y1 = (boxes[:, i] for i in range(4))
    areas = np.maximum(x1 - x0, 0) * np.maximum(y1 - y0, 0)
    keep: list[int] = []
    while order.size and (limit is None or len(keep) < limit):
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        w = np.maximum(np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]), 0)
        h = np.maximum(np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]), 0)
        inter = w * h
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-12)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def batched_nms(
    boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_threshold: float, limit: int | None = None
) -> np.ndarray:
    """:func:`nms` per class (boxes of different classes never suppress each
    other): each class's boxes are shifted by a distance no box spans."""
    if boxes.size == 0:
        return np.zeros(0, dtype=np.int64)
    span = float(np.max(boxes) - np.min(boxes)) + 1.0
    shifted = boxes + (classes.astype(np.float32) * span)[:, None]
    return nms(shifted, scores, iou_threshold, limit)


def logit(p: float) -> float:
    """The logit whose sigmoid is ``p``: thresholding logits against it
    equals thresholding probabilities against ``p``, without a sigmoid over
    every anchor."""
    p = min(max(p, 1e-7), 1 - 1e-7)
    return float(np.log(p / (1 - p)))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -80.0, 80.0)))


def detections(
    labels: Sequence[str] | None, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray
) -> list[dict[str, Any]]:
    """The ``detections`` list of a result: label, score and frame-pixel box
    ``[x0, y0, x1, y1]`` rounded to 0.1 pixel."""
    return [
        {
            "label": label_for(labels, int(c)),
            "score": round(float(s), 6),
            "box": [round(float(v), 1) for v in box],
        }
        for box, s, c in zip(boxes, scores, classes)
    ]
