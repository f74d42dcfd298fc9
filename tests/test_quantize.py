"""The quantizer: data loading, int8 ONNX, QDQ mixed precision, the report,
the quality gate, and the command line's handling of bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from edge_agent.bundle import open_bundle
from edge_agent.cli import main
from edge_agent.config import ModelConfig
from edge_agent.models.manager import LoadedModel
from edge_agent.testing import tiny_onnx_classifier
from quantize.data import TensorReader, load_samples, make_views
from quantize.errors import QuantizeInputError
from quantize.mixed import MixedPrecisionResult, divergence, rank_sensitivity, search
from quantize.onnx_int8 import OnnxInt8Quantizer
from quantize.qdq import QdqEditor

FMNIST_MEAN = "0.2860,0.2860,0.2860"
FMNIST_STD = "0.3530,0.3530,0.3530"
REPO = Path(__file__).resolve().parents[1]


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
    graph = helper.make_graph(
        nodes,
        "relu_convnet",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))
    return path


def _photo_tensors(assets: dict[str, Path], size: int = 16) -> np.ndarray:
    """Real photos, resized small, as NCHW float inputs in [0, 1]."""
    out = []
    for p in sorted(assets["photos"].glob("*.jpg"))[:12]:
        img = cv2.resize(cv2.imread(str(p)), (size, size), interpolation=cv2.INTER_AREA)
        out.append(img[:, :, ::-1].transpose(2, 0, 1).astype(np.float32) / 255.0)
    return np.stack(out)


def _run(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return np.stack([sess.run(None, {"input": x[i : i + 1]})[0][0] for i in range(len(x))])


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
    labels = (REPO / "scripts/data/imagenet_labels.txt").read_text().splitlines()
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
        "--labels", str(REPO / "scripts/data/fashion_mnist_labels.txt"), "--target", "onnx",
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    fp32, int8 = report["artifacts"]
    assert fp32["accuracy"] > 0.85
    assert fp32["accuracy"] - int8["accuracy"] <= 0.005
    assert int8["size_bytes"] / fp32["size_bytes"] < 0.3
    assert report["gate"]["passed"] and (out / "report.html").read_text().startswith("<!doctype html>")
    (bundle_dir,) = [Path(p) for p in report["bundles"]]
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


def test_mixed_precision_raises_agreement_to_the_target(tmp_path: Path, fashion_mnist: Path) -> None:
    """When plain int8 falls short, sensitive tensors are kept in float until
    the target is met on calibration data; the report names them."""
    out = tmp_path / "out"
    result = _cli(
        str(fashion_mnist / "cnn.onnx"), "--calibration", str(fashion_mnist / "calibration.npz"),
        "--eval", str(fashion_mnist / "test.npz"), "--out", str(out), "--mean", FMNIST_MEAN, "--std", FMNIST_STD,
        "--target", "onnx", "--min-agreement", "0.999", "--per-tensor", "--calibration-limit", "200",
    )
    report = json.loads((out / "report.json").read_text())
    mixed = report["details"]["onnx"]["mixed_precision"]
    if not mixed["needed"]:
        pytest.skip("plain int8 already met 99.9 % on calibration data")
    assert mixed["met"], mixed
    assert mixed["agreement_on_calibration"] >= 0.999
    assert 0 < len(mixed["float_nodes"]) < mixed["candidates"]
    assert mixed["agreement_on_calibration"] > report["details"]["onnx"]["agreement_on_calibration_full_int8"]
    assert result.exit_code in (0, 1)
