"""Ultralytics YOLO heads: YOLOv5 (``[1, N, 5 + C]``: cx, cy, w, h,
objectness, C class scores) and YOLOv8/YOLO11 (``[1, 4 + C, N]``: cx, cy,
w, h, C class scores); score threshold, per-class NMS, boxes mapped back
through the resize (letterbox or stretch) to the source frame's pixels.

The decoder family of ``postprocessing.decoder`` ``"yolo"``
(:class:`YoloParams`). :func:`yolo_layout` tells the layouts apart from an
output shape, for ``pack``.
"""

from __future__ import annotations

import ast
from typing import Any, Sequence

import numpy as np

from edge_agent.bundles.manifest import TensorSpec, YoloParams
from edge_agent.pipeline.postprocess.base import batched_nms, detections, output_index
from edge_agent.pipeline.preprocess import Transform


def yolo_layout(shape: Sequence[int | None], num_labels: int | None = None) -> dict[str, Any] | None:
    """``{"objectness", "transposed", "classes"}`` for a YOLO output shape, or
    None when the shape is no YOLO head.

    The attribute axis is the shorter of the last two (N, the candidate
    boxes, is in the thousands). Ultralytics' v8/v11 exports put it first
    (``[1, 4 + C, N]``), v5 exports last (``[1, N, 5 + C]``). Where the
    number of class names is known and fits only the other variant, it wins.
    """
    dims = list(shape)
    if len(dims) == 3 and dims[0] in (1, None):
        dims = dims[1:]
    if len(dims) != 2 or dims == [None, None]:
        return None
    if None in dims:  # a dynamic export: the candidate count is the dynamic one
        transposed = dims[1] is None
        attrs, boxes = int(dims[0] if transposed else dims[1]), None  # type: ignore[arg-type]
    else:
        a, b = int(dims[0]), int(dims[1])  # type: ignore[arg-type]
        transposed = a < b
        attrs, boxes = (a, b) if transposed else (b, a)
    if attrs < 5 or (boxes is not None and boxes < 2 * attrs):
        return None
    objectness = not transposed
    if num_labels:
        if attrs == 5 + num_labels:
            objectness = True
        elif attrs == 4 + num_labels:
            objectness = False
    return {"objectness": objectness, "transposed": transposed, "classes": attrs - (5 if objectness else 4)}


def names_from_metadata(metadata: dict[str, str]) -> list[str] | None:
    """Class names from an Ultralytics export's ONNX metadata ``names``
    (a Python dict literal ``{0: 'person', ...}``, or a list), in class order."""
    text = metadata.get("names")
    if not text:
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    if isinstance(value, dict) and value and all(isinstance(k, int) for k in value):
        return [str(value.get(i, "")) for i in range(max(value) + 1)]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return None


class YoloDecoder:
    """YOLOv5/v8/v11 decoding + per-class NMS; boxes in source-frame pixels."""

    def __init__(
        self, params: YoloParams, outputs: Sequence[TensorSpec], labels: Sequence[str] | None, input_size: tuple[int, int]
    ) -> None:
        self.params = params
        self.labels = labels
        self.width, self.height = input_size
        self.index = output_index(outputs, params.output, 0)
        self.offset = 5 if params.objectness else 4

    def candidates(self, output: np.ndarray) -> np.ndarray:
        """The output as [N, attributes] (a view where it can be)."""
        x = np.asarray(output, dtype=np.float32)
        x = x.reshape(x.shape[-2:]) if x.ndim > 2 else x
        return x.T if self.params.transposed else x

    def __call__(
        self,
        outputs: Sequence[np.ndarray],
        transform: Transform,
        *,
        top_k: int | None = None,
        threshold: float | None = None,
    ) -> dict[str, Any]:
        p = self.params
        thr = p.threshold if threshold is None else threshold
        rows = self.candidates(outputs[self.index])
        if p.objectness:
            # score = objectness * class score <= objectness: the cheap test first.
            rows = rows[rows[:, 4] >= thr]
            cls_scores = rows[:, 5:] * rows[:, 4:5]
        else:
            cls_scores = rows[:, 4:]
        if rows.shape[0] == 0 or cls_scores.shape[1] == 0:
            return {"detections": []}
        classes = np.argmax(cls_scores, axis=1)
        scores = cls_scores[np.arange(len(classes)), classes]
        keep = np.flatnonzero(scores >= thr)
        if keep.size == 0:
            return {"detections": []}
        box, scores, classes = rows[keep, :4], scores[keep], classes[keep]
        cx, cy, w, h = box[:, 0], box[:, 1], box[:, 2], box[:, 3]
        if p.coordinates == "normalized" or (p.coordinates == "auto" and float(np.max(np.abs(box))) <= 2.0):
            cx, w = cx * self.width, w * self.width
            cy, h = cy * self.height, h * self.height
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        limit = min(top_k or p.max_detections, p.max_detections)
        chosen = batched_nms(boxes, scores, classes, p.iou_threshold, limit)
        frame_boxes = transform.box_to_frame(boxes[chosen])
        return {"detections": detections(self.labels, frame_boxes, scores[chosen], classes[chosen])}
