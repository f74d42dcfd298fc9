"""Model outputs -> results, per the manifest's task and parameters.

One module per decoder family; :func:`make_postprocessor` picks one from
the manifest:

* ``task = "classify"`` -> :mod:`.classifier` (softmax where the model emits
  logits, top-k with labels)
* ``task = "detect"``, by ``postprocessing.decoder``:

  - ``yolo`` -> :mod:`.yolo` (Ultralytics YOLOv5 and YOLOv8/11 heads)
  - ``ssd`` -> :mod:`.ssd` (raw SSD outputs, MediaPipe / TF Object
    Detection anchors), and ``ssd_anchors`` (the first bundles' BlazeFace
    grids) by the same module
  - ``tflite-postprocess`` -> :mod:`.tflite_postprocess` (models ending in
    ``TFLite_Detection_PostProcess``)

A new decoder family is a module here that builds a :class:`Postprocessor`
(see :mod:`.base`, which family modules import instead of this package)
and one entry in :data:`DETECTORS` (its parameters: one class in
:data:`edge_agent.bundles.manifest.DETECT_PARAMS`).
"""

from __future__ import annotations

from typing import Sequence

from edge_agent.bundles.manifest import DetectParams, Manifest
from edge_agent.errors import ModelLoadError
from edge_agent.pipeline.postprocess.base import Postprocessor
from edge_agent.pipeline.postprocess.classifier import Classifier, softmax
from edge_agent.pipeline.postprocess.ssd import SsdDecoder
from edge_agent.pipeline.postprocess.tflite_postprocess import TflitePostprocessDecoder
from edge_agent.pipeline.postprocess.yolo import YoloDecoder

#: The first name of the SSD family's decoder, kept for callers of old.
Detector = SsdDecoder

__all__ = [
    "Classifier",
    "Detector",
    "DETECTORS",
    "Postprocessor",
    "SsdDecoder",
    "TflitePostprocessDecoder",
    "YoloDecoder",
    "make_postprocessor",
    "softmax",
]

# Detection decoders by the manifest's ``postprocessing.decoder``; each is
# built as ``cls(params, outputs, labels, input_size)``.
DETECTORS: dict[str, type[SsdDecoder] | type[YoloDecoder] | type[TflitePostprocessDecoder]] = {
    "ssd_anchors": SsdDecoder,  # the first bundles' BlazeFace grids
    "ssd": SsdDecoder,
    "yolo": YoloDecoder,
    "tflite-postprocess": TflitePostprocessDecoder,
}


def make_postprocessor(manifest: Manifest, labels: Sequence[str] | None) -> Postprocessor:
    """The postprocessor of a bundle: its manifest's task and decoder, its labels."""
    params = manifest.postprocessing
    if isinstance(params, DetectParams):
        try:
            decoder = DETECTORS[params.decoder]
            return decoder(params, manifest.outputs, labels, manifest.preprocessing.size)  # type: ignore[arg-type]
        except ValueError as exc:  # parameters that do not fit the model's outputs
            raise ModelLoadError(f"{manifest.name} v{manifest.version}: decoder {params.decoder!r}: {exc}") from None
    return Classifier(params, manifest.outputs, labels)
