"""Model outputs -> results, per the manifest's task and parameters.

One module per decoder family; :func:`make_postprocessor` picks one from
the manifest:

* ``task = "classify"`` -> :mod:`.classifier` (softmax where the model emits
  logits, top-k with labels)
* ``task = "detect"``, ``decoder = "ssd_anchors"`` -> :mod:`.blazeface`
  (anchor-based single-shot decoding, NMS, boxes in frame pixels)

A new decoder family is a module here that builds a :class:`Postprocessor`
(see :mod:`.base`, which family modules import instead of this package)
and one entry in :data:`DETECTORS`.
"""

from __future__ import annotations

from typing import Callable, Sequence

from edge_agent.bundles.manifest import DetectParams, Manifest
from edge_agent.pipeline.postprocess.base import Postprocessor
from edge_agent.pipeline.postprocess.blazeface import Detector
from edge_agent.pipeline.postprocess.classifier import Classifier, softmax

__all__ = ["Classifier", "Detector", "DETECTORS", "Postprocessor", "make_postprocessor", "softmax"]

# Detection decoders by the manifest's ``postprocessing.decoder``.
DETECTORS: dict[str, Callable[[Manifest, Sequence[str] | None], Postprocessor]] = {
    "ssd_anchors": lambda m, labels: Detector(m.postprocessing, m.outputs, labels, m.preprocessing.size),
}


def make_postprocessor(manifest: Manifest, labels: Sequence[str] | None) -> Postprocessor:
    """The postprocessor of a bundle: its manifest's task and decoder, its labels."""
    params = manifest.postprocessing
    if isinstance(params, DetectParams):
        return DETECTORS[params.decoder](manifest, labels)
    return Classifier(params, manifest.outputs, labels)
