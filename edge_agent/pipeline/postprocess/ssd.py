"""Raw SSD outputs: box regressors and class scores per anchor, with the
anchors of MediaPipe's ``SsdAnchorsCalculator`` (the TensorFlow Object
Detection API's multiple-grid anchor generator) and the box coder of its
``TensorsToDetectionsCalculator``; score threshold, per-class NMS, boxes
mapped back to the source frame's pixels.

The decoder family of ``postprocessing.decoder`` ``"ssd"``
(:class:`SsdParams`) and of the first bundles' ``"ssd_anchors"``
(:class:`AnchorGridParams`, BlazeFace's fixed grids), which is the case
"fixed unit anchors, ``xywh``, every scale ``box_scale``" of the same
decoding.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from edge_agent.bundles.manifest import AnchorGridParams, SsdParams, TensorSpec
from edge_agent.pipeline.postprocess.base import batched_nms, detections, logit, output_index, sigmoid
from edge_agent.pipeline.preprocess import Transform


def _scale(min_scale: float, max_scale: float, index: int, count: int) -> float:
    if count == 1:
        return (min_scale + max_scale) / 2
    return min_scale + (max_scale - min_scale) * index / (count - 1)


def ssd_anchors(p: SsdParams) -> np.ndarray:
    """Anchors [N, 4] as (cx, cy, w, h), fractions of the input, in output
    order, exactly as MediaPipe's ``SsdAnchorsCalculator`` generates them
    (consecutive layers with the same stride share one grid)."""
    rows: list[np.ndarray] = []
    layer = 0
    strides = p.strides
    while layer < p.num_layers:
        ratios: list[float] = []
        scales: list[float] = []
        last = layer
        while last < len(strides) and strides[last] == strides[layer]:
            scale = _scale(p.min_scale, p.max_scale, last, len(strides))
            if last == 0 and p.reduce_boxes_in_lowest_layer:
                ratios += [1.0, 2.0, 0.5]
                scales += [0.1, scale, scale]
            else:
                for ratio in p.aspect_ratios:
                    ratios.append(ratio)
                    scales.append(scale)
                if p.interpolated_scale_aspect_ratio > 0:
                    following = (
                        1.0 if last == len(strides) - 1 else _scale(p.min_scale, p.max_scale, last + 1, len(strides))
                    )
                    scales.append(math.sqrt(scale * following))
                    ratios.append(p.interpolated_scale_aspect_ratio)
            last += 1
        sizes = np.array(
            [(s * math.sqrt(r), s / math.sqrt(r)) for s, r in zip(scales, ratios)], dtype=np.float64
        )  # (w, h)
        if p.fixed_anchor_size:
            sizes[:] = 1.0
        gh = math.ceil(p.input_size_height / strides[layer])
        gw = math.ceil(p.input_size_width / strides[layer])
        ys, xs = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
        cx = (xs.reshape(-1) + p.anchor_offset_x) / gw
        cy = (ys.reshape(-1) + p.anchor_offset_y) / gh
        k = len(sizes)
        grid = np.empty((gh * gw, k, 4), dtype=np.float64)
        grid[:, :, 0] = cx[:, None]
        grid[:, :, 1] = cy[:, None]
        grid[:, :, 2:] = sizes[None, :, :]
        rows.append(grid.reshape(-1, 4))
        layer = last
    return np.concatenate(rows).astype(np.float32)


def grid_anchors(p: AnchorGridParams, width: int, height: int) -> np.ndarray:
    """The first bundles' grids as anchors [N, 4] (cx, cy, 1, 1)."""
    rows = []
    for stride, per_cell in zip(p.strides, p.anchors_per_cell):
        gw, gh = math.ceil(width / stride), math.ceil(height / stride)
        ys, xs = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
        cx = (xs.reshape(-1) + p.anchor_offset) / gw
        cy = (ys.reshape(-1) + p.anchor_offset) / gh
        centres = np.stack([cx, cy, np.ones_like(cx), np.ones_like(cy)], axis=1)
        rows.append(np.repeat(centres, per_cell, axis=0))
    return np.concatenate(rows).astype(np.float32)


class SsdDecoder:
    """Anchor decoding + per-class NMS; boxes come out in source-frame pixels."""

    def __init__(
        self,
        params: SsdParams | AnchorGridParams,
        outputs: Sequence[TensorSpec],
        labels: Sequence[str] | None,
        input_size: tuple[int, int],
    ) -> None:
        self.params = params
        self.labels = labels
        self.width, self.height = input_size
        if isinstance(params, AnchorGridParams):
            self.anchors = grid_anchors(params, self.width, self.height)
            self.scales = (params.box_scale,) * 4
            self.xywh, self.exponential, self.ignore = True, False, ()
        else:
            self.anchors = ssd_anchors(params)
            self.scales = (params.x_scale, params.y_scale, params.w_scale, params.h_scale)
            self.xywh = params.box_format == "xywh"
            self.exponential = params.apply_exponential_on_box_size
            self.ignore = tuple(params.ignore_classes)
        # Unnamed outputs: the widest last axis holds the box regressors, the
        # narrowest the class scores.
        widths = [s.shape[-1] or 0 for s in outputs]
        self.boxes_index = output_index(outputs, params.boxes_output, int(np.argmax(widths)))
        self.scores_index = output_index(outputs, params.scores_output, int(np.argmin(widths)))
        if self.boxes_index == self.scores_index:
            raise ValueError("a detector needs separate box and score outputs")
        for index in (self.boxes_index, self.scores_index):
            rows = _rows(outputs[index].shape)
            if rows is not None and rows != len(self.anchors):
                raise ValueError(
                    f"the anchors give {len(self.anchors)} boxes but output {outputs[index].name!r} "
                    f"{list(outputs[index].shape)} has {rows}"
                )

    def __call__(
        self,
        outputs: Sequence[np.ndarray],
        transform: Transform,
        *,
        top_k: int | None = None,
        threshold: float | None = None,
    ) -> dict[str, Any]:
        p = self.params
        n = len(self.anchors)
        reg = np.asarray(outputs[self.boxes_index], dtype=np.float32).reshape(n, -1)
        raw = np.asarray(outputs[self.scores_index], dtype=np.float32).reshape(n, -1)
        if self.ignore:
            raw = raw.copy()
            raw[:, [c for c in self.ignore if c < raw.shape[1]]] = -np.inf
        classes = np.argmax(raw, axis=1) if raw.shape[1] > 1 else np.zeros(n, dtype=np.int64)
        best = raw[np.arange(n), classes]
        thr = p.threshold if threshold is None else threshold
        sig = p.score_activation == "sigmoid"
        # Threshold first (on logits where the scores are logits): the
        # activation and the box decoding run only on the survivors.
        keep = np.flatnonzero(best >= (logit(thr) if sig else thr))
        if keep.size == 0:
            return {"detections": []}
        reg, classes, anchors = reg[keep], classes[keep], self.anchors[keep]
        scores = sigmoid(best[keep]) if sig else best[keep]
        xs, ys, hs, ws = self.scales[0], self.scales[1], self.scales[3], self.scales[2]
        if self.xywh:
            dx, dy, dw, dh = reg[:, 0], reg[:, 1], reg[:, 2], reg[:, 3]
        else:
            dy, dx, dh, dw = reg[:, 0], reg[:, 1], reg[:, 2], reg[:, 3]
        cx = dx / xs * anchors[:, 2] + anchors[:, 0]
        cy = dy / ys * anchors[:, 3] + anchors[:, 1]
        if self.exponential:
            w = np.exp(dw / ws) * anchors[:, 2]
            h = np.exp(dh / hs) * anchors[:, 3]
        else:
            w = dw / ws * anchors[:, 2]
            h = dh / hs * anchors[:, 3]
        boxes = np.stack(
            [(cx - w / 2) * self.width, (cy - h / 2) * self.height, (cx + w / 2) * self.width, (cy + h / 2) * self.height],
            axis=1,
        )
        limit = min(top_k or p.max_detections, p.max_detections)
        chosen = batched_nms(boxes, scores, classes, p.iou_threshold, limit)
        frame_boxes = transform.box_to_frame(boxes[chosen])
        return {"detections": detections(self.labels, frame_boxes, scores[chosen], classes[chosen])}


def _rows(shape: Sequence[int | None]) -> int | None:
    """Anchor rows of an output shaped [1, N, K] or [N, K] (None when dynamic)."""
    dims = [d for d in shape[:-1] if d != 1]
    if len(dims) == 1:
        return dims[0]
    return None


#: The anchors of MediaPipe's BlazeFace (short range) and palm detectors:
#: at 128 x 128 and 192 x 192 they give 896 and 2016 anchors.
MEDIAPIPE_FACE_ANCHORS: dict[str, Any] = {
    "num_layers": 4,
    "min_scale": 0.1484375,
    "max_scale": 0.75,
    "anchor_offset_x": 0.5,
    "anchor_offset_y": 0.5,
    "strides": [8, 16, 16, 16],
    "aspect_ratios": [1.0],
    "fixed_anchor_size": True,
    "interpolated_scale_aspect_ratio": 1.0,
    "reduce_boxes_in_lowest_layer": False,
    "box_format": "xywh",
    "score_activation": "sigmoid",
}


def mediapipe_face_params(width: int, height: int, **extra: Any) -> SsdParams:
    """:data:`MEDIAPIPE_FACE_ANCHORS` for a ``width`` x ``height`` input,
    box coder scales equal to the input size (regressors in input pixels)."""
    return SsdParams.model_validate(
        {
            **MEDIAPIPE_FACE_ANCHORS,
            "input_size_width": width,
            "input_size_height": height,
            "x_scale": width,
            "y_scale": height,
            "w_scale": width,
            "h_scale": height,
            **extra,
        }
    )
