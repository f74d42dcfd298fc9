"""``edge-agent quantize`` on a real detector bundle: the registry's COCO
YOLOv5s, packed as ``pack --task detect`` packs it, quantized to int8 and
judged by detection agreement with fp32 (mAP@0.5 against fp32's boxes,
recall and precision), not by top-1 of a flattened output. The int8
bundles the job writes are loaded as the agent loads them and must still
find the hand-measured dog, bicycle and truck of darknet's dog.jpg.

Slow (a real quantization of a 7 GFLOP detector on 2 cores): integration
and slow."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest
from click.testing import CliRunner

import testassets
from edge_agent.bundles import open_bundle
from edge_agent.bundles.pack import pack
from edge_agent.cli import main
from quantize.data import make_views
from test_detectors import check_dog_jpg, dog, load

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CALIBRATION = ["astronaut", "motorcycle_left", "giraffe", "eagle", "china", "camera"]
EVALUATION = ["dog", "horses", "kite", "person"]


def _views(photos: Path, names: list[str], out: Path, count: int) -> Path:
    out.mkdir(parents=True)
    for k, name in enumerate(names):
        image = cv2.imread(str(photos / f"{name}.jpg"))
        for i, view in enumerate(make_views(image, count, seed=k)):
            cv2.imwrite(str(out / f"{name}_{i}.jpg"), view, [cv2.IMWRITE_JPEG_QUALITY, 95])
    return out


@pytest.fixture(scope="module")
def yolo(assets: dict[str, Path]) -> Path:
    try:
        return testassets.build(testassets.default_cache_dir(), only={"yolov5s"})["yolov5s"]
    except testassets.AssetError as exc:
        pytest.skip(f"detector model unavailable: {exc}")


def _quantize(yolo: Path, assets: dict[str, Path], tmp_path: Path, *options: str) -> tuple[object, dict, Path]:
    bundle = pack(yolo / "yolov5s.onnx", name="yolov5s", version=1, out=tmp_path / "fp32",
                  labels=yolo / "labels.txt", task="detect")
    cal = _views(assets["photos"], CALIBRATION, tmp_path / "cal", 6)
    ev = _views(assets["photos"], EVALUATION, tmp_path / "eval", 5)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["quantize", str(bundle), "--calibration", str(cal), "--eval", str(ev),
                                       "--out", str(out), *options])
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else {}
    return result, report, out


def test_int8_yolov5s_agrees_with_fp32_on_boxes_and_still_finds_the_dog(
    yolo: Path, assets: dict[str, Path], tmp_path: Path
) -> None:
    """The report judges a detector by its boxes: mAP@0.5 against fp32's
    boxes (the gate's number), recall and precision at the bundle's
    threshold, and fp32's own noise floor in mAP; a weight-only int8 source
    is expanded to float first. The int8 bundle keeps the decoder and finds
    the hand-measured objects of dog.jpg."""
    target = "onnx"
    result, report, out = _quantize(yolo, assets, tmp_path, "--target", target, "--min-agreement", "0.8")
    assert result.exit_code == 0, result.output
    assert report["gate"]["metric"] == "map50" and report["gate"]["passed"]
    assert report["model"]["weights_expanded_from_int8"] > 50
    arts = {a["label"]: a for a in report["artifacts"]}
    fp32, int8 = arts["fp32"], arts[f"int8 {target}"]
    assert fp32["detection_map50"] == 1.0 and fp32["fp32_boxes"] > 20
    assert fp32["agreement_top1"] is None and int8["agreement_top1"] is None
    assert 0.8 <= int8["detection_map50"] <= 1.0
    assert 0.7 <= int8["detection_recall50"] <= 1.0 and 0.7 <= int8["detection_precision50"] <= 1.0
    assert int8["size_bytes"] < fp32["size_bytes"] / 3  # int8 weights against the expanded float32 ones
    floor = report["evaluation"]["fp32_noise_floor"]
    assert floor["metric"] == "map50" and 0.8 < floor["agreement"] <= 1.0
    assert "mAP50 vs fp32" in result.output and "mAP@0.5 against its own boxes" in result.output
    (written,) = report["bundles"]
    with open_bundle(Path(written)) as opened:
        assert opened.manifest.task == "detect"
        assert opened.manifest.runtime == target
    model = load(Path(written))
    try:
        check_dog_jpg(model.process(dog(assets)).payload["detections"])
    finally:
        model.close()


def test_a_full_int8_tflite_yolo_that_loses_boxes_fails_the_gate_on_detection_agreement(
    yolo: Path, assets: dict[str, Path], tmp_path: Path
) -> None:
    """Without mixed precision, the full-integer TFLite YOLOv5s (int8 in and
    out, every layer int8) loses many of fp32's boxes on these pictures (43 %
    mAP@0.5 on the benchmark's calibration views): the gate reads the
    detection agreement, says so in its words, and writes no bundle. (Mixed
    precision, which brings it to the target, searches for minutes on 2
    cores: measured in benchmarks/detector_quantize.py, not here.)"""
    from quantize.errors import QuantizeError
    from quantize.tflite import find_converter_env

    try:
        find_converter_env()
    except QuantizeError as exc:
        pytest.skip(f"{exc} (scripts/test.sh creates it)")
    result, report, out = _quantize(yolo, assets, tmp_path, "--target", "tflite", "--min-agreement", "0.9",
                                    "--no-mixed-precision")
    assert result.exit_code == 1, result.output
    assert "quality gate failed: detection agreement with fp32 (mAP@0.5 against fp32's boxes) below 90.0% for int8 tflite" \
        in result.output
    assert report["gate"] == {"min_agreement": 0.9, "metric": "map50", "passed": False, "failing": ["int8 tflite"]}
    int8 = {a["label"]: a for a in report["artifacts"]}["int8 tflite"]
    assert int8["detection_map50"] < 0.9 and int8["detection_recall50"] < 1.0
    assert "bundles" not in report and not list(out.glob("*-int8-*"))
    ops = report["details"]["tflite"]["ops"]
    assert "CONV_2D" in ops and not [o for o in ops if o.startswith("Flex")]
