"""How close a quantized model stays to fp32, per task.

A *judge* turns a model's outputs on a set of pictures into what is
compared, and says how well a candidate agrees with the fp32 reference:

:class:`TopOne` (classifiers)
    the first output per picture, flattened to class scores; agreement is
    top-1 agreement; sensitivity is the KL divergence of the softmax.
:class:`DetectionAgreement` (detectors)
    the bundle's own decoder (:data:`edge_agent.pipeline.postprocess.DETECTORS`)
    turns the outputs into boxes, exactly as on the device. The fp32 boxes
    at the bundle's score threshold are the reference ("ground truth"); the
    candidate's boxes, down to a low score, are ranked against them: the
    agreement is mAP@0.5 (mean over the reference's classes of the average
    precision at IoU >= 0.5). Recall (share of fp32 boxes the candidate
    also reports at the threshold, same label, IoU >= 0.5) and precision
    (share of the candidate's boxes at the threshold that fp32 reports too)
    are reported beside it. Sensitivity (for the mixed-precision ranking)
    is measured on the raw outputs: their mean squared error relative to
    the reference's variance, a noise-to-signal ratio, since a single
    quantized layer rarely moves a box across the IoU line.

Every judge is used the same way by the evaluation, the quality gate and
both mixed-precision searches (ONNX and TFLite).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from edge_agent.bundles.manifest import DetectParams, TensorSpec, detect_params
from edge_agent.pipeline.preprocess import Transform

IOU = 0.5


class Runner(Protocol):
    """What a judge needs of a loaded model (:class:`quantize.evaluate.Runner`)."""

    artifact: Any  # .preprocessing.size: the model's input size
    output_specs: Sequence[TensorSpec]

    def outputs(self, tensors: np.ndarray, progress: Callable[[int], None] | None = None) -> np.ndarray: ...

    def all_outputs(self, tensors: np.ndarray, progress: Callable[[int], None] | None = None) -> list[list[np.ndarray]]: ...


class Judge(Protocol):
    """What a task compares (see the module docstring)."""

    metric: str  # the agreement's name in reports: "top1" or "map50"
    sensitivity_score: str  # the TFLite worker's name for divergence(): "kl" or "nsr"

    def collect(self, runner: Runner, tensors: np.ndarray, progress: Any = None) -> Any:
        """What is compared, for every tensor of ``tensors`` (batch axis first)."""

    def agreement(self, reference: Any, candidate: Any) -> float:
        """How well ``candidate`` agrees with ``reference`` (1.0: fully)."""

    def same(self, reference: Any, candidate: Any) -> np.ndarray:
        """Per picture: does the candidate say the same as the reference?"""

    def subset(self, items: Any, mask: np.ndarray) -> Any:
        """The items of the pictures where ``mask`` is true."""

    def details(self, reference: Any, candidate: Any) -> dict[str, float]:
        """Further figures for the report."""

    def raw(self, runner: Runner, tensors: np.ndarray) -> Any:
        """What the sensitivity ranking compares."""

    def divergence(self, reference: Any, candidate: Any) -> float:
        """How far ``candidate`` moved from ``reference`` (0: not at all)."""


def _log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def kl_divergence(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean KL(softmax(reference) || softmax(candidate)) over the samples."""
    lp, lq = _log_softmax(reference), _log_softmax(candidate)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=1)))


def top1_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    return float(np.mean(candidate.argmax(axis=1) == reference.argmax(axis=1)))


class TopOne:
    """Classifiers: class scores, top-1 agreement (see the module docstring)."""

    metric = "top1"
    sensitivity_score = "kl"

    def collect(self, runner: Runner, tensors: np.ndarray, progress: Any = None) -> np.ndarray:
        return runner.outputs(tensors, progress)

    def agreement(self, reference: np.ndarray, candidate: np.ndarray) -> float:
        return top1_agreement(reference, candidate)

    def same(self, reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
        return candidate.argmax(axis=1) == reference.argmax(axis=1)

    def subset(self, items: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return items[mask]

    def details(self, reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
        ref_top1 = reference.argmax(axis=1)
        k = min(5, candidate.shape[1])
        top5 = np.argpartition(-candidate, k - 1, axis=1)[:, :k]
        return {"fp32_top1_in_top5": float(np.mean([ref_top1[i] in top5[i] for i in range(len(ref_top1))]))}

    def raw(self, runner: Runner, tensors: np.ndarray) -> np.ndarray:
        return runner.outputs(tensors)

    def divergence(self, reference: np.ndarray, candidate: np.ndarray) -> float:
        return kl_divergence(reference, candidate)


@dataclass(frozen=True)
class Boxes:
    """One picture's detections: [K, 4] boxes (x0, y0, x1, y1, model-input
    pixels), [K] scores, [K] class names."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: tuple[str, ...]

    @classmethod
    def from_result(cls, result: dict[str, Any]) -> "Boxes":
        dets = result.get("detections", [])
        return cls(
            np.asarray([d["box"] for d in dets], dtype=np.float64).reshape(-1, 4),
            np.asarray([d["score"] for d in dets], dtype=np.float64),
            tuple(d["label"] for d in dets),
        )

    def above(self, threshold: float) -> "Boxes":
        keep = self.scores >= threshold
        return Boxes(self.boxes[keep], self.scores[keep], tuple(lbl for lbl, k in zip(self.labels, keep) if k))


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of every box of ``a`` [N, 4] with every box of ``b`` [M, 4]."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def _greedy_matches(reference: Boxes, candidate: Boxes, iou: float) -> list[int | None]:
    """For every candidate box, best score first: the reference box of the
    same label it matches (IoU >= ``iou``, the best unmatched one), or
    None. In the candidate's score order."""
    order = np.argsort(-candidate.scores, kind="stable")
    overlap = iou_matrix(candidate.boxes, reference.boxes)
    taken: set[int] = set()
    matches: list[int | None] = [None] * len(candidate.scores)
    for i in order:
        best, best_iou = None, iou
        for j, label in enumerate(reference.labels):
            if j in taken or label != candidate.labels[i] or overlap[i, j] < best_iou:
                continue
            best, best_iou = j, overlap[i, j]
        if best is not None:
            taken.add(best)
            matches[int(i)] = best
    return matches


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision-recall curve with precision made monotone
    (all points, as PASCAL VOC 2010+ and COCO do, without COCO's 101-point
    sampling)."""
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[1.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    steps = np.flatnonzero(r[1:] != r[:-1])
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


def _matched_at(reference: Boxes, candidate: Boxes, threshold: float, iou: float = IOU) -> tuple[int, int, int]:
    """One picture at ``threshold``: (candidate boxes matching a reference
    box, reference boxes, candidate boxes)."""
    ref, kept = reference.above(threshold), candidate.above(threshold)
    matched = sum(m is not None for m in _greedy_matches(ref, kept, iou))
    return matched, len(ref.labels), len(kept.labels)


def detection_agreement(
    reference: Sequence[Boxes], candidate: Sequence[Boxes], threshold: float, iou: float = IOU
) -> dict[str, float]:
    """mAP@``iou`` of ``candidate`` (all its boxes, ranked by score) against
    the boxes of ``reference`` scored at least ``threshold`` as ground
    truth, and recall / precision at ``threshold`` (see the module
    docstring). Pictures pair up by position. With no reference box at all,
    a candidate that reports nothing at the threshold agrees fully."""
    refs = [r.above(threshold) for r in reference]
    classes = sorted({lbl for r in refs for lbl in r.labels})
    aps = []
    for cls in classes:
        truths = sum(lbl == cls for r in refs for lbl in r.labels)
        scored: list[tuple[float, bool]] = []
        for r, c in zip(refs, candidate):
            mine = [i for i, lbl in enumerate(c.labels) if lbl == cls]
            if not mine:
                continue
            sub = Boxes(c.boxes[mine], c.scores[mine], tuple(cls for _ in mine))
            matches = _greedy_matches(r, sub, iou)
            scored.extend((float(s), m is not None) for s, m in zip(sub.scores, matches))
        if not scored:
            aps.append(0.0)
            continue
        scored.sort(key=lambda item: -item[0])
        hits = np.cumsum([hit for _, hit in scored])
        ranks = np.arange(1, len(scored) + 1)
        aps.append(average_precision(hits / truths, hits / ranks))
    found = reported = matched = 0
    for r, c in zip(refs, candidate):
        kept = c.above(threshold)
        matches = _greedy_matches(r, kept, iou)
        matched += sum(m is not None for m in matches)
        found += len(r.labels)
        reported += len(kept.labels)
    return {
        "map50": float(np.mean(aps)) if aps else (1.0 if reported == 0 else 0.0),
        "recall50": matched / found if found else 1.0,
        "precision50": matched / reported if reported else 1.0,
        "fp32_boxes": float(found),
    }


def map_output_names(
    postprocessing: dict[str, Any], reference: Sequence[TensorSpec], outputs: Sequence[TensorSpec]
) -> dict[str, Any]:
    """``postprocessing`` (a manifest's object) for a converted model whose
    outputs (``outputs``) may be named otherwise than the fp32 model's
    (``reference``): every value naming a reference output names the
    converted model's counterpart instead: the output of the same shape
    when only one has it, else the one in the same position (TFLite
    converters rename outputs, ``Identity`` -> ``PartitionedCall:0``)."""
    if [o.name for o in reference] == [o.name for o in outputs] or len(reference) != len(outputs):
        return dict(postprocessing)
    renamed: dict[str, str] = {}
    for i, ref in enumerate(reference):
        same_shape = [o for o in outputs if list(o.shape) == list(ref.shape)]
        renamed[ref.name] = same_shape[0].name if len(same_shape) == 1 else outputs[i].name
    return {k: renamed.get(v, v) if isinstance(v, str) else v for k, v in postprocessing.items()}


class DetectionAgreement:
    """Detectors: decoded boxes, mAP@0.5 against fp32's (see the module docstring).

    ``params``: the bundle's decoder parameters (its ``threshold`` is the
    reference's); the candidate's boxes are decoded down to ``floor`` so
    that the ranking behind the average precision sees them.
    """

    metric = "map50"
    sensitivity_score = "nsr"

    def __init__(self, params: DetectParams, labels: Sequence[str] | None, *, floor: float = 0.05,
                 reference_outputs: Sequence[TensorSpec] = ()) -> None:
        self.params = params
        self.reference_outputs = list(reference_outputs)
        self.labels = list(labels) if labels else None
        self.threshold = params.threshold
        self.floor = min(floor, params.threshold)

    @classmethod
    def from_manifest(cls, postprocessing: dict[str, Any], labels: Sequence[str] | None,
                      reference_outputs: Sequence[TensorSpec] = ()) -> "DetectionAgreement":
        return cls(detect_params(postprocessing), labels, reference_outputs=reference_outputs)

    def _decoder(self, outputs: Sequence[TensorSpec], size: tuple[int, int]) -> Any:
        from edge_agent.pipeline.postprocess import DETECTORS

        params = self.params
        if self.reference_outputs:
            params = detect_params(map_output_names(params.model_dump(), self.reference_outputs, outputs))
        return DETECTORS[params.decoder](params, outputs, self.labels, size)

    def collect(self, runner: Runner, tensors: np.ndarray, progress: Any = None) -> list[Boxes]:
        decoder = self._decoder(runner.output_specs, runner.artifact.preprocessing.size)
        found = []
        for outs in runner.all_outputs(tensors, progress):
            result = decoder(outs, Transform(), threshold=self.floor, top_k=self.params.max_detections)
            found.append(Boxes.from_result(result))
        return found

    def agreement(self, reference: Sequence[Boxes], candidate: Sequence[Boxes]) -> float:
        return detection_agreement(reference, candidate, self.threshold)["map50"]

    def same(self, reference: Sequence[Boxes], candidate: Sequence[Boxes]) -> np.ndarray:
        """Per picture: every fp32 box found again at the threshold and nothing else reported."""
        out = []
        for r, c in zip(reference, candidate):
            matched, found, reported = _matched_at(r, c, self.threshold)
            out.append(matched == found == reported)
        return np.asarray(out, dtype=bool)

    def subset(self, items: Sequence[Boxes], mask: np.ndarray) -> list[Boxes]:
        return [b for b, keep in zip(items, mask) if keep]

    def details(self, reference: Sequence[Boxes], candidate: Sequence[Boxes]) -> dict[str, float]:
        figures = detection_agreement(reference, candidate, self.threshold)
        return {k: v for k, v in figures.items() if k != "map50"}

    def raw(self, runner: Runner, tensors: np.ndarray) -> list[np.ndarray]:
        per_sample = runner.all_outputs(tensors)
        return [np.stack([outs[i] for outs in per_sample]) for i in range(len(per_sample[0]))]

    def divergence(self, reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
        """Mean over the outputs of MSE / variance of the reference."""
        ratios = []
        for r, c in zip(reference, candidate):
            r64, c64 = r.astype(np.float64), c.astype(np.float64).reshape(r.shape)
            ratios.append(float(np.mean((r64 - c64) ** 2) / max(float(np.var(r64)), 1e-12)))
        return float(np.mean(ratios))


def judge_for(task: str, postprocessing: dict[str, Any], labels: Sequence[str] | None,
              reference_outputs: Sequence[TensorSpec] = ()) -> Judge:
    """The judge of a bundle's task; ``reference_outputs``: the fp32
    model's outputs, which the bundle's decoder parameters name."""
    if task == "detect":
        return DetectionAgreement.from_manifest(postprocessing, labels, reference_outputs)
    return TopOne()
