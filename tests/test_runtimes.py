"""Runtimes and postprocessing on the real models: MobileNetV2 through ONNX
Runtime, BlazeFace through LiteRT, plus the pieces (quantization, softmax,
top-k, load failures) that are checked numerically."""

from __future__ import annotations

import builtins
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.bundles import open_bundle
from edge_agent.bundles.manifest import ClassifyParams, Quantization, TensorSpec
from edge_agent.config import ModelConfig
from edge_agent.errors import InferenceError, ModelLoadError, RuntimeUnavailable
from edge_agent.models.servable import LoadedModel
from edge_agent.pipeline.postprocess import Classifier, softmax
from edge_agent.pipeline.preprocess import Transform
from edge_agent.runtimes import create_runtime
from edge_agent.runtimes.litert import interpreter_class, quantize
from edge_agent.testing import tiny_onnx_classifier

CAT_LABELS = {"Egyptian cat", "tabby", "tiger cat"}
LOGITS = TensorSpec(name="logits", shape=[1, 5], dtype="float32")


def photo(assets: dict[str, Path], name: str) -> np.ndarray:
    img = cv2.imread(str(assets["photos"] / f"{name}.jpg"))
    assert img is not None, name
    return img




# ------------------------------------------------------------ ONNX Runtime


def test_mobilenet_classifies_chelsea_as_a_cat(mobilenet: LoadedModel, assets: dict[str, Path]) -> None:
    """The end-to-end classify path (bundle -> preprocess -> ORT -> softmax/top-k -> labels) must get a real photo right."""
    out = mobilenet.process(photo(assets, "chelsea"))
    top = out.payload["top"]
    assert len(top) == 5
    assert top[0]["label"] in CAT_LABELS and top[0]["score"] > 0.5
    assert {t["label"] for t in top[:3]} == CAT_LABELS
    assert [t["score"] for t in top] == sorted((t["score"] for t in top), reverse=True)
    assert all(0.0 <= t["score"] <= 1.0 for t in top)
    assert out.latency_ms > 0 and 0 < out.infer_ms <= out.latency_ms


def test_mobilenet_classifies_coffee_as_espresso(mobilenet: LoadedModel, assets: dict[str, Path]) -> None:
    """A second, unrelated photo guards against a model that always answers 'cat'."""
    top = mobilenet.process(photo(assets, "coffee")).payload["top"]
    assert top[0]["label"] == "espresso" and top[0]["index"] == 967
    assert top[0]["score"] > 0.8


def test_per_call_top_k_and_threshold(mobilenet: LoadedModel, assets: dict[str, Path]) -> None:
    """Sources may override top_k/threshold; the override must apply to that call only."""
    img = photo(assets, "chelsea")
    assert len(mobilenet.process(img, top_k=2).payload["top"]) == 2
    high = mobilenet.process(img, top_k=5, threshold=0.5).payload["top"]
    assert len(high) == 1 and high[0]["label"] in CAT_LABELS
    assert len(mobilenet.process(img).payload["top"]) == 5


def test_onnx_runtime_direct_infer_and_wrong_input(mobilenet_bundle: Path) -> None:
    """The runtime returns float32 outputs in manifest order, and a wrong tensor is an InferenceError, not an ORT exception."""
    with open_bundle(mobilenet_bundle) as bundle:
        m = bundle.manifest
        runtime = create_runtime("onnx", bundle.model_path, m.inputs, m.outputs, threads=1)
        with pytest.raises(InferenceError, match="not loaded"):
            runtime.infer(np.zeros((1, 3, 224, 224), np.float32))
        runtime.load()
    (logits,) = runtime.infer(np.zeros((1, 3, 224, 224), np.float32))
    assert logits.shape == (1, 1000) and logits.dtype == np.float32
    with pytest.raises(InferenceError, match="onnxruntime failed on mobilenet_v2.onnx"):
        runtime.infer(np.zeros((1, 3, 100, 100), np.float32))
    runtime.close()
    runtime.close()  # safe twice
    with pytest.raises(InferenceError):
        runtime.infer(np.zeros((1, 3, 224, 224), np.float32))


def test_corrupt_onnx_is_model_load_error(tmp_path: Path) -> None:
    """A corrupt model file must fail at load with the agent's error (code model_load_failed), so a deploy can roll back."""
    good = tiny_onnx_classifier(tmp_path / "good.onnx")
    spec_in = TensorSpec(name="input", shape=[1, 3, 8, 8], dtype="float32")
    spec_out = TensorSpec(name="logits", shape=[1, 4], dtype="float32")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="bad.onnx") as info:
        create_runtime("onnx", bad, [spec_in], [spec_out]).load()
    assert info.value.code == "model_load_failed"
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01not a model" * 50)
    with pytest.raises(ModelLoadError):
        create_runtime("onnx", garbage, [spec_in], [spec_out]).load()


def test_unavailable_provider_is_reported(tmp_path: Path) -> None:
    """Asking for an accelerator that is not installed must say which providers exist instead of silently using none."""
    model = tiny_onnx_classifier(tmp_path / "tiny.onnx")
    runtime = create_runtime(
        "onnx",
        model,
        [TensorSpec(name="input", shape=[1, 3, 8, 8], dtype="float32")],
        [TensorSpec(name="logits", shape=[1, 4], dtype="float32")],
        providers=["NoSuchExecutionProvider"],
    )
    with pytest.raises(ModelLoadError, match="CPUExecutionProvider") as info:
        runtime.load()
    assert info.value.code == "provider_unavailable"


# ------------------------------------------------------------------ LiteRT


def test_blazeface_finds_the_astronauts_face(blazeface: LoadedModel, assets: dict[str, Path]) -> None:
    """The detect path (LiteRT, anchors, NMS, letterbox mapping) must find the one face, boxed in the 512x512 photo's pixels."""
    dets = blazeface.process(photo(assets, "astronaut")).payload["detections"]
    assert len(dets) == 1, dets
    (face,) = dets
    assert face["label"] == "face" and face["score"] > 0.8
    x0, y0, x1, y1 = face["box"]
    # Eileen Collins' face lies within x 150..310, y 50..220 of the 512x512 picture
    assert 150 <= x0 < x1 <= 310 and 50 <= y0 < y1 <= 220, face["box"]
    assert 60 <= x1 - x0 <= 160 and 60 <= y1 - y0 <= 160, face["box"]


def test_blazeface_box_follows_the_face_across_letterbox_padding(
    blazeface: LoadedModel, assets: dict[str, Path]
) -> None:
    """Moving the photo 64 px inside a wider frame must move the reported box by 64 px: boxes are in frame pixels, padding undone."""
    img = photo(assets, "astronaut")
    boxes = []
    for offset in (0, 64):
        canvas = np.full((512, 576, 3), 40, np.uint8)
        canvas[:, offset : offset + 512] = img
        (face,) = blazeface.process(canvas).payload["detections"]
        boxes.append(np.array(face["box"]))
    shift = boxes[1] - boxes[0]
    assert abs(shift[0] - 64) < 8 and abs(shift[2] - 64) < 8, shift
    assert abs(shift[1]) < 8 and abs(shift[3]) < 8, shift


def test_blazeface_finds_no_face_on_photos_without_people(blazeface: LoadedModel, assets: dict[str, Path]) -> None:
    """The score threshold must keep false positives out on photos without people."""
    for name in ("coffee", "rocket", "china", "dog"):
        assert blazeface.process(photo(assets, name)).payload["detections"] == [], name


def test_blazeface_scores_a_cat_face_far_below_a_human_face(blazeface: LoadedModel, assets: dict[str, Path]) -> None:
    """A cat's face is face-like to BlazeFace (about 0.5 whatever the resize
    filter); it must stay well below a real human face, so a threshold can
    separate them."""
    cat = blazeface.process(photo(assets, "chelsea"), threshold=0.0).payload["detections"]
    human = blazeface.process(photo(assets, "astronaut"), threshold=0.0).payload["detections"]
    assert human[0]["score"] > 0.9
    assert cat[0]["score"] < 0.6


def test_quantize_matches_the_affine_formula() -> None:
    """int8 inputs must be round(x / scale) + zero_point, saturated to the type's range: anything else shifts every pixel."""
    q = Quantization(scale=0.5, zero_point=10)
    x = np.array([0.0, 1.0, -1.0, 0.2, 0.3, 63.0, 100.0, -100.0], np.float32)
    out = quantize(x, q, np.dtype(np.int8))
    assert out.dtype == np.int8
    np.testing.assert_array_equal(out, [10, 12, 8, 10, 11, 127, 127, -128])
    u = quantize(np.array([-1.0, 0.0, 0.5, 1.0, 2.0], np.float32), Quantization(scale=1 / 128, zero_point=128), np.dtype(np.uint8))
    assert u.dtype == np.uint8
    np.testing.assert_array_equal(u, [0, 128, 192, 255, 255])


def test_quantize_round_trip_error_is_at_most_half_a_step(assets: dict[str, Path]) -> None:
    """On a real photo normalised to [-1, 1], dequantize(quantize(x)) must be within scale/2 of x."""
    img = cv2.imread(str(assets["photos"] / "astronaut.jpg")).astype(np.float32) / 127.5 - 1.0
    q = Quantization(scale=2.0 / 255.0, zero_point=0)
    back = (quantize(img, q, np.dtype(np.int8)).astype(np.float32) - q.zero_point) * q.scale
    assert np.abs(back - img).max() <= q.scale / 2 + 1e-6


def test_litert_missing_is_runtime_unavailable(monkeypatch: pytest.MonkeyPatch, blazeface_bundle: Path) -> None:
    """On a device without ai-edge-litert or tflite-runtime a TFLite bundle must fail with a message saying what to install, not an ImportError."""
    real_import = builtins.__import__

    def no_tflite(name, *args, **kwargs):
        if name.split(".")[0] in ("ai_edge_litert", "tflite_runtime"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    for mod in list(sys.modules):
        if mod.split(".")[0] in ("ai_edge_litert", "tflite_runtime"):
            monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(builtins, "__import__", no_tflite)

    with pytest.raises(RuntimeUnavailable) as info:
        interpreter_class()
    assert info.value.code == "runtime_unavailable"
    assert "ai-edge-litert" in str(info.value) and "tflite-runtime" in str(info.value)
    assert "pip install" in str(info.value)
    with open_bundle(blazeface_bundle) as bundle:
        with pytest.raises(RuntimeUnavailable):
            LoadedModel.load(bundle, ModelConfig(name="blazeface"))


def test_corrupt_tflite_is_model_load_error(tmp_path: Path) -> None:
    """A damaged .tflite must fail at load with the agent's own error."""
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"TFL3" + b"\x00" * 200)
    spec = TensorSpec(name="input", shape=[1, 128, 128, 3], dtype="float32")
    with pytest.raises(ModelLoadError, match="bad.tflite"):
        create_runtime("tflite", bad, [spec], [spec]).load()


# --------------------------------------------------- classification results


def classifier(labels=("a", "b", "c", "d", "e"), **params) -> Classifier:
    return Classifier(ClassifyParams(**params), [LOGITS], list(labels) if labels else None)


def test_softmax_auto_applies_to_logits() -> None:
    """Logits must be turned into probabilities so thresholds and scores mean the same for every model."""
    logits = np.array([[2.0, 1.0, 0.1, 3.0, -1.0]], np.float32)
    top = classifier(top_k=5)([logits], Transform())["top"]
    probs = softmax(logits[0].astype(np.float64))
    assert [t["index"] for t in top] == [3, 0, 1, 2, 4]
    assert [t["label"] for t in top] == ["d", "a", "b", "c", "e"]
    np.testing.assert_allclose([t["score"] for t in top], probs[[3, 0, 1, 2, 4]], atol=1e-6)
    assert abs(sum(t["score"] for t in top) - 1.0) < 1e-5


def test_softmax_auto_leaves_probabilities_alone() -> None:
    """A model that already ends in softmax must not be softmaxed twice (that flattens every score towards 1/N)."""
    probs = np.array([0.1, 0.6, 0.05, 0.2, 0.05], np.float32)
    top = classifier(top_k=3)([probs], Transform())["top"]
    assert [(t["label"], t["score"]) for t in top] == [("b", 0.6), ("d", 0.2), ("a", 0.1)]


def test_softmax_always_and_never() -> None:
    """The manifest can force either behaviour for models whose outputs fool the auto-detection."""
    probs = np.array([0.1, 0.6, 0.05, 0.2, 0.05], np.float32)
    always = classifier(top_k=1, softmax="always")([probs], Transform())["top"]
    assert always[0]["index"] == 1 and always[0]["score"] == pytest.approx(float(softmax(probs)[1]), abs=1e-6)
    logits = np.array([2.0, 1.0, 0.1, 3.0, -1.0], np.float32)
    never = classifier(top_k=2, softmax="never")([logits], Transform())["top"]
    assert [(t["index"], t["score"]) for t in never] == [(3, 3.0), (0, 2.0)]


def test_top_k_threshold_and_missing_labels() -> None:
    """top_k bounds the list, threshold drops weak classes, and a class without a label is reported by its index."""
    probs = np.array([0.05, 0.5, 0.3, 0.1, 0.05], np.float32)
    assert [t["index"] for t in classifier(top_k=10)([probs], Transform())["top"]] == [1, 2, 3, 0, 4]
    assert [t["index"] for t in classifier(top_k=5, threshold=0.2)([probs], Transform())["top"]] == [1, 2]
    assert classifier(top_k=5)([probs], Transform(), threshold=0.9)["top"] == []
    assert len(classifier(top_k=5)([probs], Transform(), top_k=2)["top"]) == 2
    unlabeled = classifier(labels=None, top_k=1)([probs], Transform())["top"]
    assert unlabeled == [{"label": "1", "index": 1, "score": 0.5}]
    short = classifier(labels=("a",), top_k=2)([probs], Transform())["top"]
    assert [t["label"] for t in short] == ["1", "2"]


def test_classifier_uses_the_named_output() -> None:
    """With several outputs the manifest's `output` picks the scores, not whatever comes first."""
    outs = [TensorSpec(name="features", shape=[1, 5], dtype="float32"), LOGITS]
    clf = Classifier(ClassifyParams(output="logits", top_k=1), outs, None)
    top = clf([np.array([9.0, 0, 0, 0, 0]), np.array([0.0, 0, 0, 0.9, 0.1])], Transform())["top"]
    assert top[0]["index"] == 3
    with pytest.raises(ValueError, match="'nope'"):
        Classifier(ClassifyParams(output="nope"), outs, None)
