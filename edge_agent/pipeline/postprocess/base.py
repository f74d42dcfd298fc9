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
