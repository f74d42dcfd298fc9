"""Choosing a detector's decoder at ``pack --task detect``: what the model's
outputs say (YOLO heads, ``TFLite_Detection_PostProcess``, raw SSD
outputs), what the user gave (``--decoder``, ``--anchors``), and the
clear error when the outputs fit no decoder.

Workstation side, like :mod:`edge_agent.bundles.pack`, which calls
:func:`choose_decoder`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pydantic import ValidationError

from edge_agent.bundles.manifest import DetectParams, TensorSpec, detect_params
from edge_agent.errors import BundleError

DECODERS = ("auto", "yolo", "ssd", "tflite-postprocess")

ANCHOR_FIELDS = (
    "num_layers, min_scale, max_scale, input_size_height, input_size_width, anchor_offset_x, anchor_offset_y, "
    "strides, aspect_ratios, reduce_boxes_in_lowest_layer, interpolated_scale_aspect_ratio, fixed_anchor_size, "
    "x_scale, y_scale, w_scale, h_scale, box_format, score_activation, ignore_classes"
)


@dataclass
class Choice:
    """The decoder chosen: its parameters, what was found (for the user),
    and class names read from the model (None: none there)."""

    params: DetectParams
    found: str
    names: list[str] | None = field(default=None)


def _shapes(outputs: Sequence[TensorSpec]) -> str:
    return ", ".join(f"{o.name} {[d if d is not None else -1 for d in o.shape]}" for o in outputs)


def _bad(message: str) -> BundleError:
    return BundleError(message, code="unsupported_model")


def load_anchors(path: Path | str) -> dict[str, Any]:
    """The ``--anchors`` JSON object (MediaPipe ``SsdAnchorsCalculatorOptions``
    field names plus the box coder's)."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"anchors {path}: not found", code="bundle_not_found") from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"anchors {path}: not a JSON file ({exc})", code="bad_usage") from None
    if not isinstance(data, dict):
        raise BundleError(f"anchors {path}: expected a JSON object with the fields {ANCHOR_FIELDS}", code="bad_usage")
    return data


def _raw_ssd(outputs: Sequence[TensorSpec]) -> tuple[TensorSpec, TensorSpec] | None:
    """(boxes, scores) when the outputs are a raw SSD's: two of shape
    ``[1, N, K]`` with the same N; the box output is the one with 4 columns
    (else the wider one: BlazeFace-style models append keypoints)."""
    if len(outputs) != 2 or any(len(o.shape) != 3 or o.shape[1] is None for o in outputs):
        return None
    a, b = outputs
    if a.shape[1] != b.shape[1]:
        return None
    if (b.shape[-1] == 4) != (a.shape[-1] == 4):
        return (b, a) if b.shape[-1] == 4 else (a, b)
    return (a, b) if (a.shape[-1] or 0) >= (b.shape[-1] or 0) else (b, a)


def _ssd(
    outputs: Sequence[TensorSpec], anchors: dict[str, Any] | None, input_size: tuple[int, int], extra: dict[str, Any]
) -> Choice:
    from edge_agent.pipeline.postprocess.ssd import mediapipe_face_params, ssd_anchors

    pair = _raw_ssd(outputs)
    if pair is None:
        raise _bad(
            f"--decoder ssd needs two outputs [1, N, 4 or more] (boxes) and [1, N, classes] (scores); "
            f"the model has {_shapes(outputs)}"
        )
    boxes, scores = pair
    n = boxes.shape[1]
    names = {"boxes_output": boxes.name, "scores_output": scores.name}
    w, h = input_size
    if anchors is None:
        guess = mediapipe_face_params(w, h, **names, **extra)
        if len(ssd_anchors(guess)) == n:
            return Choice(guess, f"raw SSD outputs ({_shapes(outputs)}); MediaPipe's BlazeFace/palm anchors "
                          f"(strides 8,16,16,16) give {n} anchors at {w}x{h}, so those are used "
                          "(give --anchors FILE.json for others)")
        raise _bad(
            f"raw SSD outputs ({_shapes(outputs)}) with {n} anchors: give --anchors FILE.json with the fields "
            f"{ANCHOR_FIELDS} (MediaPipe's SsdAnchorsCalculatorOptions and the box coder's)"
        )
    data = {"input_size_width": w, "input_size_height": h, **anchors, **names, **extra, "decoder": "ssd"}
    try:
        params = detect_params(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'anchors'}: {e['msg']}" for e in exc.errors())
        raise BundleError(f"--anchors: {problems}", code="bad_usage") from None
    count = len(ssd_anchors(params))  # type: ignore[arg-type]
    if count != n:
        raise _bad(f"--anchors give {count} anchors but the model's outputs ({_shapes(outputs)}) have {n}")
    return Choice(params, f"raw SSD outputs ({_shapes(outputs)}), {n} anchors from --anchors")


def choose_decoder(
    model: Path,
    runtime: str,
    outputs: Sequence[TensorSpec],
    input_size: tuple[int, int],
    *,
    decoder: str = "auto",
    anchors: dict[str, Any] | None = None,
    num_labels: int | None = None,
    extra: dict[str, Any] | None = None,
) -> Choice:
    """The decoder for a detector's ``outputs``: ``decoder`` as the user
    named it, or (``auto``) the one the outputs show. ``extra`` are
    parameters given on the command line (``threshold``). Raises
    :class:`BundleError` naming the output shapes when none fits, or naming
    what is missing (``--anchors``)."""
    from edge_agent.pipeline.postprocess.tflite_postprocess import postprocess_outputs
    from edge_agent.pipeline.postprocess.yolo import names_from_metadata, yolo_layout

    extra = dict(extra or {})
    if decoder not in DECODERS:
        raise BundleError(f"--decoder {decoder!r}: choose one of {', '.join(DECODERS)}", code="bad_usage")
    if anchors is not None and decoder not in ("auto", "ssd"):
        raise BundleError(f"--anchors describes raw SSD outputs; it does not apply to --decoder {decoder}",
                          code="bad_usage")
    if decoder in ("auto", "tflite-postprocess"):
        found = postprocess_outputs(outputs)
        if found is not None:
            params = detect_params({"decoder": "tflite-postprocess", **found, **extra})
            return Choice(params, f"a TFLite_Detection_PostProcess head ({_shapes(outputs)})")
        if decoder == "tflite-postprocess":
            raise _bad("--decoder tflite-postprocess needs four outputs: boxes [1, N, 4], classes [1, N], "
                       f"scores [1, N], count [1]; the model has {_shapes(outputs)}")
    if decoder in ("auto", "yolo"):
        names = layout = None
        if len(outputs) == 1:  # a YOLO head: its class names may be in the model's metadata
            if runtime == "onnx":
                from edge_agent.runtimes.onnx import OnnxRuntime

                names = names_from_metadata(OnnxRuntime.metadata(model))
            layout = yolo_layout(outputs[0].shape, num_labels or (len(names) if names else None))
        if layout is not None:
            classes = layout.pop("classes")
            params = detect_params({"decoder": "yolo", "output": outputs[0].name, **layout, **extra})
            kind = "YOLOv5 (objectness)" if layout["objectness"] else "YOLOv8/YOLO11 (no objectness)"
            where = f", class names from the model's metadata ({len(names)})" if names else ""
            return Choice(params, f"a {kind} head, {classes} classes ({_shapes(outputs)}){where}", names)
        if decoder == "yolo":
            raise _bad("--decoder yolo needs one output [1, N, 5 + classes] (YOLOv5) or [1, 4 + classes, N] "
                       f"(YOLOv8/11); the model has {_shapes(outputs)}")
    if decoder == "ssd" or (decoder == "auto" and (anchors is not None or _raw_ssd(outputs) is not None)):
        return _ssd(outputs, anchors, input_size, extra)
    raise _bad(
        f"no detection decoder fits the model's outputs ({_shapes(outputs)}): expected a YOLO head "
        "([1, N, 5 + classes] or [1, 4 + classes, N]), TFLite_Detection_PostProcess outputs "
        "(boxes [1, N, 4], classes [1, N], scores [1, N], count [1]) or raw SSD outputs "
        "([1, N, 4 or more] and [1, N, classes], with --anchors)"
    )
