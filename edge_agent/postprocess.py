"""Model outputs -> results, per the manifest's task and parameters.

Classification: softmax where the model emits logits, top-k with labels.
Detection: anchor-based single-shot decoding (BlazeFace/SSD), score
threshold, non-maximum suppression (OpenCV's), boxes mapped back to the
source frame's pixels.

Each postprocessor is a callable ``(outputs, transform) -> dict`` whose
result is the task-specific part of a result message (``top`` or
``detections``).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import cv2
import numpy as np

from edge_agent.bundles.manifest import ClassifyParams, DetectParams, Manifest, TensorSpec
from edge_agent.preprocess import Transform

Postprocessor = Callable[[Sequence[np.ndarray], Transform], dict[str, Any]]


def softmax(x: np.ndarray) -> np.ndarray:
    z = x - np.max(x, axis=-1, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=-1, keepdims=True)


def _is_distribution(x: np.ndarray) -> bool:
    return bool(np.all(x >= -1e-6) and abs(float(np.sum(x)) - 1.0) < 1e-2)


def _label(labels: Sequence[str] | None, index: int) -> str:
    if labels is not None and 0 <= index < len(labels) and labels[index]:
        return labels[index]
    return str(index)


def _output_index(outputs: Sequence[TensorSpec], name: str | None, default: int) -> int:
    if name is None:
        return default
    for i, spec in enumerate(outputs):
        if spec.name == name:
            return i
    raise ValueError(f"the manifest names output {name!r}, which the model does not have")


class Classifier:
    """Top-k classes with their scores; ``top_k``/``threshold`` may be
    overridden per source."""

    def __init__(self, params: ClassifyParams, outputs: Sequence[TensorSpec], labels: Sequence[str] | None) -> None:
        self.params = params
        self.labels = labels
        self.index = _output_index(outputs, params.output, 0)

    def __call__(
        self,
        outputs: Sequence[np.ndarray],
        transform: Transform,
        *,
        top_k: int | None = None,
        threshold: float | None = None,
    ) -> dict[str, Any]:
        scores = np.asarray(outputs[self.index], dtype=np.float32).reshape(-1)
        mode = self.params.softmax
        if mode == "always" or (mode == "auto" and not _is_distribution(scores)):
            scores = softmax(scores)
        k = min(top_k or self.params.top_k, scores.size)
        thr = self.params.threshold if threshold is None else threshold
        idx = np.argpartition(-scores, k - 1)[:k]
        idx = idx[np.argsort(-scores[idx], kind="stable")]
        top = [
            {"label": _label(self.labels, int(i)), "index": int(i), "score": round(float(scores[i]), 6)}
            for i in idx
            if scores[i] >= thr
        ]
        return {"top": top}


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
        self.boxes_index = _output_index(outputs, params.boxes_output, int(np.argmax(widths)))
        self.scores_index = _output_index(outputs, params.scores_output, int(np.argmin(widths)))
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
        if p.score_activation == "sigmoid":
            raw = 1.0 / (1.0 + np.exp(-np.clip(raw, -80.0, 80.0)))
        classes = np.argmax(raw, axis=1)
        scores = raw[np.arange(len(raw)), classes]
        thr = p.threshold if threshold is None else threshold
        keep = scores >= thr
        if not np.any(keep):
            return {"detections": []}
        reg, scores, classes, anchors = reg[keep], scores[keep], classes[keep], self.anchors[keep]
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
                "label": _label(self.labels, int(classes[i])),
                "score": round(float(scores[i]), 6),
                "box": [round(float(v), 1) for v in box],
            }
            for i, box in zip(chosen, frame_boxes)
        ]
        return {"detections": detections}


def make_postprocessor(manifest: Manifest, labels: Sequence[str] | None) -> Classifier | Detector:
    params = manifest.postprocessing
    if isinstance(params, DetectParams):
        return Detector(params, manifest.outputs, labels, manifest.preprocessing.size)
    return Classifier(params, manifest.outputs, labels)
