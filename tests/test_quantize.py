"""The quantizer: data loading, int8 ONNX, QDQ mixed precision, the report,
the quality gate, and the command line's handling of bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from edge_agent.bundles import open_bundle
from edge_agent.bundles.manifest import Preprocessing
from edge_agent.cli import main
from edge_agent.config import ModelConfig
from edge_agent.models.servable import LoadedModel
from edge_agent.testing import tiny_onnx_classifier
from quantize.data import Sample, TensorReader, load_samples, make_views
from quantize.evaluate import Artifact, evaluate
from quantize.report import floor_line
from quantize.errors import QuantizeError, QuantizeInputError
from quantize.mixed import MixedPrecisionResult, divergence, rank_sensitivity, search
from quantize.onnx_int8 import OnnxInt8Quantizer
from quantize.qdq import QdqEditor

FMNIST_MEAN = "0.2860,0.2860,0.2860"
FMNIST_STD = "0.3530,0.3530,0.3530"
REPO = Path(__file__).resolve().parents[1]


def _save_classifier(path: Path, name: str, nodes: list, inits: list, classes: int) -> Path:
    """Save a graph from ``input`` [1, 3, 16, 16] to ``logits`` [1, classes]."""
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])], inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def _relu_convnet(path: Path, seed: int = 0) -> Path:
    """Conv -> Relu -> Conv -> Add(residual) -> GlobalAveragePool -> Flatten -> Gemm."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, "W1"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) * 0.1, "B1"),
        numpy_helper.from_array(rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2, "W2"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) * 0.1, "B2"),
        numpy_helper.from_array(rng.standard_normal((5, 8)).astype(np.float32), "W3"),
        numpy_helper.from_array(rng.standard_normal(5).astype(np.float32) * 0.1, "B3"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Add", ["c2", "r1"], ["a"], name="add"),
        helper.make_node("GlobalAveragePool", ["a"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "W3", "B3"], ["logits"], transB=1, name="fc"),
    ]
    return _save_classifier(path, "relu_convnet", nodes, inits, 5)


def _photo_tensors(assets: dict[str, Path], size: int = 16) -> np.ndarray:
    """Real photos, resized small, as NCHW float inputs in [0, 1]."""
    out = []
    for p in sorted(assets["photos"].glob("*.jpg"))[:12]:
        img = cv2.resize(cv2.imread(str(p)), (size, size), interpolation=cv2.INTER_AREA)
        out.append(img[:, :, ::-1].transpose(2, 0, 1).astype(np.float32) / 255.0)
    return np.stack(out)


def _run(model: onnx.ModelProto | Path, x: np.ndarray, *, fuse: bool = True) -> np.ndarray:
    """The model's outputs for each row of ``x``. ``fuse=False`` runs the
    graph as written (no QDQ -> QLinear fusion): what the graph means,
    independent of the int8 kernels of this CPU (on x86 without VNNI,
    ONNX Runtime's u8s8 kernels saturate, so two equivalent graphs fused
    differently can differ)."""
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    options = ort.SessionOptions()
    if not fuse:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return np.stack([sess.run(None, {"input": x[i : i + 1]})[0][0] for i in range(len(x))])


def _accuracy(model: Path, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of a Fashion-MNIST model run as written (no fusion)."""
    x = ((images.astype(np.float32) / 255.0 - 0.286) / 0.353)[:, None]
    return float(np.mean(_run(model, x, fuse=False).argmax(axis=1) == labels))


def _int8_dot_exact() -> bool:
    """ONNX Runtime's u8s8 kernels are exact here: not x86, or x86 with VNNI."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


@pytest.fixture()
def quantized_convnet(tmp_path: Path, assets: dict[str, Path]):
    fp32 = _relu_convnet(tmp_path / "fp32.onnx")
    x = _photo_tensors(assets)
    q = OnnxInt8Quantizer(fp32, tmp_path)
    q.prepare()
    q.calibrate(TensorReader("input", x))
    full = q.quantize(tmp_path / "int8.onnx")
    return fp32, q, full, x


def test_qdq_model_with_everything_back_in_float_equals_fp32(quantized_convnet) -> None:
    """Mixed precision edits the QDQ graph; with every candidate in float it
    must be the fp32 model again (Relu kept, weights restored exactly)."""
    fp32, q, full, x = quantized_convnet
    editor = QdqEditor(onnx.load(str(full)), onnx.load(str(q.prepared)))
    kinds = {c.kind for c in editor.candidates}
    assert kinds == {"activation", "weights"}
    all_float = editor.with_float([c.id for c in editor.candidates])
    onnx.checker.check_model(all_float)
    np.testing.assert_allclose(_run(all_float, x), _run(fp32, x), rtol=1e-5, atol=1e-5)
    ops = {n.op_type for n in all_float.graph.node}
    assert "QuantizeLinear" not in ops and "Relu" in ops
    # and the fully quantized model really differs from fp32
    assert not np.allclose(_run(full, x), _run(fp32, x), atol=1e-4)


def test_floating_one_candidate_moves_outputs_towards_fp32(quantized_convnet) -> None:
    """Each candidate is one tensor: keeping the most harmful one in float
    must reduce the divergence from fp32."""
    fp32, q, full, x = quantized_convnet
    editor = QdqEditor(onnx.load(str(full)), onnx.load(str(q.prepared)))
    ref = _run(fp32, x)
    ids = [c.id for c in editor.candidates]
    ranking = rank_sensitivity(ids, lambda f: editor.with_float(list(f)), lambda m: _run(m, x), ref)
    assert [r[0] for r in ranking] and ranking[0][1] >= ranking[-1][1]
    worst = ranking[0][0]
    assert divergence(ref, _run(editor.with_float([worst]), x)) < divergence(ref, _run(full, x))


def test_search_finds_the_fewest_float_nodes() -> None:
    """The search is a pure function of the ranking and the measured
    agreement: here agreement reaches the target exactly at 5 nodes."""
    order = [(f"n{i}", float(10 - i)) for i in range(10)]
    reference = np.eye(20)[np.arange(20) % 20]  # 20 samples, distinct classes

    def build(ids):
        return len(ids)

    def outputs(k: int) -> np.ndarray:
        out = reference.copy()
        wrong = max(0, 10 - 2 * k)  # each float node fixes two samples
        out[:wrong] = np.roll(out[:wrong], 1, axis=1)
        return out

    result = search(order, build, outputs, reference, 1.0)
    assert isinstance(result, MixedPrecisionResult)
    assert result.met and result.float_nodes == [f"n{i}" for i in range(5)]
    unreachable = search(order, build, lambda k: np.roll(reference, 1, axis=1), reference, 0.9, max_nodes=4)
    assert not unreachable.met and len(unreachable.float_nodes) <= 4


def test_samples_from_folder_video_npz_and_class_folders(tmp_path: Path, assets: dict[str, Path]) -> None:
    """Calibration data comes in the forms users have; a corrupt picture is
    skipped and counted, not fatal."""
    folder = tmp_path / "pics"
    folder.mkdir()
    for p in sorted(assets["photos"].glob("*.jpg"))[:3]:
        shutil.copy(p, folder / p.name)
    (folder / "zz_broken.jpg").write_bytes(b"not a jpeg at all")
    got = load_samples(folder)
    assert len(got) == 3 and got.skipped == ["zz_broken.jpg"]

    classes = tmp_path / "classes"
    for name in ("tabby", "espresso"):
        (classes / name).mkdir(parents=True)
        cv2.imwrite(str(classes / name / "a.png"), np.full((8, 8, 3), 7, np.uint8))
    labels = (REPO / "testassets/data/imagenet_labels.txt").read_text().splitlines()
    labelled = load_samples(classes, labels=labels)
    assert sorted(s.label for s in labelled.samples) == sorted([labels.index("tabby"), labels.index("espresso")])

    video = load_samples(assets["demo_video"], stride=30)
    assert len(video) == 10

    npz = tmp_path / "d.npz"
    np.savez(npz, images=np.zeros((4, 28, 28), np.uint8), labels=np.arange(4))
    assert [s.label for s in load_samples(npz).samples] == [0, 1, 2, 3]

    views = make_views(cv2.imread(str(assets["photos"] / "chelsea.jpg")), 8)
    assert len(views) == 8 and views[1].shape == views[0].shape


def test_empty_or_unusable_calibration_is_a_usage_error(tmp_path: Path) -> None:
    """No usable picture at all is the user's mistake: a clear message, exit 2."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(QuantizeInputError) as err:
        load_samples(tmp_path / "empty")
    assert err.value.exit_code == 2 and "no usable pictures" in str(err.value)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(QuantizeInputError, match="1 unreadable"):
        load_samples(tmp_path / "bad")


def test_the_quantizer_imports_without_camera_or_mqtt_code() -> None:
    """The quantizer runs on a workstation: importing it must not pull in the agent's frame sources (cameras,
    streams) or its MQTT side, which it has no use for."""
    code = (
        "import sys, quantize.pipeline, quantize.data, quantize.tflite, quantize.prune;"
        "print(sorted(m for m in sys.modules if m.startswith(('edge_agent.sources', 'edge_agent.comms', 'paho'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip() == "[]", out


def _cli(*args: str):
    return CliRunner().invoke(main, ["quantize", *args], catch_exceptions=False)


def test_cli_bad_inputs_exit_2_with_a_clear_message(tmp_path: Path, assets: dict[str, Path]) -> None:
    """Not-a-model, unknown input size, and no calibration pictures each get
    one line and exit code 2, never a traceback."""
    pics = tmp_path / "pics"
    pics.mkdir()
    shutil.copy(assets["photos"] / "chelsea.jpg", pics)
    junk = tmp_path / "model.onnx"
    junk.write_bytes(b"\x00\x01 definitely not protobuf")
    result = _cli(str(junk), "--calibration", str(pics), "--out", str(tmp_path / "o1"))
    assert result.exit_code == 2 and "not a valid ONNX model" in result.output and "Traceback" not in result.output

    dynamic = tiny_onnx_classifier(tmp_path / "dyn.onnx", size=("W", "H"))
    result = _cli(str(dynamic), "--calibration", str(pics), "--out", str(tmp_path / "o2"))
    assert result.exit_code == 2 and "--size" in result.output

    (tmp_path / "empty").mkdir()
    static = tiny_onnx_classifier(tmp_path / "static.onnx", size=(8, 8))
    result = _cli(str(static), "--calibration", str(tmp_path / "empty"), "--out", str(tmp_path / "o3"))
    assert result.exit_code == 2 and "no usable pictures" in result.output


def test_fashion_mnist_int8_keeps_its_accuracy(tmp_path: Path, fashion_mnist: Path) -> None:
    """Real labelled data: the int8 ONNX bundle loses at most half a point of
    accuracy, is about a quarter of the size, carries its report, and the
    agent serves it."""
    out = tmp_path / "out"
    result = _cli(
        str(fashion_mnist / "cnn.onnx"), "--calibration", str(fashion_mnist / "calibration.npz"),
        "--eval", str(fashion_mnist / "test.npz"), "--out", str(out), "--mean", FMNIST_MEAN, "--std", FMNIST_STD,
        "--labels", str(REPO / "testassets/data/fashion_mnist_labels.txt"), "--target", "onnx",
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    fp32, int8 = report["artifacts"]
    assert fp32["accuracy"] > 0.85
    # The int8 graph itself (run as written: exact int8 arithmetic, what an
    # ARM device or an x86 CPU with VNNI computes) keeps accuracy within
    # half a point. The report measures with this machine's fused kernels:
    # on x86 without VNNI ONNX Runtime's u8s8 kernels saturate (measured on
    # an AVX2-only EPYC: 0.8835 fused against 0.8900 as written, fp32
    # 0.8895), so there the report may show up to a point less.
    (bundle_dir,) = [Path(p) for p in report["bundles"]]
    test = np.load(fashion_mnist / "test.npz")
    as_written = _accuracy(next(bundle_dir.glob("*.onnx")), test["images"], test["labels"])
    assert fp32["accuracy"] - as_written <= 0.005, as_written
    assert fp32["accuracy"] - int8["accuracy"] <= (0.005 if _int8_dot_exact() else 0.01)
    assert int8["size_bytes"] / fp32["size_bytes"] < 0.3
    assert report["gate"]["passed"] and (out / "report.html").read_text().startswith("<!doctype html>")
    with open_bundle(bundle_dir) as bundle:
        assert json.loads((bundle.root / "report.json").read_text())["gate"]["passed"]
        model = LoadedModel.load(bundle, ModelConfig(name=bundle.manifest.name, threads=1))
    images = np.load(fashion_mnist / "test.npz")
    hits = [model.process(images["images"][i]).payload["top"][0]["index"] == images["labels"][i] for i in range(50)]
    assert np.mean(hits) > 0.8


def test_gate_failure_exits_1_writes_the_report_and_no_bundle(tmp_path: Path, fashion_mnist: Path) -> None:
    """An artifact below the agreement target must not be packaged: exit 1,
    the report says which one failed."""
    out = tmp_path / "out"
    result = _cli(
        str(fashion_mnist / "cnn.onnx"), "--calibration", str(fashion_mnist / "calibration.npz"),
        "--eval", str(fashion_mnist / "test.npz"), "--out", str(out), "--mean", FMNIST_MEAN, "--std", FMNIST_STD,
        "--target", "onnx", "--min-agreement", "1.0", "--no-mixed-precision", "--method", "minmax", "--per-tensor",
    )
    report = json.loads((out / "report.json").read_text())
    if report["artifacts"][1]["agreement_top1"] == 1.0:
        pytest.skip("int8 happened to agree on every test image")
    assert result.exit_code == 1, result.output
    assert "quality gate failed" in result.output
    assert not report["gate"]["passed"] and report["gate"]["failing"] == ["int8 onnx"]
    assert not [p for p in out.iterdir() if p.is_dir()]


def _outlier_net(path: Path, wide: float = 300.0, seed: int = 0) -> Path:
    """conv0 -> Relu -> conv1 -> Relu -> pool -> Gemm, where channel 0 of
    conv0 is ``wide`` times wider than the others and conv1 reads it
    ``wide`` times weaker: in fp32 every channel counts, but one int8 scale
    for the Relu output (per tensor, as int8 activations are) is set by
    channel 0 and rounds the other seven to a few steps. No exact rescaling
    fixes it (the Relu is between the convolutions, so equalization leaves it
    alone): only keeping that tensor in float does."""
    rng = np.random.default_rng(seed)
    w0 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3
    b0 = rng.standard_normal(8).astype(np.float32) * 0.1
    w0[0] *= wide
    b0[0] *= wide
    w1 = rng.standard_normal((16, 8, 1, 1)).astype(np.float32) * 0.5
    w1[:, 0] /= wide
    inits = [
        numpy_helper.from_array(w0, "W0"),
        numpy_helper.from_array(b0, "B0"),
        numpy_helper.from_array(w1, "W1"),
        numpy_helper.from_array(rng.standard_normal(16).astype(np.float32) * 0.1, "B1"),
        numpy_helper.from_array(rng.standard_normal((10, 16)).astype(np.float32), "W2"),
        numpy_helper.from_array(np.zeros(10, np.float32), "B2"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "W0", "B0"], ["c0"], pads=[1, 1, 1, 1], name="conv0"),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "W1", "B1"], ["c1"], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("GlobalAveragePool", ["r1"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "W2", "B2"], ["logits"], transB=1, name="fc"),
    ]
    return _save_classifier(path, "outlier_net", nodes, inits, 10)


def _varied_pictures(path: Path, count: int, seed: int) -> Path:
    """Pictures of one random colour each, with noise: the model's top-1
    varies from one to the next."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (count, 1, 1, 3))
    noise = rng.integers(-60, 60, (count, 16, 16, 3))
    np.savez(path, images=np.clip(base + noise, 0, 255).astype(np.uint8))
    return path


# The TFLite run converts with TensorFlow (the converter's environment in the
# asset cache), seconds per model: an integration test, as conftest.py marks
# the tests that take the converter_env fixture.
@pytest.mark.parametrize("target", ["onnx", pytest.param("tflite", marks=pytest.mark.integration)])
def test_mixed_precision_raises_agreement_to_the_target(tmp_path: Path, target: str) -> None:
    """Plain int8 of a model with one badly scaled activation falls well
    short of the target (the gate fails without mixed precision); with it,
    the search keeps that part in float, the target is met on the
    calibration data and on the disjoint evaluation set, and the report
    names what was kept and what it cost in latency. For both runtimes."""
    if target == "tflite":
        from quantize.tflite import find_converter_env

        try:
            find_converter_env()
        except QuantizeError as exc:
            pytest.skip(f"{exc} (scripts/test.sh creates it)")
    model = _outlier_net(tmp_path / "outlier.onnx")
    cal = _varied_pictures(tmp_path / "cal.npz", 200, seed=1)
    ev = _varied_pictures(tmp_path / "eval.npz", 200, seed=2)
    common = [str(model), "--calibration", str(cal), "--eval", str(ev), "--target", target, "--min-agreement", "0.95"]
    label = f"int8 {target}"

    plain = _cli(*common, "--out", str(tmp_path / "plain"), "--no-mixed-precision")
    plain_report = json.loads((tmp_path / "plain" / "report.json").read_text())
    assert plain.exit_code == 1, plain.output
    assert "quality gate failed" in plain.output
    plain_int8 = {a["label"]: a for a in plain_report["artifacts"]}[label]
    assert plain_int8["agreement_top1"] < 0.9, plain_int8

    result = _cli(*common, "--out", str(tmp_path / "mixed"))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "mixed" / "report.json").read_text())
    details = report["details"][target]
    if target == "onnx":
        mixed = details["mixed_precision"]
        assert mixed["needed"] and mixed["met"], mixed
        full_int8 = details["agreement_on_calibration_full_int8"]
        assert "act:r0" in mixed["float_nodes"]  # the badly scaled tensor
        assert 0 < len(mixed["float_nodes"]) < mixed["candidates"]
        assert {"conv0", "conv1"} <= set(mixed["float_compute_nodes"])
        assert "fc" not in mixed["float_compute_nodes"]
        assert "mixed precision, int8 onnx: 4 of 7 tensors in float" in result.output
    else:
        mixed = details
        assert mixed["target_met_on_calibration"], mixed
        full_int8 = mixed["trials"][0]["agreement"]
        assert mixed["trials"][0]["float_nodes"] == 0
        assert 0 < len(mixed["float_nodes"]) < 4
        assert "mixed precision, int8 tflite: " in result.output
    assert full_int8 < 0.9, full_int8
    assert mixed["agreement_on_calibration"] >= 0.95 > full_int8
    assert f"agreement on the calibration pictures {100 * full_int8:.1f}% -> " in result.output
    evaluated = {a["label"]: a for a in report["artifacts"]}[label]
    assert evaluated["agreement_top1"] >= 0.95 > plain_int8["agreement_top1"], evaluated
    floor = report["evaluation"]["fp32_noise_floor"]
    assert floor["samples"] == 200 and 0 < floor["stable_samples"] <= 200 and 0 < floor["agreement"] <= 1
    assert evaluated["agreement_top1_stable"] is not None
    assert "fp32 against itself with +-1 grey level of pixel noise" in result.output
    # What mixed precision cost in latency, against the fully int8 model.
    cost = mixed["latency"]
    assert cost["full_int8_ms"] > 0 and cost["mixed_ms"] > 0 and cost["threads"] == 1
    assert cost["cost_ms"] == pytest.approx(cost["mixed_ms"] - cost["full_int8_ms"], abs=0.002)
    assert "(target met); latency" in result.output


# --------------------------------------------------------------- int8 quality


def _residual_convnet(path: Path, seed: int = 1, wide_channel: float = 20.0) -> Path:
    """conv0 -> [conv1 + x] -> [conv2 + prev] -> conv3 -> Relu -> pool ->
    Gemm: two chained residual Adds (a linear stream from conv0 to conv3),
    channel 0 of the stream much wider than the others (as in MobileNetV2's
    late stages)."""
    rng = np.random.default_rng(seed)
    w0 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3
    b0 = rng.standard_normal(8).astype(np.float32) * 0.1
    w0[0] *= wide_channel
    b0[0] *= wide_channel
    inits = [
        numpy_helper.from_array(w0, "W0"),
        numpy_helper.from_array(b0, "B0"),
        numpy_helper.from_array(rng.standard_normal((8, 8, 1, 1)).astype(np.float32) * 0.3, "W1"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) * 0.1, "B1"),
        numpy_helper.from_array(rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.1, "W2"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) * 0.1, "B2"),
        numpy_helper.from_array(rng.standard_normal((5, 8)).astype(np.float32), "W3"),
        numpy_helper.from_array(rng.standard_normal(5).astype(np.float32) * 0.1, "B3"),
        numpy_helper.from_array(rng.standard_normal((8, 8, 1, 1)).astype(np.float32) * 0.3, "W4"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) * 0.1, "B4"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "W0", "B0"], ["c0"], pads=[1, 1, 1, 1], name="conv0"),
        helper.make_node("Conv", ["c0", "W1", "B1"], ["c1"], name="conv1"),
        helper.make_node("Add", ["c1", "c0"], ["a1"], name="add1"),
        helper.make_node("Conv", ["a1", "W2", "B2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Add", ["c2", "a1"], ["a2"], name="add2"),
        helper.make_node("Conv", ["a2", "W4", "B4"], ["c3"], name="conv3"),
        helper.make_node("Relu", ["c3"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "W3", "B3"], ["logits"], transB=1, name="fc"),
    ]
    return _save_classifier(path, "residual_convnet", nodes, inits, 5)


def test_noise_floor_finds_the_pictures_fp32_itself_cannot_decide(tmp_path: Path) -> None:
    """A model whose class is "mean red above or below mid-grey": pictures
    of exactly mid-grey on average are ties that one grey level of noise
    flips, clearly dark or bright ones never flip. The floor says fp32
    disagrees with itself on the ties only, and agreement on the stable
    pictures leaves the ties out."""
    weights = np.array([[1, 0, 0], [0, 0, 0]], np.float32)
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "W", "B"], ["logits"], transB=1),
    ]
    path = _save_classifier(tmp_path / "grey.onnx", "grey", nodes, [
        numpy_helper.from_array(weights, "W"), numpy_helper.from_array(np.array([-0.5, 0], np.float32), "B"),
    ], 2)
    checker = np.indices((16, 16)).sum(axis=0) % 2  # half the pixels 127, half 128: mean exactly mid-grey
    ties = [np.repeat((127 + checker)[..., None], 3, axis=2).astype(np.uint8) for _ in range(8)]
    clear = [np.full((16, 16, 3), v, np.uint8) for v in (40, 60, 200, 220)]
    samples = [Sample(f"s{i}", im) for i, im in enumerate(ties + clear)]
    pre = Preprocessing(size=(16, 16))
    metrics, floor = evaluate([Artifact("fp32", path, pre), Artifact("copy", path, pre)], samples, latency_runs=1,
                              noise_draws=5)
    assert floor is not None
    assert floor.stable[8:].all()  # clear pictures never flip
    assert floor.stable[:8].sum() <= 2  # ties flip (each stays put in 5 draws 1 time in 32)
    assert 0.3 < floor.agreement < 1.0
    assert floor.to_dict()["samples"] == 12 and floor.to_dict()["stable_samples"] == int(floor.stable.sum())
    assert metrics[1].agreement_top1 == 1.0 and metrics[1].agreement_top1_stable == 1.0
    # The terminal line warns when the gate leaves less room than the pictures' own noise.
    assert "note: fp32 disagrees with itself" in floor_line(floor, metrics, 0.95)
    clear_metrics, clear_floor = evaluate([Artifact("fp32", path, pre)], samples[8:], latency_runs=1, noise_draws=5)
    assert clear_floor is not None and clear_floor.agreement == 1.0
    assert "note:" not in floor_line(clear_floor, clear_metrics, 0.95)


def test_equalize_is_exact_in_fp32_and_narrows_the_wide_channel(tmp_path: Path, assets: dict[str, Path]) -> None:
    from quantize.equalize import channel_absmax, equalize, find_streams

    fp32 = onnx.load(str(_residual_convnet(tmp_path / "fp32.onnx")))
    x = _photo_tensors(assets)
    feeds = [{"input": x[i : i + 1]} for i in range(len(x))]
    (stream,) = find_streams(fp32)
    assert set(stream.tensors) == {"c0", "c1", "a1", "c2", "a2"}
    assert set(stream.writers) == {"conv0", "conv1", "conv2"} and set(stream.readers) == {"conv1", "conv2", "conv3"}
    before = channel_absmax(fp32, ["a1"], feeds)["a1"]
    model, done = equalize(fp32, feeds)
    after = channel_absmax(model, ["a1"], feeds)["a1"]
    np.testing.assert_allclose(_run(model, x), _run(fp32, x), rtol=1e-4, atol=1e-4)
    assert done and after.max() / np.median(after) < before.max() / np.median(before)


def test_bias_correction_removes_the_mean_error_of_a_layer(tmp_path: Path, assets: dict[str, Path]) -> None:
    from quantize.bias_correction import apply_deltas, bias_deltas

    fp32_path = _relu_convnet(tmp_path / "fp32.onnx")
    x = _photo_tensors(assets)
    q = OnnxInt8Quantizer(fp32_path, tmp_path / "w", bias_correction=False, equalize=False)
    q.workdir.mkdir()
    q.prepare()
    q.calibrate(TensorReader("input", x))
    fp32, qdq = onnx.load(str(q.prepared)), onnx.load(str(q.quantize(tmp_path / "int8.onnx")))
    feeds = [{"input": x[i : i + 1]} for i in range(len(x))]
    deltas = bias_deltas(fp32, qdq, feeds)
    assert set(deltas) == {"B1", "B2", "B3"} and all(np.isfinite(d).all() for d in deltas.values())
    # the first layer's input does not depend on any bias: measuring it again
    # on the corrected model gives the same correction
    again = bias_deltas(apply_deltas(fp32, deltas), qdq, feeds)
    np.testing.assert_allclose(again["B1"], deltas["B1"], atol=1e-5)
    corrected = OnnxInt8Quantizer(fp32_path, tmp_path / "w2", equalize=False)
    corrected.workdir.mkdir()
    corrected.prepare()
    corrected.calibrate(TensorReader("input", x))
    ref = _run(fp32_path, x)
    before = np.abs((_run(qdq, x) - ref).mean(axis=0)).mean()
    after = np.abs((_run(corrected.quantize(tmp_path / "bc.onnx"), x) - ref).mean(axis=0)).mean()
    assert after < before  # the logits' mean shift shrinks
    assert corrected.notes["bias_correction"]["layers"] == 3


def test_float_residuals_outputs_and_compact(tmp_path: Path, assets: dict[str, Path]) -> None:
    """The Add chain reads float, the logits are not rounded, and the
    compacted file is smaller and computes the same."""
    from quantize.qdq import compact, float_outputs, float_residuals

    fp32 = _residual_convnet(tmp_path / "fp32.onnx")
    x = _photo_tensors(assets)
    q = OnnxInt8Quantizer(fp32, tmp_path / "w", bias_correction=False, equalize=False, float_residual=False)
    q.workdir.mkdir()
    q.prepare()
    q.calibrate(TensorReader("input", x))
    plain = onnx.load(str(q.quantize(tmp_path / "int8.onnx")))
    assert q.notes["float_outputs"] == 1  # always on
    producer = {o: n for n in plain.graph.node for o in n.output}
    assert producer["logits"].op_type == "Gemm"

    res, changed = float_residuals(plain)
    assert changed == 1
    add2 = next(n for n in res.graph.node if n.name == "add2")
    assert "a1" in add2.input  # the float sum, not its DequantizeLinear
    assert float_outputs(res)[1] == 0  # nothing left to do

    keep = {o for n in onnx.load(str(q.prepared)).graph.node for o in n.output}
    small = compact(res, keep)
    assert len(small.SerializeToString()) < len(res.SerializeToString())
    np.testing.assert_allclose(_run(small, x, fuse=False), _run(res, x, fuse=False), rtol=1e-5, atol=1e-5)
    assert "c1" in {o for n in small.graph.node for o in n.output}  # fp32 names kept
    zps = [n for n in small.graph.node if n.op_type == "DequantizeLinear" and len(n.input) == 2]
    assert zps  # zero points of int8 weights / int32 biases dropped


def test_relu_input_and_output_are_one_candidate(quantized_convnet) -> None:
    fp32, q, full, x = quantized_convnet
    editor = QdqEditor(onnx.load(str(full)), onnx.load(str(q.prepared)))
    acts = {c.id: c for c in editor.candidates if c.kind == "activation"}
    assert "act:c1" not in acts and acts["act:r1"].members == ("act:c1",)
    assert "act:f" not in acts or "act:p" not in acts  # pool -> Flatten share one range
    assert editor.float_compute("act:r1") >= {"conv1", "conv2"}
    assert editor.float_compute("weights:conv2") == {"conv2"}


def test_node_macs_and_mixed_precision_order() -> None:
    from quantize.mixed import closed_prefixes, cost_aware, search_stable
    from quantize.qdq import node_macs

    model = onnx.load_from_string(
        helper.make_model(
            helper.make_graph(
                [helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1], name="c"),
                 helper.make_node("Gemm", ["f", "G"], ["z"], transB=1, name="g")],
                "m",
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
                 helper.make_tensor_value_info("f", TensorProto.FLOAT, [1, 16])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8]),
                 helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 10])],
                [numpy_helper.from_array(np.zeros((4, 3, 3, 3), np.float32), "W"),
                 numpy_helper.from_array(np.zeros((10, 16), np.float32), "G")],
            ),
            opset_imports=[helper.make_opsetid("", 17)],
        ).SerializeToString()
    )
    assert node_macs(model) == {"c": 4 * 8 * 8 * 27, "g": 160}

    ranking = [("big", 4.0), ("small", 3.0), ("inside", 0.5), ("other", 0.1)]
    cost = {"big": 100.0, "small": 1.0, "inside": 0.0, "other": 5.0}
    order = [c for c, _ in cost_aware(ranking, cost, overhead=1.0)]
    assert order[:2] == ["small", "inside"] and order[-1] in ("big", "other")
    compute = {"big": {"n1", "n2"}, "small": {"n3"}, "inside": {"n2"}, "other": {"n4"}}.__getitem__
    sets = closed_prefixes(["big", "small", "inside", "other"], compute, 4)
    assert sets[0] == [] and set(sets[1]) == {"big", "inside"}  # inside n2: taken along for free
    assert len(sets) == 4  # the prefix of 3 adds nothing new

    reference = np.eye(10)
    agreement = {0: 0.5, 1: 1.0, 2: 0.8, 3: 1.0, 4: 1.0}

    def outputs(k: int) -> np.ndarray:
        out = reference.copy()
        wrong = int(round((1 - agreement[k]) * 10))
        out[:wrong] = np.roll(out[:wrong], 1, axis=1)
        return out

    lucky = [["a"] * k for k in range(5)]
    result = search_stable(lucky, len, outputs, reference, 0.95)
    assert result.met and len(result.float_nodes) == 3  # 1 touched the target once only
    assert [k for k, _ in result.tried] == [0, 1, 2, 3, 4]


def test_first_stable_skips_a_lucky_count() -> None:
    from quantize.mixed import first_stable

    curve = [0.80, 0.97, 0.90, 0.97, 0.98, 0.99]
    calls: list[int] = []

    def agree(k: int) -> float:
        calls.append(k)
        return curve[k]

    assert first_stable(5, agree, 0.97) == (3, True)
    assert calls == [0, 1, 2, 3, 4]  # stops as soon as 3 is confirmed
    assert first_stable(5, curve.__getitem__, 0.97, confirm=0) == (1, True)
    assert first_stable(2, curve.__getitem__, 0.99) == (1, False)  # best of 0..2
    assert first_stable(1, curve.__getitem__, 0.97) == (1, True)  # the last count needs no confirmation


def test_weights_stored_as_int8_are_expanded_to_float_before_quantizing(tmp_path: Path) -> None:
    """A weight-only quantized model (int8 weights behind a constant
    DequantizeLinear, as a TFLite "dynamic range" export converted to ONNX
    stores them: the registry's YOLOv5s) is turned into the same function
    with float32 weights, per-axis scales included, so that the quantizers
    see one plain float model (onnx2tf converts such weights wrongly)."""
    from quantize.onnx_int8 import dequantize_weights

    rng = np.random.default_rng(3)
    q = rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8)
    scale = np.array([0.01, 0.02, 0.005, 0.03], dtype=np.float32)
    inits = [numpy_helper.from_array(q, "Wq"), numpy_helper.from_array(scale, "Ws"),
             numpy_helper.from_array(np.zeros(4, np.int8), "Wz")]
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "Ws", "Wz"], ["W"], axis=0),
             helper.make_node("Conv", ["input", "W"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "wq", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"input": x})[0]
    assert dequantize_weights(model) == 1
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["Conv"]
    assert {i.name for i in model.graph.initializer} == {"W"}
    after = ort.InferenceSession(model.SerializeToString()).run(None, {"input": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)
    assert dequantize_weights(model) == 0  # nothing left to fold
