"""Models that end in TFLite's ``TFLite_Detection_PostProcess`` operator
(TensorFlow Object Detection API exports, Coral's detectors): the model has
already decoded its anchors and run NMS; its outputs are boxes ``[1, N, 4]``
(ymin, xmin, ymax, xmax as fractions of the input), classes ``[1, N]``,
scores ``[1, N]`` and the count of valid rows ``[1]``. This family applies
the score threshold and maps the boxes back to the source frame's pixels.

The decoder family of ``postprocessing.decoder`` ``"tflite-postprocess"``
(:class:`TflitePostprocessParams`). :func:`postprocess_outputs` finds the
four outputs, for ``pack``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from edge_agent.bundles.manifest import TensorSpec, TflitePostprocessParams
from edge_agent.pipeline.postprocess.base import detections, output_index
from edge_agent.pipeline.preprocess import Transform

_ROLES = ("boxes", "classes", "scores", "count")


def postprocess_outputs(outputs: Sequence[TensorSpec]) -> dict[str, str] | None:
    """``{"boxes_output": name, ...}`` when the outputs are those of
    ``TFLite_Detection_PostProcess``, else None. The operator's outputs are
    ``name``, ``name:1``, ``name:2``, ``name:3`` (boxes, classes, scores,
    count); without those names, by shape: the ``[1, N, 4]`` one, the
    ``[1]`` one, and the two ``[1, N]`` in model order (classes, scores)."""
    if len(outputs) != 4:
        return None
    by_suffix: dict[int, TensorSpec] = {}
    for spec in outputs:
        base, _, suffix = spec.name.rpartition(":")
        index = int(suffix) if base and suffix.isdigit() else 0
        by_suffix[index] = spec
    if sorted(by_suffix) == [0, 1, 2, 3] and "TFLite_Detection_PostProcess" in outputs[0].name:
        ordered = [by_suffix[i] for i in range(4)]
    else:
        boxes = [s for s in outputs if len(s.shape) == 3 and s.shape[-1] == 4]
        count = [s for s in outputs if len(s.shape) <= 1]
        pairs = [s for s in outputs if len(s.shape) == 2]
        if len(boxes) != 1 or len(count) != 1 or len(pairs) != 2:
            return None
        ordered = [boxes[0], pairs[0], pairs[1], count[0]]
    boxes_spec, classes_spec, scores_spec, count_spec = ordered
    n = boxes_spec.shape[1] if len(boxes_spec.shape) == 3 else None
    if len(boxes_spec.shape) != 3 or boxes_spec.shape[-1] != 4:
        return None
    if any(len(s.shape) != 2 or s.shape[1] != n for s in (classes_spec, scores_spec)) or len(count_spec.shape) > 1:
        return None
    return {f"{role}_output": spec.name for role, spec in zip(_ROLES, ordered)}


class TflitePostprocessDecoder:
    """Threshold + mapping of an in-model NMS's detections."""

    def __init__(
        self,
        params: TflitePostprocessParams,
        outputs: Sequence[TensorSpec],
        labels: Sequence[str] | None,
        input_size: tuple[int, int],
    ) -> None:
        self.params = params
        self.labels = labels
        self.width, self.height = input_size
        self.index = {
            role: output_index(outputs, getattr(params, f"{role}_output"), default)
            for role, default in zip(_ROLES, range(4))
        }

    def __call__(
        self,
        outputs: Sequence[np.ndarray],
        transform: Transform,
        *,
        top_k: int | None = None,
        threshold: float | None = None,
    ) -> dict[str, Any]:
        p = self.params
        boxes = np.asarray(outputs[self.index["boxes"]], dtype=np.float32).reshape(-1, 4)
        classes = np.asarray(outputs[self.index["classes"]], dtype=np.float32).reshape(-1)
        scores = np.asarray(outputs[self.index["scores"]], dtype=np.float32).reshape(-1)
        count = int(np.asarray(outputs[self.index["count"]]).reshape(-1)[0])
        n = max(0, min(count, len(boxes), len(scores), len(classes)))
        thr = p.threshold if threshold is None else threshold
        keep = np.flatnonzero(scores[:n] >= thr)
        keep = keep[np.argsort(-scores[keep], kind="stable")][: min(top_k or p.max_detections, p.max_detections)]
        if keep.size == 0:
            return {"detections": []}
        ymin, xmin, ymax, xmax = (boxes[keep, i] for i in range(4))
        pixel = np.stack([xmin * self.width, ymin * self.height, xmax * self.width, ymax * self.height], axis=1)
        labels_at = np.rint(classes[keep]).astype(np.int64) + p.label_offset
        return {"detections": detections(self.labels, transform.box_to_frame(pixel), scores[keep], labels_at)}
