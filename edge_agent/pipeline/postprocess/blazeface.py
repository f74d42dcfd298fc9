"""Detection with anchor-based single-shot decoding (BlazeFace/SSD style):
score threshold, non-maximum suppression (OpenCV's), boxes mapped back to
the source frame's pixels.

The decoder family of ``task = "detect"`` bundles whose
``postprocessing.decoder`` is ``"ssd_anchors"`` (:class:`DetectParams`).
"""

from __future__ import annotations

from typing import Any, Sequence

import cv2
import numpy as np

from edge_agent.bundles.manifest import DetectParams, TensorSpec
from edge_agent.pipeline.postprocess.base import label_for, output_index
from edge_agent.pipeline.preprocess import Transform


def ssd_anchors(params: DetectParams, width: int, height: int) -> np.ndarray:
    """Anchor centres (cx, cy), normalised to [0, 1], in output order."""
    rows = []
    for stride, per_cell in zip(params.strides, params.anchors_per_cell):
        gw, gh = int(np.ceil(width / stride)), int(np.ceil(height / stride))
        ys, xs = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
        cx = (xs.reshape(-1) + params.anchor_offset) / gw
        cy = (ys.reshape(-1) + params.anchor_offset) / gh
        centres = np.stack([cx, cy], axis=1)
        rows.append(np.repeat(centres, per_cell, axis=0))
    return np.concatenate(rows).astype(np.float32)


def _logit(t: float) -> float:
    """The logit whose sigmoid is ``t`` (-inf at 0; at 1, the smallest logit whose float32 sigmoid is 1)."""
    if t <= 0.0:
        return -np.inf
    if t >= 1.0:
        return 17.0  # float32: 1 / (1 + exp(-17)) rounds to 1.0
    return float(np.log(t / (1.0 - t)))


class Detector:
    """Anchor decoding + NMS; boxes come out in source-frame pixels."""

    def __init__(
        self,
        params: DetectParams,
        outputs: Sequence[TensorSpec],
        labels: Sequence[str] | None,
        input_size: tuple[int, int],
    ) -> None:
        self.params = params
        self.labels = labels
        self.width, self.height = input_size
        self.anchors = ssd_anchors(params, self.width, self.height)
        # Unnamed outputs: the widest last axis holds the box regressors, the
        # narrowest the class scores.
        widths = [s.shape[-1] or 0 for s in outputs]
        self.boxes_index = output_index(outputs, params.boxes_output, int(np.argmax(widths)))
        self.scores_index = output_index(outputs, params.scores_output, int(np.argmin(widths)))
        if self.boxes_index == self.scores_index:
            raise ValueError("a detector needs separate box and score outputs")

    def __call__(
        self,
        outputs: Sequence[np.ndarray],
        transform: Transform,
        *,
        top_k: int | None = None,
        threshold: float | None = None,
    ) -> dict[str, Any]:
        p = self.params
        reg = np.asarray(outputs[self.boxes_index], dtype=np.float32).reshape(len(self.anchors), -1)
        raw = np.asarray(outputs[self.scores_index], dtype=np.float32).reshape(len(self.anchors), -1)
        thr = p.threshold if threshold is None else threshold
        classes = np.argmax(raw, axis=1) if raw.shape[1] > 1 else np.zeros(len(raw), np.int64)
        scores = raw.max(axis=1) if raw.shape[1] > 1 else raw[:, 0]
        sigmoid = p.score_activation == "sigmoid"
        # The sigmoid is monotonic: threshold the logits (sigmoid(x) >= t <=> x >= logit(t)) and
        # take the sigmoid of the few anchors kept only, not of every anchor.
        keep = scores >= _logit(thr) if sigmoid else scores >= thr
        if not np.any(keep):
            return {"detections": []}
        reg, scores, classes, anchors = reg[keep], scores[keep], classes[keep], self.anchors[keep]
        if sigmoid:
            scores = 1.0 / (1.0 + np.exp(-np.clip(scores, -80.0, 80.0)))
        cx = reg[:, 0] / p.box_scale + anchors[:, 0]
        cy = reg[:, 1] / p.box_scale + anchors[:, 1]
        w = reg[:, 2] / p.box_scale
        h = reg[:, 3] / p.box_scale
        boxes = np.stack(
            [(cx - w / 2) * self.width, (cy - h / 2) * self.height, (cx + w / 2) * self.width, (cy + h / 2) * self.height],
            axis=1,
        )
        xywh = np.stack([boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1)
        chosen = cv2.dnn.NMSBoxes(xywh.tolist(), scores.tolist(), float(thr), float(p.iou_threshold))
        chosen = np.asarray(chosen, dtype=np.int64).reshape(-1)[: min(top_k or p.max_detections, p.max_detections)]
        frame_boxes = transform.box_to_frame(boxes[chosen])
        detections = [
            {
                "label": label_for(self.labels, int(classes[i])),
                "score": round(float(scores[i]), 6),
                "box": [round(float(v), 1) for v in box],
            }
            for i, box in zip(chosen, frame_boxes)
        ]
        return {"detections": detections}
