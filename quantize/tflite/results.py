"""What the TFLite converter hands back: the quantizable layers of a model
(:class:`Layer`), how sensitive each is (:class:`Sensitivity`), and the
int8 model written (:class:`TfliteArtifact`, whose :meth:`~TfliteArtifact.to_dict`
goes into ``report.json`` and the manifest).

Frozen value objects; safe to share between threads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Layer:
    """One quantizable layer of the TFLite graph: ``name`` is its output
    tensor's name (what ``float_nodes`` takes), ``op`` its TFLite op, and
    ``index`` its position among the quantizable layers (graph order)."""

    name: str
    op: str
    index: int

    @property
    def label(self) -> str:
        """Short human label, e.g. ``#12 CONV_2D tf.nn.convolution_5``."""
        parts = [p for p in self.name.split(";") if p and not p.startswith("Const")]
        core = parts[-1].split("/")[-2] if parts and "/" in parts[-1] else (parts[-1] if parts else self.name)
        return f"#{self.index} {self.op} {core}"


@dataclass(frozen=True)
class Sensitivity:
    """How much quantizing this layer alone moves the outputs away from fp32
    (mean KL divergence of the softmax over the sensitivity samples)."""

    layer: Layer
    score: float


@dataclass(frozen=True)
class TfliteArtifact:
    """A full-integer TFLite model written by this module.

    ``input_quant``/``output_quant``: (scale, zero_point) of the int8 input
    (the normalised NHWC image) and output; ``float_nodes``: layers kept in
    float (tensor names); for a mixed-precision result ``agreement`` is what
    ``evaluate`` returned for it, ``target_met`` whether it reached the
    target, and ``trials`` every (number of float layers, agreement) tried.
    """

    path: Path
    ops: tuple[str, ...]
    input_quant: tuple[float, int]
    output_quant: tuple[float, int]
    float_nodes: tuple[str, ...] = ()
    float_layers: tuple[str, ...] = ()
    input_shape: tuple[int, ...] = ()
    output_shape: tuple[int, ...] = ()
    input_name: str = ""
    output_name: str = ""
    op_counts: dict[str, int] = field(default_factory=dict)
    agreement: float | None = None
    target_met: bool | None = None
    trials: tuple[tuple[int, float], ...] = ()
    conversion_s: float = 0.0
    full_int8_path: Path | None = None
    """For a mixed-precision result with layers in float: the fully int8
    candidate beside it (what mixed precision started from), for comparing
    their latency."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (for report.json and the manifest)."""
        return {
            "path": str(self.path),
            "ops": list(self.ops),
            "op_counts": dict(self.op_counts),
            "input": {"name": self.input_name, "shape": list(self.input_shape), "dtype": "int8", "scale": self.input_quant[0], "zero_point": self.input_quant[1]},
            "output": {"name": self.output_name, "shape": list(self.output_shape), "dtype": "int8", "scale": self.output_quant[0], "zero_point": self.output_quant[1]},
            "float_nodes": list(self.float_nodes),
            "float_layers": list(self.float_layers),
            "agreement": self.agreement,
            "target_met": self.target_met,
            "trials": [{"float_nodes": k, "agreement": a} for k, a in self.trials],
            "conversion_s": self.conversion_s,
        }
