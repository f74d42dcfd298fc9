"""The bundle manifest (``manifest.json``), format version 1.

These typed models are the single definition of the format: ``pack`` writes
them, every loader validates them, and ``docs/bundle.md`` describes them. The
manifest states everything needed to serve the model without guessing: which
runtime, which file, the input/output tensors (with int8 scale/zero-point where
quantized), how a camera frame becomes the input tensor, and how the outputs
become a result.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FORMAT = "edge-agent-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Quantization(_Strict):
    """Affine int8/uint8 quantization: ``real = scale * (q - zero_point)``."""

    scale: float = Field(gt=0)
    zero_point: int


class TensorSpec(_Strict):
    name: str
    shape: list[int | None] = Field(description="None (or -1 in JSON) marks a dynamic dimension.")
    dtype: Literal["float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool", "string"]
    quantization: Quantization | None = None

    @field_validator("shape", mode="before")
    @classmethod
    def _dynamic(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [None if (d is None or (isinstance(d, int) and d < 0)) else d for d in value]
        return value


class Preprocessing(_Strict):
    """How a frame (BGR uint8, as OpenCV delivers it) becomes the input tensor.

    ``size`` is (width, height). ``resize``: ``stretch`` to size; ``crop``
    scales the short side to ``size / crop_fraction`` then centre-crops;
    ``letterbox`` fits inside and pads with ``pad_value``. ``mean``/``std``
    apply to pixels scaled to [0, 1], per channel in ``color`` order.
    """

    size: tuple[int, int]
    resize: Literal["stretch", "crop", "letterbox"] = "stretch"
    crop_fraction: float = Field(1.0, gt=0, le=1)
    pad_value: int = Field(0, ge=0, le=255)
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    layout: Literal["nchw", "nhwc"] = "nchw"
    color: Literal["rgb", "bgr", "gray"] = "rgb"

    @field_validator("size")
    @classmethod
    def _positive(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 1:
            raise ValueError("size must be positive")
        return value

    @field_validator("std")
    @classmethod
    def _nonzero(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(v == 0 for v in value):
            raise ValueError("std must not contain 0")
        return value


class ClassifyParams(_Strict):
    """Classification: softmax where the model emits logits, then top-k."""

    output: str | None = Field(None, description="Output tensor holding the scores (default: the first).")
    softmax: Literal["auto", "always", "never"] = Field(
        "auto", description="auto: apply softmax unless the output already is a distribution."
    )
    top_k: int = Field(5, ge=1)
    threshold: float = Field(0.0, ge=0, le=1)


class DetectParams(_Strict):
    """What every detection decoder shares; one subclass per ``decoder``.

    ``decoder`` picks the family (:data:`DETECT_PARAMS`): ``yolo``
    (:class:`YoloParams`), ``ssd`` (:class:`SsdParams`, raw SSD outputs with
    MediaPipe/TF Object Detection anchors), ``tflite-postprocess``
    (:class:`TflitePostprocessParams`) and ``ssd_anchors``
    (:class:`AnchorGridParams`, the BlazeFace grids of the first bundles).
    Build one from a manifest's object with :func:`detect_params`.
    """

    decoder: str
    threshold: float = Field(0.5, ge=0, le=1)
    iou_threshold: float = Field(0.3, ge=0, le=1)
    max_detections: int = Field(100, ge=1)


class AnchorGridParams(DetectParams):
    """Anchor-based single-shot detection on fixed grids (BlazeFace style),
    the only detector of the first bundles; decoded by the ``ssd`` family.

    Anchors: one grid per stride over the input, ``anchors_per_cell[i]``
    anchors of fixed unit size per cell of grid ``i``, centred on the cell.
    A box regressor row is ``[dx, dy, w, h, ...]`` in input pixels divided by
    ``box_scale``; scores are logits (``sigmoid``) or probabilities.
    """

    decoder: Literal["ssd_anchors"] = "ssd_anchors"
    boxes_output: str | None = None
    scores_output: str | None = None
    strides: list[int] = Field(default_factory=lambda: [8, 16])
    anchors_per_cell: list[int] = Field(default_factory=lambda: [2, 6])
    anchor_offset: float = 0.5
    box_scale: float = Field(128.0, gt=0)
    score_activation: Literal["sigmoid", "none"] = "sigmoid"

    @model_validator(mode="after")
    def _grids(self) -> "AnchorGridParams":
        if len(self.strides) != len(self.anchors_per_cell) or not self.strides:
            raise ValueError("strides and anchors_per_cell must be non-empty and of equal length")
        return self


class SsdParams(DetectParams):
    """Raw SSD outputs (box regressors + class scores per anchor), anchors
    generated as MediaPipe's ``SsdAnchorsCalculator`` does, with its option
    names, and boxes decoded as its ``TensorsToDetectionsCalculator`` does.
    """

    decoder: Literal["ssd"] = "ssd"
    boxes_output: str | None = None
    scores_output: str | None = None
    # SsdAnchorsCalculatorOptions
    num_layers: int = Field(ge=1)
    min_scale: float = Field(gt=0)
    max_scale: float = Field(gt=0)
    input_size_height: int = Field(ge=1)
    input_size_width: int = Field(ge=1)
    anchor_offset_x: float = 0.5
    anchor_offset_y: float = 0.5
    strides: list[int] = Field(min_length=1)
    aspect_ratios: list[float] = Field(default_factory=lambda: [1.0])
    reduce_boxes_in_lowest_layer: bool = False
    interpolated_scale_aspect_ratio: float = 1.0
    fixed_anchor_size: bool = False
    # the box coder
    x_scale: float = Field(1.0, gt=0)
    y_scale: float = Field(1.0, gt=0)
    w_scale: float = Field(1.0, gt=0)
    h_scale: float = Field(1.0, gt=0)
    apply_exponential_on_box_size: bool = False
    box_format: Literal["yxhw", "xywh"] = "yxhw"
    score_activation: Literal["sigmoid", "none"] = "sigmoid"
    ignore_classes: list[int] = Field(default_factory=list)

    @model_validator(mode="after")
    def _layers(self) -> "SsdParams":
        if len(self.strides) != self.num_layers:
            raise ValueError(f"strides has {len(self.strides)} entries; num_layers is {self.num_layers}")
        if any(s < 1 for s in self.strides) or any(a <= 0 for a in self.aspect_ratios):
            raise ValueError("strides and aspect_ratios must be positive")
        return self


class YoloParams(DetectParams):
    """Ultralytics YOLO heads: v5 (``[1, N, 5 + C]``: cx, cy, w, h,
    objectness, C class scores) and v8/v11 (``[1, 4 + C, N]``, no
    objectness). Boxes are in input pixels, or fractions of the input
    (``coordinates``; ``auto`` tells them apart per frame)."""

    decoder: Literal["yolo"] = "yolo"
    output: str | None = None
    objectness: bool = Field(description="v5: a row is cx, cy, w, h, objectness, classes; v8/v11: no objectness.")
    transposed: bool = Field(description="attributes on axis 1 ([1, 4+C, N], v8/v11 exports) rather than last.")
    coordinates: Literal["auto", "pixels", "normalized"] = "auto"
    threshold: float = Field(0.25, ge=0, le=1)
    iou_threshold: float = Field(0.45, ge=0, le=1)


class TflitePostprocessParams(DetectParams):
    """Models ending in TFLite's ``TFLite_Detection_PostProcess``: boxes
    ``[1, N, 4]`` (ymin, xmin, ymax, xmax as fractions of the input), classes
    ``[1, N]``, scores ``[1, N]``, count ``[1]``; NMS is done in the model."""

    decoder: Literal["tflite-postprocess"] = "tflite-postprocess"
    boxes_output: str | None = None
    classes_output: str | None = None
    scores_output: str | None = None
    count_output: str | None = None
    label_offset: int = Field(0, description="added to the class index before the label is looked up")


#: ``postprocessing.decoder`` -> its parameters.
DETECT_PARAMS: dict[str, type[DetectParams]] = {
    "ssd_anchors": AnchorGridParams,
    "ssd": SsdParams,
    "yolo": YoloParams,
    "tflite-postprocess": TflitePostprocessParams,
}


def detect_params(data: Any) -> DetectParams:
    """The detection parameters of a manifest's ``postprocessing`` object:
    the class its ``decoder`` names (absent: ``ssd_anchors``, as the first
    bundles wrote)."""
    if isinstance(data, DetectParams):
        return data
    data = dict(data or {})
    decoder = data.setdefault("decoder", "ssd_anchors")
    cls = DETECT_PARAMS.get(decoder) if isinstance(decoder, str) else None
    if cls is None:
        raise ValueError(f"decoder {decoder!r} is not one of {', '.join(DETECT_PARAMS)}")
    return cls.model_validate(data)


class FileEntry(_Strict):
    path: str
    sha256: str
    size: int = Field(ge=0)

    @field_validator("path")
    @classmethod
    def _relative(cls, value: str) -> str:
        parts = value.split("/")
        if value.startswith("/") or "\\" in value or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"{value!r} is not a plain relative path inside the bundle")
        if value in (MANIFEST_NAME, SIGNATURE_NAME):
            raise ValueError(f"{value!r} is reserved")
        return value

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        if not _SHA_RE.fullmatch(value):
            raise ValueError("sha256 must be 64 lower-case hex digits")
        return value


class Manifest(_Strict):
    format: Literal["edge-agent-bundle"] = FORMAT
    format_version: Literal[1] = FORMAT_VERSION
    name: str
    version: int = Field(ge=1)
    runtime: Literal["onnx", "tflite"]
    model_file: str
    files: list[FileEntry] = Field(min_length=1)
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    preprocessing: Preprocessing | None = Field(
        None, description="How a camera frame becomes the input; required for classify and detect, "
        "absent (null) for tensor."
    )
    task: Literal["classify", "detect", "tensor"]
    postprocessing: ClassifyParams | YoloParams | SsdParams | TflitePostprocessParams | AnchorGridParams | None = Field(
        None, description="How the outputs become a result; absent (null) for tensor, whose answer is the outputs."
    )
    labels: str | None = Field(None, description="Bundle file with one label per line, in class order.")
    samples: str | None = Field(
        None,
        description="Bundle file (.npz) with preprocessed sample inputs (`input`, stacked) and the outputs "
        "the model gave for them (`output_0`, ...); the device checks them before a version may serve.",
    )
    samples_tolerance: float = Field(
        0.05, gt=0, description="Allowed difference from the sample outputs, as a fraction of each output's range."
    )
    created_at: float | None = None
    created_by: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _postprocessing_by_task(cls, data: Any) -> Any:
        """Pick the postprocessing schema from ``task`` (absent means defaults)."""
        if isinstance(data, dict) and not isinstance(data.get("postprocessing"), BaseModel):
            params = data.get("postprocessing") or {}
            if data.get("task") == "detect":
                data = {**data, "postprocessing": detect_params(params)}
            elif data.get("task") == "classify":
                data = {**data, "postprocessing": ClassifyParams.model_validate(params)}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        if not _NAME_RE.fullmatch(self.name):
            raise ValueError(f"name {self.name!r} must be 1-64 letters, digits, '_', '.' or '-'")
        listed = {f.path for f in self.files}
        if len(listed) != len(self.files):
            raise ValueError("a file is listed twice")
        if self.model_file not in listed:
            raise ValueError(f"model_file {self.model_file!r} is not among the listed files")
        if self.labels is not None and self.labels not in listed:
            raise ValueError(f"labels {self.labels!r} is not among the listed files")
        if self.samples is not None and self.samples not in listed:
            raise ValueError(f"samples {self.samples!r} is not among the listed files")
        if self.task == "tensor":
            # Any model: tensors in, tensors out; no camera frame, no result.
            if self.preprocessing is not None or self.postprocessing is not None:
                raise ValueError("task 'tensor' takes no preprocessing or postprocessing (they must be null)")
            if self.samples is not None:
                raise ValueError("task 'tensor' records no samples")
            return self
        if self.preprocessing is None:
            raise ValueError(f"task {self.task!r} needs preprocessing")
        want = DetectParams if self.task == "detect" else ClassifyParams
        if not isinstance(self.postprocessing, want):
            raise ValueError(f"postprocessing does not match task {self.task!r}")
        return self

    def file(self, path: str) -> FileEntry:
        return next(f for f in self.files if f.path == path)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=False) + "\n"


def concrete_input(spec: TensorSpec, pre: Preprocessing) -> TensorSpec:
    """The input spec with dynamic dimensions filled in from the preprocessing
    (batch 1, the configured size), so warm-up runs on a real shape."""
    if len(spec.shape) != 4 or all(d is not None for d in spec.shape):
        return spec
    w, h = pre.size
    channels = 1 if pre.color == "gray" else 3
    filled = [1, channels, h, w] if pre.layout == "nchw" else [1, h, w, channels]
    shape = [d if d is not None else f for d, f in zip(spec.shape, filled)]
    return spec.model_copy(update={"shape": shape})
