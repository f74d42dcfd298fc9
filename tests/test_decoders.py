"""Detection decoders on synthetic outputs (quick): YOLOv5 and YOLOv8/11
layouts, NMS, letterbox undo, MediaPipe/TF anchors against the first
bundles' BlazeFace grids, TFLite_Detection_PostProcess outputs, and what
``pack --task detect`` finds, asks for, or refuses (naming the shapes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edge_agent.bundles import open_bundle
from edge_agent.bundles.manifest import (
    AnchorGridParams,
    Manifest,
    Preprocessing,
    SsdParams,
    TensorSpec,
    TflitePostprocessParams,
    YoloParams,
    detect_params,
)
from edge_agent.bundles.pack import pack
from edge_agent.cli import main
from edge_agent.errors import BundleError
from edge_agent.pipeline.postprocess import make_postprocessor
from edge_agent.pipeline.postprocess.base import batched_nms, nms
from edge_agent.pipeline.postprocess.ssd import SsdDecoder, grid_anchors, mediapipe_face_params, ssd_anchors
from edge_agent.pipeline.postprocess.tflite_postprocess import TflitePostprocessDecoder, postprocess_outputs
from edge_agent.pipeline.postprocess.yolo import YoloDecoder, names_from_metadata, yolo_layout
from edge_agent.pipeline.preprocess import Preprocessor, Transform

IDENTITY = Transform()


def constant_onnx(path: Path, outputs: dict[str, np.ndarray], size: tuple[int, int] = (32, 32),
                  metadata: dict[str, str] | None = None) -> Path:
    """An ONNX model taking float32 [1, 3, H, W] and returning the given
    constant outputs (plus 0 x the input's mean, so the input is used)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w, h = size
    nodes = [helper.make_node("ReduceMean", ["input"], ["mean"], keepdims=0),
             helper.make_node("Mul", ["mean", "zero"], ["nothing"])]
    inits = [numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    outs = []
    for i, (name, value) in enumerate(outputs.items()):
        inits.append(numpy_helper.from_array(value.astype(np.float32), f"c{i}"))
        nodes.append(helper.make_node("Add", [f"c{i}", "nothing"], [name]))
        outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape)))
    graph = helper.make_graph(nodes, "const", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, h, w])],
                              outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return path


def v5_rows(boxes: list[tuple[float, float, float, float]], obj: list[float], cls: list[int], scores: list[float],
            classes: int = 3, n: int = 64) -> np.ndarray:
    out = np.zeros((1, n, 5 + classes), np.float32)
    for i, (b, o, c, s) in enumerate(zip(boxes, obj, cls, scores)):
        out[0, i, :4] = b
        out[0, i, 4] = o
        out[0, i, 5 + c] = s
    return out


# ------------------------------------------------------------------ YOLO


def test_yolo_layout_tells_v5_from_v8_by_the_shape() -> None:
    assert yolo_layout([1, 6300, 85]) == {"objectness": True, "transposed": False, "classes": 80}
    assert yolo_layout([1, 84, 8400]) == {"objectness": False, "transposed": True, "classes": 80}
    assert yolo_layout([1, 84, 8400], num_labels=79) == {"objectness": True, "transposed": True, "classes": 79}
    assert yolo_layout([1, 1000]) is None and yolo_layout([1, 896, 16, 2]) is None
    assert yolo_layout([None, 84, None]) == {"objectness": False, "transposed": True, "classes": 80}  # dynamic export
    assert yolo_layout([1, None, 85]) == {"objectness": True, "transposed": False, "classes": 80}
    assert yolo_layout([1, None, None]) is None and yolo_layout([1, 3, 10]) is None


def test_yolov5_objectness_times_class_score_threshold_and_per_class_nms() -> None:
    params = YoloParams(objectness=True, transposed=False, coordinates="pixels", threshold=0.3, iou_threshold=0.5)
    dec = YoloDecoder(params, [TensorSpec(name="o", shape=[1, 64, 8], dtype="float32")], ["a", "b", "c"], (320, 320))
    out = v5_rows(
        [(100, 100, 40, 40), (102, 101, 40, 40), (101, 100, 40, 40), (200, 200, 20, 20), (50, 50, 10, 10)],
        obj=[0.9, 0.8, 0.9, 0.2, 0.9],
        cls=[0, 0, 1, 2, 2],
        scores=[0.9, 0.95, 0.5, 1.0, 0.3],
    )
    dets = dec([out], IDENTITY)["detections"]
    # 0.81 and 0.76 overlap (same class): one stays; 0.45 is another class: kept;
    # objectness 0.2 < 0.3: dropped; 0.27 < 0.3: dropped.
    assert [(d["label"], round(d["score"], 2)) for d in dets] == [("a", 0.81), ("b", 0.45)]
    assert dets[0]["box"] == [80.0, 80.0, 120.0, 120.0]
    assert dec([out], IDENTITY, threshold=0.8)["detections"][0]["label"] == "a"
    assert len(dec([out], IDENTITY, top_k=1)["detections"]) == 1


def test_yolov8_transposed_layout_decodes_like_the_same_boxes_in_rows() -> None:
    rows = np.zeros((64, 4 + 3), np.float32)
    rows[0] = [100, 100, 40, 40, 0.9, 0, 0]
    rows[1] = [200, 150, 60, 20, 0, 0, 0.7]
    params = YoloParams(objectness=False, transposed=True, coordinates="pixels")
    dec = YoloDecoder(params, [TensorSpec(name="o", shape=[1, 7, 64], dtype="float32")], None, (320, 320))
    dets = dec([rows.T[None]], IDENTITY)["detections"]
    assert [(d["label"], d["score"], d["box"]) for d in dets] == [
        ("0", 0.9, [80.0, 80.0, 120.0, 120.0]), ("2", 0.7, [170.0, 140.0, 230.0, 160.0])]


def test_yolo_normalised_coordinates_are_found_and_scaled_to_the_input() -> None:
    out = v5_rows([(0.5, 0.25, 0.1, 0.2)], obj=[1.0], cls=[1], scores=[0.9])
    for coords in ("auto", "normalized"):
        dec = YoloDecoder(YoloParams(objectness=True, transposed=False, coordinates=coords),
                          [TensorSpec(name="o", shape=[1, 64, 8], dtype="float32")], None, (320, 160))
        (det,) = dec([out], IDENTITY)["detections"]
        assert det["box"] == [144.0, 24.0, 176.0, 56.0]


def test_letterbox_is_undone_so_boxes_land_in_frame_pixels() -> None:
    """A 640x480 frame letterboxed into 320x320: scale 0.5, 40 px bands top and bottom."""
    pre = Preprocessor(Preprocessing(size=(320, 320), resize="letterbox", layout="nhwc"),
                       TensorSpec(name="i", shape=[1, 320, 320, 3], dtype="float32"))
    _, _, transform = pre.geometry(640, 480)
    dec = YoloDecoder(YoloParams(objectness=True, transposed=False, coordinates="pixels"),
                      [TensorSpec(name="o", shape=[1, 64, 8], dtype="float32")], None, (320, 320))
    # a box at input (100..140, 60..100) is frame (200..280, 40..120)
    (det,) = dec([v5_rows([(120, 80, 40, 40)], [1.0], [0], [1.0])], transform)["detections"]
    assert det["box"] == [200.0, 40.0, 280.0, 120.0]
    frame = np.zeros((480, 640, 3), np.uint8)
    frame[40:120, 200:280] = 255
    tensor, _ = pre(frame)
    ys, xs = np.nonzero(tensor[0, :, :, 0] > 0.5)
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (100, 140, 60, 100)


def test_names_from_ultralytics_metadata() -> None:
    assert names_from_metadata({"names": "{0: 'person', 1: 'bicycle', 3: 'motorcycle'}"}) == [
        "person", "bicycle", "", "motorcycle"]
    assert names_from_metadata({"names": "['a', 'b']"}) == ["a", "b"]
    assert names_from_metadata({"names": "__import__('os')"}) is None
    assert names_from_metadata({}) is None


# ------------------------------------------------------------------- NMS


def test_nms_keeps_the_best_of_overlapping_boxes_and_all_disjoint_ones() -> None:
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 200, (300, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 60, (300, 2))], axis=1).astype(np.float32)
    scores = rng.uniform(0, 1, 300).astype(np.float32)
    keep = nms(boxes, scores, 0.4)

    def iou(a: np.ndarray, b: np.ndarray) -> float:
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = w * h
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    # brute force: greedy by score
    expected: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        if all(iou(boxes[i], boxes[j]) <= 0.4 for j in expected):
            expected.append(int(i))
    assert keep.tolist() == expected
    assert nms(boxes, scores, 0.4, limit=3).tolist() == expected[:3]
    same = np.array([[0, 0, 10, 10], [1, 1, 10, 10]], np.float32)
    assert batched_nms(same, np.array([0.9, 0.8]), np.array([0, 1]), 0.3).tolist() == [0, 1]
    assert batched_nms(same, np.array([0.9, 0.8]), np.array([1, 1]), 0.3).tolist() == [0]


# ------------------------------------------------------------------- SSD


def test_mediapipe_anchors_reproduce_the_blazeface_grids() -> None:
    """BlazeFace's SsdAnchorsCalculatorOptions give the same 896 centres, in
    the same order, as the first bundles' grids (strides 8, 16; 2 and 6 per cell)."""
    options = ssd_anchors(mediapipe_face_params(128, 128))
    grids = grid_anchors(AnchorGridParams(), 128, 128)
    assert options.shape == grids.shape == (896, 4)
    np.testing.assert_allclose(options, grids, atol=1e-6)
    assert len(ssd_anchors(mediapipe_face_params(192, 192))) == 2016  # palm_detection_lite


def test_tf_object_detection_anchors_with_a_reduced_lowest_layer() -> None:
    """SSD MobileNet v2 COCO's anchor generator at 300x300: 1917 anchors,
    the first cell's three reduced boxes first (0.1, and 0.2 at ratios 2 and 0.5)."""
    p = SsdParams(num_layers=6, min_scale=0.2, max_scale=0.95, input_size_height=300, input_size_width=300,
                  strides=[16, 32, 64, 128, 256, 512], aspect_ratios=[1.0, 2.0, 0.5, 3.0, 0.3333],
                  reduce_boxes_in_lowest_layer=True, x_scale=10, y_scale=10, w_scale=5, h_scale=5)
    anchors = ssd_anchors(p)
    assert len(anchors) == 19 * 19 * 3 + (10 * 10 + 5 * 5 + 3 * 3 + 2 * 2 + 1) * 6 == 1917
    np.testing.assert_allclose(anchors[0], [0.5 / 19, 0.5 / 19, 0.1, 0.1], atol=1e-6)
    r = np.sqrt(2.0)
    np.testing.assert_allclose(anchors[1], [0.5 / 19, 0.5 / 19, 0.2 * r, 0.2 / r], atol=1e-6)


def test_ssd_decodes_yxhw_with_exponential_sizes_and_ignores_the_background() -> None:
    p = SsdParams(num_layers=1, min_scale=0.5, max_scale=0.5, input_size_height=100, input_size_width=200,
                  strides=[100], aspect_ratios=[1.0], interpolated_scale_aspect_ratio=0.0,
                  x_scale=10, y_scale=10, w_scale=5, h_scale=5, apply_exponential_on_box_size=True,
                  box_format="yxhw", score_activation="none", ignore_classes=[0], threshold=0.5)
    anchors = ssd_anchors(p)  # a 2x1 grid, one 0.5 x 0.5 box per cell
    assert anchors.tolist() == [[0.25, 0.5, 0.5, 0.5], [0.75, 0.5, 0.5, 0.5]]
    specs = [TensorSpec(name="boxes", shape=[1, 2, 4], dtype="float32"),
             TensorSpec(name="scores", shape=[1, 2, 3], dtype="float32")]
    dec = SsdDecoder(p.model_copy(update={"boxes_output": "boxes", "scores_output": "scores"}), specs,
                     ["background", "cat", "dog"], (200, 100))
    reg = np.zeros((1, 2, 4), np.float32)
    reg[0, 1] = [1.0, 0.0, 0.0, 5 * np.log(2.0)]  # dy 1/10 of the anchor height, width doubled
    scores = np.array([[[0.1, 0.8, 0.1], [0.9, 0.05, 0.6]]], np.float32)
    dets = dec([reg, scores], IDENTITY)["detections"]
    assert [(d["label"], d["score"]) for d in dets] == [("cat", 0.8), ("dog", 0.6)]
    assert dets[0]["box"] == [0.0, 25.0, 100.0, 75.0]  # the anchor itself: 100 x 50 px
    assert dets[1]["box"] == [50.0, 30.0, 250.0, 80.0]  # 5 px down, twice as wide


def test_a_bundle_of_the_first_format_still_opens_and_decodes_as_before(tmp_path: Path) -> None:
    """decoder "ssd_anchors" (or no decoder at all) keeps its meaning; the SSD
    family decodes it exactly as the MediaPipe options do."""
    for post in ({"decoder": "ssd_anchors", "threshold": 0.4}, {}):
        params = detect_params(post)
        assert isinstance(params, AnchorGridParams)
    specs = [TensorSpec(name="regressors", shape=[1, 896, 16], dtype="float32"),
             TensorSpec(name="classificators", shape=[1, 896, 1], dtype="float32")]
    rng = np.random.default_rng(1)
    reg = rng.normal(0, 20, (1, 896, 16)).astype(np.float32)
    reg[..., 2:4] = np.abs(reg[..., 2:4]) + 5
    logits = rng.normal(-2, 3, (1, 896, 1)).astype(np.float32)
    old = SsdDecoder(AnchorGridParams(), specs, ["face"], (128, 128))([reg, logits], IDENTITY)
    new = SsdDecoder(mediapipe_face_params(128, 128), specs, ["face"], (128, 128))([reg, logits], IDENTITY)
    assert old == new and len(old["detections"]) > 3
    with pytest.raises(ValueError, match="decoder 'centernet'"):
        detect_params({"decoder": "centernet"})


def test_the_first_format_decodes_the_real_blazeface_as_the_mediapipe_options_do(blazeface, assets) -> None:
    """The same check on the real BlazeFace's outputs for a real face (the
    astronaut), the first bundles' grids against the MediaPipe options."""
    import cv2

    tensor, transform = blazeface.preprocess(cv2.imread(str(assets["photos"] / "astronaut.jpg")))
    outputs = blazeface.runtime.infer(tensor)
    specs = blazeface.manifest.outputs
    old = SsdDecoder(AnchorGridParams(), specs, ["face"], (128, 128))(outputs, transform, threshold=0.3)
    new = SsdDecoder(mediapipe_face_params(128, 128), specs, ["face"], (128, 128))(outputs, transform, threshold=0.3)
    assert old == new and len(old["detections"]) >= 1


def test_anchors_that_do_not_fit_the_outputs_are_refused_at_load() -> None:
    specs = [TensorSpec(name="r", shape=[1, 900, 16], dtype="float32"),
             TensorSpec(name="c", shape=[1, 900, 1], dtype="float32")]
    with pytest.raises(ValueError, match="896 boxes but output 'r'"):
        SsdDecoder(mediapipe_face_params(128, 128), specs, None, (128, 128))


# ------------------------------------------------- TFLite_Detection_PostProcess


POSTPROCESS_SPECS = [
    TensorSpec(name="TFLite_Detection_PostProcess", shape=[1, 10, 4], dtype="float32"),
    TensorSpec(name="TFLite_Detection_PostProcess:1", shape=[1, 10], dtype="float32"),
    TensorSpec(name="TFLite_Detection_PostProcess:2", shape=[1, 10], dtype="float32"),
    TensorSpec(name="TFLite_Detection_PostProcess:3", shape=[1], dtype="float32"),
]


def test_tflite_postprocess_outputs_are_recognised_by_name_and_by_shape() -> None:
    assert postprocess_outputs(POSTPROCESS_SPECS) == {
        "boxes_output": "TFLite_Detection_PostProcess", "classes_output": "TFLite_Detection_PostProcess:1",
        "scores_output": "TFLite_Detection_PostProcess:2", "count_output": "TFLite_Detection_PostProcess:3"}
    shuffled = [s.model_copy(update={"name": n}) for s, n in zip(POSTPROCESS_SPECS, "wxyz")]
    assert postprocess_outputs([shuffled[3], shuffled[0], shuffled[1], shuffled[2]]) == {
        "boxes_output": "w", "classes_output": "x", "scores_output": "y", "count_output": "z"}
    assert postprocess_outputs(POSTPROCESS_SPECS[:3]) is None


def test_tflite_postprocess_keeps_count_rows_above_the_threshold_in_frame_pixels() -> None:
    dec = TflitePostprocessDecoder(TflitePostprocessParams(**postprocess_outputs(POSTPROCESS_SPECS)),
                                   POSTPROCESS_SPECS, ["person", "bicycle", "car"], (300, 300))
    boxes = np.zeros((1, 10, 4), np.float32)
    boxes[0, :3] = [[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.6, 0.6]]
    classes = np.array([[2, 0, 1] + [0] * 7], np.float32)
    scores = np.array([[0.6, 0.9, 0.3, 0.99] + [0.0] * 6], np.float32)  # row 3 is past the count
    transform = Transform(sx=2.0, sy=1.0)  # a 600x300 frame stretched to 300x300
    dets = dec([boxes, classes, scores, np.array([3.0], np.float32)], transform)["detections"]
    assert [(d["label"], d["score"]) for d in dets] == [("person", 0.9), ("car", 0.6)]
    assert dets[1]["box"] == [120.0, 30.0, 360.0, 150.0]
    assert len(dec([boxes, classes, scores, np.array([3.0])], transform, threshold=0.2)["detections"]) == 3


# ------------------------------------------------------------------ pack


def test_pack_recognises_a_yolov8_export_and_takes_its_names_from_the_metadata(tmp_path: Path) -> None:
    out = np.zeros((1, 4 + 3, 200), np.float32)
    out[0, :, 0] = [16, 16, 8, 8, 0, 0.9, 0]
    model = constant_onnx(tmp_path / "y8.onnx", {"output0": out},
                          metadata={"names": "{0: 'person', 1: 'car', 2: 'dog'}"})
    notes: list[str] = []
    bundle = pack(model, name="y8", version=1, out=tmp_path / "b", task="detect", notes=notes.append)
    assert any("YOLOv8/YOLO11" in n and "class names from the model's metadata (3)" in n for n in notes), notes
    with open_bundle(bundle) as opened:
        m: Manifest = opened.manifest
        assert isinstance(m.postprocessing, YoloParams) and m.postprocessing.transposed
        assert opened.labels() == ["person", "car", "dog"]
        post = make_postprocessor(m, opened.labels())
    (det,) = post([out], IDENTITY)["detections"]
    assert det["label"] == "car" and det["box"] == [12.0, 12.0, 20.0, 20.0]


def test_pack_refuses_a_detector_whose_outputs_fit_no_decoder_naming_the_shapes(tmp_path: Path) -> None:
    model = constant_onnx(tmp_path / "odd.onnx", {"heat": np.zeros((1, 17, 8, 8), np.float32)})
    with pytest.raises(BundleError, match=r"no detection decoder fits the model's outputs \(heat \[1, 17, 8, 8\]\)"):
        pack(model, name="odd", version=1, out=tmp_path / "b", task="detect")
    result = CliRunner().invoke(main, ["pack", str(model), "--name", "odd", "--version", "1",
                                       "--out", str(tmp_path / "c"), "--task", "detect"])
    assert result.exit_code == 2 and "heat [1, 17, 8, 8]" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    with pytest.raises(BundleError, match=r"--decoder yolo needs one output .* the model has heat \[1, 17, 8, 8\]"):
        pack(model, name="odd", version=1, out=tmp_path / "d", task="detect", decoder="yolo")


def test_pack_asks_for_anchors_by_name_and_takes_them_from_a_json_file(tmp_path: Path) -> None:
    boxes = np.zeros((1, 8, 4), np.float32)
    scores = np.full((1, 8, 2), -5.0, np.float32)
    scores[0, 3, 1] = 5.0
    model = constant_onnx(tmp_path / "ssd.onnx", {"scores": scores, "boxes": boxes}, size=(64, 32))
    with pytest.raises(BundleError, match="8 anchors: give --anchors FILE.json with the fields num_layers, min_scale"):
        pack(model, name="s", version=1, out=tmp_path / "b", task="detect")
    anchors = {"num_layers": 1, "min_scale": 0.5, "max_scale": 0.5, "strides": [16], "aspect_ratios": [1.0],
               "interpolated_scale_aspect_ratio": 0.0, "box_format": "yxhw", "ignore_classes": [0],
               "apply_exponential_on_box_size": True}
    (tmp_path / "a.json").write_text(json.dumps(anchors))
    runner = CliRunner()
    result = runner.invoke(main, ["pack", str(model), "--name", "s", "--version", "1", "--out", str(tmp_path / "c"),
                                  "--task", "detect", "--anchors", str(tmp_path / "a.json")])
    assert result.exit_code == 0, result.output
    assert "detector: ssd: raw SSD outputs" in result.output and "8 anchors from --anchors" in result.output
    with open_bundle(tmp_path / "c") as opened:
        p = opened.manifest.postprocessing
        assert isinstance(p, SsdParams) and (p.input_size_width, p.input_size_height) == (64, 32)
        assert (p.boxes_output, p.scores_output) == ("boxes", "scores")
        post = make_postprocessor(opened.manifest, None)
    (det,) = post([scores, boxes], IDENTITY)["detections"]  # model order: scores first
    # cell 3 of the 4x2 grid: centre (3.5/4, 0.5/2), a 0.5 x 0.5 box
    assert det["label"] == "1" and det["box"] == [40.0, 0.0, 72.0, 16.0]
    (tmp_path / "bad.json").write_text(json.dumps({**anchors, "strides": [16, 32]}))
    result = runner.invoke(main, ["pack", str(model), "--name", "s", "--version", "1", "--out", str(tmp_path / "d"),
                                  "--task", "detect", "--anchors", str(tmp_path / "bad.json")])
    assert result.exit_code == 2 and "strides has 2 entries; num_layers is 1" in result.output
    result = runner.invoke(main, ["pack", str(model), "--name", "s", "--version", "1", "--out", str(tmp_path / "e"),
                                  "--anchors", str(tmp_path / "a.json")])
    assert result.exit_code == 2 and "apply to --task detect" in result.output
