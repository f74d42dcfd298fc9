"""A model's ``serving_default`` signature: its input and output tensors as
a client sees them (TF Serving's SignatureDef, reduced to what an ONNX or
TFLite model has).

Dtypes are numpy names (``float32``, ``float16``, ``float64``, ``int8``,
``uint8``, ``int16``, ``int32``, ``int64``, ``bool``, ``string``); a
dimension of ``-1`` is dynamic. A tensor the model quantizes (int8/uint8
with a scale and zero point) is ``float32`` here: the runtime quantizes
what a client sends and dequantizes what it answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from edge_agent.bundles.manifest import Manifest, TensorSpec

SIGNATURE_NAME = "serving_default"
PREDICT_METHOD = "tensorflow/serving/predict"

DTYPES = ("float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool", "string")
#: each signature dtype's TensorFlow DataType name: what metadata says over REST (as text) and gRPC (as the enum)
TF_DTYPES = {
    "float32": "DT_FLOAT", "float16": "DT_HALF", "float64": "DT_DOUBLE", "int8": "DT_INT8", "uint8": "DT_UINT8",
    "int16": "DT_INT16", "int32": "DT_INT32", "int64": "DT_INT64", "bool": "DT_BOOL", "string": "DT_STRING",
}


@dataclass(frozen=True)
class TensorInfo:
    """One input or output: its name, numpy dtype name and shape (-1: dynamic)."""

    name: str
    dtype: str
    shape: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"tensor {self.name!r}: dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")

    @classmethod
    def of(cls, spec: "TensorSpec") -> "TensorInfo":
        dtype = "float32" if spec.quantization is not None else spec.dtype
        return cls(name=spec.name, dtype=dtype, shape=[-1 if d is None else int(d) for d in spec.shape])

    def accepts(self, shape: Sequence[int]) -> bool:
        """Whether a tensor of ``shape`` fits: the same rank, and the same
        size on every static dimension."""
        return len(shape) == len(self.shape) and all(w < 0 or w == s for w, s in zip(self.shape, shape))


@dataclass(frozen=True)
class Signature:
    """The ``serving_default`` signature: inputs and outputs by name, in the model's order."""

    inputs: dict[str, TensorInfo]
    outputs: dict[str, TensorInfo]
    method_name: str = PREDICT_METHOD


def signature_of(model: Any) -> Signature:
    """The signature of a loaded model (anything with a ``manifest``) or of a
    :class:`~edge_agent.bundles.manifest.Manifest`: the model's own tensors,
    dynamic dimensions kept as such (the manifest's, not the concrete shape
    a camera frame is run at)."""
    manifest: "Manifest" = getattr(model, "manifest", model)
    return Signature(
        inputs={t.name: TensorInfo.of(t) for t in manifest.inputs},
        outputs={t.name: TensorInfo.of(t) for t in manifest.outputs},
    )
