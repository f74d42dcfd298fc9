"""Classification: softmax where the model emits logits, then top-k with labels.

The decoder family of ``task = "classify"`` bundles (:class:`ClassifyParams`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from edge_agent.bundles.manifest import ClassifyParams, TensorSpec
from edge_agent.pipeline.postprocess.base import label_for, output_index
from edge_agent.pipeline.preprocess import Transform


def softmax(x: np.ndarray) -> np.ndarray:
    z = x - np.max(x, axis=-1, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=-1, keepdims=True)


def _is_distribution(x: np.ndarray) -> bool:
    return bool(np.all(x >= -1e-6) and abs(float(np.sum(x)) - 1.0) < 1e-2)


class Classifier:
    """Top-k classes with their scores; ``top_k``/``threshold`` may be
    overridden per source."""

    def __init__(self, params: ClassifyParams, outputs: Sequence[TensorSpec], labels: Sequence[str] | None) -> None:
        self.params = params
        self.labels = labels
        self.index = output_index(outputs, params.output, 0)
        # Whether the output needs a softmax: fixed by the bundle, or ("auto")
        # decided on the model's first output: a model emits logits or
        # probabilities on every frame, not one or the other by frame.
        self._softmax: bool | None = {"always": True, "never": False}.get(params.softmax)

    def __call__(
        self,
        outputs: Sequence[np.ndarray],
        transform: Transform,
        *,
        top_k: int | None = None,
        threshold: float | None = None,
    ) -> dict[str, Any]:
        scores = np.asarray(outputs[self.index], dtype=np.float32).reshape(-1)
        apply = self._softmax
        if apply is None:  # "auto": decided on the first output, once per loaded model
            apply = self._softmax = not _is_distribution(scores)
        if apply:
            scores = softmax(scores)
        k = min(top_k or self.params.top_k, scores.size)
        thr = self.params.threshold if threshold is None else threshold
        idx = np.argpartition(-scores, k - 1)[:k]
        idx = idx[np.argsort(-scores[idx], kind="stable")]
        top = [
            {"label": label_for(self.labels, int(i)), "index": int(i), "score": round(float(scores[i]), 6)}
            for i in idx
            if scores[i] >= thr
        ]
        return {"top": top}
