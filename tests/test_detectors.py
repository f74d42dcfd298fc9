"""Detectors on real models, packed with ``pack --task detect`` (decoder
``auto``) and run as the agent serves them (:class:`LoadedModel`) on
darknet's dog.jpg: a COCO YOLOv5s (ONNX, ``yolo``), SSD MobileNet v2 COCO
(uint8 TFLite ending in ``TFLite_Detection_PostProcess``) and BlazeFace
(raw SSD, MediaPipe anchors). Boxes are checked against boxes measured by
hand on the photo (IoU >= 0.5). The models come from registry packages
(``testassets``; docs/models.md)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

import testassets
from edge_agent.bundles import open_bundle
from edge_agent.bundles.manifest import SsdParams, TflitePostprocessParams, YoloParams
from edge_agent.bundles.pack import pack
from edge_agent.config import ModelConfig
from edge_agent.models.servable import LoadedModel

#: Hand-measured on darknet's dog.jpg (768 x 576): x0, y0, x1, y1.
DOG_JPG = {
    "dog": [130, 226, 314, 542],
    "bicycle": [128, 136, 568, 422],
    "truck": [466, 80, 692, 170],  # a pickup: COCO models say "car" or "truck"
}
VEHICLE = {"car", "truck"}


def iou(a: list[float], b: list[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def check_dog_jpg(detections: list[dict]) -> None:
    """Each hand-measured object is found once with IoU >= 0.5, and nothing else scores 0.5 or more."""
    found = []
    for name, truth in DOG_JPG.items():
        labels = VEHICLE if name == "truck" else {name}
        hits = [d for d in detections if d["label"] in labels and iou(d["box"], truth) >= 0.5]
        assert len(hits) == 1, (name, detections)
        found += hits
    assert all(d["score"] < 0.5 for d in detections if d not in found), detections


@pytest.fixture(scope="module")
def detectors(assets: dict[str, Path]) -> dict[str, Path]:
    try:
        return testassets.build(testassets.default_cache_dir(), only={"yolov5s", "ssd_mobilenet_v2"})
    except testassets.AssetError as exc:
        pytest.skip(f"detector models unavailable: {exc}")


def load(bundle: Path) -> LoadedModel:
    with open_bundle(bundle) as opened:
        return LoadedModel.load(opened, ModelConfig(name=opened.manifest.name, threads=2))


def dog(assets: dict[str, Path]) -> np.ndarray:
    frame = cv2.imread(str(assets["photos"] / "dog.jpg"))
    assert frame is not None and frame.shape == (576, 768, 3)
    return frame


def test_yolov5s_onnx_finds_dog_bicycle_and_truck(detectors, assets, tmp_path: Path) -> None:
    notes: list[str] = []
    bundle = pack(detectors["yolov5s"] / "yolov5s.onnx", name="yolov5s", version=1, out=tmp_path / "y",
                  labels=detectors["yolov5s"] / "labels.txt", task="detect", notes=notes.append)
    assert notes == ["detector: yolo: a YOLOv5 (objectness) head, 80 classes (Identity [1, 6300, 85])"]
    model = load(bundle)
    try:
        assert isinstance(model.manifest.postprocessing, YoloParams)
        detections = model.process(dog(assets)).payload["detections"]
        check_dog_jpg(detections)
        assert [d["label"] for d in detections] == ["dog", "bicycle", "car"]
        assert detections[0]["score"] > 0.8
    finally:
        model.runtime.close()


def test_yolov5s_letterboxed_frame_gives_boxes_in_source_pixels(detectors, assets, tmp_path: Path) -> None:
    bundle = pack(detectors["yolov5s"] / "yolov5s.onnx", name="yolov5s", version=1, out=tmp_path / "y",
                  labels=detectors["yolov5s"] / "labels.txt", task="detect",
                  preprocessing={"resize": "letterbox", "pad_value": 114})
    model = load(bundle)
    try:
        check_dog_jpg(model.process(dog(assets)).payload["detections"])
        # the photo pasted into a larger canvas: the boxes move with it
        canvas = np.full((900, 1000, 3), 40, np.uint8)
        canvas[200:776, 100:868] = dog(assets)
        moved = model.process(canvas).payload["detections"]
        shifted = [{**d, "box": [d["box"][0] - 100, d["box"][1] - 200, d["box"][2] - 100, d["box"][3] - 200]}
                   for d in moved]
        check_dog_jpg(shifted)
    finally:
        model.runtime.close()


def test_ssd_mobilenet_tflite_postprocess_finds_dog_bicycle_and_truck(detectors, assets, tmp_path: Path) -> None:
    folder = detectors["ssd_mobilenet_v2"]
    notes: list[str] = []
    bundle = pack(folder / "mobilenet_ssd_v2_coco_quant_postprocess.tflite", name="ssd_mobilenet_v2", version=1,
                  out=tmp_path / "s", labels=folder / "labels.txt", task="detect", notes=notes.append)
    assert any("raw pixels" in n for n in notes) and any("TFLite_Detection_PostProcess head" in n for n in notes)
    model = load(bundle)
    try:
        assert isinstance(model.manifest.postprocessing, TflitePostprocessParams)
        detections = model.process(dog(assets)).payload["detections"]
        check_dog_jpg(detections)
        assert [d["label"] for d in detections] == ["dog", "bicycle", "car"]
        assert min(d["score"] for d in detections) > 0.8
    finally:
        model.runtime.close()


def test_blazeface_packed_with_auto_uses_mediapipe_anchors(assets, tmp_path: Path) -> None:
    """A raw SSD: ``auto`` recognises BlazeFace's 896 anchors, and the face
    on the astronaut is found; on dog.jpg there is none."""
    notes: list[str] = []
    bundle = pack(assets["blazeface"], name="blazeface", version=1, out=tmp_path / "f", task="detect",
                  preprocessing={"resize": "letterbox", "mean": (0.5,) * 3, "std": (0.5,) * 3}, notes=notes.append)
    assert "MediaPipe's BlazeFace/palm anchors" in notes[0]
    model = load(bundle)
    try:
        assert isinstance(model.manifest.postprocessing, SsdParams)
        face = cv2.imread(str(assets["photos"] / "astronaut.jpg"))
        (det,) = model.process(face).payload["detections"]
        assert iou(det["box"], [180, 82, 274, 176]) >= 0.5 and det["score"] > 0.8
        assert model.process(dog(assets)).payload["detections"] == []
    finally:
        model.runtime.close()


def test_palm_detection_raw_ssd_packs_with_auto_and_decodes(assets, tmp_path: Path) -> None:
    """MediaPipe's palm detector (2016 anchors at 192 x 192, found by ``auto``).
    The real photos hold no open palm, so there is no hand-measured box: its
    strongest response on camera.jpg (at the cameraman's hands on the
    camera) must come back in the same place when the photo is mirrored
    (a wrong anchor order across a row moves it), and dog.jpg gives none."""
    try:
        model_file = testassets.build(testassets.default_cache_dir(), only={"palm_detection"})["palm_detection"]
    except testassets.AssetError as exc:
        pytest.skip(f"palm detector unavailable: {exc}")
    notes: list[str] = []
    bundle = pack(model_file, name="palm", version=1, out=tmp_path / "p", task="detect",
                  preprocessing={"resize": "letterbox"}, notes=notes.append)
    assert "give 2016 anchors at 192x192" in notes[0]
    model = load(bundle)
    try:
        photo = cv2.imread(str(assets["photos"] / "camera.jpg"))
        (hand,) = model.process(photo).payload["detections"]
        assert hand["score"] > 0.5
        (mirrored,) = model.process(cv2.flip(photo, 1)).payload["detections"]
        x0, y0, x1, y1 = mirrored["box"]
        assert iou([512 - x1, y0, 512 - x0, y1], hand["box"]) > 0.6
        assert model.process(dog(assets)).payload["detections"] == []
    finally:
        model.runtime.close()
